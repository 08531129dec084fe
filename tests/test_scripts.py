"""The README's main-job script with extra flags (its whole-book example passes `--text emma --max-tokens all`), run as
a user runs it, on a tiny model and text so that it stays fast."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_checkpoint import make_checkpoint, sample_text

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    Path(sys.prefix).resolve() != (REPO / ".venv").resolve(),
    reason="runs the script in the repository's .venv, which scripts/test.sh sets up",
)
def test_memorize_book_script_passes_extra_flags_on(tmp_path):
    model = make_checkpoint(tmp_path / "model")
    text = tmp_path / "story.txt"
    text.write_text(sample_text(), encoding="utf-8")
    out = tmp_path / "run"
    env = dict(os.environ, OUT=str(out), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    flags = ["--model", str(model), "--text", str(text), "--max-tokens", "320", "--chunk-tokens", "64"]
    flags += ["--context-tokens", "16", "--r", "8"]
    done = subprocess.run(
        ["bash", "scripts/memorize_book.sh", *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "tokens scored           319 in 5 chunks" in done.stdout
    assert "merged checkpoint (MLP intermediate size 128 -> 136)" in done.stdout
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "merged" / "config.json").is_file()
