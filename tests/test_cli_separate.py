"""``peft-locas memorize --separate``: several texts, each into its own memory in one batched run, written as one
adapter folder per text that every other command takes; what it refuses."""

import json

import pytest
from safetensors.torch import load_file
from tiny_checkpoint import make_checkpoint, write_texts

from peft_locas import cli

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = ["--chunk-tokens", "64", "--context-tokens", "16", "--steps-per-chunk", "1", "--lr", "1e-2", "--r", "8"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("separate")
    write_texts(root, {"texts/first.txt": (300, 1), "texts/second.md": (200, 2), "third text.txt": (150, 3)})
    third = root / "third text.txt"
    return {"root": root, "main": make_checkpoint(root / "main"), "texts": root / "texts", "third": third}


def memorize(files, out, *extra):
    base = ["memorize", "--model", str(files["main"]), "--out", str(out), *RUN]
    return cli.main([*base, *extra])


def test_each_text_gets_its_own_memory_equal_to_a_single_text_run(files, tmp_path, capsys):
    out = tmp_path / "memories"
    texts = ["--text", str(files["texts"]), str(files["third"])]
    assert memorize(files, out, *texts, "--separate") == 0
    printed = capsys.readouterr()
    assert "3 texts, each into its own memory" in printed.err
    assert printed.out.count("prequential perplexity") == 3
    names = ["first", "second", "third_text"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == names
    assert not (tmp_path / "memories.checkpoint").exists()  # default checkpoints go once the folders are written
    for name in names:
        folder = out / name
        assert {
            "adapter_config.json",
            "adapter_model.safetensors",
            cli.RESULTS_FILE,
            cli.PLOT_FILE,
            "chunks.jsonl",
        } <= {p.name for p in folder.iterdir()}
        record = json.loads((folder / cli.RESULTS_FILE).read_text())
        assert record["model"] == str(files["main"]) and record["texts"][0]["text"] == name.replace("_", " ")
        chunks = (folder / "chunks.jsonl").read_text().splitlines()
        assert len(chunks) == len(record["result"]["losses"])

    # the same memory as memorising that text alone
    alone = tmp_path / "alone"
    assert memorize(files, alone, "--text", str(files["texts"] / "second.md")) == 0
    separate, single = (
        load_file(out / "second/adapter_model.safetensors"),
        load_file(alone / "adapter_model.safetensors"),
    )
    assert separate.keys() == single.keys()
    for key in single:
        assert (separate[key] - single[key]).abs().max() < 1e-5, key
    single_record = json.loads((alone / cli.RESULTS_FILE).read_text())["result"]["losses"]
    assert json.loads((out / "second" / cli.RESULTS_FILE).read_text())["result"]["losses"] == pytest.approx(
        single_record, rel=1e-5
    )

    # every command takes each folder as a memory; --overwrite replaces the folder of memories
    capsys.readouterr()
    assert cli.main(["eval", "--text", str(files["third"]), "--adapter", str(out / "third_text"), *RUN[:4]]) == 0
    assert "with adapter" in capsys.readouterr().out
    assert memorize(files, out, "--text", str(files["third"]), "--separate", "--overwrite", "--no-checkpoint") == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["third_text"]


def test_what_separate_refuses(files, tmp_path, capsys):
    text = ["--text", str(files["texts"])]
    cases = [
        (["--adapter-type", "lora"], "does not take --adapter-type lora: memorise LoRA baselines one text at a time"),
        (["--self-study-questions", "1"], "does not take --self-study-questions"),
        (["--chunk-tokens", "600"], "the text second has 5"),
    ]
    for extra, message in cases:
        status = memorize(files, tmp_path / "out", *text, "--separate", *extra)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert status == 1 and len(lines) == 1 and message in lines[0], err
