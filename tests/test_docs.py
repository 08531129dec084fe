"""The docs cannot drift from the code, and read on GitHub as they do on the site.

- Every page carries its code and tables inline: no ``--8<--`` include markers (GitHub shows the marker, not the code),
  and the results page holds the tables ``benchmarks/report.py`` renders from the committed results.
- The Python blocks of a page are one script: they run in order, in one namespace, in an empty folder. The
  ``peft-locas`` commands of the shell blocks run too, and the distributed guide's script runs under ``torchrun``.
- The README's quick start runs as written, in a fresh interpreter.
- Every public name is in the API reference, every error message quoted in the troubleshooting page still exists, and
  ``mkdocs build --strict`` passes.

How the code finds a model offline: it loads what a reader's code loads, ``assets.default_model_dir()`` (the
SmolLM2-135M-Instruct that ``peft-locas assets`` prepares) and ``assets.book_path(...)``. The tests point
``PEFT_LOCAS_CACHE`` (the assets' own cache setting) at a cache that looks prepared but holds a tiny random Llama and
short stand-in books. Hub ids that no such cache serves (`HUB_STAND_INS`) are replaced, in the code's text, by tiny
local checkpoints, and Hub access is switched off, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BENCHMARKS = ROOT / "benchmarks"
PAGES = sorted(DOCS.rglob("*.md"))
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w-]*)\s*$")
TINY_WIDTH = 128  # the tiny checkpoints' MLP intermediate size
#: Hub ids in the docs' code that the offline asset cache does not serve -> the tiny family that stands in for each
HUB_STAND_INS = {"openai-community/gpt2": "gpt2"}
#: the pages whose ``peft-locas`` command blocks the tests below run
COMMAND_PAGES = ("guides/ask-a-memory.md", "guides/memorize-a-book.md")
#: the stand-in books' text: the opening of Pride and Prejudice (public domain)
BOOK = """\
It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.
However little known the feelings or views of such a man may be on his first entering a neighbourhood, this truth is
so well fixed in the minds of the surrounding families, that he is considered the rightful property of some one or
other of their daughters.
"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield Park is let at last?"
Mr. Bennet replied that he had not.
"But it is," returned she; "for Mrs. Long has just been here, and she told me all about it."
Mr. Bennet made no answer.
"""


class Block(NamedTuple):
    """One fenced code block of a Markdown file."""

    lang: str
    code: str  # its lines, dedented (a block may be indented, e.g. inside an admonition), with a final newline
    line: int  # the file's line number (1-based) of its first code line
    before: str  # the line above its opening fence


def fenced_blocks(text: str) -> list[Block]:
    """Every fenced code block of a Markdown text, in order."""
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match:
            start, body = i, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            code = textwrap.dedent("\n".join(body)) + "\n"
            blocks.append(Block(match["lang"], code, start + 2, lines[start - 1] if start else ""))
        i += 1
    return blocks


def python_blocks(path: Path) -> list[Block]:
    return [block for block in fenced_blocks(path.read_text(encoding="utf-8")) if block.lang in ("python", "py")]


def page_id(page: Path) -> str:
    return page.relative_to(DOCS).as_posix()


CODE_PAGES = [page for page in PAGES if python_blocks(page)]


def _byte_tokenizer():
    """One token per UTF-8 byte (any text works; token counts are byte counts), with an end and padding token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=special, eos_token=special, pad_token=special)


