"""LOCAS is a PEFT method: registered on `import peft_locas`, and, where peft-locas is installed, in any process that
imports PEFT (``peft_locas_autoload.pth``); adapters are saved with ``peft_type: "LOCAS"`` and older ones still load;
the saved model card says what to install; transformers' adapter API works with it under the pinned versions."""

import base64
import hashlib
import importlib
import importlib.metadata
import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, PeftType, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model, tokens
from transformers import AutoModelForCausalLM

import peft_locas
from peft_locas import LocasConfig, LocasModel
from peft_locas._hook import AUTOLOAD_FINDER, NO_AUTOLOAD_ENV
from peft_locas.tuner.model_card import MARKER
from peft_locas.tuner.registration import LEGACY_PEFT_TYPE_VALUES, LOCAS_PEFT_TYPE_VALUE

REPO = Path(__file__).resolve().parents[1]
PTH = "peft_locas_autoload.pth"
LEGACY = LEGACY_PEFT_TYPE_VALUES[0]


def python(code: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter of this environment (its site-packages, so its ``.pth`` files)."""
    environ = {k: v for k, v in os.environ.items() if k != NO_AUTOLOAD_ENV}
    environ.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **(env or {}))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny base on disk; a non-identity Locas adapter for it (saved as today and as the legacy ``peft_type``); the
    logits of both on ``tokens()`` (safetensors)."""
    root = tmp_path_factory.mktemp("registration")
    tiny_model().save_pretrained(root / "base")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "base"), LocasConfig(r=4))
    generator = torch.Generator().manual_seed(7)  # values no fresh initialisation can repeat
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".value"):
                param.copy_(torch.randn(param.shape, generator=generator))
        adapter_logits = model(tokens()).logits
        with model.disable_adapter():
            base_logits = model(tokens()).logits
    model.peft_config["default"].base_model_name_or_path = str(root / "base")  # for AutoPeftModelForCausalLM
    model.save_pretrained(root / "adapter")
    shutil.copytree(root / "adapter", root / "legacy")
    config = json.loads((root / "legacy/adapter_config.json").read_text())
    (root / "legacy/adapter_config.json").write_text(json.dumps({**config, "peft_type": LEGACY}))
    save_file({"ids": tokens(), "adapter": adapter_logits, "base": base_logits}, root / "logits.safetensors")
    assert (adapter_logits - base_logits).abs().max() > 1e-2  # the adapter changes the output
    return root


def test_peft_registries_know_locas():
    assert PeftType.LOCAS is peft_locas.LOCAS_PEFT_TYPE
    assert PeftType["LOCAS"] is PeftType(LOCAS_PEFT_TYPE_VALUE) is PeftType("LOCAS") is PeftType.LOCAS
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.LOCAS] is LocasConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LOCAS] is LocasModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.LOCAS] == "locas_"
    assert LocasConfig().peft_type is PeftType.LOCAS


def test_legacy_peft_type_is_an_alias_not_a_member():
    assert PeftType(LEGACY) is PeftType.LOCAS
    assert PEFT_TYPE_TO_CONFIG_MAPPING[LEGACY] is LocasConfig  # PEFT looks the raw JSON string up
    assert [member.name for member in PeftType].count("LOCAS") == 1
    legacy_key = next(key for key in PEFT_TYPE_TO_CONFIG_MAPPING if key == LEGACY)
    assert (legacy_key.name, legacy_key.value) == ("LOCAS", LEGACY)  # code iterating the registry sees a PeftType
    assert LEGACY not in PEFT_TYPE_TO_TUNER_MAPPING  # loaded configs carry PeftType.LOCAS itself
    assert LocasConfig(peft_type=LEGACY).peft_type is PeftType.LOCAS


