"""`import peft_locas` is cheap (no torch, no PEFT) and still makes LOCAS a PEFT method whenever PEFT is imported,
in whatever order; so does the installed ``peft_locas_autoload.pth`` without that import, at no cost to interpreters
that never import PEFT. The command line answers --help and input errors without importing torch, and neither it nor
the imports print anything on stderr."""

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

from peft_locas._hook import AUTOLOAD_FINDER, BNB_KERNEL_NOTICE, NO_AUTOLOAD_ENV


def python(code: str, autoload: bool = True, command: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` (or ``command``) in a fresh interpreter of this environment, with or without the autoload hook."""
    env = {k: v for k, v in os.environ.items() if k != NO_AUTOLOAD_ENV}
    env.update({"OMP_NUM_THREADS": "1"} if autoload else {"OMP_NUM_THREADS": "1", NO_AUTOLOAD_ENV: "1"})
    args = command or [sys.executable, "-c", code]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_importing_the_package_loads_neither_torch_nor_peft():
    done = python(
        "import sys, peft_locas; print(json.dumps(sorted(m for m in ('torch', 'peft', 'transformers') "
        "if m in sys.modules)))".replace("json.dumps", "__import__('json').dumps")
    )
    assert json.loads(done.stdout) == []


PROBE = "import importlib.util; assert importlib.util.find_spec('peft'); "  # what transformers and lm-eval do first


@pytest.mark.parametrize(
    "imports, autoload",
    [  # with the package imported, the autoload hook is switched off: the package's own hook must do it all
        ("import peft_locas; import peft", False),  # the package, then PEFT: the import hook registers
        ("import peft; import peft_locas", False),  # PEFT first: registered at once
        ("from peft_locas.engine.memorization import memorize", False),  # a module that imports PEFT itself
        (
            "import peft_locas.tuner.layer; import peft_locas.tuner.model",
            False,
        ),  # a tuner module first: waits for model
        (
            "from peft_locas.tuner.config import LocasConfig",
            False,
        ),  # the config first (what `peft-locas memorize` does)
        ("from peft_locas import LocasConfig", False),  # a public name
        ("import peft_locas; " + PROBE + "import peft", False),  # a spec probe before the import
        ("import peft", True),  # no import of peft_locas: the .pth hook
        (PROBE + "import peft", True),
    ],
)
def test_locas_is_registered_in_every_import_order(imports, autoload):
    python(
        f"{imports}\n"
        "from peft import PeftType\n"
        "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING\n"
        "assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.LOCAS].__name__ == 'LocasConfig'\n"
        "assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LOCAS].__name__ == 'LocasModel'\n"
        "import peft\n"
        "assert 'exec_module' not in vars(peft.__spec__.loader)  # the hook left PEFT's loader as it was\n"
        "import sys\n"
        "assert not any(type(f).__name__ == '_PeftFinder' for f in sys.meta_path)  # and removed itself\n",
        autoload=autoload,
    )


def test_interpreter_start_imports_nothing():
    """The .pth hook is in place at start-up, and costs no import: not torch, not PEFT, not even this package."""
    done = python(
        "import sys; import json\n"
        "print(json.dumps([sorted(m for m in ('torch', 'peft', 'peft_locas', 'transformers') if m in sys.modules), "
        "[getattr(finder, '__name__', '') for finder in sys.meta_path].count(" + repr(AUTOLOAD_FINDER) + ")]))"
    )
    assert json.loads(done.stdout) == [[], 1]
    off = python("import sys; print([getattr(f, '__name__', '') for f in sys.meta_path])", autoload=False)
    assert AUTOLOAD_FINDER not in off.stdout


def test_commands_and_imports_print_nothing_on_stderr():
    """`peft-locas --help` and `import peft_locas, peft` are silent on stderr; of bitsandbytes' logger, only its
    missing-kernel notice (logged on AVX512-BF16 CPUs when PEFT imports bitsandbytes) is dropped."""
    script = Path(sys.executable).with_name("peft-locas")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "peft_locas"]  # the console script, if any
    cli = python("", command=[*command, "--help"])
    assert cli.stderr == "" and "memorize" in cli.stdout
    name, notice = BNB_KERNEL_NOTICE
    done = python(
        "import peft_locas, peft, logging\n"
        f"log = logging.getLogger({name!r})\n"
        f"log.warning({notice + ': %s. Please make sure you already `pip install kernels`'!r}, 'no kernels')\n"
        "log.warning('another bitsandbytes notice')\n"
    )
    assert done.stderr == "another bitsandbytes notice\n"


def test_the_dropped_notice_is_what_bitsandbytes_logs():
    """If bitsandbytes rewords the notice or moves it to another logger, the filter above would miss it."""
    spec = find_spec("bitsandbytes")
    if spec is None:
        pytest.skip("bitsandbytes is not installed")
    name, notice = BNB_KERNEL_NOTICE
    source = Path(spec.origin).parent.joinpath(*name.split(".")[1:]).with_suffix(".py").read_text()
    assert "logger = logging.getLogger(__name__)" in source and f'"{notice}: %s.' in source


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
