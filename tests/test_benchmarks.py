"""Every benchmark runs end to end in its smallest mode on a tiny model, so the scripts cannot rot."""

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_benchmark(script: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--model", "tiny", "--quick", *args],
        capture_output=True,
        text=True,
        cwd=BENCHMARKS,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.parametrize(
    "script, extra, keys",
    [
        ("overhead.py", ["--tokens", "32", "--repeats", "1"], {"inference", "decode", "training", "init_vs_forward"}),
        ("overhead.py", ["--tokens", "32", "--repeats", "1", "--dtype", "bfloat16"], {"inference", "training"}),
        ("merge_fidelity.py", ["--tokens", "32"], {"rows"}),
        ("init_ablation.py", ["--chunk", "32", "--steps", "1", "--offsets", "0,64"], {"runs", "mean_next_chunk_loss"}),
        ("startup.py", ["--repeats", "1"], {"rows", "repeats"}),
    ],
)
def test_benchmark_smallest_mode(tmp_path, script, extra, keys):
    out = tmp_path / "result.json"
    run_benchmark(script, "--out", str(out), *extra)
    result = json.loads(out.read_text())
    assert keys <= result.keys() and result["machine"]["torch"]
    assert result["machine"]["dtype"] == ("bfloat16" if "bfloat16" in extra else "float32")
    if script == "merge_fidelity.py":
        rows = {row["setting"]: row for row in result["rows"]}
        assert rows["fp32 merge"]["max abs diff"] < 1e-4
        assert rows["fp32 merge"]["effect kept per block"] == pytest.approx(1, abs=1e-4)
        assert rows["nf4 re-quantized merge"]["memory effect (mean abs)"] > 1e-4  # the memory was trained first
        assert set(rows) >= {
            "int8 re-quantized merge",
            "int8 float export",
            "nf4 re-quantized merge",
            "nf4 float export",
        }
    elif script == "init_ablation.py":
        assert [run["offset"] for run in result["runs"]] == [0, 64]
        losses = result["mean_next_chunk_loss"]
        assert set(losses) == {"top_k", "random_clone", "bottom_k", "activation_keys", "param_norm", "gaussian"}
        assert all(0 < loss < 10 for loss in losses.values())  # a random model over 256 tokens: about ln 256 = 5.5
    elif script == "startup.py":
        rows = {row["command"]: row for row in result["rows"]}
        assert {"peft-locas --help", "import peft_locas", "python -c pass", "import peft (autoload off)"} <= set(rows)
        assert all(row["wall_s"] > 0 and row["vs_bare_python"] > 0 for row in rows.values())
        autoload = {row["command"]: row for row in result["autoload"]}  # the .pth hook on against off
        assert set(autoload) == {"python -c pass", "import peft"}
        for name, row in autoload.items():
            assert row["wall_ratio"] == pytest.approx(row["wall_on_s"] / row["wall_off_s"])
            assert row["cpu_ratio"] == pytest.approx(row["cpu_on_s"] / row["cpu_off_s"])
            off = rows[f"{name} (autoload off)"]
            assert (row["wall_on_s"], row["wall_off_s"]) == (rows[name]["wall_s"], off["wall_s"])
    else:
        variants = [row["variant"] for row in result["inference"]]
        assert variants == ["base", "locas r=16", "locas r=64", "locas r=256", "locas r=64 merged", "lora r=64"]
        assert all(row["tokens/s"] > 0 for row in result["inference"])


def test_compose_smallest_mode(tmp_path):
    """Two memories composed keep each book's gain, exactly through the merge."""
    out = tmp_path / "compose.json"
    protocol = ["--tokens", "256", "--chunk", "64", "--context", "16", "--work", str(tmp_path / "work")]
    run_benchmark("compose.py", "--out", str(out), *protocol)
    rows = {row["book"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"pride_and_prejudice", "persuasion"}
    for row in rows.values():
        assert row["merged composed"] == pytest.approx(row["composed"], rel=1e-4)
        assert row["own memory"] < row["base"]  # the tiny model learns its random text a little


def test_batch_memorize_smallest_mode(tmp_path):
    """Batched and sequential memorisation, each in its own process: the same perplexities, both timed."""
    out = tmp_path / "batch.json"
    protocol = ["--tokens", "96", "--chunk", "32", "--context", "8", "--r", "8", "--batch-sizes", "2", "--rounds", "1"]
    run_benchmark("batch_memorize.py", "--out", str(out), *protocol)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["B"] == 2 and row["max ppl diff"] < 1e-3
    assert row["batched tok/s"] > 0 and row["sequential tok/s"] > 0 and row["batched peak GiB"] > 0
    assert row["speed-up"] == pytest.approx(row["batched tok/s"] / row["sequential tok/s"])


def test_profile_step_smallest_mode(tmp_path):
    """The profile finds a weight gradient for every memory matrix and none for a frozen weight or the embedding."""
    out = tmp_path / "profile.json"
    run_benchmark("profile_step.py", "--out", str(out), "--r", "8")
    result = json.loads(out.read_text())
    assert result["memory_weight_gradients_per_step"] == result["memory_parameters"] == 6  # 2 blocks x gate/key/value
    assert result["frozen_weight_gradients_per_step"] == 0 and result["embedding_backward_calls"] == 0
    assert result["forward_share"] + result["backward_share"] == pytest.approx(1.0)
    assert result["top_ops"] and result["seconds_per_step"] > 0


def test_steps_pareto_smallest_mode(tmp_path):
    """Every (book, method, steps) is measured once per round with each method's swept rate; perplexity repeats
    exactly across rounds; the target is evaluated from the rows; a rerun reuses the finished measurements."""
    out, work = tmp_path / "pareto.json", tmp_path / "work"
    protocol = ["--tokens", "96", "--chunk", "32", "--context", "8", "--r", "8", "--lora-r", "8", "--steps", "1"]
    protocol += ["--rounds", "2", "--sweep-tokens", "64", "--lora-lrs", "1e-3,3e-3", "--locas-lrs", "4e-3,1e-2"]
    protocol += ["--work", str(work), "--jobs", "2"]
    protocol += ["--books", "persuasion"]
    run_benchmark("steps_pareto.py", "--out", str(out), *protocol)
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(row["method"], row["steps"]) for row in rows] == [("locas", 1), ("lora", 1)]
    assert all(len(row["runs"]) == 2 and row["ppl spread"] == 0 and row["CPU s"] > 0 for row in rows)
    assert all(row["jobs"] == [2] and all(run["jobs"] == 2 for run in row["runs"]) for row in rows)
    for method in ("lora", "locas"):
        for steps, sweep in result[f"{method}_lr_sweep"].items():
            chosen = min(sweep["perplexity_by_lr"], key=sweep["perplexity_by_lr"].get)
            assert sweep["chosen"] == float(chosen)
            assert all(
                row["lr"] == sweep["chosen"] for row in rows if (row["method"], row["steps"]) == (method, int(steps))
            )
    assert [target["book"] for target in result["targets"]] == ["persuasion"]
    assert (tmp_path / "steps_pareto_quick.png").stat().st_size > 0
    stored = json.loads((work / "steps_pareto_runs.json").read_text())
    run_benchmark("steps_pareto.py", "--out", str(out), *protocol)
    assert json.loads((work / "steps_pareto_runs.json").read_text()) == stored  # nothing measured again
    assert json.loads(out.read_text())["rows"] == rows


def test_steps_pareto_lora_on_the_mlp_only(tmp_path, benchmarks_importable):
    """``--methods lora_mlp`` sweeps and measures TempLoRA's LoRA on the MLP projections alone (no target without both
    Locas and LoRA); its adapter holds LoRA weights beside the MLP's projections and nowhere else."""
    from common import load_model
    from peft import get_peft_model
    from steps_pareto import ADAPTERS

    out = tmp_path / "pareto.json"
    protocol = ["--tokens", "64", "--chunk", "32", "--context", "8", "--lora-r", "4", "--steps", "1", "--rounds", "1"]
    protocol += ["--sweep-tokens", "64", "--lora-lrs", "1e-3", "--methods", "lora_mlp", "--books", "persuasion"]
    protocol += ["--work", str(tmp_path / "w")]
    run_benchmark("steps_pareto.py", "--out", str(out), *protocol)
    result = json.loads(out.read_text())
    assert [(row["method"], row["lr"]) for row in result["rows"]] == [("lora_mlp", 1e-3)]
    assert "lora_mlp_lr_sweep" in result and "lora_lr_sweep" not in result and result["targets"] == []
    model = get_peft_model(load_model("tiny")[0], ADAPTERS["lora_mlp"](argparse.Namespace(lora_r=4)))
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_parameters() if ".lora_A." in name}
    layers = model.config.num_hidden_layers
    assert len(adapted) == 3 * layers and all(".mlp." in name for name in adapted)


