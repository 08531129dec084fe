"""The ``peft-locas`` command line: memorize -> merge -> eval end to end in subprocesses, resuming, and one
``error:`` line with a non-zero exit for every bad input."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_checkpoint import make_checkpoint, sample_text
from transformers import AutoModelForCausalLM

from peft_locas import LocasConfig, assets, cli
from peft_locas.engine.memorization import templora_config

TESTS = Path(__file__).parent
RUN = ["--chunk-tokens", "64", "--context-tokens", "16", "--max-tokens", "320"]
MEMORIZE = RUN + ["--r", "8", "--steps-per-chunk", "2", "--lr", "1e-2", "--compare-baseline"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny model folders (the main one, one with another hidden size, one with fewer layers), a text, and adapters
    made on the main model."""
    root = tmp_path_factory.mktemp("cli")
    models = {
        "main": make_checkpoint(root / "main"),
        "wide": make_checkpoint(root / "wide", hidden=96),
        "shallow": make_checkpoint(root / "shallow", layers=1),
    }
    text = root / "text.txt"
    text.write_text(sample_text(), encoding="utf-8")
    adapters = {}
    for name, config in (("locas", LocasConfig(r=4, init_weights=False)), ("lora", templora_config(4))):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(models["main"]), config)
        model.save_pretrained(root / f"adapter-{name}")
        adapters[name] = root / f"adapter-{name}"
    return {"root": root, "text": text, "adapters": adapters, **models}


def command(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([*args], env=env, capture_output=True, text=True, timeout=300)


def console_script() -> list[str]:
    """The installed ``peft-locas`` script, or the module where the package is only on the path (no entry points)."""
    script = Path(sys.executable).with_name("peft-locas")
    return [str(script)] if script.exists() else [sys.executable, "-m", "peft_locas"]


def test_memorize_merge_eval_end_to_end(files, tmp_path):
    out, checkpoints, merged = tmp_path / "adapter", tmp_path / "checkpoints", tmp_path / "merged"
    common = ["--model", str(files["main"]), "--text", str(files["text"])]
    memorize = [sys.executable, "-m", "peft_locas", "memorize", *common, "--out", str(out), *MEMORIZE]
    done = command(*memorize, "--checkpoint-dir", str(checkpoints))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "prequential perplexity" in done.stdout and "without memory" in done.stdout
    assert "tok/s" in done.stderr and "ppl=" in done.stderr  # the progress bar
    assert {"adapter_config.json", "adapter_model.safetensors", cli.RESULTS_FILE, cli.PLOT_FILE} <= {
        p.name for p in out.iterdir()
    }
    assert (out / cli.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((out / cli.RESULTS_FILE).read_text())
    result = record["result"]
    assert record["settings"]["chunk_tokens"] == 64 and record["adapter_type"] == "locas"
    assert result["total_tokens"] == 319 and len(result["losses"]) == len(result["baseline_losses"]) == 5
    assert result["perplexity"] > 1 and result["tokens_per_s"] > 0

    # the same command again resumes from the final checkpoint: same results, nothing retrained (in this process)
    assert cli.main([*memorize[3:], "--checkpoint-dir", str(checkpoints), "--overwrite"]) == 0
    again = json.loads((out / cli.RESULTS_FILE).read_text())["result"]
    assert again["losses"] == result["losses"] and again["wall_time_s"] == result["wall_time_s"]

    merge = command(
        *console_script(), "merge", "--model", str(files["main"]), "--adapter", str(out), "--out", str(merged)
    )
    assert merge.returncode == 0, merge.stderr[-3000:]
    assert "intermediate size 128 -> 136" in merge.stdout
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        vanilla = AutoModelForCausalLM.from_pretrained(merged)(ids).logits
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(files["main"]), out)(ids).logits
    torch.testing.assert_close(vanilla, adapted, atol=1e-5, rtol=1e-5)
    assert (merged / "tokenizer.json").exists()

    scored = command(*console_script(), "eval", *common, "--adapter", str(out), *RUN)
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert "with adapter" in scored.stdout and "without adapter" in scored.stdout


def error_of(capsys, argv) -> tuple[int, str]:
    """Exit status and stderr of one in-process run; stderr must be exactly one ``error:`` line."""
    try:
        status = cli.main(argv)
    except SystemExit as exc:  # argparse
        status = exc.code
    err = capsys.readouterr().err.strip()
    # progress and memorize's plan line ("memorize: N tokens of ...", printed once the inputs passed) are not errors
    progress = ("Loading weights", "Failed to load CPU", "memorize: ")
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(progress)]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return status, lines[0]


