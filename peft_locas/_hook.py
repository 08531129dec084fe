"""Register LOCAS with PEFT the moment PEFT is imported, without importing PEFT (or torch) before anyone needs it.

Two ways in, one mechanism (a ``sys.meta_path`` finder that lets PEFT import as usual and, right after PEFT's own
``__init__`` has run, imports `peft_locas._register`):

- ``import peft_locas`` calls `install`. So ``import peft_locas; from peft import PeftModel`` registers, a process that
  never imports PEFT pays nothing, and ``peft-locas --help`` answers without loading torch. When PEFT is already
  imported, registration happens at once.
- Without that import: the installed package ships ``peft_locas_autoload.pth`` (source: ``peft_locas_autoload.pth`` at
  the repository root; ``setup.py`` puts it into wheels and editable installs). At interpreter start it inserts a
  stub finder, `AUTOLOAD_FINDER`, defined in that one line: it imports nothing, so ``python -c pass`` pays only for
  reading the line (``benchmarks/startup.py`` measures it). When anything imports ``peft`` or looks its spec up
  (``import transformers`` does, with ``importlib.util.find_spec``), the stub calls `autoload`, which imports this
  package (not PEFT, not torch) and hands over to the finder above. That is how lm-eval's ``peft=``, transformers'
  ``load_adapter`` or someone else's script load Locas adapters. ``PEFT_LOCAS_NO_AUTOLOAD=1`` (any value but empty or
  ``0``) keeps the stub out, as ``SETUPTOOLS_USE_DISTUTILS`` does for setuptools' ``distutils-precedence.pth``.
  Registration that the stub started never breaks ``import peft``: a failure becomes a warning, since the process did
  not ask for Locas.

PEFT's import also imports bitsandbytes, which logs "Failed to load CPU gemm_4bit_forward from kernels-community ..."
on every import on CPUs with AVX512-BF16 when the optional ``kernels`` package is absent; the finder drops that one
record (see `quiet_bitsandbytes`) before PEFT runs, so command-line errors stay one line.

One order cannot register from the hook: a tuner module of this package imported directly before PEFT (``import
peft_locas.tuner.layer`` in a fresh process), because registration needs that very module, still half-initialised when
its own PEFT import fires the hook. Registration then waits for `ensure_registered`, which every public name of the
package and the end of `peft_locas.tuner.model` call.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

_REGISTER = "peft_locas._register"
#: Name of the stub finder class that ``peft_locas_autoload.pth`` inserts into ``sys.meta_path``.
AUTOLOAD_FINDER = "PeftLocasAutoload"
#: Environment variable that keeps ``peft_locas_autoload.pth`` from inserting its stub.
NO_AUTOLOAD_ENV = "PEFT_LOCAS_NO_AUTOLOAD"
#: The bitsandbytes log record dropped on PEFT's import: (logger name, start of the message format).
BNB_KERNEL_NOTICE = ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community")
_pending = False


def ensure_registered() -> None:
    """Register LOCAS with PEFT now (imports PEFT and torch); idempotent and cheap after the first call."""
    global _pending
    importlib.import_module(_REGISTER)
    _pending = False


def register_if_pending() -> None:
    """Finish a registration that the hook had to postpone (see the module docstring)."""
    if _pending:
        ensure_registered()


def install() -> None:
    """Register now if PEFT is imported already, else once it is (idempotent). Takes over from the autoload stub."""
    _remove_autoload_stub()
    if "peft" in sys.modules:
        ensure_registered()
    elif not any(isinstance(finder, _PeftFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PeftFinder())


def autoload(fullname: str, path=None, target=None):
    """``find_spec`` of the ``.pth`` stub for ``peft``: hand over to `install`'s finder and return PEFT's spec.

    Importing this package already ran `install` (its ``__init__`` calls it), so a `_PeftFinder` heads
    ``sys.meta_path``; it is marked lenient because this process never asked for Locas. Returns the spec the
    remaining finders give for ``fullname`` (its loader wrapped to register after PEFT's ``__init__``), or ``None``.
    """
    importlib.import_module("peft_locas")  # runs install(); imports neither PEFT nor torch
    install()  # idempotent: a no-op unless the package was imported before with the stub still in place
    for finder in sys.meta_path:
        if isinstance(finder, _PeftFinder):
            finder.lenient = True
    return _first_spec(list(sys.meta_path), fullname, path, target)


def _remove_autoload_stub() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not _is_stub(finder)]


def _is_stub(finder) -> bool:
    return getattr(finder, "__name__", None) == AUTOLOAD_FINDER


def quiet_bitsandbytes() -> None:
    """Drop bitsandbytes' notice that its optional AVX512-BF16 4-bit kernel (from the ``kernels`` package) is missing.

    It is logged at import time, whether or not a 4-bit layer is ever used, and its own fallback kernel computes the
    same results; every other record of that logger still shows. Idempotent.
    """
    import logging

    name, start = BNB_KERNEL_NOTICE
    logger = logging.getLogger(name)
    if not any(isinstance(existing, _DropRecord) for existing in logger.filters):
        logger.addFilter(_DropRecord(start))


class _DropRecord:
    """A ``logging`` filter that drops the records whose message format starts with ``start``."""

    def __init__(self, start: str) -> None:
        self.start = start

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(self.start)


def _after_peft(lenient: bool) -> None:
    global _pending
    initialising = [
        name
        for name, module in list(sys.modules.items())
        if name.startswith("peft_locas.") and getattr(getattr(module, "__spec__", None), "_initializing", False)
    ]
    try:
        ensure_registered()
    except ImportError:
        if initialising:
            _pending = True  # a tuner module imported directly before PEFT: it finishes the registration itself
        elif lenient:
            _warn_not_registered()
        else:
            raise
    except Exception:
        if not lenient:
            raise
        _warn_not_registered()


def _warn_not_registered() -> None:
    import traceback
    import warnings

    reason = traceback.format_exc(limit=-1).strip().splitlines()[-1]
    warnings.warn(
        f"peft-locas could not register the LOCAS type with PEFT ({reason}), so Locas adapters will not load in this "
        f"process; `import peft_locas` shows the full error, and {NO_AUTOLOAD_ENV}=1 stops this attempt.",
        RuntimeWarning,
        stacklevel=2,
    )


class _PeftFinder:
    """A ``sys.meta_path`` finder that finds nothing itself: for ``peft`` it takes the spec the other finders give and
    registers after its loader's ``exec_module`` (a wrapper set on that one loader instance, removed once it has run).

    It stays in place until PEFT is actually executed, because a spec can be asked for without an import:
    transformers and lm-eval probe ``importlib.util.find_spec("peft")`` first, and each import asks again.
    ``lenient``: a failed registration warns instead of failing PEFT's import (set by `autoload`).
    """

    def __init__(self) -> None:
        self.lenient = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft":
            return None
        quiet_bitsandbytes()  # before PEFT's __init__ imports bitsandbytes
        others = [finder for finder in sys.meta_path if not isinstance(finder, _PeftFinder) and not _is_stub(finder)]
        spec = _first_spec(others, fullname, path, target)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module") or "exec_module" in getattr(loader, "__dict__", {}):
            return spec
        run = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _PeftFinder)]
            try:
                run(module)
            finally:
                del loader.exec_module  # the instance attribute: the loader is its own class's again
            _after_peft(self.lenient)

        loader.exec_module = exec_module
        return spec


def _first_spec(finders, fullname, path, target):
    for finder in finders:
        find_spec = getattr(finder, "find_spec", None)
        spec = None if find_spec is None else find_spec(fullname, path, target)
        if spec is not None:
            return spec
    return None
