"""Output folders written so that nothing is half-written: a hidden temporary folder beside ``--out`` is filled and
renamed to ``--out`` only once every file is complete, and a full disk or a read-only place is one line naming the
folder and the space needed."""

from __future__ import annotations

import contextlib
import errno
import os
import re
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
    usage = shutil.disk_usage(parent)
    if usage.total == 0:  # /proc, /sys: a virtual file system holds no files
        raise UsageError(f"cannot write {flag} {out}: {parent} is a virtual file system; choose another {flag}")
    free = usage.free
    if free < needed:
        raise UsageError(
            f"not enough space for {flag} {out}: it needs about {_size(needed)}, {parent} has {_size(free)} free; "
            f"free some space or choose another {flag}"
        )


@contextlib.contextmanager
def atomic_folder(out: Path, needed: int | None = None, flag: str = "--out") -> Iterator[Path]:
    """Yield an empty temporary folder beside ``out`` to write the outputs into; on success it becomes ``out`` (an
    existing ``out``, which ``--overwrite`` allowed, is replaced whole, so no file of an older output stays beside the
    new ones), and on any failure the temporary folder is removed and ``out`` is left as it was.

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
        _open_to_group_and_others(partial)
        if not out.exists():
            os.rename(partial, out)
            partial = None
        else:  # --overwrite (check_out vetted it): swap the new folder in, then drop the old one, whole
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(partial, out)
            partial = None
            shutil.rmtree(old, ignore_errors=True)
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


def _open_to_group_and_others(folder: Path) -> None:
    """Give the outputs the permissions the umask allows (mkdtemp makes 0700, some writers 0600), so that another
    user or a serving container can read an export."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _remove_orphans(out: Path) -> None:
    """Remove the temporary folders that killed writers of ``out`` left (their process is gone): a crashed merge of a
    large model would otherwise leave gigabytes in a hidden folder."""
    for folder in [*out.parent.glob(f".{out.name}.partial-*-*"), *out.parent.glob(f".{out.name}.old-*")]:
        pid = re.match(r"\.(?:partial|old)-(\d+)", folder.name[len(f".{out.name}") :])
        pid = pid.group(1) if pid else ""
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
