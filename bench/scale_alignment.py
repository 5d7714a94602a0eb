"""Short alignment runs that choose the weight-scale learning rate (``--align-scale-lr``; issue 3).

    python bench/scale_alignment.py ARTIFACT [--steps 40 --scale-lr 0,1e-4,3e-4,1e-3]

From the same unaligned artifact, aligns the projector for ``--steps`` steps (checked every 10) once per scale
learning rate (0: the projector alone) and prints the held-out KL(FP dense ‖ W4A4) at each check, with the
spread of the learned gains. The training questions are the first ones ``--align-projector`` uses; the 128
held-out ones are those that pick its step, never test questions.
"""

from __future__ import annotations

import argparse

import torch
from _table import emit_table  # bench/ is the script's directory, so its siblings import


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", help="an unaligned artifact (qavtp calibrate ... --retain none)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--scale-lr", default="0,1e-4,3e-4,1e-3", help="comma-separated; 0: the projector alone")
    ap.add_argument("--out", default="bench/results/scale_alignment.md", help="also write the table here")
    a = ap.parse_args()

    from qavtp.calibrate.align import align_projector, alignment_data
    from qavtp.calibrate.artifact import load_artifact
    from qavtp.config import AlignConfig
    from qavtp.models.loading import load_model, resolve

    rows = []
    for lr in [float(x) for x in a.scale_lr.split(",")]:
        torch.manual_seed(0)
        _, processor, adapter, cfg = load_artifact(a.artifact)
        teacher, _, _ = load_model(resolve(cfg["source"]["model"]))
        train, held = alignment_data(cfg["data"]["spec"], a.steps, 8, seed=cfg["options"]["seed"])
        rec = align_projector(
            adapter, teacher, processor, train, held, AlignConfig(steps=a.steps, scale_lr=lr), eval_every=10
        )
        rows.append((lr, rec))
    checks = [c["step"] for c in rows[0][1]["curve"]]
    lines = [
        f"Held-out KL(FP dense ‖ W4A4) per answer token, {a.steps}-step alignments of `{a.artifact}` "
        f"(`python bench/scale_alignment.py {a.artifact} --steps {a.steps} --scale-lr {a.scale_lr}`):",
        "",
        "| scale lr | " + " | ".join(f"step {s}" for s in checks) + " | gains min–max | mean abs(gain − 1) | s |",
        "|---|" + "---:|" * (len(checks) + 3),
    ]
    for lr, rec in rows:
        kl = " | ".join(f"{c['heldout_kl']:.4f}" for c in rec["curve"])
        g = rec.get("scale_gains")
        spread = f"{g['min']:.4f}–{g['max']:.4f} | {g['mean_abs_change']:.5f}" if g else "| "
        lines.append(f"| {lr:g} {'(projector alone)' if not lr else ''} | {kl} | {spread} | {rec['seconds']:.0f} |")
    emit_table(lines, a.out)


if __name__ == "__main__":
    main()
