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
    assert "3 texts, each into its own memory, in at most 12 chunks per text of up to 64 tokens" in printed.err
    assert f"memories in {out}: first, second, third_text (from {files['third']})" in printed.err
    assert f"{out} holds 3 memories: first (new), second (new), third_text (new)" in printed.out
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
        assert "README.md" in {p.name for p in folder.iterdir()}  # PEFT's model card, inside the memory's folder
        record = json.loads((folder / cli.RESULTS_FILE).read_text())
        assert record["model"] == str(files["main"]) and record["texts"][0]["text"] == name.replace("_", " ")
        assert record["settings"]["adapter_name"] == name and record["batch"]["adapter_names"] == names
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

    # every command takes each folder as a memory; the library as a whole is named, not taken for one adapter
    capsys.readouterr()
    assert cli.main(["eval", "--text", str(files["third"]), "--adapter", str(out / "third_text"), *RUN[:4]]) == 0
    assert "with adapter" in capsys.readouterr().out
    assert cli.main(["eval", "--text", str(files["third"]), "--adapter", str(out), *RUN[:4]]) == 1
    assert (
        f"error: {out} is a folder of 3 memories (first, second, third_text), not one adapter: give one of them, e.g. "
        f"{out / 'first'}\n" in capsys.readouterr().err
    )
    assert cli.main(["compose", "--adapter", str(out), "--out", str(tmp_path / "composed")]) == 1
    assert f"error: {out} is a folder of 3 memories (first, second, third_text), not one" in capsys.readouterr().err
    ask = ["ask", "--model", str(files["main"]), "--question", "Who?"]
    assert cli.main([*ask, "--adapter", str(out)]) == 1
    assert f"e.g. {out / 'first'} (ask --memory {out} asks them all)" in capsys.readouterr().err
    # a library is no output to replace: no --overwrite hint, with or without it
    for overwrite in ([], ["--overwrite"]):
        assert memorize(files, out, "--text", str(files["third"]), *overwrite) == 1
        assert capsys.readouterr().err == (
            f"error: --out {out} is a folder of 3 memories (first, second, third_text): write to a new folder "
            f"inside it ({out}/NAME) or choose another --out (memorize --separate --out {out} adds memories to it)\n"
        )

    # a later run adds its memory to the library; the same name needs --overwrite, which replaces only that memory
    before = (out / "first" / "adapter_model.safetensors").read_bytes()
    assert memorize(files, out, "--text", str(files["third"]), "--separate", "--no-checkpoint") == 1
    assert f"error: --out {out} already holds third_text: pass --overwrite to replace it" in capsys.readouterr().err
    extra = tmp_path / "more" / "fourth.txt"
    extra.parent.mkdir()
    extra.write_text((files["third"]).read_text())
    assert memorize(files, out, "--text", str(extra), str(files["third"]), "--separate", "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["first", "fourth", "second", "third_text"]
    held = "first (kept), fourth (new), second (kept), third_text (replaced)"
    assert f"{out} holds 4 memories: {held}" in capsys.readouterr().out
    assert (out / "first" / "adapter_model.safetensors").read_bytes() == before


def test_a_library_is_asked_as_all_its_memories(files, tmp_path, capsys):
    out = tmp_path / "library"
    assert memorize(files, out, "--text", str(files["texts"]), "--separate", "--no-checkpoint") == 0
    capsys.readouterr()
    question = ["--question", "Who?", "--max-new-tokens", "2", "--no-chat-template"]
    assert cli.main(["ask", "--model", str(files["main"]), "--memory", str(out), *question]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["memory"] for line in lines] == [str(out / "first"), str(out / "second")]
    twice = ["--memory", str(out), "--memory", str(out / "second")]
    assert cli.main(["ask", "--model", str(files["main"]), *twice, *question]) == 1
    how = f"(from --memory {out} and --memory {out / 'second'})"
    message = f"error: --memory gives {out / 'second'} twice {how}: give each memory once"
    assert capsys.readouterr().err == message + "\n"
    assert cli.main(["ask", "--model", str(files["main"]), "--memory", str(out), "--context-tokens", "8", *question])
    assert "with --adapter: with --memory give a shared --context FILE" in capsys.readouterr().err


def test_what_separate_refuses(files, tmp_path, capsys):
    text = ["--text", str(files["texts"])]
    cases = [
        (["--adapter-type", "lora"], "does not take --adapter-type lora: memorise LoRA baselines one text at a time"),
        (["--self-study-questions", "1"], "does not take --self-study-questions"),
        (["--chunk-tokens", "600"], "the text second has 5"),
        (["--text", str(files["texts"] / "first.txt")], "--text names first twice"),
    ]
    assert memorize(files, files["texts"], *text, "--separate") == 1
    assert f"error: --out {files['texts']} is also an input of this command" in capsys.readouterr().err
    adapter = tmp_path / "an_adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    status = memorize(files, adapter, *text, "--separate")
    assert (
        status == 1
        and "is a model or adapter folder; --separate writes a folder of memories" in capsys.readouterr().err
    )
    for extra, message in cases:
        status = memorize(files, tmp_path / "out", *text, "--separate", *extra)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert status == 1 and len(lines) == 1 and message in lines[0], err


def test_memory_names_are_derived_from_the_texts_and_never_misread_by_peft():
    from pathlib import Path

    from peft_locas.app.inputs import Source
    from peft_locas.app.memorize_separate import _PREFIX, adapter_names
    from peft_locas.tuner.registration import LOCAS_PREFIX

    assert _PREFIX == LOCAS_PREFIX
    labels = ["notes", "notes", "a", "default", "__base__", "notes.v2", "my notes (draft)", "..."]
    sources = [Source(text="x", label=label, path=Path(label)) for label in labels]
    assert adapter_names(sources) == [
        "notes",
        "notes_2",
        "a_text",
        "default_text",
        "base",
        "notes_v2",
        "my_notes_draft",
        "text",
    ]
