"""Register LOCAS with PEFT the moment PEFT is imported, without importing PEFT (or torch) before anyone needs it.

``import peft_locas`` installs an import hook (a ``sys.meta_path`` finder) that lets PEFT import as usual and, right
after PEFT's own ``__init__`` has run, imports `peft_locas._register`. So ``import peft_locas; from peft import
PeftModel`` registers, a process that never imports PEFT pays nothing, and ``peft-locas --help`` answers without
loading torch. When PEFT is already imported, registration happens at once.

One order cannot register from the hook: a tuner module of this package imported directly before PEFT (``import
peft_locas.layer`` in a fresh process), because registration needs that very module, still half-initialised when its
own PEFT import fires the hook. Registration then waits for `ensure_registered`, which every public name of the package
and the end of `peft_locas.model` call.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from types import ModuleType

_REGISTER = "peft_locas._register"
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
    """Register now if PEFT is imported already, else once it is (idempotent)."""
    if "peft" in sys.modules:
        ensure_registered()
    elif not any(isinstance(finder, _PeftFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PeftFinder())


def _after_peft() -> None:
    global _pending
    initialising = [
        name
        for name, module in list(sys.modules.items())
        if name.startswith("peft_locas.") and getattr(getattr(module, "__spec__", None), "_initializing", False)
    ]
    try:
        ensure_registered()
    except ImportError:
        if not initialising:
            raise
        _pending = True  # a tuner module imported directly before PEFT: it finishes the registration itself


class _PeftFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for ``peft`` it takes the spec the other finders give and registers after its loader's
    ``exec_module`` (a wrapper set on that one loader instance, removed once it has run)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft":
            return None
        sys.meta_path.remove(self)  # fire once; the lookup below must not find this finder again
        spec = next(
            (found for finder in sys.meta_path if (found := _spec(finder, fullname, path, target)) is not None), None
        )
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            try:
                run(module)
            finally:
                del loader.exec_module  # the instance attribute: the loader is its own class's again
            _after_peft()

        loader.exec_module = exec_module
        return spec


def _spec(finder, fullname, path, target):
    find_spec = getattr(finder, "find_spec", None)
    return None if find_spec is None else find_spec(fullname, path, target)