def test_steps_pareto_refuses_unknown_methods(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "steps_pareto.py"), "--methods", "locas,dora", "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=BENCHMARKS,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].endswith(
        "--methods locas,dora: give each of locas, lora, lora_mlp at most once"
    )


def test_steps_target_picks_the_cheapest_locas_setting_at_or_below_loras_best():
    sys.path.insert(0, str(BENCHMARKS))
    from report import steps_target

    def row(method, steps, ppl, cpu):
        return {"book": "emma", "method": method, "steps": steps, "lr": None, "ppl": ppl, "wall s": cpu, "CPU s": cpu}

    rows = [row("lora", 1, 20.0, 50), row("lora", 2, 19.0, 100), row("lora", 4, 19.0, 200)]
    rows += [row("locas", 1, 19.5, 20), row("locas", 2, 18.9, 45), row("locas", 4, 18.5, 90)]
    target = steps_target("emma", rows)
    assert target["lora best"]["steps"] == 2  # the tie at 19.0 goes to the cheaper setting
    assert target["locas"]["steps"] == 2 and target["cpu ratio"] == pytest.approx(0.45)
    assert target["met"] and not target["stretch met"]
    missed = steps_target("emma", rows[:3] + [row("locas", 1, 19.5, 20)])
    assert missed["locas"] is None and not missed["met"]
    assert "no Locas setting reaches LoRA's best perplexity 19.00" in missed["summary"]