def _tiny_checkpoint(family: str, folder: Path) -> Path:
    """A seeded random 2-layer ``family`` model (d=64, MLP width 128, 1,024 positions) and the byte tokenizer, saved
    as a Hugging Face checkpoint folder."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=320, bos_token_id=256, eos_token_id=256, pad_token_id=256)
    if family == "llama":
        config = tf.LlamaConfig(
            **common,
            hidden_size=64,
            intermediate_size=TINY_WIDTH,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
        )
        model = tf.LlamaForCausalLM(config)
    else:
        model = tf.GPT2LMHeadModel(tf.GPT2Config(**common, n_embd=64, n_inner=TINY_WIDTH, n_layer=2, n_head=4))
    model.save_pretrained(folder)
    _byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def docs_env(tmp_path_factory):
    """What the docs' code runs with (see the module docstring): ``env``, the environment variables (a prepared-looking
    asset cache whose model is a tiny Llama and whose books are short; Hub access off), and ``hub``, Hub id -> tiny
    checkpoint folder."""
    from importlib import metadata

    from peft_locas import assets

    root = tmp_path_factory.mktemp("docs")
    cache = root / "cache"
    model = _tiny_checkpoint("llama", cache / "models" / assets.MODEL_NAME)
    marker = {"asset": assets.MODEL_NAME, "transformers_version": metadata.version("transformers")}
    (model / assets.MARKER).write_text(json.dumps(marker))
    (cache / "books").mkdir()
    for book in ("emma", "pride_and_prejudice", "persuasion"):
        (cache / "books" / f"{book}.txt").write_text(BOOK * 4, encoding="utf-8")
    hub = {name: str(_tiny_checkpoint(family, root / family)) for name, family in HUB_STAND_INS.items()}
    return SimpleNamespace(env={"PEFT_LOCAS_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}, hub=hub)


def _enter(docs_env, monkeypatch, folder: Path) -> None:
    """Work in ``folder`` with the docs' environment; Hub access off here too (huggingface_hub reads the variable at
    import)."""
    import huggingface_hub.constants

    from peft_locas import assets

    for key, value in docs_env.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(folder)
    assert assets.default_model_dir() == Path(docs_env.env["PEFT_LOCAS_CACHE"]) / "models" / assets.MODEL_NAME


def _with_stand_ins(code: str, hub: dict[str, str]) -> str:
    for name, folder in hub.items():
        code = code.replace(f'"{name}"', repr(folder))
    return code


def _run_blocks(page: Path, blocks: list[Block], namespace: dict, hub: dict[str, str]) -> None:
    """Execute ``blocks`` of ``page`` in ``namespace``; a traceback names the page and its own line numbers."""
    for block in blocks:
        code = "\n" * (block.line - 1) + _with_stand_ins(block.code, hub)
        exec(compile(code, str(page), "exec"), namespace)


def test_pages_carry_their_code_and_tables_inline():
    """An include marker (pymdownx.snippets) renders on GitHub as itself, not as the code or table it names."""
    for path in [*PAGES, ROOT / "README.md"]:
        text = path.read_text(encoding="utf-8")
        assert "--8<--" not in text, f"{path.relative_to(ROOT)}: an include marker; put the code or table in the page"


@pytest.mark.parametrize("page", CODE_PAGES, ids=page_id)
def test_page_code_runs(page, docs_env, tmp_path, monkeypatch):
    """The page's Python blocks, in order, as one script (``__name__ == "__main__"``) in an empty folder."""
    _enter(docs_env, monkeypatch, tmp_path)
    _run_blocks(page, python_blocks(page), {"__name__": "__main__"}, docs_env.hub)


