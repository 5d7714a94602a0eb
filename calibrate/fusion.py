"""Learning the fusion of semantic relevance and quantization sensitivity, per retention ratio.

The artifact's ``config.json`` holds, under ``fusion``::

    {"layer": 0, "objective": "kl", "n_samples": 128,
     "ratios": {"0.125": {"params": FusionParams.to_dict(), "score": ..., "curve": [...]}, ...}}
"""

from __future__ import annotations

from qavtp.errors import QavtpError
from qavtp.pruning import check_ratio
from qavtp.scoring import FusionParams


def ratio_key(rho: float) -> str:
    """The JSON key of a retention ratio: ``0.125`` -> ``"0.125"``, ``1`` -> ``"1"``."""
    return f"{check_ratio(rho):g}"


def fusion_for(cfg: dict, rho: float) -> FusionParams:
    """The learned fusion parameters of ratio ``rho`` from an artifact config, or one clear error."""
    fus = cfg.get("fusion")
    if not fus or not fus.get("ratios"):
        raise QavtpError("this artifact was calibrated without fusion weights; rerun qavtp calibrate with --retain")
    key = ratio_key(rho)
    if key not in fus["ratios"]:
        raise QavtpError(f"the artifact has fusion weights for retention {', '.join(fus['ratios'])}, not {key}")
    return FusionParams.from_dict(fus["ratios"][key]["params"])