def test_reimport_and_reload_are_idempotent():
    members_before, configs_before = list(PeftType), len(PEFT_TYPE_TO_CONFIG_MAPPING)
    importlib.reload(importlib.import_module("peft_locas.tuner.registration"))
    reloaded = importlib.reload(peft_locas)
    assert list(PeftType) == members_before
    assert len(PEFT_TYPE_TO_CONFIG_MAPPING) == configs_before
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
    done = subprocess.run(
        [str(exe), str(script), str(REPO / "peft_locas/tuner/_enum.py")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok")


def test_adapters_are_saved_as_LOCAS_and_legacy_ones_still_load(saved, tmp_path):
    assert json.loads((saved / "adapter/adapter_config.json").read_text())["peft_type"] == "LOCAS"
    config = PeftConfig.from_pretrained(saved / "legacy")
    assert isinstance(config, LocasConfig) and config.peft_type is PeftType.LOCAS
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved / "base"), saved / "legacy")
    with torch.no_grad():
        torch.testing.assert_close(model(tokens()).logits, load_file(saved / "logits.safetensors")["adapter"])
    model.save_pretrained(tmp_path / "resaved")  # a legacy adapter saved again is written with the bare name
    assert json.loads((tmp_path / "resaved/adapter_config.json").read_text())["peft_type"] == "LOCAS"


def test_autoload_pth_is_installed_in_this_environment():
    """The interpreter running the tests has peft-locas installed (editable in .venv, which scripts/test.sh sets up
    from a clean clone): its RECORD lists the .pth, which sits in a site directory with the repository's content."""
    site_dirs = [str(Path(path).resolve()) for path in [*site.getsitepackages(), site.getusersitepackages()]]
    # the installed distribution, not the repository's own peft_locas.egg-info that a run from its root would see
    (installation,) = importlib.metadata.distributions(name="peft-locas", path=site_dirs)
    recorded = [file for file in installation.files or [] if file.name == PTH]
    assert len(recorded) == 1 and recorded[0].parent == Path(), f"{PTH} is not installed with peft-locas"
    installed = Path(recorded[0].locate()).resolve()
    assert str(installed.parent) in site_dirs, f"{installed} is not in a site directory {site_dirs}"
    assert installed.read_bytes() == (REPO / PTH).read_bytes(), (
        f"{installed} differs from {REPO / PTH}: reinstall with `pip install -e . --no-deps`"
    )


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def test_wheel_and_editable_wheel_carry_the_pth(tmp_path):
    """Both wheels setuptools builds from the sources (what `pip install .` and `pip install -e .` install) have the
    .pth at their top level, listed in RECORD (so that pip also uninstalls it)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", PTH):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "peft_locas", source / "peft_locas", ignore=shutil.ignore_patterns("__pycache__"))
    for hook in ("build_wheel", "build_editable"):  # each in its own process, as pip runs them
        build = f"import sys; from setuptools import build_meta; build_meta.{hook}(sys.argv[1])"
        command = [sys.executable, "-c", build, str(tmp_path / "dist")]
        done = subprocess.run(command, cwd=source, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    wheels = sorted((tmp_path / "dist").glob("*.whl"))
    assert [".editable-" in wheel.name for wheel in wheels] == [True, False], wheels  # peft_locas-0.1.0-0.editable-…
    expected = (REPO / PTH).read_bytes()
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            assert archive.read(PTH) == expected, wheel
            record = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/RECORD"))).decode()
        assert _record_line(PTH, expected) in record.splitlines(), wheel


FRESH_LOAD = """
import sys
assert "peft_locas" not in sys.modules and "peft" not in sys.modules
import torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

root = sys.argv[1]
saved = load_file(f"{root}/logits.safetensors")
ids, expected = saved["ids"], saved["adapter"]
assert type(PeftConfig.from_pretrained(f"{root}/adapter")).__name__ == "LocasConfig"
assert type(PeftConfig.from_pretrained(f"{root}/legacy")).__name__ == "LocasConfig"
models = {
    "PeftModel": PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(f"{root}/base"), f"{root}/adapter"),
    "AutoPeftModel": AutoPeftModelForCausalLM.from_pretrained(f"{root}/adapter"),
}
models["load_adapter"] = AutoModelForCausalLM.from_pretrained(f"{root}/base")
models["load_adapter"].load_adapter(f"{root}/adapter")
with torch.no_grad():
    for name, model in models.items():
        torch.testing.assert_close(model(ids).logits, expected, msg=lambda m: f"{name}: {m}")
