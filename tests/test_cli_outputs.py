"""What the command line writes and reads as a user meets it (issue 12): atomic output folders, default checkpoints
beside ``--out`` that a full disk or a crash cannot lose, the plan line and the per-chunk log, several texts and
folders as one memory, ``--encoding``, continuing a memory with ``--adapter``, and a base refused by fingerprint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_checkpoint import make_checkpoint, write_texts

from peft_locas import cli

RUN = ["--chunk-tokens", "64", "--context-tokens", "16", "--steps-per-chunk", "1", "--lr", "1e-2"]
R = ["--r", "8"]

# A fresh interpreter whose safetensors writer fails at its FAIL_AT-th call, after writing part of the file: with
# FAIL_MODE=full as a full disk (ENOSPC), with FAIL_MODE=kill by a SIGKILL (a crash mid-write). Every other call
# writes for real. It patches before transformers, PEFT and peft_locas bind the function.
FAILING_WRITER = """
import errno, os, signal, sys
import safetensors.torch as st
real, calls = st.save_file, [0]
def save_file(tensors, filename, metadata=None):
    calls[0] += 1
    if calls[0] == int(os.environ["FAIL_AT"]):
        with open(filename, "wb") as handle:
            handle.write(bytes(100))
        if os.environ["FAIL_MODE"] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
    return real(tensors, filename, metadata)
st.save_file = save_file
from peft_locas.app.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    texts = write_texts(root / "texts", {"a.txt": (400, 1), "b.md": (300, 2)})
    (texts / "notes.json.bak").write_text("not a text of the folder")
    return {
        "root": root,
        "main": make_checkpoint(root / "main"),
        "other": make_checkpoint(root / "other", seed=1),  # same shapes, other weights
        "text": texts / "a.txt",
        "texts": texts,
    }


