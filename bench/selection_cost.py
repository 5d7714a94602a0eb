"""What the in-graph greedy selections cost in the prefill (issue 26): top-k against DPP / max-min Loops.

    python bench/selection_cost.py --artifact runs/main/w4a4 [--retain 0.125] [--runs 20] [--threads 2]

Exports the artifact once per scorer (``--format ort``, the same weights), then times the onnxruntime prefill of one
easy-VQA question (batch 1): the median and minimum of ``--runs`` runs after a warm-up, and, from one profiled run,
the kernel time of the selection nodes (``prune/select``: ``TopK``, or the ``Loop`` with its k picks) and of the
whole scoring-and-pruning stage. Prints a Markdown table (``--out`` writes it too). Nothing else may run meanwhile:
onnxruntime's thread pools spin.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from _table import emit_table  # bench/ is the script's directory, so its siblings import

SCORERS = ("qapruner", "qavtp", "qavtp-dpp", "cdpruner", "divprune")


def _profile(m) -> dict[str, float]:
    """Kernel ms per node-name scope (``prune/select``, ``prune/score``, ``llm`` ...) of the profiled run."""
    events = json.loads(Path(m.prefill.session.end_profiling()).read_text())
    totals: dict[str, float] = defaultdict(float)
    for e in events:
        name = e.get("name", "")
        if e.get("cat") == "Node" and name.endswith("_kernel_time"):
            parts = name.split("/")
            totals[parts[0]] += e.get("dur", 0) / 1000
            if parts[0] == "prune" and len(parts) > 2:
                totals["/".join(parts[:2])] += e.get("dur", 0) / 1000
    return totals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--retain", type=float, default=0.125)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/selection_cost.md")
    args = ap.parse_args()

    from qavtp.config import ExportConfig
    from qavtp.data.easyvqa import load_easyvqa
    from qavtp.export.export_model import export_model
    from qavtp.export.session import ExportedModel

    row = load_easyvqa("test")[0]
    lines = [
        f"Prefill of one easy-VQA question at {args.retain:g} retention, batch 1, onnxruntime CPU, "
        f"{args.threads} threads, `--format ort`; median and minimum of {args.runs} runs after a warm-up; "
        "selection and stage times are kernel times from one profiled run.",
        "",
        "| scorer | selection | prefill median ms | prefill min ms | select ms | score+select ms "
        "| select / all kernels |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for scorer in SCORERS:
            d = export_model(args.artifact, Path(tmp) / scorer, ExportConfig(args.retain, scorer, "ort"))
            meta = json.loads((d / "export.json").read_text())
            fusion = meta["pruning"]["fusion"] or {}
            dpp = scorer in ("cdpruner", "qavtp-dpp") or fusion.get("select") == "dpp"
            how = "max-min Loop" if scorer == "divprune" else "DPP Loop" if dpp else "TopK"
            m = ExportedModel(d, threads=args.threads)
            feeds = m.inputs([row["image"]], [row["question"]])
            m.run_prefill(feeds)
            times = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                m.run_prefill(feeds)
                times.append((time.perf_counter() - t0) * 1000)
            prof = ExportedModel(d, threads=args.threads, profile=True)
            prof.run_prefill(feeds)
            t = _profile(prof)
            total = sum(v for k, v in t.items() if "/" not in k)
            sel, pr = t.get("prune/select", 0.0), t.get("prune", 0.0)
            lines.append(
                f"| {scorer} | {how} | {statistics.median(times):.1f} | {min(times):.1f} | {sel:.2f} | {pr:.2f} "
                f"| {100 * sel / total:.1f} % |"
            )
    emit_table(lines, args.out)


if __name__ == "__main__":
    main()
