"""Every benchmark runs end to end in its smallest mode on a tiny model, so the scripts cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize(
    "script, extra, keys",
    [
        ("overhead.py", ["--tokens", "32", "--repeats", "1"], {"inference", "training", "init_vs_forward"}),
        ("merge_fidelity.py", ["--tokens", "32"], {"rows"}),
    ],
)
def test_benchmark_smallest_mode(tmp_path, script, extra, keys):
    out = tmp_path / "result.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--model", "tiny", "--quick", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        cwd=BENCHMARKS,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert keys <= result.keys() and result["machine"]["torch"]
    if script == "merge_fidelity.py":
        rows = {row["setting"]: row for row in result["rows"]}
        assert rows["fp32 merge_and_unload"]["max abs diff"] < 1e-4
        assert set(rows) >= {
            "int8 re-quantized merge",
            "int8 float export",
            "nf4 re-quantized merge",
            "nf4 float export",
        }
    else:
        variants = [row["variant"] for row in result["inference"]]
        assert variants == ["base", "locas r=16", "locas r=64", "locas r=256", "locas r=64 merged", "lora r=64"]
        assert all(row["tokens/s"] > 0 for row in result["inference"])


def test_benchmarks_explain_themselves():
    for script in ("overhead.py", "merge_fidelity.py", "cuda_check.py"):
        done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True)
        assert done.returncode == 0 and "usage:" in done.stdout
