"""The package's layering: `peft_locas.init`'s modules call downward only, in the order its docstring lists them."""

import ast
import re
from pathlib import Path

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
