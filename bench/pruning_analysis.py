"""Why pruning helps or hurts under W4A4 on the reference model: where the outlier tokens are, what each scorer
keeps, and how the quantization error of the kept set changes.

    python bench/pruning_analysis.py --artifact runs/w4a4-qavtp [--limit 256] [--out bench/results/pruning_analysis]

For each easy-VQA test question (seeded subset) it computes, at the pruning point (the projector output entering
layer 0), every visual token's semantic scores (text attention at layer 0, vision [CLS] attention), its activation
quantization error under the artifact's quantizer and its channel range, and marks the tokens whose 8x8 patch
shows the shape (foreground). Writes a Markdown table and a PNG of the per-position means.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def foreground(images, side: int) -> np.ndarray:
    """Per patch: does it show the shape (pixels that differ from the image's most common colour)?"""
    out = []
    for im in images:
        a = np.asarray(im.convert("RGB").resize((side * 8, side * 8)), dtype=np.int16)
        flat = a.reshape(-1, 3)
        colours, counts = np.unique(flat, axis=0, return_counts=True)
        bg = colours[counts.argmax()]
        fg = (np.abs(a - bg).sum(-1) > 30).astype(np.float32)
        patches = fg.reshape(side, 8, side, 8).mean((1, 3))
        out.append(patches.reshape(-1) > 0.1)
    return np.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--limit", type=int, default=256)
    ap.add_argument("--out", default="bench/results/pruning_analysis")
    a = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qavtp.calibrate.artifact import load_artifact
    from qavtp.calibrate.artifact_config import activation_spec, fusion_params
    from qavtp.data import load_data
    from qavtp.prompting import encode
    from qavtp.pruning import select_tokens
    from qavtp.scoring import (
        fused_scores,
        gather_visual,
        qapruner_params,
        quant_error_score,
        semantic_scores,
    )

    model, processor, adapter, cfg = load_artifact(a.artifact)
    spec = activation_spec(cfg)
    ds = load_data("easy-vqa", "test", a.limit, 0)
    ratios = sorted((float(k) for k in cfg["fusion"]["ratios"]), reverse=True)
    acc = {k: [] for k in ("text", "cls", "err", "rel", "range", "fg")}
    kept = {}
    with torch.no_grad():
        for s in range(0, len(ds), 16):
            rows = ds[s : s + 16]
            enc = encode(processor, rows["image"], rows["prompt"])
            vis = adapter.visual_positions(enc["input_ids"])
            emb = adapter.embed(enc["input_ids"], enc["pixel_values"])
            X = gather_visual(emb, vis)
            side = int(X.shape[1] ** 0.5)
            terms = {
                "text": semantic_scores(adapter, enc, emb, vis, "text"),
                "cls": semantic_scores(adapter, enc, emb, vis, "cls"),
                "err": quant_error_score(X, spec, relative=False),
                "rel": quant_error_score(X, spec, relative=True),
                "range": X.float().amax(-1) - X.float().amin(-1),
            }
            for k, v in terms.items():
                acc[k].append(v.numpy())
            acc["fg"].append(foreground(rows["image"], side))
            scorers = {
                "semantic (text)": lambda rho, t=terms: t["text"],
                "cls": lambda rho, t=terms: t["cls"],
                "qapruner": lambda rho, t=terms, X=X: fused_scores(t["text"], X, qapruner_params(X.shape[-1])),
                "qavtp (learned)": lambda rho, t=terms, X=X: fused_scores(
                    t[fusion_params(cfg, rho).semantic], X, fusion_params(cfg, rho)
                ),
            }
            for name, fn in scorers.items():
                for rho in ratios:
                    kept.setdefault((name, rho), []).append(select_tokens(fn(rho), rho).numpy())
    T = {k: np.concatenate(v) for k, v in acc.items()}
    n_tok = T["text"].shape[1]
    side = int(n_tok**0.5)

    def corr(x, y):
        return float(np.corrcoef(x.reshape(-1), y.reshape(-1))[0, 1])

    lines = [
        f"Reference W4A4 artifact `{a.artifact}`, {len(ds)} easy-VQA test questions (seed 0), {n_tok} visual "
        f"tokens each, quantizer {spec}.",
        "",
        "| token statistic | foreground patches | background patches |",
        "|---|---:|---:|",
    ]
    fg = T["fg"]
    for k, label in (
        ("range", "channel range (outlier intensity)"),
        ("err", "absolute 4-bit quantization error"),
        ("rel", "relative 4-bit quantization error"),
        ("text", "text attention at layer 0"),
        ("cls", "[CLS] attention"),
    ):
        lines.append(f"| {label} | {T[k][fg].mean():.4g} | {T[k][~fg].mean():.4g} |")
    lines += [
        "",
        f"Foreground share of all visual tokens: {100 * fg.mean():.1f} %. Correlations over all tokens: "
        f"range vs text attention {corr(T['range'], T['text']):+.2f}, range vs [CLS] attention "
        f"{corr(T['range'], T['cls']):+.2f}, absolute error vs range {corr(T['err'], T['range']):+.2f}.",
        "",
        "| scorer | retain | foreground share of kept | share of foreground kept | mean range kept / dropped "
        "| mean abs. error kept / dropped |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for (name, rho), ks in kept.items():
        K = np.concatenate(ks)
        mask = np.zeros_like(fg)
        np.put_along_axis(mask, K, True, axis=1)
        share_kept = fg[mask].mean()
        fg_kept = (mask & fg).sum() / max(fg.sum(), 1)
        r_k, r_d = T["range"][mask].mean(), T["range"][~mask].mean()
        e_k, e_d = T["err"][mask].mean(), T["err"][~mask].mean()
        lines.append(
            f"| {name} | {100 * rho:g} % | {100 * share_kept:.1f} % | {100 * fg_kept:.1f} % "
            f"| {r_k:.3g} / {r_d:.3g} | {e_k:.3g} / {e_d:.3g} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)

    fig, axes = plt.subplots(1, 5, figsize=(16, 3.4))
    for ax, (k, title) in zip(
        axes,
        [
            ("fg", "foreground frequency"),
            ("range", "channel range"),
            ("err", "abs. quant. error"),
            ("text", "text attention (L0)"),
            ("cls", "[CLS] attention"),
        ],
        strict=True,
    ):
        im = ax.imshow(T[k].astype(np.float32).mean(0).reshape(side, side), cmap="viridis")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("mean over test images, per patch position", fontsize=10)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