@pytest.fixture
def benchmarks_importable(monkeypatch):
    """The benchmark scripts importable as modules (``report``, ``common``, ...), for this test only."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))


def test_steps_pareto_page_says_which_runs_shared_the_machine(benchmarks_importable):
    """Runs measured one at a time (or before --jobs existed) add no column; two at a time show it round by round."""
    from report import steps_pareto_tables

    result = json.loads((BENCHMARKS / "results" / "steps_pareto.json").read_text())
    for row in result["rows"]:  # as measured before --jobs existed, or with --jobs 1
        row["runs"] = [{key: value for key, value in run.items() if key != "jobs"} for run in row["runs"]]
    assert "runs at a time" not in steps_pareto_tables(result)
    for row in result["rows"]:
        row["runs"] = [row["runs"][0], *({**run, "jobs": 2} for run in row["runs"][1:])]
    page = steps_pareto_tables(result)
    shown = "| " + ", ".join(["1"] + ["2"] * (result["rounds"] - 1)) + " |"  # "| 1, 2, 2 |" for three rounds
    assert "| runs at a time |" in page and page.count(shown) == len(result["rows"])


def test_report_renders_the_engines_locas_rate(benchmarks_importable):
    """report.py names the engine's default Locas learning rate without importing torch; it must stay the engine's."""
    from report import ENGINE_LOCAS_LR

    from peft_locas.engine.memorization import RECIPES

    assert ENGINE_LOCAS_LR == RECIPES["locas"]["lr"]


def test_best_settings_compare_book_ppl_and_steps_pareto_only_on_the_same_reading(benchmarks_importable):
    """Each method's best perplexity over both benchmarks' settings, and nothing when they read different tokens."""
    from report import best_settings, targets_table

    results = {
        name: json.loads((BENCHMARKS / "results" / f"{name}.json").read_text())
        for name in ("book_ppl", "steps_pareto", "overhead")
    }
    book_ppl, pareto = results["book_ppl"], results["steps_pareto"]
    pareto["tokens_per_book"] = book_ppl["tokens_per_book"] // 4
    assert best_settings(book_ppl, pareto) == []
    pareto["tokens_per_book"] = book_ppl["tokens_per_book"]
    for row in pareto["rows"]:  # as if read to book_ppl's length: LoRA best at 4 steps, Locas above book_ppl's
        row["ppl"] = {("lora", 4): 10.0, ("locas", 1): 100.0}.get((row["method"], row["steps"]), 1000.0)
    best = best_settings(book_ppl, pareto)
    assert [entry["book"] for entry in best] == ["pride_and_prejudice", "persuasion"]
    locas_there = next(r["ppl"] for r in book_ppl["tables"]["persuasion"] if r["method"] == "locas r=64 top_k")
    assert best[1]["locas"] == {"steps": 2, "lr": 4e-3, "ppl": locas_there}  # book_ppl's beats every Pareto setting
    lora_lr = pareto["rows"][-1]["lr"]  # Persuasion's LoRA at 4 steps, the last row
    assert best[1]["lora"] == {"steps": 4, "lr": lora_lr, "ppl": 10.0}
    page = targets_table(results)
    assert "| Persuasion: Locas r=64 PPL <= LoRA r=64, each at its best setting measured at 16,384 tokens " in page
    row = next(line for line in page.splitlines() if line.startswith("| Persuasion: Locas r=64 PPL <= LoRA r=64, each"))
    assert f"| {locas_there:.2f} (2 steps per chunk, lr 0.004) vs 10.00 (4 steps per chunk, lr {lora_lr:g}) |" in row
    assert row.endswith("| **no** |")
    for key, value in (("context", "512"), ("dtype", "bfloat16"), ("device", "cuda")):
        assert best_settings(book_ppl, {**pareto, "arguments": {**pareto["arguments"], key: value}}) == []


def test_book_ppl_and_forgetting_smallest_mode(tmp_path):
    """book_ppl runs every method once per book in its own process; a rerun reuses them; forgetting reuses the
    memories book_ppl trained (same protocol, same checkpoints)."""
    work, book_json = tmp_path / "work", tmp_path / "book.json"
    args = ["--books", "emma", "--tokens", "512", "--sweep-tokens", "256", "--lora-lrs", "1e-3,3e-3"]
    args += ["--chunk", "128", "--context", "64", "--work", str(work), "--out", str(book_json)]
    first = run_benchmark("book_ppl.py", *args)
    assert "running locas r=64 top_k on emma (512 tokens)" in first.stdout
    result = json.loads(book_json.read_text())
    assert set(result["lora_lr_sweep"]["perplexity_by_lr"]) == {"0.001", "0.003"}
    sweep = result["lora_lr_sweep"]["perplexity_by_lr"]
    assert result["lora_lr_sweep"]["chosen"] == float(min(sweep, key=sweep.get))
    rows = {row["method"]: row for row in result["tables"]["emma"]}
    assert list(rows) == [
        "no memory",
        "long window",
        "locas r=4 top_k",
        "locas r=16 top_k",
        "locas r=64 top_k",
        "locas r=64 gaussian",
        "locas r=64 random_clone",
        "locas r=64 bottom_k",
        "lora r=64",
    ]
    # the tiny Llama: 2 layers, hidden 64, intermediate 128; LoRA on q, k, v, o, gate, up, down
    assert rows["locas r=64 top_k"]["extra params"] == 2 * 3 * 64 * 64
    assert rows["lora r=64"]["extra params"] == 2 * 64 * (128 + 96 + 96 + 128 + 192 * 3)
    assert rows["no memory"]["time / no memory"] == 1 and rows["lora r=64"]["params / lora"] == 1
    for run in result["runs"]["emma"]:
        assert sum(run["result"]["token_counts"]) == 511  # every token but the first is predicted
        assert all(loss == loss and loss > 0 for loss in run["result"]["losses"])
    assert (tmp_path / result["plot"]).stat().st_size > 10_000

    again = run_benchmark("book_ppl.py", *args)
    assert "running" not in again.stdout and json.loads(book_json.read_text())["tables"] == result["tables"]

    checkpoints = sorted(work.glob("*.checkpoint"))
    out = tmp_path / "forgetting.json"
    mmlu = tmp_path / "mmlu.jsonl"
    rows = [
        {"question": f"What is {a} + {a}?", **{f"answer_{k}": str(2 * a + "abcd".index(k)) for k in "abcd"}}
        | {"correct_answer": "A", "topic": "arithmetic"}
        for a in range(6)
    ]
    mmlu.write_text("".join(json.dumps(row) + "\n" for row in rows))
    forgetting_args = ["--book", "emma", "--tokens", "512", "--chunk", "128", "--context", "64", "--questions", "5"]
    forgetting_args += [
        "--mmlu",
        str(mmlu),
        "--heldout-tokens",
        "256",
        "--lora-lr",
        str(result["lora_lr_sweep"]["chosen"]),
    ]
    run_benchmark("forgetting.py", *forgetting_args, "--work", str(work), "--out", str(out))
    assert sorted(work.glob("*.checkpoint")) == checkpoints  # nothing trained again
    forgetting = {row["model"]: row for row in json.loads(out.read_text())["rows"]}
    assert list(forgetting) == [
        "base",
        "locas r=64 top_k unmerged",
        "locas r=64 top_k merged",
        "lora r=64 unmerged",
        "lora r=64 merged",
    ]
    for merged, unmerged in (
        ("locas r=64 top_k merged", "locas r=64 top_k unmerged"),
        ("lora r=64 merged", "lora r=64 unmerged"),
    ):
        assert forgetting[merged]["gold loglik"] == pytest.approx(forgetting[unmerged]["gold loglik"], abs=1e-3)
        assert forgetting[merged]["held-out ppl"] == pytest.approx(forgetting[unmerged]["held-out ppl"], rel=1e-4)
    assert forgetting["base"]["gold loglik change"] == 0


def test_long_read_smallest_mode(tmp_path):
    """long_read reads one book with every width and LoRA in book_ppl's runs; each stretch's perplexity is its
    chunks' (their token-weighted mean loss recovers the whole read's); a rerun trains nothing again."""
    work, out = tmp_path / "work", tmp_path / "long_read.json"
    args = ["--tokens", "512", "--segment", "256", "--ranks", "4,16", "--chunk", "128", "--context", "64"]
    args += ["--long-chunk", "128", "--lora-lrs", "1e-3", "--work", str(work), "--out", str(out)]
    first = run_benchmark("long_read.py", *args)
    assert "running locas r=16 top_k on emma (512 tokens)" in first.stdout
    result = json.loads(out.read_text())
    rows = {row["method"]: row for row in result["rows"]}
    assert list(rows) == ["no memory", "locas r=4 top_k", "locas r=16 top_k", "lora r=64", "long window"]
    assert rows["locas r=16 top_k"]["extra params"] == 2 * 3 * 64 * 16
    for run, row in zip(result["runs"], result["rows"], strict=True):
        counts, losses = run["result"]["token_counts"], run["result"]["losses"]
        assert list(row)[2:4] == ["ppl 0-256", "ppl 256-512"]
        if run["spec"]["method"] != "long window":  # 128-token chunks: 127 + 128 tokens in the first stretch
            assert counts == [127, 128, 128, 128]
            first = sum(n * loss for n, loss in zip(counts[:2], losses[:2], strict=True)) / 255
            assert row["ppl 0-256"] == pytest.approx(math.exp(first), rel=1e-12)
        whole = (255 * math.log(row["ppl 0-256"]) + 256 * math.log(row["ppl 256-512"])) / 511
        assert whole == pytest.approx(math.log(row["ppl"]), rel=1e-9)
    assert (tmp_path / result["plot"]).stat().st_size > 10_000
    again = run_benchmark("long_read.py", *args)
    assert "running" not in again.stdout and json.loads(out.read_text())["rows"] == result["rows"]
    run_benchmark("long_read.py", *args, "--no-long-window")
    assert json.loads(out.read_text())["rows"] == result["rows"][:-1]
    # a second LoRA rate: only its run is new, and the rows name both rates
    both = run_benchmark("long_read.py", *args[:-6], "--lora-lrs", "1e-3,3e-3,0.001", *args[-4:], "--no-long-window")
    assert both.stdout.count("running") == 1 and "running lora r=64 on emma" in both.stdout
    rows_both = {row["method"]: row for row in json.loads(out.read_text())["rows"]}
    assert list(rows_both)[-2:] == ["lora r=64 lr 0.001", "lora r=64 lr 0.003"]
    assert rows_both["lora r=64 lr 0.001"]["ppl"] == rows["lora r=64"]["ppl"]
    assert json.loads(out.read_text())["lora_lrs"] == [1e-3, 3e-3]


def test_cloze_scoring_with_a_shared_prompt_cache_matches_whole_sequences():
    """forgetting.py reads the prompt once and scores the options from its cache; the result must equal scoring
    each prompt + option sequence on its own."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(BENCHMARKS))
    try:
        from common import tiny_model_folder
        from forgetting import option_logliks
    finally:
        sys.path.remove(str(BENCHMARKS))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_folder()).eval()
    prompt, options = [5, 17, 99, 3, 42], [[7], [8, 9, 10], [200, 1], [33, 34, 35, 36]]
    expected = []
    with torch.no_grad():
        for option in options:
            ids = torch.tensor([prompt + option])
            logprobs = F.log_softmax(model(ids).logits[0].float(), dim=-1)
            positions = torch.arange(len(prompt), len(prompt) + len(option))
            expected.append(logprobs[positions - 1, ids[0, positions]].sum().item())
    assert option_logliks(model, prompt, options) == pytest.approx(expected, abs=1e-4)
    assert option_logliks(model, prompt, [[7], [7]]) == pytest.approx(expected[:1] * 2, abs=1e-4)  # one-token options


