"""Accuracy over retention ratios x scorers: the paper-shaped table, the ablation table and the plots."""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass
from pathlib import Path

from qavtp.calibrate.artifact import load_model_or_artifact, read_config
from qavtp.calibrate.artifact_config import ArtifactConfig, activation_spec, fusion_params, ratio_key
from qavtp.errors import QavtpError
from qavtp.evaluate import Pruning, evaluate
from qavtp.io import atomic_dir, atomic_write_json
from qavtp.prompting import encode
from qavtp.scoring import LEARNED_SCORERS, check_layer, check_scorer

# Rows of the ablation table: every single metric, then the paper's recipe and the learned fusion.
ABLATION = ("random", "linf", "l1", "l2", "variance", "outlier", "qerror", "hybrid", "cls", "semantic", "qapruner")
N_EXAMPLES = 4  # questions whose kept tokens are drawn


def check_fusion(cfg: ArtifactConfig | None, scorers: list[str], ratios: list[float]) -> None:
    """Scorers ``qavtp`` and ``qavtp-dpp`` need the artifact's fusion weights for every pruned ratio: one clear line
    if not."""
    if set(LEARNED_SCORERS) & set(scorers):
        for rho in [r for r in ratios if r < 1]:
            fusion_params(cfg, rho)


def pruning_for(
    adapter,
    scorer: str,
    rho: float,
    cfg: ArtifactConfig | None,
    seed: int = 0,
    layer: int = 0,
    theta: float | None = None,
) -> Pruning:
    """How ``qavtp eval`` prunes at ratio ``rho``: the artifact's fusion weights of that ratio (scorer ``qavtp``,
    and the sensitivity ablation's quantizer and direction) and its deployed activation quantizer."""
    fusion = None
    learned = cfg.fusion.ratios if cfg is not None and cfg.fusion is not None else {}
    # qavtp needs its ratio's weights (fusion_for says so if they are missing); the sensitivity ablation uses them
    # where the artifact has them; every other scorer ignores them, so an artifact learned for 0.125 alone can
    # still be swept at 0.5 with semantic or [CLS] pruning.
    if rho < 1 and (scorer in LEARNED_SCORERS or ratio_key(rho) in learned):
        fusion = fusion_params(cfg, rho)
    return Pruning(adapter, scorer, rho, fusion, activation_spec(cfg), seed, layer, theta)


def parse_scorers(spec: str) -> list[str]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise QavtpError("--scorer names no scorer")
    if names == ["ablation"]:
        return [*ABLATION, "qavtp"]
    return [check_scorer(n) for n in names]


@dataclass(frozen=True)
class SweepSpec:
    """What ``qavtp eval`` sweeps: every (ratio, scorer), optionally the floating-point source with ``fp_scorers``."""

    ratios: tuple[float, ...]
    scorers: tuple[str, ...]
    layer: int = 0
    fp_scorers: tuple[str, ...] | None = None
    dtype: str = "fp32"
    batch_size: int = 16
    seed: int = 0
    relevance_weight: float | None = None


def sweep(model: str | None, artifact: str | None, dataset, spec: SweepSpec, cache_dir=None) -> tuple[list[dict], str]:
    """The sweep's runs and its Markdown report: the paper-shaped table and, for an artifact, its fusion weights."""
    cfg = read_config(artifact) if artifact else None
    runs: list[dict] = []
    if spec.fp_scorers is not None:
        source = cfg.source.model if model is None else model
        runs += _sweep_model(source, None, None, "FP", spec.fp_scorers, dataset, spec, cache_dir)
        gc.collect()  # the floating-point model goes before the quantized one is built
    runs += _sweep_model(model, artifact, cfg, cfg.label if cfg else "FP", spec.scorers, dataset, spec, cache_dir)
    head = "Accuracy (%) ± half the 95 % Wilson interval; columns: visual tokens kept."
    md = [head, "", paper_table(runs, list(spec.ratios))]
    if cfg and cfg.fusion:
        md += ["#### Learned fusion weights", "", fusion_table(cfg)]
    return runs, "\n".join(md)


def _sweep_model(model, artifact, cfg, label: str, scorers, dataset, spec: SweepSpec, cache_dir) -> list[dict]:
    net, processor, adapter = load_model_or_artifact(model, artifact, spec.dtype, cache_dir)
    return run_sweep(net, adapter, processor, dataset, spec, list(scorers), label, cfg)


