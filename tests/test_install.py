"""The source tree is what runs: pytest, an editable install and a wheel all import the same files."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Prints every qavtp module with the file it was imported from; run inside the venv under test.
IMPORT_ALL = """
import importlib, json, pkgutil, qavtp
names = sorted(m.name for m in pkgutil.walk_packages(qavtp.__path__, "qavtp."))
print(json.dumps({n: importlib.import_module(n).__file__ for n in names}))
"""
EXPECTED = {"qavtp.cli", "qavtp.calibrate", "qavtp.calibrate.quantizers", "qavtp.export", "qavtp.export.session"}


def test_pytest_imports_the_checkout():
    # pyproject's pythonpath puts the checkout first: an installed snapshot would hide the edits under test.
    import qavtp.calibrate
    import qavtp.cli
    import qavtp.export

    for module in (qavtp, qavtp.calibrate, qavtp.export, qavtp.cli):
        assert Path(module.__file__).parent.resolve().is_relative_to(REPO), module.__file__
    assert Path(qavtp.calibrate.__file__).resolve() == REPO / "calibrate" / "__init__.py"
    assert Path(qavtp.cli.__file__).resolve() == REPO / "cli.py"


def _venv(where: Path) -> Path:
    # The venv sees this interpreter's packages (torch, transformers ...), so only qavtp itself is installed.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(where)], check=True)
    return where / "bin" / "python"


def _import_all(python: Path, cwd: Path) -> dict[str, str]:
    import json

    out = subprocess.run([str(python), "-c", IMPORT_ALL], cwd=cwd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_editable_install_imports_every_module_from_the_checkout(tmp_path):
    python = _venv(tmp_path / "venv")
    pip = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check"]
    subprocess.run([*pip, "-e", str(REPO)], check=True, capture_output=True)
    files = _import_all(python, cwd=tmp_path)  # outside the checkout: only the install can provide qavtp
    assert EXPECTED <= set(files)
    for name, file in files.items():
        assert Path(file).resolve().is_relative_to(REPO), (name, file)


def test_wheel_holds_the_layout_and_imports_every_module(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(REPO)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("qavtp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"qavtp/cli.py", "qavtp/calibrate/__init__.py", "qavtp/export/session.py"} <= names
    assert not any(n.startswith(("calibrate/", "export/", "tests/")) for n in names)
    python = _venv(tmp_path / "venv")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)
    files = _import_all(python, cwd=tmp_path)
    assert EXPECTED <= set(files)
    for name, file in files.items():
        assert not Path(file).resolve().is_relative_to(REPO), (name, file)
