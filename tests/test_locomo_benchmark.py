"""benchmarks/locomo.py and benchmarks/recall_probe.py: the smallest mode on a tiny model, resuming after a kill, the
evidence-outside-window split on a hand-made conversation, the aggregation, and the probe generator."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
MEMORIES = ["locas_ntp", "locas_distill", "lora"]
SETTINGS = [window + (f"+{m}" if m else "") for window in ("none", "short", "long") for m in ["", *MEMORIES]]


def benchmark_module(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def run_locomo(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "locomo.py"), *args], capture_output=True, text=True, cwd=BENCHMARKS
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def mixed_categories_probe(path: Path) -> Path:
    """A small probe whose questions are relabelled with every LoCoMo category in turn (category 5 made adversarial),
    so every prompt form and scoring rule runs."""
    recall_probe = benchmark_module("recall_probe")
    data = recall_probe.generate_probe(facts=10, tokens=700, seed=3)
    for index, qa in enumerate(data[0]["qa"]):
        qa["category"] = index % 5 + 1
        if qa["category"] == 5:
            qa["adversarial_answer"] = qa.pop("answer")
    path.write_text(json.dumps(data))
    return path


def flat(value, prefix=""):
    """``(path, leaf)`` pairs of nested dicts and lists, for comparing two results with a tolerance."""
    if isinstance(value, dict):
        return [item for key, inner in value.items() for item in flat(inner, f"{prefix}/{key}")]
    if isinstance(value, list):
        return [item for i, inner in enumerate(value) for item in flat(inner, f"{prefix}/{i}")]
    return [(prefix, value)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Work folder A: a run with one memory, then a simulated kill (one setting's answers half written with a torn
    last line, another's deleted), then the full run. Work folder B: the same memories, every setting answered in one
    uninterrupted run."""
    root = tmp_path_factory.mktemp("locomo")
    data = mixed_categories_probe(root / "probe.json")
    common = ["--model", "tiny", "--quick", "--threads", "1", "--data", str(data), "--r", "8", "--chunk", "128"]
    common += ["--context", "64", "--short-tokens", "150", "--long-tokens", "500", "--answer-tokens", "4"]
    work_a, work_b = root / "a", root / "b"
    first = run_locomo(*common, "--work", str(work_a), "--memories", "locas_ntp", "--out", str(root / "a1.json"))
    answers = work_a / "probe-3" / "answers"
    lines = (answers / "short+locas_ntp.jsonl").read_text().splitlines()
    (answers / "short+locas_ntp.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:40])
    (answers / "none.jsonl").unlink()
    untouched = ["short.jsonl", "long.jsonl", "none+locas_ntp.jsonl", "long+locas_ntp.jsonl"]
    untouched = {name: (answers / name).stat().st_mtime_ns for name in untouched}
    record = work_a / "probe-3" / "memories" / "locas_ntp" / "record.json"
    untouched["record"] = record.stat().st_mtime_ns
    second = run_locomo(*common, "--work", str(work_a), "--out", str(root / "a2.json"))
    after = {name: (answers / name).stat().st_mtime_ns for name in untouched if name != "record"}
    after["record"] = record.stat().st_mtime_ns

    shutil.copytree(work_a / "probe-3" / "memories", work_b / "probe-3" / "memories")
    third = run_locomo(*common, "--work", str(work_b), "--out", str(root / "b.json"))
    return {
        "root": root,
        "first": (first, json.loads((root / "a1.json").read_text())),
        "resumed": (second, json.loads((root / "a2.json").read_text())),
        "uninterrupted": (third, json.loads((root / "b.json").read_text())),
        "mtimes": (untouched, after),
        "answers": answers,
    }


def test_smallest_mode_reports_every_setting_and_category(runs):
    done, result = runs["uninterrupted"]
    assert "LoCoMo categories: 1 = multi-hop, 2 = temporal, 3 = open-domain, 4 = single-hop, 5 = adversarial" in (
        done.stdout
    )
    assert result["mode"] == "quick" and "probe-3: sessions 1-" in result["quick_mode"]
    assert result["category_names"] == {"1": "multi-hop", "2": "temporal", "3": "open-domain", "4": "single-hop"} | {
        "5": "adversarial"
    }
    assert list(result["datasets"]) == ["probe"]  # a file written by recall_probe.py is reported as a probe
    summary = result["datasets"]["probe"]
    assert list(summary["settings"]) == SETTINGS
    for name, entry in summary["settings"].items():
        assert entry["all"]["f1"]["n"] == 10 and entry["all"]["loglik"]["n"] == 10, name
        assert sorted(entry["categories"]) == ["1", "2", "3", "4", "5"]
        assert all(scores["f1"]["n"] == 2 for scores in entry["categories"].values())
        assert 0 <= entry["all"]["f1"]["mean"] <= 1 and entry["all"]["loglik"]["mean"] < 0
        assert entry["all"]["loglik"]["stderr"] > 0
    outside = {name: entry["outside"]["f1"]["n"] for name, entry in summary["settings"].items()}
    # every probe question has evidence; a longer window can only hold more of it
    assert outside["none"] == 10 and outside["long"] <= outside["short"] <= 10 and outside["long"] < 10
    assert all(outside[f"{window}+{m}"] == outside[window] for window in ("none", "short", "long") for m in MEMORIES)
    pairs = {(item["a"], item["b"], item["subset"]) for item in summary["paired"]}
    assert ("short+locas_ntp", "short", "outside") in pairs and ("none+locas_distill", "none+lora", "all") in pairs
    assert summary["paired_by_conversation"] == {}  # one conversation: the pooled differences are its own
    info = result["conversations"]["probe-3"]
    assert info["sample"] == "probe-3" and list(info["memories"]) == MEMORIES and list(info["settings"]) == SETTINGS
    assert all(cost["wall_s"] > 0 and cost["cpu_s"] > 0 for cost in info["memories"].values())
    assert info["windows"]["short"]["tokens"] <= 150 and info["windows"]["long"]["tokens"] <= 500
    assert result["total_wall_time_s"] > 0 and result["protocol"]["lora_lr_source"]
    assert (runs["root"] / result["plot"]).stat().st_size > 10_000
    adversarial = [json.loads(line) for line in (runs["answers"] / "none.jsonl").read_text().splitlines()[1:]]
    adversarial = [record for record in adversarial if record["category"] == 5]
    assert len(adversarial) == 2 and all(r["gold"] == "Not mentioned in the conversation." for r in adversarial)


def test_a_killed_run_resumes_to_the_uninterrupted_result(runs):
    partial, (second, resumed), (third, uninterrupted) = runs["first"][1], runs["resumed"], runs["uninterrupted"]
    first_settings = ["none", "none+locas_ntp", "short", "short+locas_ntp", "long", "long+locas_ntp"]
    assert list(partial["datasets"]["probe"]["settings"]) == first_settings
    settings = resumed["conversations"]["probe-3"]["settings"]
    assert settings["none"] == settings["none"] | {"answered_now": 10, "reused": 0}
    assert settings["short+locas_ntp"]["answered_now"] == 8 and settings["short+locas_ntp"]["reused"] == 2
    assert settings["long"]["answered_now"] == 0 and settings["long+locas_ntp"]["reused"] == 10
    before, after = runs["mtimes"]
    assert before == after  # finished settings and the finished memory were not recomputed
    assert "into locas_ntp" not in second.stdout and "into locas_distill" in second.stdout
    assert "memorising" not in third.stdout
    got, expected = flat(resumed["datasets"]), flat(uninterrupted["datasets"])
    assert [path for path, _ in got] == [path for path, _ in expected]
    for (path, value), (_, reference) in zip(got, expected, strict=True):
        assert value == (pytest.approx(reference, abs=1e-6) if isinstance(reference, float) else reference), path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(benchmark_module("locomo").tiny_folder(tmp_path_factory.mktemp("tiny")))


def test_evidence_outside_the_window_on_a_hand_made_conversation(tokenizer):
    from peft_locas.recall.dialogue import Conversation, Question, Session, Turn

    locomo = benchmark_module("locomo")
    questions = {
        "before": Question("q1", "a", 4, ("D1:2",)),
        "same session, before the window": Question("q2", "a", 4, ("D2:1",)),
        "in the window": Question("q3", "a", 4, ("D2:3",)),
        "half in the window": Question("q4", "a", 1, ("D1:1", "D2:3")),
        "no evidence": Question("q5", "a", 4, ()),
        "unknown turn": Question("q6", "a", 4, ("D9:9",)),
    }
    conversation = Conversation(
        "hand",
        (
            Session(1, "1 May 2031", (Turn("Ann", "Hello Bob.", "D1:1"), Turn("Bob", "My dog is Rex.", "D1:2"))),
            Session(
                2,
                "9 May 2031",
                (
                    Turn("Ann", "The garden is full of weeds after the rain.", "D2:1"),
                    Turn("Bob", "I went for a long walk by the river.", "D2:2"),
                    Turn("Ann", "My sister is coming to stay next week.", "D2:3"),
                ),
            ),
        ),
        tuple(questions.values()),
    )
    dialogue = locomo.Dialogue.build("hand", "locomo", "-", conversation, 2, tokenizer)

    def count(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    window_unit = dialogue.dia_units["D2:2"]
    header = "[Session 2 - 9 May 2031]\n"
    budget = len(dialogue.ids) - dialogue.starts[window_unit] + count(header)
    short = locomo.view(dialogue, "short", budget, count)
    assert (short.unit, short.start_token, short.tokens) == (window_unit, dialogue.starts[window_unit], budget)
    assert (
        short.context
        == header + "Bob: I went for a long walk by the river.\nAnn: My sister is coming to stay next week."
    )
    assert locomo.view(dialogue, "short", budget - 1, count).unit == dialogue.dia_units["D2:3"]  # the longest that fits
    assert locomo.view(dialogue, "long", 10_000, count).context == dialogue.text  # all of it, from the first header
    outside = {name: short.outside(dialogue, question) for name, question in questions.items()}
    assert outside == {
        "before": True,
        "same session, before the window": True,
        "in the window": False,
        "half in the window": False,
        "no evidence": None,
        "unknown turn": None,
    }
    nothing = locomo.view(dialogue, "none", None, count)
    assert nothing.context is None
    assert [nothing.outside(dialogue, q) for q in questions.values()] == [True, True, True, True, None, None]


def test_aggregates_and_paired_differences():
    scores = benchmark_module("locomo_scores")

    def record(key, f1, loglik, outside, category=4):
        return {"sample": "s", "key": key, "f1": f1, "loglik": loglik, "outside": outside, "category": category}

    a = [record(0, 1.0, -1.0, True), record(1, 0.0, -2.0, False, 5), record(2, 0.5, -0.5, None), record(3, 1, -1, True)]
    b = [record(0, 0.0, -1.5, True), record(1, 0.0, -2.5, False, 5), record(2, 0.5, -1.0, None)]
    summary = scores.summarize(a)
    assert summary["all"]["f1"] == {"n": 4, "mean": 0.625, "stderr": pytest.approx(math.sqrt(0.22916666 / 4))}
    assert summary["outside"]["loglik"] == {"n": 2, "mean": -1.0, "stderr": 0.0}
    assert summary["categories"]["5"]["f1"] == {"n": 1, "mean": 0.0, "stderr": 0.0}
    both = scores.paired({"a": a, "b": b}, "a", "b", "all")
    assert both["loglik"] == {"n": 3, "mean": pytest.approx(0.5), "stderr": 0.0}  # key 3 has no partner
    assert scores.paired({"a": a, "b": b}, "a", "b", "outside")["f1"] == {"n": 1, "mean": 1.0, "stderr": 0.0}
    assert scores.stats([]) == {"n": 0, "mean": None, "stderr": None}


def test_paired_differences_per_conversation_beside_the_pooled_ones():
    scores = benchmark_module("locomo_scores")

    def run(sample, gains):
        def records(shift):
            return [
                {"sample": sample, "key": k, "f1": 0.0, "loglik": -1.0 + shift * g, "outside": True, "category": 4}
                for k, g in enumerate(gains)
            ]

        names = ("none", "short", "long")
        found = {name: records(0) for name in names} | {f"{name}+locas_ntp": records(1) for name in names}
        return {"info": {"dataset": "locomo", "sample": sample}, "records": found}

    # one conversation gains 0.1 and 0.3 nats, the other loses 0.4 and 0.2: pooled, the mean is -0.05
    summary = scores.aggregate([run("up", [0.1, 0.3]), run("down", [-0.4, -0.2])], ["locas_ntp"])["locomo"]
    pooled = next(p for p in summary["paired"] if (p["a"], p["b"]) == ("none+locas_ntp", "none"))
    assert pooled["loglik"]["n"] == 4 and pooled["loglik"]["mean"] == pytest.approx(-0.05)
    assert list(summary["paired_by_conversation"]) == ["up", "down"]
    for sample, mean in (("up", 0.2), ("down", -0.3)):
        entry = next(
            p for p in summary["paired_by_conversation"][sample] if (p["a"], p["b"]) == ("none+locas_ntp", "none")
        )
        assert entry["loglik"] == {"n": 2, "mean": pytest.approx(mean), "stderr": pytest.approx(0.1)}
    assert scores.aggregate([run("up", [0.1])], ["locas_ntp"])["locomo"]["paired_by_conversation"] == {}
    report = benchmark_module("report")
    targets = report.locomo_targets({"datasets": {"locomo": summary}, "protocol": {"memories": ["locas_ntp"]}})
    assert [(row["target"], row["met"], row["met per conversation"]) for row in targets] == [
        (
            "locomo: `short+locas_ntp` beats `short` on questions with evidence outside the short window",
            "**no**",
            "up yes, down no",
        ),
        ("locomo: `none+locas_ntp` beats `none` on all questions", "**no**", "up yes, down no"),
    ]
    page = report._by_conversation("locomo", summary["paired_by_conversation"])
    assert "| a - b | questions | up | down |" in page
    assert "| `none+locas_ntp` - `none` | all | 0.200 ± 0.100 (n=2) | -0.300 ± 0.100 (n=2) |" in page


def test_question_forms_follow_locomo():
    from peft_locas.recall.dialogue import Question

    locomo = benchmark_module("locomo")
    temporal = Question("When did Ann move?", "May 2031", 2)
    assert locomo.question_prompt(temporal, 0, 0) == (
        "When did Ann move? Use DATE of CONVERSATION to answer with an approximate date.",
        None,
    )
    adversarial = Question("What is Bob's cat called?", None, 5, ("D1:2",), {"adversarial_answer": "Rex"})
    forms = [locomo.question_prompt(adversarial, index, 0) for index in range(8)]
    assert {(text, tuple(options.items())) for text, options in forms} == {
        (
            "What is Bob's cat called? Select the correct answer: (a) Not mentioned in the conversation (b) Rex.",
            (("a", "Not mentioned in the conversation"), ("b", "Rex")),
        ),
        (
            "What is Bob's cat called? Select the correct answer: (a) Rex (b) Not mentioned in the conversation.",
            (("a", "Rex"), ("b", "Not mentioned in the conversation")),
        ),
    }
    text, options = locomo.question_prompt(adversarial, 5, 0)
    assert locomo.question_prompt(adversarial, 5, 0) == (text, options)  # seeded
    assert locomo.adversarial_prediction(" (B) ", options) == options["b"]
    assert locomo.adversarial_prediction("a", options) == options["a"]
    assert locomo.adversarial_prediction("It is Rex.", options) == "It is Rex."


def test_stratified_selection_balances_categories():
    from peft_locas.recall.dialogue import Question

    locomo = benchmark_module("locomo")
    questions = [(i, Question(f"q{i}", "a", category)) for i, category in enumerate([1] * 10 + [2] * 2 + [3] * 10)]
    chosen = locomo.stratified(questions, 9, seed=0)
    counts = {c: sum(q.category == c for _, q in chosen) for c in (1, 2, 3)}
    assert counts == {1: 4, 2: 2, 3: 3}
    assert [i for i, _ in chosen] == sorted(i for i, _ in chosen) and chosen == locomo.stratified(questions, 9, 0)
    assert chosen != locomo.stratified(questions, 9, seed=1)
    assert locomo.stratified(questions, 50, 0) == questions


def test_lora_rate_comes_from_the_option_or_book_ppl_sweep_and_never_a_silent_default(tmp_path, monkeypatch):
    import argparse

    locomo = benchmark_module("locomo")
    book_ppl = sys.modules["book_ppl"]
    monkeypatch.setattr(book_ppl, "RESULTS", tmp_path)
    assert locomo.chosen_lora_lr(argparse.Namespace(lora_lr=2e-4)) == (2e-4, "--lora-lr")
    with pytest.raises(SystemExit, match=r"^error: no LoRA learning rate: run book_ppl.py or pass --lora-lr$"):
        locomo.chosen_lora_lr(argparse.Namespace(lora_lr=None))
    (tmp_path / "book_ppl.json").write_text(json.dumps({"lora_lr_sweep": {"chosen": 5e-4}}))
    assert locomo.chosen_lora_lr(argparse.Namespace(lora_lr=None)) == (5e-4, "book_ppl.json's sweep")


def test_probe_is_deterministic_and_every_answer_is_in_its_evidence(tmp_path):
    from peft_locas.recall.dialogue import load_conversation, render_conversation

    recall_probe = benchmark_module("recall_probe")
    first = recall_probe.write_probe(tmp_path / "a.json", facts=40, tokens=6000, seed=7)
    again = recall_probe.write_probe(tmp_path / "b.json", facts=40, tokens=6000, seed=7)
    other = recall_probe.write_probe(tmp_path / "c.json", facts=40, tokens=6000, seed=8)
    assert first.read_bytes() == again.read_bytes() != other.read_bytes()
    sample = json.loads(first.read_text())[0]
    turns = {t["dia_id"]: t for key, ts in sample["conversation"].items() if key[-1].isdigit() for t in ts}
    assert len(sample["qa"]) == 40 and len({qa["answer"] for qa in sample["qa"]}) == 40
    for qa in sample["qa"]:
        (evidence,) = qa["evidence"]
        assert qa["answer"] in turns[evidence]["text"] and qa["category"] == 4
        speaker = turns[evidence]["speaker"]
        assert speaker in qa["question"]  # asked about the speaker who stated it
    assert {qa["phrasing"] for qa in sample["qa"]} == {"direct", "paraphrase"}
    assert len({qa["fact"].split()[0] for qa in sample["qa"]}) == 7  # every kind of fact
    conversation = load_conversation(first)
    assert len(conversation.questions) == 40 and len(render_conversation(conversation)) >= 4 * 6000
    assert sample["generator"]["counted_tokens"] >= 6000
    with pytest.raises(ValueError, match=r"^generate_probe: at most 78 facts fit two speakers' fact kinds, got 79$"):
        recall_probe.generate_probe(facts=79)


def test_scripts_explain_themselves():
    for script in ("locomo.py", "recall_probe.py"):
        done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True)
        assert done.returncode == 0 and "usage:" in done.stdout
    assert "quick mode: the first conversation only" in " ".join(done.stdout.split()) or script == "recall_probe.py"


def test_results_page_section_renders_the_json_and_computes_the_targets(runs, tmp_path):
    report = benchmark_module("report")
    _, result = runs["uninterrupted"]
    results = tmp_path / "results"
    results.mkdir()
    (results / "locomo_quick.json").write_text(json.dumps(result))
    shutil.copyfile(runs["root"] / result["plot"], results / result["plot"])
    written = report.locomo_section(results, tmp_path)
    assert [path.name for path in written] == ["locomo.md", "locomo.png"]
    page = written[0].read_text()
    assert page.startswith("*From `benchmarks/results/locomo_quick.json` (finished ")
    assert "This is a **quick** run, not the full benchmark: quick mode: the first conversation only" in page
    assert "LoCoMo category ids: 1 = multi-hop, 2 = temporal, 3 = open-domain, 4 = single-hop, 5 = adversarial" in page
    assert "| `short+locas_ntp` | 10 |" in page and " 5 adversarial (n=2) |" in page
    assert "(benchmark-results/locomo.png)" in page and "Total wall time of all runs:" in page
    targets = report.locomo_targets(result)
    assert len(targets) == 8  # two Locas memories x (short, no dialogue) x (vs no memory, vs LoRA)
    paired = {f"`{p['a']}` beats `{p['b']}`": p["loglik"] for p in result["datasets"]["probe"]["paired"]}
    for row in targets:
        entry = next(value for key, value in paired.items() if key in row["target"])
        assert row["met"] == ("yes" if entry["mean"] > entry["stderr"] else "**no**"), row
        assert row["target"].startswith("probe: ") and row["measured"].endswith(f"(n={entry['n']})")
    (tmp_path / "out").mkdir()
    empty = report.locomo_section(tmp_path / "nothing", tmp_path / "out")
    assert empty[0].read_text().startswith("No LoCoMo result is committed yet")