def test_benchmarks_explain_themselves():
    """Every script's ``--help`` works; one interpreter runs them all (their shared imports load once)."""
    scripts = [
        "overhead.py",
        "merge_fidelity.py",
        "cuda_check.py",
        "book_ppl.py",
        "forgetting.py",
        "init_ablation.py",
        "startup.py",
        "locomo.py",
        "recall_study.py",
        "compose.py",
        "batch_memorize.py",
        "profile_step.py",
        "steps_pareto.py",
        "report.py",
    ]
    code = f"""
import contextlib, io, runpy, sys
sys.path.insert(0, {str(BENCHMARKS)!r})
for script in {scripts!r}:
    sys.argv = [script, "--help"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exit:
            assert exit.code in (0, None), (script, exit.code)
    assert "usage:" in out.getvalue(), script
    if script not in ("report.py", "cuda_check.py", "startup.py"):  # every benchmark of a model runs on a GPU too
        assert "--device DEVICE" in out.getvalue() and "--dtype {{bfloat16,float16,float32}}" in out.getvalue(), script
    print(script, "ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=BENCHMARKS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [word for script in scripts for word in (script, "ok")]


def test_results_page_tables_are_rendered_from_the_committed_results(tmp_path):
    """docs/benchmarks.md includes the tables benchmarks/report.py renders; they must match the committed JSON."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from report import DOCS, render
    finally:
        sys.path.remove(str(BENCHMARKS))
    written = render(BENCHMARKS / "results", tmp_path)
    assert {path.name for path in written} >= {"overhead.md", "merge_fidelity.md", "init_ablation.md"}
    committed = DOCS / "benchmark-results"
    for path in written:
        assert (committed / path.name).read_bytes() == path.read_bytes(), (
            f"docs/benchmark-results/{path.name} is stale: run `python benchmarks/report.py`"
        )


