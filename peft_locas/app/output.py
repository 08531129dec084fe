"""Output folders written so that nothing is half-written: a hidden temporary folder beside ``--out`` is filled and
renamed to ``--out`` only once every file is complete, and a full disk or a read-only place is one line naming the
folder and the space needed."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .options import UsageError

#: errors that mean "no room": a full device, or a user's quota
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
#: errors that mean "not allowed to write here"
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def check_writable(out: Path, flag: str = "--out") -> None:
    """Refuse, before any work, an ``out`` whose nearest existing parent cannot be written (read-only file system or
    permissions). Raises `UsageError`."""
    parent = _existing_parent(out)
    if not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write {flag} {out}: {parent} is read-only; choose another {flag}")


def check_space(out: Path, needed: int, flag: str = "--out") -> None:
    """Refuse, before any work, an ``out`` on a device with less than ``needed`` bytes free. Raises `UsageError`."""
    parent = _existing_parent(out)
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise UsageError(
            f"not enough space for {flag} {out}: it needs about {_size(needed)}, {parent} has {_size(free)} free; "
            f"free some space or choose another {flag}"
        )


@contextlib.contextmanager
def atomic_folder(out: Path, needed: int | None = None, flag: str = "--out") -> Iterator[Path]:
    """Yield an empty temporary folder beside ``out`` to write the outputs into; on success its files move into
    ``out`` (the folder is renamed when ``out`` does not exist yet, else each file replaces its namesake, leaving
    other files there alone), and on any failure the temporary folder is removed and ``out`` is left as it was.

    Args:
        out: the output folder (``--out``); its parents are created.
        needed: the bytes the outputs take, when known: the write is refused up front when the disk has less.
        flag: the option named in errors.

    Raises:
        UsageError: no space (``ENOSPC``/``EDQUOT``, or less than ``needed`` free) or a read-only destination, as one
            line naming ``out``, the space needed and that nothing was written.
    """
    check_writable(out, flag)
    if needed is not None:
        check_space(out, needed, flag)
    partial: Path | None = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_orphans(out)
        partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
        yield partial
        if not out.exists():
            os.rename(partial, out)
            partial = None
        else:  # --overwrite into an existing folder: replace our files one by one, never delete the user's others
            for item in sorted(partial.iterdir()):
                target = out / item.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(item, target)
    except OSError as exc:
        written = _folder_bytes(partial) if partial is not None else 0
        if exc.errno in _NO_SPACE:
            need = f"about {_size(needed)}" if needed is not None else f"more than the {_size(written)} written"
            raise (no_space(exc, out, flag, "nothing was written there", need) or exc) from exc
        if exc.errno in _NOT_WRITABLE:
            raise UsageError(f"cannot write {flag} {out} ({exc.strerror}); nothing was written there") from exc
        raise
    finally:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)


def no_space(exc: OSError, folder: Path | None, flag: str, kept: str, need: str | None = None) -> UsageError | None:
    """The one-line `UsageError` for a disk that filled while writing ``folder`` (``ENOSPC``/``EDQUOT``), saying
    what was ``kept``; ``None`` for any other ``OSError``."""
    if exc.errno not in _NO_SPACE or folder is None:
        return None
    free = _size(shutil.disk_usage(_existing_parent(folder)).free)
    needs = f"it needs {need}, " if need is not None else ""
    return UsageError(
        f"no space left on the device of {flag} {folder}: {needs}{free} is free; {kept} (free some space or choose "
        f"another {flag})"
    )


def _remove_orphans(out: Path) -> None:
    """Remove the temporary folders that killed writers of ``out`` left (their process is gone): a crashed merge of a
    large model would otherwise leave gigabytes in a hidden folder."""
    for folder in out.parent.glob(f".{out.name}.partial-*-*"):
        pid = folder.name[len(f".{out.name}.partial-") :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0


def _size(num_bytes: int | None) -> str:
    value = num_bytes or 0
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value} B"
