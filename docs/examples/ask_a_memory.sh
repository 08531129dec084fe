# --8<-- [start:locomo]
# memorise one LoCoMo conversation (your copy of locomo10.json): its rendered text, chunked at turn starts
peft-locas memorize --text locomo10.json --sample conv-26 --out conv26-memory --compare-baseline

# ask it questions, with the last 1,024 tokens of the conversation in the prompt (read through the model once)
peft-locas ask --adapter conv26-memory --context-tokens 1024 \
    --question "What did Melanie do after the road trip to relax?" \
    --question "What did the charity race raise awareness for?" \
    --question "Where did Caroline move from 4 years ago?"
# --8<-- [end:locomo]

# --8<-- [start:questions]
# every question of the sample, from memory alone: JSON lines with the gold answer and LoCoMo's F1
peft-locas ask --adapter conv26-memory --questions locomo10.json --sample conv-26 --out conv26-answers.jsonl
# --8<-- [end:questions]

# --8<-- [start:own]
# a conversation of your own (turns JSONL), memorised by self-distillation from the model reading 4,096 tokens
peft-locas memorize --text dialogue.jsonl --out dialogue-memory --objective distill --teacher-context-tokens 4096

# questions from a JSONL file, with a whole (short) conversation file as the context
peft-locas ask --adapter dialogue-memory --questions questions.jsonl --context dialogue.jsonl
# --8<-- [end:own]

# --8<-- [start:chat]
# an interactive chat: answers stream as they are generated, follow-ups see the earlier turns; Ctrl-D leaves
peft-locas chat --adapter conv26-memory --context-tokens 1024
# --8<-- [end:chat]
