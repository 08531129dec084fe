"""The package's layering: `peft_locas.init`'s modules call downward only, in the order its docstring lists them; the
weights, the tuner and recall import nothing above them."""

import ast
import re
from pathlib import Path

import pytest

import peft_locas.init

INIT = Path(peft_locas.init.__file__).parent


def test_init_modules_import_only_the_ones_listed_before_them():
    order = re.findall(r"^- `(\w+)`:", peft_locas.init.__doc__, flags=re.M)
    assert sorted(order) == sorted(path.stem for path in INIT.glob("*.py") if path.stem != "__init__")
    for position, name in enumerate(order):
        tree = ast.parse((INIT / f"{name}.py").read_text(encoding="utf-8"))
        siblings = {
            node.module.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
        }
        assert siblings <= set(order[:position]), f"init/{name}.py imports {sorted(siblings - set(order[:position]))}"


def package_imports(folder: str) -> dict[str, set[str]]:
    """Each module of ``peft_locas/<folder>`` -> the ``peft_locas`` modules it imports (relative imports resolved)."""
    root = INIT.parent
    found = {}
    for path in sorted((root / folder).glob("*.py")):
        package = ["peft_locas", folder]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - (node.level - 1)]
                if node.module:
                    imported.add(".".join([*base, node.module]))
                else:
                    imported |= {".".join([*base, alias.name]) for alias in node.names}
        found[path.stem] = imported
    return found


@pytest.mark.parametrize(
    "folder, allowed",
    [
        # the weights sit below the tuner: they may use the data-free unit math and nothing else above them
        ("weights", ("peft_locas.weights.", "peft_locas.init.units")),
        # the tuner builds on the weights; initialising from data (which reads the tuner's layers) comes above it
        ("tuner", ("peft_locas.weights.", "peft_locas.tuner.", "peft_locas.init.units", "peft_locas._hook")),
        # asking a model and reading conversations need no engine: the engine (memorize, self-study) builds on them
        ("recall", ("peft_locas.recall.",)),
    ],
)
def test_lower_layers_import_nothing_above_them(folder, allowed):
    for module, imported in package_imports(folder).items():
        above = sorted(name for name in imported if not name.startswith(allowed) and name != "peft_locas.__init__")
        assert not above, f"{folder}/{module}.py imports {above}"
