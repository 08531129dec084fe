"""lm-eval's own command line evaluates a Locas adapter (``--model_args pretrained=BASE,peft=ADAPTER``) exactly as the
merged checkpoint, as docs/guides/lm-eval.md shows: lm-eval never imports peft_locas, so this is the ``.pth`` autoload
at work. Tiny offline model, the guide's YAML task over a JSONL file this test writes (``dataset_path: json``);
nothing is downloaded."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from tiny_checkpoint import WORDS, make_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_locas import LocasConfig
from peft_locas._hook import NO_AUTOLOAD_ENV

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guides" / "lm-eval.md"
DATA = "/path/to/my_task.jsonl"  # the guide's task file reads its questions from there


def write_task(folder: Path, docs: int = 8, seed: int = 0) -> Path:
    """The guide's task (its YAML block, ``my_task``) over questions in its format: eight words of the tiny vocabulary,
    then which of three words comes next."""
    text = GUIDE.read_text(encoding="utf-8")
    task = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert f"test: {DATA}" in task and task.startswith("task: my_task\n")
    rng = random.Random(seed)
    rows = [
        {"context": " ".join(rng.choices(WORDS, k=8)), "choices": rng.sample(WORDS, 3), "label": rng.randrange(3)}
        for _ in range(docs)
    ]
    folder.mkdir()
    (folder / "my_task.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "my_task.yaml").write_text(task.replace(DATA, str(folder / "my_task.jsonl")))
    return folder


def lm_eval(model_args: str, tasks: Path, out: Path) -> subprocess.Popen:
    """Start ``lm_eval --model hf ... --log_samples --output_path out`` (the console script, as a user types it),
    offline, with its own Hugging Face cache beside ``out``."""
    script = Path(sys.executable).with_name("lm_eval")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lm_eval"]
    command += ["--model", "hf", "--model_args", model_args, "--tasks", "my_task", "--include_path", str(tasks)]
    command += ["--device", "cpu", "--batch_size", "4", "--log_samples", "--output_path", str(out)]
    env = {k: v for k, v in os.environ.items() if k != NO_AUTOLOAD_ENV}
    env.update(HF_HOME=f"{out}-cache", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.update(TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def samples(out: Path) -> dict[int, dict]:
    (path,) = out.rglob("samples_my_task_*.jsonl")
    return {row["doc_id"]: row for row in map(json.loads, path.read_text().splitlines())}


def test_lm_eval_cli_scores_an_adapter_as_its_merged_checkpoint(tmp_path):
    """The guide's two commands (adapter, merged checkpoint) on its task format give the same per-sample scores."""
    guide = " ".join(GUIDE.read_text(encoding="utf-8").replace("\\\n", " ").split())
    assert "lm_eval --model hf --model_args pretrained=HuggingFaceTB/SmolLM2-135M-Instruct,peft=my-memory," in guide
    assert "--tasks my_task --include_path my_tasks --device cpu --batch_size 8 --log_samples --output_path" in guide
    base = make_checkpoint(tmp_path / "base")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LocasConfig(r=8))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a memory that changes the scores (a fresh one is a no-op)
        for name, param in model.named_parameters():
            if name.endswith(".value"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save_pretrained(tmp_path / "adapter")
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp_path / "merged")
    ids = torch.arange(1, 17)[None]
    with torch.no_grad():
        moved = (merged(ids).logits - AutoModelForCausalLM.from_pretrained(base)(ids).logits).abs().max()
    assert moved > 0.1, "the memory must change the model, or the comparison below proves nothing"

    tasks = write_task(tmp_path / "tasks")
    runs = {  # side by side: each is mostly interpreter and library start-up
        "adapter": lm_eval(f"pretrained={base},peft={tmp_path / 'adapter'},dtype=float32", tasks, tmp_path / "a"),
        "merged": lm_eval(f"pretrained={tmp_path / 'merged'},dtype=float32", tasks, tmp_path / "m"),
    }
    for name, run in runs.items():
        output, _ = run.communicate(timeout=600)
        assert run.returncode == 0, f"lm_eval ({name}) failed:\n{output[-4000:]}"

    adapter, reference = samples(tmp_path / "a"), samples(tmp_path / "m")
    assert sorted(adapter) == sorted(reference) == list(range(8))
    for doc_id, row in adapter.items():
        other = reference[doc_id]
        assert row["doc"] == other["doc"] and row["arguments"] == other["arguments"] and row["acc"] == other["acc"]
        # each choice: [log-likelihood, is-greedy], as strings
        assert [greedy for _, greedy in row["filtered_resps"]] == [greedy for _, greedy in other["filtered_resps"]]
        scores = [float(loglik) for loglik, _ in row["filtered_resps"]]
        assert scores == pytest.approx([float(loglik) for loglik, _ in other["filtered_resps"]], abs=1e-4), doc_id