def test_bad_inputs_give_one_error_line(files, tmp_path, capsys, monkeypatch):
    main, text, root = str(files["main"]), str(files["text"]), files["root"]
    out = str(tmp_path / "out")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)))
    (tmp_path / "nul.txt").write_bytes(b"text\x00more text")
    (tmp_path / "short.txt").write_text("A short text.")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("x")

    def memorize(*args: str) -> list[str]:  # --text accumulates: the default text only where args give none
        return ["memorize", "--model", main, *(() if "--text" in args else ("--text", text)), "--out", out, *args]

    cases = [
        (memorize("--width", "0"), 2, r"argument --r/--width: expected an integer >= 1, got '0'"),
        (memorize("--chunk-tokens", "1"), 2, r"argument --chunk-tokens: expected an integer >= 2"),
        (memorize("--lr=-1e-3"), 2, r"argument --lr: expected a positive number, got '-1e-3'"),
        (memorize("--context-tokens", "x"), 2, r"argument --context-tokens: expected an integer >= 0, got 'x'"),
        (memorize("--max-tokens", "0"), 2, r"expected a positive integer or 'all'"),
        (memorize("--load-in-4bit", "--load-in-8bit"), 2, r"not allowed with argument"),
        (memorize("--text", str(tmp_path / "missing.txt")), 1, r"text file .*missing.txt not found"),
        (memorize("--text", str(tmp_path / "empty.txt")), 1, r"text file .*empty.txt is empty"),
        (memorize("--text", str(tmp_path / "binary.bin")), 1, r"binary.bin is not a UTF-8 text file"),
        (memorize("--text", str(tmp_path / "nul.txt")), 1, r"nul.txt is not a text file \(it contains NUL bytes\)"),
        (memorize("--text", str(tmp_path / "short.txt")), 1, r"the text has \d+ tokens, fewer than one chunk of 512"),
        (memorize("--max-tokens", "100"), 1, r"--max-tokens 100 keeps fewer tokens than one chunk of 512: raise"),
        (
            ["ask", "--adapter", main, "--question", "Q?"],
            1,
            r"is a model folder \(it has config.json\), not an adapter",
        ),
        (memorize("--model", "some-org/some-model"), 1, r"model folder some-org/some-model not found"),
        (memorize("--out", str(tmp_path / "full")), 1, r"exists and is not empty: pass --overwrite"),
        (memorize("--r", "500"), 1, r"--r 500 exceeds the MLP's intermediate size 128 of .*: .* at most 128$"),
        (
            ["eval", "--model", str(files["wide"]), "--text", text, "--adapter", str(files["adapters"]["locas"])],
            1,
            r"was made for another base model: its model.layers.0.mlp has 64 features, this model's 96",
        ),
        (
            ["merge", "--model", str(files["wide"]), "--adapter", str(files["adapters"]["lora"]), "--out", out],
            1,
            r"another base model: its model\.layers\.0\.\S+ has \d+ features, this model.s \d+ \(hidden size 96",
        ),
        (
            ["merge", "--model", str(files["shallow"]), "--adapter", str(files["adapters"]["locas"]), "--out", out],
            1,
            r"was made for another base model: it has layer 1, this model has 1 layers",
        ),
        (
            ["merge", "--model", main, "--adapter", str(root / "nowhere"), "--out", out],
            1,
            r"adapter folder .*nowhere not found$",
        ),
        (
            ["merge", "--model", main, "--adapter", str(tmp_path / "short.txt"), "--out", out],
            1,
            r"short\.txt is a file, not an adapter folder \(one holding adapter_config\.json and adapter_model\.safetensors\)$",  # noqa: E501
        ),
        (
            ["eval", "--model", main, "--text", text, "--adapter", str(tmp_path / "full")],
            1,
            r"full is not an adapter folder: it has no adapter_config\.json or adapter_model\.safetensors$",
        ),
        (
            ["merge", "--model", main, "--adapter", str(files["adapters"]["lora"]), "--out", out, "--dequantize"],
            1,
            r"--dequantize applies to Locas adapters",
        ),
    ]
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "adapter_config.json").write_bytes((files["adapters"]["locas"] / "adapter_config.json").read_bytes())
    weights = (files["adapters"]["locas"] / "adapter_model.safetensors").read_bytes()
    for content in (weights[: len(weights) // 2], b"", b"not a safetensors file at all"):  # truncated, empty, foreign
        (damaged / "adapter_model.safetensors").write_bytes(content)
        for command in (["merge", "--out", out], ["eval", "--text", text]):
            status, line = error_of(capsys, [*command, "--model", main, "--adapter", str(damaged)])
            assert status == 1 and re.search(r"damaged/adapter_model\.safetensors is not a readable safetensors", line)
    for argv, expected_status, pattern in cases:
        status, line = error_of(capsys, argv)
        assert status == expected_status, (argv, line)
        assert re.search(pattern, line), (argv, line)

    # without prepared assets, the defaults say how to prepare them
    monkeypatch.setenv("PEFT_LOCAS_CACHE", str(tmp_path / "no-cache"))
    assert error_of(capsys, ["memorize", "--text", text, "--out", out]) == (
        1,
        "error: the default model is not prepared: run `peft-locas assets`, or pass --model FOLDER",
    )
    status, line = error_of(capsys, memorize("--text", "emma"))
    assert status == 1 and "book 'emma' is not prepared: run `peft-locas assets` first" in line


def test_a_checkpoint_of_another_run_is_refused(files, tmp_path, capsys):
    common = ["--model", str(files["main"]), "--text", str(files["text"]), "--checkpoint-dir", str(tmp_path / "ck")]
    assert cli.main(["memorize", *common, "--out", str(tmp_path / "a"), *MEMORIZE]) == 0
    capsys.readouterr()
    status, line = error_of(capsys, ["memorize", *common, "--out", str(tmp_path / "b"), *MEMORIZE, "--seed", "1"])
    assert status == 1 and "belongs to another run (settings: seed 0 -> 1)" in line


def test_assets_command_passes_its_arguments_on(monkeypatch):
    seen = []
    monkeypatch.setattr(assets, "main", lambda argv, prog: seen.append((argv, prog)) or 0)
    assert cli.main(["assets", "--only", "books", "--cache-dir", "/somewhere"]) == 0
    assert seen == [(["--only", "books", "--cache-dir", "/somewhere"], "peft-locas assets")]


def test_merge_keeps_the_base_dtype_and_warns_on_a_needless_dequantize(files, tmp_path, capsys):
    base = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(files["main"], dtype=torch.bfloat16).save_pretrained(base)
    (base / "tokenizer.json").write_bytes((files["main"] / "tokenizer.json").read_bytes())
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (files["main"] / name).exists():
            (base / name).write_bytes((files["main"] / name).read_bytes())
    adapter = files["adapters"]["locas"]
    merged = tmp_path / "merged"
    argv = ["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(merged), "--dequantize"]
    assert cli.main(argv) == 0
    assert "warning: --dequantize has no effect: the base is not quantized" in capsys.readouterr().err
    assert AutoModelForCausalLM.from_pretrained(merged).dtype == torch.bfloat16
    assert cli.main([*argv[:-1], "--overwrite", "--dtype", "float32"]) == 0
    assert AutoModelForCausalLM.from_pretrained(merged).dtype == torch.float32
