"""The layer contract in pyproject.toml places every qavtp module (lint-imports, run by .ci/run, enforces it)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import grimp

REPO = Path(__file__).resolve().parent.parent


def _layers() -> list[str]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in config["contracts"] if c["type"] == "layers"]
    return [m.strip() for layer in layers for m in re.split(r"[|:]", layer)]


def test_every_module_has_a_layer():
    placed = _layers()
    graph = grimp.build_graph("qavtp")
    packages = {"qavtp", "qavtp.calibrate", "qavtp.export"}  # namespaces whose modules are placed one by one
    unplaced = [
        m
        for m in sorted(graph.modules)
        if m not in packages and not any(m == p or m.startswith(p + ".") for p in placed)
    ]
    assert not unplaced, f"modules in no layer of the contract: {unplaced}"
    assert len(placed) == len(set(placed)), "a module is placed twice"


def test_no_module_imports_in_a_cycle():
    graph = grimp.build_graph("qavtp")
    cycles = [
        (a, b)
        for a in sorted(graph.modules)
        for b in graph.find_modules_directly_imported_by(a)
        if graph.chain_exists(importer=b, imported=a)
    ]
    assert not cycles, cycles