def fresh(*argv: str, fail_at: int | None = None, mode: str = "full") -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", FAIL_AT=str(fail_at or 0), FAIL_MODE=mode)
    code = (
        FAILING_WRITER if fail_at else "import sys; from peft_locas.app.main import main; sys.exit(main(sys.argv[1:]))"
    )
    return subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, timeout=300)


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def losses(folder: Path) -> list[float]:
    return json.loads((folder / "memorize_results.json").read_text())["result"]["losses"]


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def test_a_full_disk_or_a_crash_while_memorizing_loses_at_most_one_chunk(files, tmp_path, capsys):
    common = ["memorize", "--model", str(files["main"]), "--text", str(files["text"]), *RUN, *R, "--max-tokens", "320"]
    assert cli.main([*common, "--out", str(tmp_path / "reference"), "--no-checkpoint"]) == 0
    assert not (tmp_path / "reference.checkpoint").exists()
    plan = capsys.readouterr().err
    assert "memorize: 320 tokens of a in 5 chunks of up to 64 tokens (16-token prefix, 1 training step each); " in plan
    assert "no checkpoints" in plan

    out = tmp_path / "adapter"
    checkpoints = tmp_path / "adapter.checkpoint"  # the default: beside --out
    # each checkpoint writes three safetensors files (RNG, adapter, optimiser): the 8th is the 3rd checkpoint's adapter
    full = fresh(*common, "--out", str(out), fail_at=8)
    assert full.returncode == 1, full.stderr
    assert errors(full.stderr) == [
        f"error: no space left on the device of --checkpoint-dir {checkpoints}: "
        + full.stderr.split(f"--checkpoint-dir {checkpoints}: ")[1].split("\n")[0]
    ]
    assert "is free; the last complete checkpoint is kept (free some space or choose another --checkpoint-dir)" in (
        full.stderr
    )
    assert not out.exists() and (checkpoints / "chunk-000002").is_dir()
    assert [json.loads(line)["chunk"] for line in (checkpoints / "chunks.jsonl").read_text().splitlines()] == [0, 1]

    resumed = fresh(*common, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert losses(out) == pytest.approx(losses(tmp_path / "reference"), rel=1e-6)
    assert not checkpoints.exists()  # the default checkpoints go once the adapter folder holds the run
    log = [json.loads(line) for line in (out / "chunks.jsonl").read_text().splitlines()]
    assert [entry["chunk"] for entry in log] == [0, 1, 2, 3, 4]
    assert [entry["loss"] for entry in log] == pytest.approx(losses(out), rel=1e-9)
    assert leftovers(tmp_path) == []


def test_merge_writes_all_or_nothing(files, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    argv = ["memorize", "--model", str(files["main"]), "--text", str(files["text"]), *RUN, *R, "--no-checkpoint"]
    assert cli.main([*argv, "--out", str(adapter)]) == 0
    merged = tmp_path / "merged"
    full = fresh("merge", "--adapter", str(adapter), "--out", str(merged), fail_at=1)
    assert full.returncode == 1, full.stderr
    (line,) = errors(full.stderr)
    assert line.startswith(f"error: no space left on the device of --out {merged}: it needs about ")
    assert line.endswith("is free; nothing was written there (free some space or choose another --out)")
    assert not merged.exists() and leftovers(tmp_path) == []

    killed = fresh("merge", "--adapter", str(adapter), "--out", str(merged), fail_at=1, mode="kill")
    assert killed.returncode == -9 and not merged.exists()
    assert len(leftovers(tmp_path)) == 1  # the killed process's temporary folder: the next write removes it

    # --overwrite replaces a model or adapter folder whole (no file of the old output stays), readable by others
    merged.mkdir()
    (merged / "notes.txt").write_text("mine")
    (merged / "adapter_config.json").write_text("{}")  # an old adapter: without the swap, transformers would see it
    assert cli.main(["merge", "--adapter", str(adapter), "--out", str(merged), "--overwrite"]) == 0
    assert sorted(p.name for p in merged.iterdir() if p.suffix in (".txt", ".json") and "token" not in p.name) == [
        "config.json",
        "generation_config.json",
        "memorize_results.json",  # the adapter's record: what the checkpoint memorised
    ]
    assert (merged / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()
    capsys.readouterr()
    for out, message in (
        (adapter, f"error: --out {adapter} is also an input of this command: write the result to another folder"),
        (tmp_path / "own", f"error: --out {tmp_path / 'own'} is not a model or adapter folder (no adapter_config.json"),
    ):
        (tmp_path / "own").mkdir(exist_ok=True)
        (tmp_path / "own" / "thesis.tex").write_text("years of work")
        assert cli.main(["merge", "--adapter", str(adapter), "--out", str(out), "--overwrite"]) == 1
        assert capsys.readouterr().err.strip().startswith(message)
    assert (tmp_path / "own" / "thesis.tex").read_text() == "years of work"
    assert leftovers(tmp_path) == []


def test_several_texts_and_a_folder_are_one_memory(files, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_locas import LocasConfig, MemorizeConfig, memorize

    base = ["memorize", "--model", str(files["main"]), *RUN, *R, "--no-checkpoint"]
    a, b = files["texts"] / "a.txt", files["texts"] / "b.md"
    assert cli.main([*base, "--text", str(a), str(b), "--out", str(tmp_path / "two")]) == 0
    assert cli.main([*base, "--text", str(files["texts"]), "--out", str(tmp_path / "folder")]) == 0
    assert losses(tmp_path / "two") == losses(tmp_path / "folder")
    record = json.loads((tmp_path / "folder" / "memorize_results.json").read_text())
    assert record["text"] == str(files["texts"]) and [t["text_path"] for t in record["texts"]] == [
        str(a.resolve()),
        str(b.resolve()),
    ]
    # the same run through the Python API: documents memorised in order
    model = AutoModelForCausalLM.from_pretrained(files["main"])
    tokenizer = AutoTokenizer.from_pretrained(files["main"])
    config = MemorizeConfig(chunk_tokens=64, context_tokens=16, steps_per_chunk=1, lr=1e-2)
    result = memorize(model, tokenizer, [a.read_text(), b.read_text()], config, peft_config=LocasConfig(r=8))
    assert result.losses == pytest.approx(losses(tmp_path / "two"), rel=1e-6)

    # ask --context-tokens reads the texts again, joined as memorize joined them: the context is b's end
    capsys.readouterr()
    ask = ["ask", "--adapter", str(tmp_path / "two"), "--context-tokens", "12", "--question", "Who?"]
    assert cli.main([*ask, "--max-new-tokens", "1", "--no-chat-template"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["prompt_tokens"] >= 12

    empty = tmp_path / "empty-folder"
    empty.mkdir()
    (empty / "data.csv").write_text("x")
    capsys.readouterr()
    assert cli.main([*base, "--text", str(empty), "--out", str(tmp_path / "x")]) == 1
    assert capsys.readouterr().err.strip() == f"error: --text {empty} is a folder with no .txt or .md file in it"


def test_encoding(files, tmp_path, capsys):
    latin = tmp_path / "latin.txt"
    latin.write_bytes(("Café crème, déjà vu. " * 40).encode("latin-1"))
    base = ["memorize", "--model", str(files["main"]), "--text", str(latin), *RUN, *R, "--no-checkpoint"]
    assert cli.main([*base, "--out", str(tmp_path / "a")]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {latin} is not a UTF-8 text file (undecodable byte at offset 3): give its encoding with --encoding "
        "(e.g. --encoding latin-1)"
    )
    assert cli.main([*base, "--out", str(tmp_path / "a"), "--encoding", "latin-1"]) == 0
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*base, "--out", str(tmp_path / "b"), "--encoding", "klingon"])
    assert exit_info.value.code == 2
    assert "argument --encoding: unknown encoding 'klingon' (e.g. utf-8, latin-1, cp1252)" in capsys.readouterr().err


def test_continue_a_memory_and_refuse_another_base(files, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_locas import MemorizeConfig, memorize

    a, b = files["texts"] / "a.txt", files["texts"] / "b.md"
    base = ["memorize", *RUN, "--no-checkpoint"]
    first, second = tmp_path / "first", tmp_path / "second"
    assert cli.main([*base, "--model", str(files["main"]), "--r", "8", "--text", str(a), "--out", str(first)]) == 0
    # the base is the one the adapter recorded: no --model needed
    assert cli.main([*base, "--adapter", str(first), "--text", str(b), "--out", str(second)]) == 0
    record = json.loads((second / "memorize_results.json").read_text())
    assert record["continued_from"] == str(first.resolve()) and record["r"] == 8
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(files["main"]), first, is_trainable=True)
    config = MemorizeConfig(chunk_tokens=64, context_tokens=16, steps_per_chunk=1, lr=1e-2, init=None)
    expected = memorize(model, AutoTokenizer.from_pretrained(files["main"]), b.read_text(), config)
    assert losses(second) == pytest.approx(expected.losses, rel=1e-6)

    capsys.readouterr()
    assert cli.main([*base, "--adapter", str(first), "--r", "4", "--text", str(b), "--out", str(tmp_path / "c")]) == 1
    assert capsys.readouterr().err.strip() == f"error: --r describes a new memory; --adapter continues {first} as it is"
    # a base of the same shape with other weights: refused before it loads, in every command
    for argv in (
        ["eval", "--text", str(b), "--adapter", str(first)],
        ["merge", "--adapter", str(first), "--out", str(tmp_path / "m")],
        [*base, "--adapter", str(first), "--text", str(b), "--out", str(tmp_path / "d")],
    ):
        assert cli.main([*argv, "--model", str(files["other"])]) == 1
        assert capsys.readouterr().err.strip() == (
            f"error: adapter {first} was made on another base model ({files['main']}): the weights in "
            f"{files['other']} differ from those it recorded; pass the base it was made on with --model"
        )


def test_distill_options_reach_the_run(files, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_locas import LocasConfig, MemorizeConfig, memorize

    distill = [
        "--objective",
        "distill",
        "--teacher-context-tokens",
        "128",
        "--distill-top-k",
        "8",
        "--ntp-weight",
        "0.5",
    ]
    argv = ["memorize", "--model", str(files["main"]), "--text", str(files["text"]), *RUN, *R, "--max-tokens", "256"]
    assert cli.main([*argv, *distill, "--no-checkpoint", "--out", str(tmp_path / "a")]) == 0
    settings = json.loads((tmp_path / "a" / "memorize_results.json").read_text())["settings"]
    assert (settings["objective"], settings["distill_top_k"], settings["ntp_weight"]) == ("distill", 8, 0.5)
    config = MemorizeConfig(
        chunk_tokens=64,
        context_tokens=16,
        steps_per_chunk=1,
        lr=1e-2,
        max_tokens=256,
        objective="distill",
        teacher_context_tokens=128,
        distill_top_k=8,
        ntp_weight=0.5,
    )
    model = AutoModelForCausalLM.from_pretrained(files["main"])
    result = memorize(
        model,
        AutoTokenizer.from_pretrained(files["main"]),
        files["text"].read_text(),
        config,
        peft_config=LocasConfig(r=8),
    )
    assert losses(tmp_path / "a") == pytest.approx(result.losses, rel=1e-6)


def test_compose_two_memories(files, tmp_path, capsys):
    from peft import PeftModel
    from tiny_models import tokens
    from transformers import AutoModelForCausalLM

    a, b = files["texts"] / "a.txt", files["texts"] / "b.md"
    base = ["memorize", "--model", str(files["main"]), *RUN, *R, "--no-checkpoint", "--max-tokens", "128"]
    for text, out in ((a, "one"), (b, "two")):
        assert cli.main([*base, "--text", str(text), "--out", str(tmp_path / out)]) == 0
    composed = tmp_path / "both"
    argv = ["compose", "--adapter", str(tmp_path / "one"), "--adapter", str(tmp_path / "two"), "--out", str(composed)]
    assert cli.main([*argv, "--weight", "1", "--weight", "0.5"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"composed memory (r=16) of 2 memories: {composed}")
    record = json.loads((composed / "memorize_results.json").read_text())
    assert record["weights"] == [1.0, 0.5] and record["r"] == 16
    # the composed adapter equals both memories active at once, the second's output halved
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(files["main"]), tmp_path / "one", "one")
    model.load_adapter(tmp_path / "two", "two")
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "locas_memory") and "two" in module.locas_memory:
                module.locas_memory["two"].value.mul_(0.5)
        model.base_model.set_adapter(["one", "two"])
        both = model(tokens()).logits
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(files["main"]), composed).eval()
        torch.testing.assert_close(reloaded(tokens()).logits, both, atol=1e-5, rtol=1e-5)
    # and is a memory like any other: merge takes it (its recorded base)
    assert cli.main(["merge", "--adapter", str(composed), "--out", str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    assert cli.main([*argv[:3], "--out", str(tmp_path / "x")]) == 1
    assert capsys.readouterr().err.strip() == "error: compose takes two or more memories: give --adapter for each"
    assert cli.main([*argv[:-2], "--weight", "2", "--out", str(tmp_path / "x")]) == 1
    assert capsys.readouterr().err.strip() == "error: give one --weight per --adapter (2 adapters, 1 weights)"
    assert cli.main([*argv[:3], *argv[1:3], "--out", str(tmp_path / "x")]) == 1
    message = f"error: --adapter {tmp_path / 'one'} is given twice: give each memory once (--weight scales a memory)"
    assert capsys.readouterr().err.strip() == message


def test_ask_several_memories_at_once(files, tmp_path, capsys):
    a, b = files["texts"] / "a.txt", files["texts"] / "b.md"
    base = ["memorize", "--model", str(files["main"]), *RUN, *R, "--no-checkpoint", "--max-tokens", "128"]
    for text, out in ((a, "one"), (b, "two")):
        assert cli.main([*base, "--text", str(text), "--out", str(tmp_path / out)]) == 0
    capsys.readouterr()
    asking = ["ask", "--question", "Who ran?", "--question", "Where is the key?", "--max-new-tokens", "4"]
    memories = ["--memory", str(tmp_path / "one"), "--memory", str(tmp_path / "two")]
    assert cli.main([*asking, *memories, "--no-chat-template"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["question"], Path(line["memory"]).name) for line in lines] == [
        ("Who ran?", "one"),
        ("Who ran?", "two"),
        ("Where is the key?", "one"),
        ("Where is the key?", "two"),
    ]
    for line in lines:  # each the answer that memory gives alone
        alone = ["ask", "--adapter", line["memory"], "--question", line["question"], "--max-new-tokens", "4"]
        assert cli.main([*alone, "--no-chat-template"]) == 0
        assert json.loads(capsys.readouterr().out)["answer"] == line["answer"]
    assert cli.main([*asking, *memories, "--adapter", str(tmp_path / "one")]) == 1
    assert capsys.readouterr().err.strip() == (
        "error: --memory and --adapter exclude each other: give every memory with --memory"
    )
