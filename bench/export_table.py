"""onnxruntime CPU latency of the exported reference model: fp32, qdq and ort graphs at several retentions.

    python bench/export_table.py --artifact runs/bench/W4A4_QuaRot___GPTQ [--runs 5] [--threads 2]

Prints a Markdown table: prefill latency (image + prompt -> first-token logits, median of --runs, batch 1,
one easy-VQA question) per retention ratio, greedy decode tokens/s (16 steps after the prefill) and the
size on disk of each export. The scorer is qapruner (no fusion weights needed); it costs the same as qavtp.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _table import emit_table  # bench/ is the script's directory, so its siblings import

RETAIN = (1.0, 0.5, 0.25, 0.125)


def _mib(d: Path) -> float:
    return sum(f.stat().st_size for f in d.iterdir() if f.suffix in (".onnx", ".bin")) / 2**20


def _bench(
    d: Path, image, question: str, runs: int, threads: int | None, steps: int = 16, runtime: str = "onnxruntime"
) -> tuple[float, float]:
    from qavtp.export.session import ExportedModel

    m = ExportedModel(d, threads=threads, runtime=runtime)
    feeds = m.inputs([image], [question])
    m.run_prefill(feeds)  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = m.run_prefill(feeds)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    _, steps = m.greedy(out, steps + 1)  # the path qavtp run takes (a fused export decodes in place)
    tok_s = steps / (time.perf_counter() - t0)
    return statistics.median(times) * 1000, tok_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True, help="W4A4 artifact of the reference model")
    ap.add_argument("--model", default="smollava-easyvqa", help="fp32 source model")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--retain", type=float, nargs="+", default=list(RETAIN))
    ap.add_argument("--out", default="bench/results/export_table.md", help="also write the table here")
    args = ap.parse_args()

    from qavtp.config import ExportConfig
    from qavtp.data.easyvqa import load_easyvqa
    from qavtp.export.export_model import load_source, write_export

    row = load_easyvqa("test")[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="qavtp-bench-") as tmp:
        loaded = {}
        for label, source, fmt, level in (
            ("fp32", args.model, "qdq", 0),
            ("W4A4 qdq (DequantizeLinear int4)", args.artifact, "qdq", 0),
            ("W4A4 ort (MatMulNBits, accuracy level 0)", args.artifact, "ort", 0),
            ("W4A4 ort (MatMulNBits, accuracy level 4: int8 GEMM)", args.artifact, "ort", 4),
        ):
            if source not in loaded:
                loaded[source] = load_source(source)
            cells, sizes, rates = [], [], []
            for rho in args.retain:
                d = write_export(
                    loaded[source], Path(tmp) / f"{fmt}{level}-{rho:g}", ExportConfig(rho, "qapruner", fmt, level)
                )
                ms, tok_s = _bench(d, row["image"], row["question"], args.runs, args.threads)
                cells.append(f"{ms:.0f}")
                rates.append(tok_s)
                sizes.append(_mib(d))
            rows.append((label, cells, statistics.median(rates), max(sizes)))
    head = " | ".join(f"prefill ms, ρ={r:g}" for r in args.retain)
    lines = [f"| graph | {head} | decode tokens/s | size MiB |", "|---|" + "---:|" * (len(args.retain) + 2)]
    for label, cells, rate, size in rows:
        lines.append(f"| {label} | {' | '.join(cells)} | {rate:.1f} | {size:.0f} |")
    emit_table(lines, args.out)


if __name__ == "__main__":
    main()