def test_asking_benchmark_smallest_mode(tmp_path):
    out = tmp_path / "asking.json"
    run_benchmark("asking.py", "--out", str(out), "--work", str(tmp_path / "work"), "--tokens", "64")
    result = json.loads(out.read_text())
    rows = {row["method"]: row for row in result["rows"]}
    assert list(rows) == ["generate", "ask", "ask_many", "ask_many (prefix copied)"]
    assert rows["generate"]["vs_generate"] == 1 and rows["generate"]["prefill_s"] is None
    assert all(row["total_s"] == pytest.approx(row["prefill_s"] + row["questions_s"]) for row in result["rows"][1:])
    assert len(result["answers"]) == len(result["questions"]) == 4 and result["tokens"] == 64


@pytest.fixture
def steps_pareto(benchmarks_importable):
    import steps_pareto

    return steps_pareto


class _Runs:
    """Stands in for steps_pareto.Runs (its ``stopping`` and ``get``): records the order of runs; ``on_run`` acts
    before each is "measured"."""

    def __init__(self, on_run=lambda count: None):
        self.on_run, self.order, self.stopping = on_run, [], False

    def get(self, spec, round_index):
        if self.stopping:
            raise SystemExit("stopped by a signal")
        self.on_run(len(self.order))
        self.order.append((round_index, spec["name"]))
        return {"perplexity": 1.0, "seconds": 1.0, "cpu_seconds": 1.0}


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_steps_pareto_interleaves_and_stops_on_a_signal(steps_pareto, stop):
    """Rounds alternate direction; a SIGTERM or SIGINT during a run lets it finish and keeps it, then nothing new
    starts."""
    specs = [{"name": "a"}, {"name": "b"}, {"name": "c"}]
    runs = _Runs()
    measured = steps_pareto.measure_all(runs, specs, rounds=2, jobs=1)
    assert runs.order == [(0, "a"), (0, "b"), (0, "c"), (1, "c"), (1, "b"), (1, "a")]
    assert all(len(measured[index]) == 2 for index in range(3))

    def signal_on_second(count):
        if count == 1:
            os.kill(os.getpid(), stop)
            for _ in range(1000):  # the handler runs in the main thread; wait for it, as a long run would
                if runs.stopping:
                    break
                time.sleep(0.01)

    runs = _Runs(signal_on_second)
    previous = steps_pareto.stop_on_signals(runs)
    try:
        with pytest.raises(SystemExit, match="stopped by a signal"):
            steps_pareto.measure_all(runs, specs, rounds=2, jobs=1)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    assert len(runs.order) == 2  # the run in flight when the signal came finished; none started after it


