"""Where do 4-bit activations cost accuracy? Change the activation quantizer of one group of linears at a time.

    python bench/act_sensitivity.py --artifact runs/main/w4a4 [--limit 300] [--windows 8]

Loads a W4A4 artifact once and, for each row, sets the activation spec of the selected decoder linears (the
weights stay as calibrated): 8 bits for one projection type or a band of layers, or another 4-bit scheme for
all of them (clipping, group-wise scales, asymmetric). Prints accuracy on easy-VQA test questions (seeded
subset, log-likelihood) and perplexity on the offline corpus (``qavtp.perplexity``), as a Markdown table.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from _table import emit_table  # bench/ is the script's directory, so its siblings import

# (row name, which linears, how their activation spec changes); None selects every linear.
ROWS = [
    ("W4A4 as calibrated", None, {}),
    ("q/k/v inputs A8", ("q_proj", "k_proj", "v_proj"), {"bits": 8}),
    ("o_proj input A8", ("o_proj",), {"bits": 8}),
    ("gate/up inputs A8", ("gate_proj", "up_proj"), {"bits": 8}),
    ("down_proj input A8", ("down_proj",), {"bits": 8}),
    ("layers 0-4 A8", range(0, 5), {"bits": 8}),
    ("layers 25-29 A8", range(25, 30), {"bits": 8}),
    ("all A8 (W4A8)", None, {"bits": 8}),
    ("A4 clip 0.9", None, {"clip_ratio": 0.9}),
    ("A4 groups of 64", None, {"group_size": 64}),
    ("A4 groups of 32", None, {"group_size": 32}),
    ("A4 groups of 32, clip 0.9", None, {"group_size": 32, "clip_ratio": 0.9}),
    ("A4 asymmetric", None, {"symmetric": False}),
    ("A4 asymmetric, groups of 32", None, {"symmetric": False, "group_size": 32}),
]


def _selected(name: str, which) -> bool:
    if which is None:
        return True
    if isinstance(which, range):
        return int(name.split(".")[0]) in which
    return name.rsplit(".", 1)[-1] in which or any(f".{w}." in f".{name}." for w in which)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--limit", type=int, default=300, help="easy-VQA test questions")
    ap.add_argument("--windows", type=int, default=8, help="perplexity windows of 512 tokens")
    ap.add_argument("--out", default="bench/results/act_sensitivity.md")
    a = ap.parse_args()

    import torch

    from qavtp.calibrate.artifact import load_artifact
    from qavtp.calibrate.quantizers import QuantLinear
    from qavtp.data import load_data
    from qavtp.evaluate import evaluate
    from qavtp.perplexity import CORPUS, perplexity

    torch.manual_seed(0)
    model, processor, adapter, _ = load_artifact(a.artifact)
    mods = {n: m for n, m in adapter.decoder_layers.named_modules() if isinstance(m, QuantLinear)}
    base = {n: m.aspec for n, m in mods.items()}
    if any(s is None for s in base.values()):
        raise SystemExit(f"{a.artifact} has unquantized activations: give a W4A4 artifact")
    ds = load_data("easy-vqa", "test", limit=a.limit, seed=0)
    lines = [
        f"Activation quantizer changed per group of decoder linears, weights as calibrated ({a.artifact}); "
        f"easy-VQA accuracy on {len(ds)} test questions (seed 0), perplexity on {CORPUS}, {a.windows} windows.",
        "",
        "| activations | accuracy % | perplexity | seconds |",
        "|---|---:|---:|---:|",
    ]
    for name, which, change in ROWS:
        for n, m in mods.items():
            m.aspec = replace(base[n], **change) if _selected(n, which) else base[n]
        t0 = time.time()
        ppl = perplexity(model, processor.tokenizer, max_chunks=a.windows, progress=False)["perplexity"]
        acc = evaluate(model, processor, ds, progress=False)["accuracy"]
        lines.append(f"| {name} | {100 * acc:.2f} | {ppl:.2f} | {time.time() - t0:.0f} |")
        print(lines[-1], flush=True)
    emit_table(lines, a.out)


if __name__ == "__main__":
    main()