def test_distributed_guide_runs_under_torchrun(docs_env, tmp_path):
    """The distributed guide's script, saved as ``distributed.py`` and launched as the guide shows, two CPU ranks."""
    page = DOCS / "guides" / "distributed.md"
    command = "ACCELERATE_USE_CPU=yes torchrun --standalone --nproc_per_node 2 distributed.py"
    assert command in page.read_text(encoding="utf-8")
    script = "".join(_with_stand_ins(block.code, docs_env.hub) for block in python_blocks(page))
    (tmp_path / "distributed.py").write_text(script, encoding="utf-8")
    env = dict(os.environ, **docs_env.env, ACCELERATE_USE_CPU="yes", OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*torchrun, "distributed.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert (tmp_path / "my-memory" / "adapter_model.safetensors").is_file()


def readme_quick_start() -> Block:
    """The first Python block under the README's ``## Quick start`` heading."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## Quick start\n")
    offset = text.count("\n", 0, start)
    block = next(block for block in fenced_blocks(text[start:]) if block.lang == "python")
    return block._replace(line=block.line + offset)


def test_readme_quick_start_runs_as_written(docs_env, tmp_path):
    """The README's quick start, saved as a file and run by a fresh interpreter: it defines everything it uses."""
    block = readme_quick_start()
    (tmp_path / "quickstart.py").write_text(_with_stand_ins(block.code, docs_env.hub), encoding="utf-8")
    env = dict(os.environ, **docs_env.env, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "quickstart.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"README.md line {block.line}:\n" + done.stdout[-2000:] + done.stderr[-4000:]
    assert (tmp_path / "my-memory" / "adapter_model.safetensors").is_file()
    merged = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert merged["intermediate_size"] == TINY_WIDTH + 64 and "peft_type" not in merged


def _command_blocks(page: Path) -> list[list[str]]:
    """The ``peft-locas`` commands of a page, in order: those of every shell block whose commands are all
    ``peft-locas ...`` (continuation lines joined, comments and blank lines dropped)."""
    commands = []
    for block in fenced_blocks(page.read_text(encoding="utf-8")):
        if block.lang not in ("bash", "sh", "shell"):
            continue
        argvs = [shlex.split(line, comments=True) for line in block.code.replace("\\\n", " ").splitlines()]
        argvs = [argv for argv in argvs if argv]
        if argvs and all(argv[0] == "peft-locas" for argv in argvs):
            commands += argvs
    return commands


def test_every_command_block_is_run():
    """Blocks of ``peft-locas`` commands appear only on the pages whose commands the tests below run."""
    assert {page_id(page) for page in PAGES if _command_blocks(page)} == set(COMMAND_PAGES)


def test_book_guide_commands_run(docs_env, tmp_path, monkeypatch):
    """Each ``peft-locas`` command of the book guide, in this process, as written but smaller (later options override
    earlier ones); ``assets`` downloads and is skipped: the cache is prepared already."""
    from peft_locas import cli

    _enter(docs_env, monkeypatch, tmp_path)
    small = ["--chunk-tokens", "128", "--context-tokens", "32", "--max-tokens", "256"]
    ran = []
    for _, command, *args in _command_blocks(DOCS / "guides" / "memorize-a-book.md"):
        if command == "assets":
            continue
        assert cli.main([command, *args, *(small if command in ("memorize", "eval") else [])]) == 0, [command, *args]
        ran.append(command)
    assert {"memorize", "eval", "merge"} <= set(ran)
    assert json.loads((tmp_path / "emma-merged" / "config.json").read_text())["intermediate_size"] == TINY_WIDTH + 64


def _stand_in_dialogues(folder: Path) -> None:
    """Invented stand-ins for the files the ask-a-memory guide's commands read: a LoCoMo-format ``locomo10.json`` of
    two samples (conv-26 second, so that --sample must pick it), a turns JSONL conversation and a questions JSONL
    file."""
    lines = ["I moved to Lyon last week for a job.", "What job took you to Lyon?", "I restore old looms at a museum."]
    turns = [
        {"speaker": ("Ann", "Bob")[k % 2], "dia_id": f"D1:{k + 1}", "text": f"{lines[k % 3]} ({k})"} for k in range(16)
    ]
    qa = [
        {"question": "Where did Ann move?", "answer": "Lyon", "evidence": ["D1:1"], "category": 4},
        {"question": "Where did Bob move?", "adversarial_answer": "Lyon", "evidence": ["D1:1"], "category": 5},
    ]
    samples = [
        {"sample_id": sample, "conversation": {"speaker_a": "Ann", "speaker_b": "Bob", "session_1": turns}, "qa": qa}
        for sample in ("conv-1", "conv-26")
    ]
    samples[1]["conversation"]["session_1_date_time"] = "1:56 pm on 8 May, 2023"
    (folder / "locomo10.json").write_text(json.dumps(samples), encoding="utf-8")
    jsonl = [{"speaker": t["speaker"], "text": t["text"]} for t in turns]
    (folder / "dialogue.jsonl").write_text("".join(json.dumps(t) + "\n" for t in jsonl), encoding="utf-8")
    (folder / "questions.jsonl").write_text(json.dumps({"question": "Who moved?", "answer": "Ann"}), encoding="utf-8")


def test_ask_guide_commands_run(docs_env, tmp_path, monkeypatch):
    """Each ``peft-locas`` command of the ask-a-memory guide, in this process, as written but smaller (later options
    override earlier ones), on invented stand-ins for the conversation files; ``chat`` reads one question from
    stdin."""
    from peft_locas import cli

    _enter(docs_env, monkeypatch, tmp_path)
    _stand_in_dialogues(tmp_path)
    small = {
        "memorize": ["--chunk-tokens", "128", "--context-tokens", "32", "--max-tokens", "256"],
        "ask": ["--max-new-tokens", "4"],
        "chat": ["--max-new-tokens", "4"],
    }
    ran = []
    for _, command, *args in _command_blocks(DOCS / "guides" / "ask-a-memory.md"):
        extra = small[command] + (["--teacher-context-tokens", "256"] if "--objective" in args else [])
        monkeypatch.setattr(sys, "stdin", io.StringIO("Where did Ann move?\n"))
        assert cli.main([command, *args, *extra]) == 0, [command, *args]
        ran.append(command)
    assert {"memorize", "ask", "chat"} <= set(ran)
    answers = [json.loads(line) for line in (tmp_path / "conv26-answers.jsonl").read_text().splitlines()]
    # the adversarial question has no gold answer; its tempting wrong one is kept apart
    gold = [(a["gold"], a.get("adversarial_answer"), a["category"]) for a in answers]
    assert gold == [("Lyon", None, 4), (None, "Lyon", 5)]
    assert all(0 <= a["f1"] <= 1 and 1 <= a["new_tokens"] <= 4 for a in answers)


def test_results_page_holds_the_rendered_tables(tmp_path):
    """docs/benchmarks.md carries, between its marker comments, the tables benchmarks/report.py renders from the
    committed results."""
    spec = importlib.util.spec_from_file_location("benchmark_report", BENCHMARKS / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    report.render(BENCHMARKS / "results", tmp_path)
    page = (DOCS / "benchmarks.md").read_text(encoding="utf-8")
    assert report.fill_page(page, tmp_path) == page, "docs/benchmarks.md is stale: run `python benchmarks/report.py`"
    (tmp_path / "extra.md").write_text("| a |\n|---|\n")
    with pytest.raises(ValueError, match=r"^the results page has no section for \['extra'\]: add the lines "):
        report.fill_page(page, tmp_path)


def test_every_public_name_is_in_the_api_reference():
    import peft_locas
    from peft_locas import cli

    reference = "\n".join(p.read_text(encoding="utf-8") for p in (DOCS / "reference").glob("*.md"))
    documented = set(re.findall(r"^::: (\S+)", reference, flags=re.M))
    missing = [name for name in peft_locas.__all__ if name != "__version__" and f"peft_locas.{name}" not in documented]
    assert not missing, f"public names missing from docs/reference: {missing}"
    subcommands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    helped = set(re.findall(r"<!-- cli-help: *(\w*) *-->", reference))
    missing = set(subcommands.choices) - helped
    assert not missing, f"peft-locas commands without a help section in docs/reference/cli.md: {sorted(missing)}"


def test_cli_reference_holds_every_option():
    """docs/reference/cli.md carries each command's help text inline (it reads on GitHub); every option of every
    command is in its section, so the committed copy cannot fall behind the parsers."""
    from peft_locas import cli

    page = (DOCS / "reference" / "cli.md").read_text(encoding="utf-8")
    sections = dict(re.findall(r"<!-- cli-help: *(\w*) *-->\n(.*?)<!-- cli-help-end -->", page, flags=re.S))
    subcommands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in subcommands.choices.items():
        if name == "assets":  # its own parser, outside build_parser's options
            continue
        options = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
        missing = [o for o in options if o not in sections.get(name, "")]
        assert not missing, f"docs/reference/cli.md lacks {name} {missing}: run `python docs/hooks/docs_hooks.py`"


def _message_templates() -> list[str]:
    """Every string literal of the package, f-string fields as ``…`` (implicit concatenations joined)."""
    templates = []
    for path in (ROOT / "peft_locas").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.JoinedStr):
                parts = [v.value if isinstance(v, ast.Constant) else "…" for v in node.values]
                templates.append("".join(parts))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                templates.append(node.value)
    return templates


def _matches(message: str, templates: list[str]) -> bool:
    pieces = [piece for piece in message.split("…") if piece]
    for template in templates:
        position = 0
        for piece in pieces:
            position = template.find(piece, position)
            if position < 0:
                break
            position += len(piece)
        else:
            return True
    return False


def test_troubleshooting_messages_exist_in_the_library():
    text = (DOCS / "troubleshooting.md").read_text(encoding="utf-8")
    ours = text.split("## Messages from other libraries")[0]
    templates = _message_templates()
    checked = 0
    for block in fenced_blocks(ours):
        if block.lang != "text" or "unchecked" in block.before:
            continue
        for line in filter(str.strip, block.code.splitlines()):
            message = re.sub(r"^(?:[A-Z]\w*(?:Error|Warning): )", "", line.strip()).strip("'")
            assert _matches(message, templates), f"troubleshooting.md quotes a message the library lacks: {line}"
            checked += 1
    assert checked > 50


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers")),
    reason="the docs toolchain is not installed (pip install -e '.[docs]'); the site build is not checked",
)
def test_mkdocs_build_strict(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-6000:]
    assert (tmp_path / "site" / "reference" / "config-and-model" / "index.html").is_file()
