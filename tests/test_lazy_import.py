"""`import peft_locas` is cheap (no torch, no PEFT) and still makes LOCAS a PEFT method whenever PEFT is imported,
in whatever order; the command line answers --help and input errors without importing torch."""

import json
import subprocess
import sys

import pytest


def python(code: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_importing_the_package_loads_neither_torch_nor_peft():
    done = python(
        "import sys, peft_locas; print(json.dumps(sorted(m for m in ('torch', 'peft', 'transformers') "
        "if m in sys.modules)))".replace("json.dumps", "__import__('json').dumps")
    )
    assert json.loads(done.stdout) == []


@pytest.mark.parametrize(
    "imports",
    [
        "import peft_locas; import peft",  # the package, then PEFT: the import hook registers
        "import peft; import peft_locas",  # PEFT first: registered at once
        "from peft_locas.memorization import memorize",  # a module that imports PEFT itself
        "import peft_locas.layer; import peft_locas.model",  # a tuner module first: registration waits for model
        "from peft_locas.config import LocasConfig",  # the config first (what `peft-locas memorize` does)
        "from peft_locas import LocasConfig",  # a public name
    ],
)
def test_locas_is_registered_in_every_import_order(imports):
    python(
        f"{imports}\n"
        "from peft import PeftType\n"
        "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING\n"
        "assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.LOCAS].__name__ == 'LocasConfig'\n"
        "assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LOCAS].__name__ == 'LocasModel'\n"
        "import peft\n"
        "assert 'exec_module' not in vars(peft.__spec__.loader)  # the hook left PEFT's loader as it was\n"
    )


def test_help_and_input_errors_come_without_torch():
    python(
        "import contextlib, io, sys\n"
        "from peft_locas.app.main import main\n"
        "for command in ('memorize', 'merge', 'eval', 'ask', 'chat'):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main([command, '--help'])\n"
        "with contextlib.redirect_stderr(io.StringIO()) as err:\n"
        "    assert main(['memorize', '--text', 'no-such-file.txt', '--out', 'x']) == 1\n"
        "assert 'text file no-such-file.txt not found' in err.getvalue(), err.getvalue()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )


def test_unknown_attribute_is_an_attribute_error():
    import peft_locas

    with pytest.raises(AttributeError, match="module 'peft_locas' has no attribute 'nothing'"):
        peft_locas.nothing  # noqa: B018
    assert {"LocasConfig", "memorize", "Asker"} <= set(dir(peft_locas))