def test_steps_pareto_raises_a_workers_error_and_starts_nothing_after_it(steps_pareto):
    def fail_on_second(count):
        if count == 1:
            raise RuntimeError("child output was not JSON")

    runs = _Runs(fail_on_second)
    with pytest.raises(RuntimeError, match="child output was not JSON"):
        steps_pareto.measure_all(runs, [{"name": "a"}, {"name": "b"}, {"name": "c"}], rounds=1, jobs=1)
    assert runs.order == [(0, "a")] and runs.stopping  # a worker still measuring would start no repeat either


_PARETO_SETTINGS = {"model": "tiny", "r": 8, "lora_r": 8, "chunk": 32, "context": 8, "seed": 0, "threads": 1}
_PARETO_SETTINGS |= {"device": "cpu", "dtype": "float32"}


def _pareto_args(work, **changed):
    return argparse.Namespace(**{**_PARETO_SETTINGS, **changed}, work=str(work), jobs=1)


def test_steps_pareto_runs_start_nothing_once_stopped(steps_pareto, tmp_path):
    """Once ``stopping`` is set, a stored run is still returned and an unmeasured one raises, naming the resume."""
    spec = {"book": "persuasion", "method": "lora"}
    stored = {"perplexity": 2.0, "seconds": 1.0, "cpu_seconds": 1.0}
    key = json.dumps({**spec, "round": 0}, sort_keys=True)
    (tmp_path / "steps_pareto_runs.json").write_text(json.dumps({"settings": _PARETO_SETTINGS, "runs": {key: stored}}))
    runs = steps_pareto.Runs(_pareto_args(tmp_path))
    runs.stopping = True
    assert runs.get(spec, 0) == stored
    with pytest.raises(SystemExit, match=r"stopped by a signal; finished runs are kept in .*: rerun to resume"):
        runs.get(spec, 1)


