"""Build hooks: ship ``peft_locas_autoload.pth`` at the top of site-packages, in wheels and in editable installs.

Everything else about the package is declared in ``pyproject.toml``. The ``.pth`` file lets any process that imports
PEFT find the LOCAS adapter type without ``import peft_locas`` (see ``peft_locas/_hook.py``); Python runs its one
``import`` line at start-up from site-packages only, so it must sit at the top of the wheel, outside the package.

- Wheels (``pip install .``, ``python -m build``): ``build_py`` copies it into ``build_lib``, whose top level is the
  wheel's top level, as pytest-socket and pdbpp do. The sdist carries the source file (``get_source_files``).
- Editable installs (PEP 660, ``pip install -e .``, what ``scripts/setup_env.sh`` runs): setuptools' editable wheel
  holds only its own ``__editable__`` path file and finder, whatever ``build_lib`` holds, so once setuptools has built
  it the file is added to the wheel with its line in ``RECORD`` (PEP 427), which also lets ``pip uninstall`` remove it.
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "peft_locas_autoload.pth"
SOURCE = Path(__file__).resolve().parent / PTH


class build_py_with_pth(build_py):
    """``build_py`` that also puts the ``.pth`` file at the top of ``build_lib`` (the wheel's top level)."""

    def run(self) -> None:
        super().run()
        self.copy_file(str(SOURCE), str(Path(self.build_lib, PTH)), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib, PTH))]

    def get_source_files(self) -> list[str]:
        return [*super().get_source_files(), PTH]


class editable_wheel_with_pth(editable_wheel):
    """setuptools' PEP 660 editable wheel, with the ``.pth`` file added at its top level once it is built."""

    def run(self) -> None:
        super().run()
        wheels = sorted(Path(self.dist_dir).glob("*-0.editable-*.whl"), key=lambda path: path.stat().st_mtime)
        if not wheels:
            raise RuntimeError(f"no editable wheel in {self.dist_dir} to add {PTH} to; setuptools changed its layout.")
        add_to_wheel(wheels[-1], PTH, SOURCE.read_bytes())


def add_to_wheel(wheel: Path, name: str, data: bytes) -> None:
    """Add the file ``name`` (contents ``data``) at the top of ``wheel`` and list it in the wheel's ``RECORD``."""
    with zipfile.ZipFile(wheel) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    record = [info.filename for info, _ in entries if info.filename.endswith(".dist-info/RECORD")]
    if len(record) != 1 or any(info.filename == name for info, _ in entries):
        raise RuntimeError(f"{wheel.name}: expected one RECORD and no {name} yet; cannot add {name}.")
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    line = f"{name},sha256={digest},{len(data)}\n".encode()
    rewritten = wheel.with_name(wheel.name + ".tmp")
    with zipfile.ZipFile(rewritten, "w", zipfile.ZIP_DEFLATED) as archive:
        added = zipfile.ZipInfo(name, date_time=entries[0][0].date_time)
        added.external_attr = 0o644 << 16  # rw-r--r--, as the other files
        archive.writestr(added, data)
        for info, content in entries:
            archive.writestr(info, line + content if info.filename == record[0] else content)
    rewritten.replace(wheel)


setup(cmdclass={"build_py": build_py_with_pth, "editable_wheel": editable_wheel_with_pth})
