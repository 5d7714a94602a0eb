"""Paired accuracy differences between pruning runs on the same questions (issue 4's comparisons).

    python bench/paired_diff.py runs/main2/sweep/results.json runs/exp/sem_k2/results.json [--ref qavtp]
    python bench/paired_diff.py A-eval/results.json B-eval/results.json ...   (plain ``qavtp eval`` runs)

Reads the ``results.json`` of one or more ``qavtp eval --retain ... --scorer ...`` sweeps over the same questions
(same data, limit and seed) and prints, per retention ratio, ``ref - other`` for every other run: the mean of the
per-question difference of correctness, ± 1.96 standard errors (a paired interval, much tighter than the two
accuracies' own intervals). Given plain evaluations (no sweep), it compares every other file with the first.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def paired(a: list[int], b: list[int]) -> tuple[float, float]:
    """Mean of ``a - b`` and the half-width of its 95 % normal interval."""
    d = [int(x) - int(y) for x, y in zip(a, b, strict=True)]
    m = sum(d) / len(d)
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1))
    return m, 1.96 * sd / math.sqrt(len(d))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="results.json files of qavtp eval sweeps")
    ap.add_argument("--ref", default="qavtp", help="the scorer the others are compared with")
    args = ap.parse_args()
    docs = [json.loads(Path(p).read_text()) for p in args.results]
    if all("predictions" in d for d in docs):
        plain(args.results, docs)
        return
    runs = []
    for path in args.results:
        for run in json.loads(Path(path).read_text())["runs"]:
            label = f"{run['model']} {run['scorer']}" + (f", K = {run['layer']}" if run.get("layer") else "")
            runs.append((label, run))
    lines = ["| retain | ref − other | other's accuracy | ref − other (points) |", "|---:|---|---:|---:|"]
    for rho in sorted({r["retain"] for _, r in runs if r["retain"] < 1}, reverse=True):
        refs = [r for _, r in runs if r["scorer"] == args.ref and r["retain"] == rho and not r.get("layer")]
        if not refs:
            continue
        ref = refs[0]
        for label, run in runs:
            if run is ref or run["retain"] not in (rho, 1.0) or len(run["correct"]) != len(ref["correct"]):
                continue
            m, h = paired(ref["correct"], run["correct"])
            diff = f"{100 * m:+.1f} ± {100 * h:.1f}"
            lines.append(f"| {rho:g} | {args.ref} − {label} | {100 * run['accuracy']:.1f} | {diff} |")
    print("\n".join(lines))


def plain(paths: list[str], docs: list[dict]) -> None:
    """Every evaluation against the first, question by question."""
    ref = [p["correct"] for p in docs[0]["predictions"]]
    lines = [
        f"reference: {paths[0]} ({100 * docs[0]['accuracy']:.1f} %)",
        "",
        "| other | accuracy | other − reference |",
    ]
    lines.append("|---|---:|---:|")
    for path, doc in zip(paths[1:], docs[1:], strict=True):
        m, h = paired([p["correct"] for p in doc["predictions"]], ref)
        lines.append(f"| {path} | {100 * doc['accuracy']:.1f} | {100 * m:+.1f} ± {100 * h:.1f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
