"""Named calibration recipes: the option sets measured on the reference model, as config instances.

A recipe fills in only the options the user left at their defaults; an explicit flag always wins. Torch-free,
so that the command line can list the names without loading it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import fields
from typing import Any

from qavtp.config import AlignConfig, CalibrationConfig, QuantConfig, updated

_ACCURATE = QuantConfig(gptq=True, a_symmetric=False, agroup=16, sequential=True, fp_align=0.25)

RECIPES: dict[str, CalibrationConfig] = {
    # QuaRot's own choice (the defaults): rotation, RTN weights, symmetric per-token activations.
    "quarot": CalibrationConfig(),
    "accurate": CalibrationConfig(quant=_ACCURATE),
    # Projector and weight-scale alignment through the quantized LLM, at the fusion ratios (dense if none).
    "aligned": CalibrationConfig(quant=_ACCURATE, align=AlignConfig(steps=200, batch_size=16, scale_lr=1e-4)),
}

DESCRIPTIONS = {
    "quarot": "the option defaults (QuaRot: RTN weights, symmetric per-token activations)",
    "accurate": "--gptq --aasym --agroup 16 --sequential --fp-align 0.25",
    "aligned": "accurate + --align-projector 200 --align-batch 16 --align-scale-lr 1e-4 --align-retain <the --retain "
    "ratios, or 1 with --retain none>",
}


def _differences(config: Any, default: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted field paths where ``config`` differs from ``default``, in field order."""
    out: dict[str, Any] = {}
    for f in fields(config):
        mine, theirs = getattr(config, f.name), getattr(default, f.name)
        if hasattr(mine, "__dataclass_fields__"):
            out.update(_differences(mine, theirs, f"{prefix}{f.name}."))
        elif mine != theirs:
            out[f"{prefix}{f.name}"] = mine
    return out


def recipe_changes(name: str) -> dict[str, Any]:
    """What recipe ``name`` sets: dotted field paths of :class:`CalibrationConfig` and their values."""
    return _differences(RECIPES[name], CalibrationConfig())


def apply_recipe(
    name: str | None, config: CalibrationConfig, given: Iterable[str]
) -> tuple[CalibrationConfig, dict[str, Any]]:
    """``config`` with recipe ``name``'s values for every field not in ``given`` (dotted paths), and what it set.

    The ``aligned`` recipe aligns for the ratios the fusion weights are learned for (the ones to be deployed), or
    for the dense model when there are none, unless ``align.ratios`` is given. On the reference model aligning
    for 12.5 % alone beat aligning for the dense model and 12.5 % together, at both (docs/results.md).
    """
    if name is None:
        return config, {}
    given = set(given)
    changes = {k: v for k, v in recipe_changes(name).items() if k not in given}
    changes["recipe"] = name
    config = updated(config, changes)
    if name == "aligned" and config.align.enabled and "align.ratios" not in given:
        changes["align.ratios"] = config.fusion.ratios or (1.0,)
        config = updated(config, {"align.ratios": changes["align.ratios"]})
    return config, {k: v for k, v in changes.items() if k != "recipe"}
