"""The docs site cannot drift from the code: every example under docs/examples runs (on tiny offline models), every
code block of the pages comes from an example, every public name is in the API reference, every error message quoted
in the troubleshooting page still exists, and ``mkdocs build --strict`` passes."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import io
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"
PAGES = sorted(DOCS.rglob("*.md"))
PY_EXAMPLES = sorted(p for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))
SNIPPET = re.compile(r'^\s*--8<-- "(?P<file>[^":]+)(?::(?P<section>[\w-]+))?"\s*$')
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w-]*)\s*$")


def _fenced_blocks(text: str) -> list[tuple[str, list[str], str]]:
    """``(language, lines, preceding line)`` of every fenced code block of a Markdown page."""
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
            blocks.append((match["lang"], body, lines[start - 1] if start else ""))
        i += 1
    return blocks


@pytest.fixture(scope="module")
def docs_env(tmp_path_factory):
    """The docs examples' tiny model folders (built once), and a prepared-looking offline asset cache whose model is
    the tiny Llama, so that the assets example runs its whole body."""
    root = tmp_path_factory.mktemp("docs")
    sys.path.insert(0, str(EXAMPLES))
    try:
        os.environ["PEFT_LOCAS_DOCS_TMP"] = str(root / "models")
        from _tiny import sample_text, tiny_model_dir

        tiny_model_dir("llama"), tiny_model_dir("gpt2")
        from importlib import metadata

        from peft_locas import assets

        cache = root / "cache"
        model = cache / "models" / assets.MODEL_NAME
        model.parent.mkdir(parents=True)
        os.symlink(tiny_model_dir("llama"), model)
        marker = {"asset": assets.MODEL_NAME, "transformers_version": metadata.version("transformers")}
        (Path(tiny_model_dir("llama")) / assets.MARKER).write_text(json.dumps(marker))
        (cache / "books").mkdir()
        (cache / "books" / "emma.txt").write_text(sample_text(), encoding="utf-8")
        yield {"PEFT_LOCAS_DOCS_TMP": str(root / "models"), "PEFT_LOCAS_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    finally:
        sys.path.remove(str(EXAMPLES))
        os.environ.pop("PEFT_LOCAS_DOCS_TMP", None)


@pytest.mark.parametrize("example", PY_EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(example, docs_env, tmp_path, monkeypatch):
    """Runs the script as ``python docs/examples/<name>.py`` would, in this process (imports are paid once)."""
    for key, value in docs_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setattr(sys, "argv", [str(example)])
    runpy.run_path(str(example), run_name="__main__")


def test_distributed_example_with_two_ranks(docs_env, tmp_path):
    """docs/examples/distributed.py under torchrun with two CPU (gloo) ranks, as the distributed guide shows."""
    env = dict(os.environ, **docs_env, ACCELERATE_USE_CPU="yes", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*command, str(EXAMPLES / "distributed.py")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert (tmp_path / "my-memory" / "adapter_model.safetensors").is_file()


def test_shell_example_commands_run(docs_env, tmp_path, monkeypatch):
    """Each ``peft-locas`` command of docs/examples/memorize_book.sh, in this process, as written except for the model,
    the text and a small size (later options override earlier ones); ``assets`` needs the network and is skipped."""
    from _tiny import sample_text, tiny_model_dir

    from peft_locas import cli

    for key, value in docs_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "book.txt").write_text(sample_text(), encoding="utf-8")
    ran = []
    for _, command, *args in _shell_commands("memorize_book.sh"):
        if command == "assets":
            continue
        extra = ["--model", tiny_model_dir("llama")]
        if command in ("memorize", "eval"):
            extra += ["--text", "book.txt", "--chunk-tokens", "128", "--context-tokens", "32", "--max-tokens", "256"]
        assert cli.main([command, *args, *extra]) == 0, [command, *args]
        ran.append(command)
    assert {"memorize", "eval", "merge"} <= set(ran)


def _shell_commands(name: str) -> list[list[str]]:
    """The commands of a docs shell example (continuation lines joined, comments and blank lines dropped)."""
    script = (EXAMPLES / name).read_text(encoding="utf-8").replace("\\\n", " ")
    commands = [shlex.split(line) for line in script.splitlines() if line.strip() and not line.startswith("#")]
    assert all(argv[0] == "peft-locas" for argv in commands), commands
    return commands


def _stand_in_dialogues(folder: Path) -> None:
    """Invented stand-ins for the files docs/examples/ask_a_memory.sh reads: a LoCoMo-format ``locomo10.json`` of two
    samples (conv-26 second, so that --sample must pick it), a turns JSONL conversation and a questions JSONL file."""
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


def test_ask_a_memory_shell_example_commands_run(docs_env, tmp_path, monkeypatch):
    """Each command of docs/examples/ask_a_memory.sh, in this process, as written except for the model, small sizes
    (later options override earlier ones) and invented stand-ins for the conversation files; ``chat`` reads one
    question from stdin."""
    from _tiny import tiny_model_dir

    from peft_locas import cli

    for key, value in docs_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    _stand_in_dialogues(tmp_path)
    small = {
        "memorize": ["--chunk-tokens", "128", "--context-tokens", "32", "--max-tokens", "256"],
        "ask": ["--max-new-tokens", "4"],
        "chat": ["--max-new-tokens", "4"],
    }
    ran = []
    for _, command, *args in _shell_commands("ask_a_memory.sh"):
        extra = ["--model", tiny_model_dir("llama"), *small[command]]
        if "--objective" in args:
            extra += ["--teacher-context-tokens", "256"]
        monkeypatch.setattr(sys, "stdin", io.StringIO("Where did Ann move?\n"))
        assert cli.main([command, *args, *extra]) == 0, [command, *args]
        ran.append(command)
    assert {"memorize", "ask", "chat"} <= set(ran)
    answers = [json.loads(line) for line in (tmp_path / "conv26-answers.jsonl").read_text().splitlines()]
    assert [(a["gold"], a["category"]) for a in answers] == [("Lyon", 4), ("Lyon", 5)]
    assert all(0 <= a["f1"] <= 1 and 1 <= a["new_tokens"] <= 4 for a in answers)


def test_code_blocks_come_from_examples():
    """Python blocks consist of snippet includes only; every include names an existing file and section; every
    example file is included somewhere."""
    included = set()
    for page in PAGES:
        for lang, lines, _ in _fenced_blocks(page.read_text(encoding="utf-8")):
            if lang not in ("python", "py", "bash", "sh"):
                continue
            snippets = [SNIPPET.match(line) for line in lines if line.strip()]
            if lang in ("python", "py"):
                assert snippets and all(snippets), f"{page.relative_to(ROOT)}: a python block not cut from an example"
            for match in filter(None, snippets):
                path = EXAMPLES / match["file"]
                assert path.is_file(), f"{page.relative_to(ROOT)}: {match['file']} does not exist"
                if match["section"]:
                    source = path.read_text(encoding="utf-8")
                    for marker in ("start", "end"):
                        assert f"# --8<-- [{marker}:{match['section']}]" in source, (page, match.group(0))
                included.add(match["file"])
    examples = {p.name for p in EXAMPLES.iterdir() if p.suffix in (".py", ".sh") and not p.name.startswith("_")}
    assert examples <= included, f"examples no page includes: {sorted(examples - included)}"


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
    for lang, lines, before in _fenced_blocks(ours):
        if lang != "text" or "unchecked" in before:
            continue
        for line in filter(str.strip, lines):
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