def write_sweep(out: Path, runs: list[dict], report: str, dataset, spec: SweepSpec, config: dict) -> list[str]:
    """``results.json``, ``results.md`` and the plots, written together into ``out`` (all or nothing)."""
    written = ["results.json", "results.md", "accuracy_vs_retention.png"]
    with atomic_dir(out) as tmp:
        atomic_write_json(tmp / "results.json", {"config": config, "runs": runs})
        (tmp / "results.md").write_text(report)
        plot_accuracy(runs, tmp / "accuracy_vs_retention.png")
        pruned = [r for r in spec.ratios if r < 1]
        if pruned:
            label = next(r["model"] for r in reversed(runs))
            drawn = ("semantic", "qapruner", "qavtp", "divprune", "cdpruner", "qavtp-dpp")
            shown = [s for s in drawn if s in spec.scorers] or list(spec.scorers[:2])
            plot_kept_tokens(dataset, runs, label, shown, min(pruned), tmp / "kept_tokens.png")
            written.append("kept_tokens.png")
    return written


def run_sweep(
    model,
    adapter,
    processor,
    dataset,
    spec: SweepSpec,
    scorers: list[str],
    label: str,
    cfg: ArtifactConfig | None = None,
    progress: bool = True,
) -> list[dict]:
    """One evaluation per (ratio, scorer) of ``spec``; ratio 1 is the dense model, evaluated once.

    ``cfg`` is the artifact config: the learned fusion weights of each ratio (scorer ``qavtp``; the
    sensitivity terms of the ablation use its quantizer and direction) and the deployed activation quantizer.
    """
    ratios, layer, seed, batch_size = list(spec.ratios), spec.layer, spec.seed, spec.batch_size
    check_layer(len(adapter.decoder_layers), layer)
    check_fusion(cfg, scorers, ratios)
    probe = dataset[0]
    n_visual = int(adapter.visual_positions(encode(processor, [probe["image"]], [probe["prompt"]])["input_ids"]).sum())
    runs = []
    for rho in sorted(set(ratios), reverse=True):
        for scorer in ["dense"] if rho == 1 else scorers:
            prune = None if rho == 1 else pruning_for(adapter, scorer, rho, cfg, seed, layer, spec.relevance_weight)
            keep_log: list = []
            t0 = time.time()
            res = evaluate(
                model,
                processor,
                dataset,
                batch_size=batch_size,
                prune=prune,
                progress=progress,
                desc=f"{label} {scorer} {rho:g}",
                keep_log=keep_log,
            )
            runs.append(
                {
                    "model": label,
                    "scorer": scorer,
                    "retain": rho,
                    "layer": layer,
                    "accuracy": res["accuracy"],
                    "ci95": res["ci95"],
                    "n": res["n"],
                    "visual_tokens": n_visual,
                    "visual_tokens_kept": res["visual_tokens_kept"] or n_visual,
                    "by_type": res["by_type"],
                    "seconds": round(time.time() - t0, 1),
                    "correct": [int(p["correct"]) for p in res["predictions"]],
                    "kept_examples": keep_log[:N_EXAMPLES],
                }
            )
    return runs


# ------------------------------------------------------------------------------------------ tables


def _cell(run: dict | None) -> str:
    if run is None:
        return "–"
    lo, hi = run["ci95"]
    return f"{100 * run['accuracy']:.1f} ± {50 * (hi - lo):.1f}"


def _find(runs: list[dict], model: str, scorer: str, rho: float) -> dict | None:
    for r in runs:
        if r["model"] == model and r["retain"] == rho and (r["scorer"] == scorer or (rho == 1 and scorer == "dense")):
            return r
    return None


def _header(ratios: list[float]) -> list[str]:
    cols = " | ".join(f"{100 * r:g} %" for r in ratios)
    return [f"| method | {cols} |", "|---|" + "---:|" * len(ratios)]


