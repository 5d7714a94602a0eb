"""Named calibration recipes: the option sets measured on the reference model, so users need not copy flags.

A recipe fills in only the options the user left at their defaults; an explicit flag always wins. Kept free
of torch at import so that the command line can list the names without loading it.
"""

from __future__ import annotations

from collections.abc import Iterable

_ACCURATE: dict[str, object] = {
    "gptq": True,
    "aasym": True,  # the command line's flag: asymmetric activations
    "agroup": 16,
    "sequential": True,
    "fp_align": 0.25,
}

RECIPES: dict[str, dict[str, object]] = {
    # QuaRot's own choice (the option defaults): rotation, RTN weights, symmetric per-token activations.
    "quarot": {},
    "accurate": _ACCURATE,
    # Projector and weight-scale alignment through the quantized LLM, at the --retain ratios (dense if none).
    "aligned": {**_ACCURATE, "align_steps": 200, "align_batch": 16, "align_scale_lr": 1e-4},
}

DESCRIPTIONS = {
    "quarot": "the option defaults (QuaRot: RTN weights, symmetric per-token activations)",
    "accurate": "--gptq --aasym --agroup 16 --sequential --fp-align 0.25",
    "aligned": "accurate + --align-projector 200 --align-batch 16 --align-scale-lr 1e-4 --align-retain <the --retain "
    "ratios, or 1 with --retain none>",
}


def _flag(name: str, value: object) -> str:
    flag = "--" + ("align-projector" if name == "align_steps" else name.replace("_", "-"))
    return flag if value is True else f"{flag} {value}"


def apply_recipe(name: str | None, options: dict[str, object], given: Iterable[str]) -> tuple[dict, list[str]]:
    """``options`` with recipe ``name``'s values for every option not in ``given``, and the flags it set.

    The ``aligned`` recipe aligns for the ratios the fusion weights are learned for (``--retain``: the ones to be
    deployed), or for the dense model with ``--retain none``, unless ``--align-retain`` is given. On the reference
    model aligning for 12.5 % alone beat aligning for the dense model and 12.5 % together, at both (README).
    """
    if name is None:
        return dict(options), []
    given = set(given)
    out = dict(options)
    applied = []
    for key, value in RECIPES[name].items():
        if key not in given:
            out[key] = value
            applied.append(_flag(key, value))
    if out.get("align_steps") and "align_retain" not in given and name == "aligned":
        from qavtp.calibrate.fusion import parse_ratios  # torch: only once a calibration runs

        below_one = [f"{r:g}" for r in parse_ratios(out.get("retain")) if r < 1.0]
        out["align_retain"] = ",".join(below_one) or "1"
        applied.append(_flag("align_retain", out["align_retain"]))
    return out, applied
