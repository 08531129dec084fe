"""`import peft_locas` makes LOCAS a PEFT method; without the import, loading fails with a message naming the fix."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from peft import PeftConfig, PeftType, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from tiny_models import tiny_model

import peft_locas
from peft_locas import LocasConfig, LocasModel
from peft_locas.registration import LOCAS_PEFT_TYPE_VALUE

REPO = Path(__file__).resolve().parents[1]


def test_peft_registries_know_locas():
    assert PeftType.LOCAS is peft_locas.LOCAS_PEFT_TYPE
    assert PeftType["LOCAS"] is PeftType(LOCAS_PEFT_TYPE_VALUE) is PeftType.LOCAS
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.LOCAS] is LocasConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LOCAS] is LocasModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.LOCAS] == "locas_"
    assert LocasConfig().peft_type is PeftType.LOCAS


def test_reimport_and_reload_are_idempotent():
    members_before = list(PeftType)
    importlib.reload(importlib.import_module("peft_locas.registration"))
    reloaded = importlib.reload(peft_locas)
    assert list(PeftType) == members_before
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.LOCAS] is reloaded.LocasConfig


ENUM_CHECK = r"""
import enum, importlib.util, json, pickle, sys
spec = importlib.util.spec_from_file_location("_enum", sys.argv[1])
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
class PeftType(str, enum.Enum):
    LORA = "LORA"
member = mod.add_enum_member(PeftType, "LOCAS", "LOCAS (hint)")
assert mod.add_enum_member(PeftType, "LOCAS", "LOCAS (hint)") is member
assert PeftType.LOCAS is PeftType["LOCAS"] is PeftType("LOCAS (hint)") is member
assert list(PeftType) == [PeftType.LORA, member] and member in PeftType and len(PeftType) == 2
assert pickle.loads(pickle.dumps(member)) is member
assert json.dumps(member) == '"LOCAS (hint)"' and {member: 1}["LOCAS (hint)"] == 1
try:
    mod.add_enum_member(PeftType, "LOCAS", "OTHER")
except ValueError as exc:
    assert "already exists" in str(exc)
else:
    raise AssertionError("rebinding a member must fail")
print("ok", sys.version_info[:2])
"""


def _interpreters():
    found = {}
    for root in (Path("/root/.pyenv/versions"), Path.home() / ".pyenv/versions"):
        for exe in sorted(root.glob("3.1[0-9]*/bin/python")):
            found.setdefault(exe.parts[-3].rsplit(".", 1)[0], exe)
    return found


@pytest.mark.parametrize("version", ["3.10", "3.11", "3.12", "3.13"])
def test_enum_extension_on_each_python(version, tmp_path):
    exe = _interpreters().get(version) or (sys.executable if sys.version.startswith(version + ".") else None)
    if exe is None:
        pytest.skip(f"no Python {version} interpreter on this machine")
    script = tmp_path / "check.py"
    script.write_text(ENUM_CHECK)
    done = subprocess.run([str(exe), str(script), str(REPO / "peft_locas/_enum.py")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok")


def test_loading_without_import_names_the_fix(tmp_path):
    model = get_peft_model(tiny_model(), LocasConfig(r=4))
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert saved["peft_type"] == LOCAS_PEFT_TYPE_VALUE
    script = f"""
from peft import PeftConfig
try:
    PeftConfig.from_pretrained({str(tmp_path / "adapter")!r})
except KeyError as exc:
    print("ERROR:", exc)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "ERROR:" in done.stdout
    assert "import peft_locas" in done.stdout and "install peft-locas" in done.stdout
    # and with the import, the same file loads
    assert isinstance(PeftConfig.from_pretrained(tmp_path / "adapter"), LocasConfig)
