"""``qavtp eval`` of one model: load it (checkpoint or artifact), prune as asked, evaluate, describe the run."""

from __future__ import annotations

import time

import torch

from qavtp.calibrate.artifact import load_model_or_artifact, read_config
from qavtp.config import EvalConfig
from qavtp.device import describe, resolve_device, visiting
from qavtp.evaluate import evaluate
from qavtp.models.reference import NAME as DEFAULT_MODEL
from qavtp.scoring import check_layer
from qavtp.sweep import pruning_for


def evaluate_one(model: str | None, artifact: str | None, dataset, config: EvalConfig, cache_dir=None) -> dict:
    """Accuracy overall and per question type, with the run's description under ``config`` (JSON-able)."""
    dev = resolve_device(config.device)
    torch.manual_seed(config.seed)
    cfg = read_config(artifact) if artifact else None
    net, processor, adapter = load_model_or_artifact(model, artifact, config.dtype, cache_dir)
    rho = config.ratios[0] if config.ratios else None
    scorer = config.scorers[0] if rho is not None else None
    prune = None
    if rho is not None:
        check_layer(len(adapter.decoder_layers), config.layer)
        prune = pruning_for(adapter, scorer, rho, cfg, config.seed, config.layer, config.relevance_weight)
    t0 = time.time()
    with visiting(net, dev):
        results = evaluate(net, processor, dataset, batch_size=config.batch_size, mode=config.mode, prune=prune)
    results["seconds"] = round(time.time() - t0, 1)
    results["device"] = describe(dev)
    name = f"artifact {artifact}" if artifact else (model or DEFAULT_MODEL)
    results["config"] = {
        "model": str(name),
        "mode": config.mode,
        "dtype": config.dtype,
        "retain": rho,
        "scorer": scorer,
        "layer": config.layer if rho is not None else None,
    }
    return results


def title(results: dict, data: str, split: str) -> str:
    c = results["config"]
    pruning = f", retain {c['retain']} by {c['scorer']} at K={c['layer']}" if c["retain"] is not None else ""
    return f"{c['model']} on {data} ({split}, n={results['n']}, {c['mode']}, {c['dtype']}{pruning})"