print("loaded", sorted(models))
"""


def test_a_fresh_process_loads_locas_adapters_without_importing_peft_locas(saved):
    """PeftConfig / PeftModel / AutoPeftModelForCausalLM .from_pretrained and transformers' load_adapter, in an
    interpreter that never imports peft_locas: the same logits as the model that was saved."""
    done = subprocess.run(
        [sys.executable, "-c", FRESH_LOAD, str(saved)],
        capture_output=True,
        text=True,
        env={**{k: v for k, v in os.environ.items() if k != NO_AUTOLOAD_ENV}, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded ['AutoPeftModel', 'PeftModel', 'load_adapter']" in done.stdout


def test_autoload_off_fails_with_peft_key_error(saved):
    done = python(
        "import sys\n"
        "from peft import PeftConfig\n"
        f"assert {AUTOLOAD_FINDER!r} not in [getattr(f, '__name__', '') for f in sys.meta_path]\n"
        "try:\n"
        f"    PeftConfig.from_pretrained({str(saved / 'adapter')!r})\n"
        "except KeyError as exc:\n"
        "    print('KeyError:', exc)\n"
        "print('peft_locas' in sys.modules)\n",
        env={NO_AUTOLOAD_ENV: "1"},
    )
    assert done.stdout.splitlines() == ["KeyError: 'LOCAS'", "False"]


def test_a_failed_autoload_warns_and_leaves_peft_working():
    """Registration started by the .pth (the process never asked for Locas) must not break `import peft`; asked for
    with `import peft_locas`, the same failure is an error."""
    broken = "import sys; sys.modules['peft_locas._register'] = None  # importing it now raises ImportError\n"
    done = python(broken + "import peft; from peft import LoraConfig; print('peft works')")
    assert done.stdout.strip() == "peft works"
    warning = "RuntimeWarning: peft-locas could not register the LOCAS type with PEFT (ModuleNotFoundError: import of "
    assert warning + "peft_locas._register halted; None in sys.modules)" in done.stderr
    assert f"{NO_AUTOLOAD_ENV}=1 stops this attempt" in done.stderr
    asked = python(broken + "import peft_locas; import peft", check=False)
    assert asked.returncode == 1 and "ModuleNotFoundError: import of peft_locas._register halted" in asked.stderr


def test_model_card_says_what_to_install(saved, tmp_path):
    card = (saved / "adapter/README.md").read_text()
    assert card.count(MARKER) == 1 and "`pip install peft-locas`" in card
    assert "\n- locas\n" in card.split("---")[1]  # the YAML front matter's tags
    assert card.index("# Model Card") < card.index(MARKER) < card.index("## Model Details")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved / "base"), saved / "adapter")
    shutil.copy2(saved / "adapter/README.md", tmp_path / "README.md")
    model.save_pretrained(tmp_path)  # saving over an existing card does not repeat the note
    assert (tmp_path / "README.md").read_text().count(MARKER) == 1
    lora = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    assert MARKER not in (tmp_path / "lora/README.md").read_text()


def test_transformers_adapter_api_works_with_locas(saved, tmp_path):
    """transformers' own adapter methods on a Locas adapter, under the pinned versions (transformers < 5.24 accepts
    peft 0.21 for all of them): load, add, switch, disable/enable, delete, save, and the outputs each gives."""
    expected = load_file(saved / "logits.safetensors")
    model = AutoModelForCausalLM.from_pretrained(saved / "base")
    model.load_adapter(saved / "adapter", adapter_name="trained")
    model.add_adapter(LocasConfig(r=4), adapter_name="fresh")  # value 0: the base model's output
    with torch.no_grad():
        model.set_adapter("trained")
        assert model.active_adapters() == ["trained"]
        torch.testing.assert_close(model(tokens()).logits, expected["adapter"])
        model.disable_adapters()
        torch.testing.assert_close(model(tokens()).logits, expected["base"])
        model.enable_adapters()
        torch.testing.assert_close(model(tokens()).logits, expected["adapter"])
        model.set_adapter("fresh")
        torch.testing.assert_close(model(tokens()).logits, expected["base"])
        model.delete_adapter("fresh")
        assert set(model.peft_config) == {"trained"}
        model.set_adapter("trained")
        state = model.get_adapter_state_dict("trained")
        assert len(state) == len(load_file(saved / "adapter/adapter_model.safetensors")) > 0
        model.save_pretrained(tmp_path / "saved")
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved / "base"), tmp_path / "saved")
        torch.testing.assert_close(reloaded(tokens()).logits, expected["adapter"])