def test_steps_pareto_runs_refuse_other_settings_and_a_second_invocation(steps_pareto, tmp_path):
    """Runs measured with other settings are refused, not overwritten; a second invocation on the same --work too."""
    path = tmp_path / "steps_pareto_runs.json"
    path.write_text(json.dumps({"settings": {**_PARETO_SETTINGS, "threads": None}, "runs": {"k": {}}}))
    kept = path.read_text()
    with pytest.raises(SystemExit, match=r"holds runs measured with no --threads: rerun with those to resume them, or"):
        steps_pareto.Runs(_pareto_args(tmp_path))
    assert path.read_text() == kept
    first = steps_pareto.Runs(_pareto_args(tmp_path, threads=None))
    with pytest.raises(SystemExit, match=r"another steps_pareto.py is measuring into .*: let it finish, or pass"):
        steps_pareto.Runs(_pareto_args(tmp_path, threads=None))
    first._lock_file.close()  # the first invocation ends: its lock goes with it
    steps_pareto.Runs(_pareto_args(tmp_path, threads=None))


def test_steps_pareto_runs_record_how_many_were_measured_at_once(steps_pareto, tmp_path, monkeypatch):
    """Two runs overlapping record 2 each, the one after them alone records 1, whatever --jobs said."""
    runs = steps_pareto.Runs(_pareto_args(tmp_path))
    both_started = threading.Barrier(2, timeout=10)

    def child(spec):
        if spec["name"] != "alone":
            both_started.wait()
        return {"perplexity": 1.0, "seconds": 1.0, "cpu_seconds": 1.0}

    monkeypatch.setattr(runs, "_child", child)
    threads = [threading.Thread(target=runs.get, args=({"name": name}, 0)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert runs.get({"name": "alone"}, 0)["jobs"] == 1
    stored = json.loads((tmp_path / "steps_pareto_runs.json").read_text())["runs"]
    assert sorted(run["jobs"] for run in stored.values()) == [1, 2, 2]


@pytest.mark.parametrize("text", ["", "1e-3,", "0,1e-3", "fast"])
def test_learning_rates_refuse_what_is_not_a_list_of_positive_rates(benchmarks_importable, capsys, text):
    from common import learning_rates

    parser = argparse.ArgumentParser(prog="long_read.py")
    assert learning_rates(parser, "--lora-lrs", "1e-3,5e-4,0.001") == [1e-3, 5e-4]
    with pytest.raises(SystemExit):
        learning_rates(parser, "--lora-lrs", text)
    message = f"long_read.py: error: --lora-lrs {text!r}: give comma-separated positive learning rates, e.g. 1e-3,5e-4"
    assert capsys.readouterr().err.splitlines()[-1] == message


def test_steps_pareto_measures_again_a_run_that_did_not_have_its_core(steps_pareto, tmp_path, monkeypatch):
    """CPU time under 90% of wall time (one thread): measured again, at most three times in all, keeping the attempt
    with the largest share of its core; a run stored from before is judged the same way on a resume."""
    path = tmp_path / "steps_pareto_runs.json"
    old = {"perplexity": 1.0, "seconds": 10.0, "cpu_seconds": 5.0}  # shared its core half the time
    path.write_text(json.dumps({"settings": _PARETO_SETTINGS, "runs": {json.dumps({"name": "old", "round": 0}): old}}))
    runs = steps_pareto.Runs(_pareto_args(tmp_path))
    shares = {"old": [0.8, 0.95], "busy": [0.5, 0.7, 0.6, 0.99], "alone": [0.97]}
    monkeypatch.setattr(
        runs,
        "_child",
        lambda spec: {"perplexity": 1.0, "seconds": 10.0, "cpu_seconds": 10 * shares[spec["name"]].pop(0)},
    )
    assert runs.get({"name": "alone"}, 0) == {
        "perplexity": 1.0,
        "seconds": 10.0,
        "cpu_seconds": 9.7,
        "jobs": 1,
        "attempts": 1,
    }
    busy = runs.get({"name": "busy"}, 0)
    assert (busy["cpu_seconds"], busy["attempts"]) == (7.0, 3) and shares["busy"] == [0.99]  # the fourth never ran
    resumed = runs.get({"name": "old"}, 0)
    assert (resumed["cpu_seconds"], resumed["attempts"]) == (9.5, 3) and shares["old"] == []
    stored = json.loads(path.read_text())["runs"]
    assert stored[json.dumps({"name": "busy", "round": 0})] == busy
    swept = {"perplexity": 1.0, "seconds": 10.0, "cpu_seconds": 1.0}  # a sweep's run: only its perplexity counts
    runs.stored["runs"][json.dumps({"name": "sweep", "round": 0})] = swept
    assert runs.get({"name": "sweep"}, 0, timed=False) == swept