def paper_table(runs: list[dict], ratios: list[float]) -> str:
    """Rows: each model dense, then each model with each scorer; columns: retention ratios."""
    ratios = sorted(set(ratios), reverse=True)
    lines = _header(ratios)
    models = list(dict.fromkeys(r["model"] for r in runs))
    for m in models:
        dense = _find(runs, m, "dense", 1.0)
        if dense is not None:
            lines.append(f"| {m} dense | " + " | ".join(_cell(dense) for _ in ratios) + " |")
        for s in dict.fromkeys(r["scorer"] for r in runs if r["model"] == m and r["retain"] < 1):
            cells = [_cell(_find(runs, m, s, rho)) if rho < 1 else "–" for rho in ratios]
            lines.append(f"| {m} + {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def fusion_table(cfg: ArtifactConfig) -> str:
    """The learned fusion weights per ratio, with their calibration scores and the paper preset's."""
    fus = cfg.fusion.record if cfg.fusion is not None else {}
    if not fus.get("ratios"):
        return ""
    lines = [
        f"Learned on {fus['n_samples']} calibration questions, objective {fus['objective']} "
        f"(dense W4A4: KL {fus['dense']['kl']:.4f}, first-token accuracy {100 * fus['dense']['accuracy']:.1f} %).",
        "",
        "| retain | semantic | α | β | direction | norm | outlier | error | selection | calib KL | calib acc "
        "| qapruner KL | qapruner acc | held-out z |",
        "|---:|---|---:|---:|---|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    for key, e in sorted(fus["ratios"].items(), key=lambda kv: -float(kv[0])):
        p = e["params"]
        direction = "keep sensitive" if p["direction"] == 1 else "keep robust"
        lines.append(
            f"| {float(key) * 100:g} % | {p['semantic']} | {p['alpha']:g} | {p['beta']:g} | {direction} | {p['norm']} "
            f"| {p['outlier']} | {'relative' if p['relative'] else 'absolute'} | {_selection_cell(p)} | {e['kl']:.4f} "
            f"| {100 * e['accuracy']:.1f} | {e['qapruner']['kl']:.4f} | {100 * e['qapruner']['accuracy']:.1f} "
            f"| {_holdout_cell(e.get('holdout'))} |"
        )
    return "\n".join(lines) + "\n"


def _selection_cell(p: dict) -> str:
    """top-k, or the DPP with its relevance weight (artifacts before issue 26 hold neither: top-k)."""
    return f"DPP θ {p['theta']:g}" if p.get("select") == "dpp" else "top-k"


def _holdout_cell(check: dict | None) -> str:
    """How the held-out comparison with the preset went (older artifacts and equal winners have none)."""
    if not check:
        return "–"
    return f"{check['z']:.2f} on {check['n']}: {check['adopted']}"


# ------------------------------------------------------------------------------------------- plots


def plot_accuracy(runs: list[dict], path) -> None:
    """Accuracy vs retention, one line per (model, scorer); dense models as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ratios = sorted({r["retain"] for r in runs})
    for r in runs:
        if r["retain"] == 1:
            ax.axhline(100 * r["accuracy"], ls="--", lw=1, color="gray")
            ax.text(ratios[0], 100 * r["accuracy"] + 0.4, f"{r['model']} dense", fontsize=7, color="gray")
    colours = iter(plt.cm.tab20.colors * 4)  # more lines than the default cycle's 10 colours
    for m in dict.fromkeys(r["model"] for r in runs):
        for s in dict.fromkeys(r["scorer"] for r in runs if r["model"] == m and r["retain"] < 1):
            pts = sorted((r["retain"], r) for r in runs if r["model"] == m and r["scorer"] == s and r["retain"] < 1)
            xs = [x for x, _ in pts]
            ys = [100 * r["accuracy"] for _, r in pts]
            err = [
                [100 * (r["accuracy"] - r["ci95"][0]) for _, r in pts],
                [100 * (r["ci95"][1] - r["accuracy"]) for _, r in pts],
            ]
            ls = "--" if m == "FP" else "-"
            ax.errorbar(
                xs, ys, yerr=err, marker="o", ms=3, capsize=2, lw=1.2, ls=ls, color=next(colours), label=f"{m} + {s}"
            )
    ax.set_xscale("log", base=2)
    ax.set_xticks(ratios, [f"{100 * r:g} %" for r in ratios])
    ax.set_xlabel("visual tokens kept")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_kept_tokens(dataset, runs: list[dict], model: str, scorers: list[str], rho: float, path) -> bool:
    """The first questions' images with the dropped patches dimmed, one column per scorer. False if nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cols = [_find(runs, model, s, rho) for s in scorers]
    cols = [(s, c) for s, c in zip(scorers, cols, strict=True) if c is not None and c["kept_examples"]]
    if not cols:
        return False
    n = min(len(c["kept_examples"]) for _, c in cols)
    fig, axes = plt.subplots(n, len(cols), figsize=(2.6 * len(cols), 2.8 * n), squeeze=False)
    for i in range(n):
        row = dataset[i]
        img = np.asarray(row["image"].convert("RGB"), dtype=np.float32) / 255
        for j, (s, c) in enumerate(cols):
            kept = c["kept_examples"][i]
            side = math.isqrt(c["visual_tokens"])
            mask = np.zeros(side * side, dtype=bool)
            mask[kept] = True
            h, w = img.shape[:2]
            grid = mask.reshape(side, side).repeat(-(-h // side), 0).repeat(-(-w // side), 1)[:h, :w]
            shown = img * np.where(grid, 1.0, 0.25)[..., None]
            ax = axes[i][j]
            ax.imshow(shown, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ok = "✓" if c["correct"][i] else "✗"
            title = f"{s}: {len(kept)} kept {ok}" if i else f"{s}\n{len(kept)} kept {ok}"
            ax.set_title(title, fontsize=8)
        axes[i][0].set_ylabel(_wrap(row["question"]), fontsize=7)
    fig.suptitle(f"{model}: kept visual tokens at {100 * rho:g} % (dimmed: dropped)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _wrap(text: str, width: int = 28) -> str:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if len(cur) + len(w) + 1 > width and cur:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return "\n".join([*lines, cur])
