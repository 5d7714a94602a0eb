"""How often does the W4A4 model's answer survive a change of float rounding alone? (issue 5, parity goal)

    python bench/parity_floor.py runs/main/onnx [--limit 200]

The export's parity with torch is "same kept tokens, same answers" (DESIGN.md, ONNX notes). A 4-bit
activation quantizer turns a one-ulp difference of its input into a whole quantization step wherever
``x / scale`` sits at a rounding boundary, and the next layers carry that on. This script measures how
much of the answer disagreement between onnxruntime and torch is of that kind, by running the *same*
torch fake-quant model several ways that differ only in float rounding:

- torch, batch 16 (what ``qavtp eval-onnx --compare`` runs);
- torch, batch 4 (other GEMM shapes, other shared-prefix grouping: the same arithmetic, reassociated);
- torch in float64 (the quantizer spec evaluated with 29 more mantissa bits);
- onnxruntime on the export (batch 16).

It prints, for every pair, the share of questions with the same answer and the same kept visual tokens,
and each run's agreement with the float64 run by that run's answer margin (the log-probability of its answer
minus the runner-up's). If torch disagrees with itself about as often as it disagrees with onnxruntime, and
only where the margin is small, the disagreement is a property of the quantized model (how close its answers
sit to a rounding flip), not of the export.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

# bench/ is the script's directory, so its siblings import.
from _table import emit_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export_dir", help="a qavtp export of a calibration artifact (qavtp export A -o DIR)")
    ap.add_argument("--limit", type=int, default=200, help="easy-VQA test questions (seed 0)")
    ap.add_argument("--alt-batch", type=int, default=4, help="the second torch run's batch size")
    ap.add_argument("--out", default="bench/results/parity_floor.md", help="also write the table here")
    ap.add_argument("--json", default=None, help="write every run's predictions and kept tokens here")
    args = ap.parse_args()

    from qavtp.data import load_data
    from qavtp.evaluate import evaluate
    from qavtp.export.accuracy import compare, evaluate_export
    from qavtp.export.session import ExportedModel
    from qavtp.export.torch_reference import torch_like_export
    from qavtp.metrics import agreement_by_margin, margin_bin_label

    em = ExportedModel(args.export_dir)
    src, pr = em.meta["source"], em.meta["pruning"]
    if src["kind"] != "artifact":
        raise SystemExit(f"{args.export_dir} was exported from {src['kind']} {src['path']}, not a calibration artifact")
    ds = load_data("easy-vqa", "test", args.limit, 0)
    net, processor, prune = torch_like_export(em.meta)

    def torch_run(batch: int) -> dict:
        kept: list = []
        res = evaluate(net, processor, ds, batch_size=batch, prune=prune, desc=f"torch b{batch}", keep_log=kept)
        return {**res, "kept": kept}

    runs: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    for name, fn in (
        ("torch fp32, batch 16", lambda: torch_run(16)),
        (f"torch fp32, batch {args.alt_batch}", lambda: torch_run(args.alt_batch)),
        ("torch fp64, batch 16", lambda: (net.double(), torch_run(16), net.float())[1]),
        ("onnxruntime, batch 16", lambda: evaluate_export(em, ds, 16)),
    ):
        t0 = time.time()
        runs[name] = fn()
        seconds[name] = time.time() - t0

    how = f"retain {pr['retain']:g} by {pr['scorer']}" if pr["scorer"] else "dense"
    lines = [
        f"Export `{args.export_dir}` of artifact `{src['path']}` ({how}); {len(ds)} easy-VQA test questions "
        "(seed 0), log-likelihood answers. Each row changes only float rounding, never the quantizer spec.",
        "",
        "| run | accuracy % | seconds |",
        "|---|---:|---:|",
        *(f"| {n} | {100 * r['accuracy']:.1f} | {seconds[n]:.0f} |" for n, r in runs.items()),
        "",
        "| pair | same answers % | same kept tokens % |",
        "|---|---:|---:|",
    ]
    for (na, a), (nb, b) in itertools.combinations(runs.items(), 2):
        agree = compare(a, b, b["kept"])  # every run here records its kept tokens
        ans, kept = agree["same_answers"], agree["same_kept_tokens"]
        lines.append(f"| {na} vs {nb} | {100 * ans:.1f} | {'–' if kept is None else f'{100 * kept:.1f}'} |")
    ref_name = "torch fp64, batch 16"
    ref = runs[ref_name]["predictions"]
    bins = agreement_by_margin(ref, ref)
    lines += [
        "",
        f"Same answers as {ref_name} (the spec evaluated most exactly), by its answer margin (log-probability of its "
        "answer minus the runner-up's, nats); n per bin in the header.",
        "",
        "| run | " + " | ".join(f"{margin_bin_label(b)} (n={b['n']})" for b in bins) + " |",
        "|---|" + "---:|" * len(bins),
    ]
    for name, r in runs.items():
        if name != ref_name:
            got = agreement_by_margin(ref, r["predictions"])
            lines.append(
                f"| {name} | " + " | ".join("–" if b["same"] is None else f"{100 * b['same']:.1f}" for b in got) + " |"
            )
    emit_table(lines, args.out)
    if args.json:
        Path(args.json).write_text(
            json.dumps({n: {"predictions": r["predictions"], "kept": r.get("kept")} for n, r in runs.items()})
        )


if __name__ == "__main__":
    main()
