"""Paired accuracy differences between pruning runs on the same questions (issue 4's comparisons).

    python bench/paired_diff.py runs/main2/sweep/results.json runs/exp/sem_k2/results.json [--ref qavtp]
    python bench/paired_diff.py A-eval/results.json B-eval/results.json ...   (plain ``qavtp eval`` runs)
    python bench/paired_diff.py SWEEP/results.json@qavtp@0.125 B-eval/results.json   (one run of a sweep)

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
    ap.add_argument(
        "--ref-model", default=None, help="the model label of the reference run (default: the last model in the files)"
    )
    ap.add_argument(
        "--subset",
        type=int,
        default=0,
        help="plain full-test runs: also split the questions into the seed-0 subset of this size (what "
        "`qavtp eval --limit N` evaluates) and the rest",
    )
    args = ap.parse_args()
    docs = [load_run(p) for p in args.results]
    if all("predictions" in d for d in docs):
        plain(args.results, docs, args.subset)
        return
    runs = []
    for path in args.results:
        for run in json.loads(Path(path).read_text())["runs"]:
            label = f"{run['model']} {run['scorer']}" + (f", K = {run['layer']}" if run.get("layer") else "")
            runs.append((label, run))
    ref_model = args.ref_model or runs[-1][1]["model"]  # a sweep with --with-fp lists the FP model first
    lines = ["| retain | ref − other | other's accuracy | ref − other (points) |", "|---:|---|---:|---:|"]
    for rho in sorted({r["retain"] for _, r in runs if r["retain"] < 1}, reverse=True):
        refs = [
            r
            for _, r in runs
            if r["scorer"] == args.ref and r["retain"] == rho and not r.get("layer") and r["model"] == ref_model
        ]
        if not refs:
            continue
        ref = refs[0]
        for label, run in runs:
            if run is ref or run["retain"] not in (rho, 1.0) or len(run["correct"]) != len(ref["correct"]):
                continue
            m, h = paired(ref["correct"], run["correct"])
            diff = f"{100 * m:+.1f} ± {100 * h:.1f}"
            lines.append(f"| {rho:g} | {ref_model} {args.ref} − {label} | {100 * run['accuracy']:.1f} | {diff} |")
    print("\n".join(lines))


def load_run(arg: str) -> dict:
    """A results.json, or ``SWEEP/results.json@SCORER@RATIO[@K]``: that one run of a sweep, as a plain evaluation."""
    path, *pick = arg.split("@")
    doc = json.loads(Path(path).read_text())
    if not pick:
        return doc
    scorer, rho, layer = pick[0], float(pick[1]), int(pick[2]) if len(pick) > 2 else 0
    if "runs" not in doc:  # a plain evaluation: it must be that run
        cfg = doc["config"]
        if (cfg.get("scorer"), cfg.get("retain") or 1.0, cfg.get("layer") or 0) != (scorer, rho, layer):
            raise SystemExit(f"{path} is one run of scorer {cfg.get('scorer')} at retain {cfg.get('retain') or 1:g}")
        return doc
    runs = [r for r in doc["runs"] if r["scorer"] == scorer and r["retain"] == rho and (r.get("layer") or 0) == layer]
    if not runs:
        raise SystemExit(f"{path} has no run of scorer {scorer} at retain {rho:g}, K = {layer}")
    return {"predictions": [{"index": i, "correct": c} for i, c in enumerate(runs[0]["correct"])]}


def plain(paths: list[str], docs: list[dict], subset: int = 0) -> None:
    """Every evaluation against the first, question by question (and on a seed-0 subset and the rest)."""
    by_index = [{p["index"]: int(p["correct"]) for p in d["predictions"]} for d in docs]
    parts = [("all", sorted(by_index[0]))]
    if subset:
        from qavtp.data import load_data

        n = len(by_index[0])
        full = load_data(docs[0]["config"]["data"], docs[0]["config"]["split"])
        if len(full) != n:
            raise SystemExit(f"--subset needs full-split runs; these have {n} of {len(full)} questions")
        chosen = set(full.add_column("_row", list(range(n))).shuffle(seed=0).select(range(subset))["_row"])
        parts += [(f"the seed-0 {subset}", sorted(chosen)), ("the rest", sorted(set(range(n)) - chosen))]
    lines = [f"reference: {paths[0]}", ""]
    lines.append("| other | questions | n | reference % | other % | other − reference |")
    lines.append("|---|---|---:|---:|---:|---:|")
    for path, other in zip(paths[1:], by_index[1:], strict=True):
        for name, idx in parts:
            ref_c, oth_c = [by_index[0][i] for i in idx], [other[i] for i in idx]
            m, h = paired(oth_c, ref_c)
            lines.append(
                f"| {path} | {name} | {len(idx)} | {100 * sum(ref_c) / len(idx):.2f} | "
                f"{100 * sum(oth_c) / len(idx):.2f} | {100 * m:+.2f} ± {100 * h:.2f} |"
            )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
