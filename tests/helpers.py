"""Helpers the test modules share."""

from __future__ import annotations

import json
from pathlib import Path

from qavtp.cli import CALIBRATE_FIELDS
from qavtp.config import CalibrationConfig, updated


def calibration(**options) -> CalibrationConfig:
    """The config ``qavtp calibrate`` builds from these options (named as its click parameters; ``wsym`` too),
    without fusion weights unless ``retain`` names ratios (the tests' calibrations are quick)."""
    fields = {**{k: f for k, (f, _) in CALIBRATE_FIELDS.items()}, "wsym": "quant.w_symmetric"}
    return updated(CalibrationConfig(), {fields[k]: v for k, v in {"retain": "none", **options}.items()})


def config_json(artifact) -> dict:
    """An artifact's ``config.json`` as written: tests of the file format read it, not the typed schema."""
    return json.loads((Path(artifact) / "config.json").read_text())
