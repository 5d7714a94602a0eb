"""The torch model an export came from, pruned as the export prunes: what ``eval-onnx --compare`` holds it to."""

from __future__ import annotations

from qavtp.calibrate.artifact import load_model_or_artifact
from qavtp.errors import QavtpError
from qavtp.evaluate import Pruning, evaluate
from qavtp.scoring import LEARNED_SCORERS, FusionParams


def torch_like_export(meta: dict, cache_dir=None, dtype: str = "fp32"):
    """``(model, processor, pruning or None)`` of the torch (fake-quant) model that ``export.json`` ``meta`` names."""
    src = meta.get("source")
    if (
        not isinstance(src, dict)
        or src.get("kind") not in ("artifact", "model")
        or not isinstance(src.get("path"), str)
    ):
        raise QavtpError("export.json does not say which artifact or model the export came from (source)")
    artifact = src["kind"] == "artifact"
    net, processor, adapter = load_model_or_artifact(
        None if artifact else src["path"], src["path"] if artifact else None, dtype, cache_dir
    )
    pr = meta["pruning"]
    prune = None
    if pr["scorer"] and pr["retain"] < 1:
        fusion = None
        if pr["scorer"] in LEARNED_SCORERS:
            if not isinstance(pr.get("fusion"), dict):
                raise QavtpError(f"export.json: scorer {pr['scorer']!r} but no fusion parameters (pruning.fusion)")
            fusion = FusionParams.from_dict(pr["fusion"])
        prune = Pruning(adapter, pr["scorer"], pr["retain"], fusion=fusion, theta=pr.get("relevance_weight"))
    return net, processor, prune


def evaluate_like_export(meta: dict, dataset, batch_size: int, cache_dir=None) -> tuple[dict, list]:
    """The torch model's results on ``dataset`` and each question's kept visual-token indices."""
    net, processor, prune = torch_like_export(meta, cache_dir)
    kept: list = []
    res = evaluate(net, processor, dataset, batch_size=batch_size, prune=prune, desc="torch eval", keep_log=kept)
    return res, kept
