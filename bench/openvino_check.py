"""Does OpenVINO run the exported graphs, and does it agree with onnxruntime? (issue 5, second runtime)

    python bench/openvino_check.py --artifact runs/main/w4a4 [--limit 200] [--retain 0.125]

Exports the fp32 reference model and the W4A4 artifact as portable ``qdq`` graphs (and the artifact as the
onnxruntime-specific ``ort`` graph, to record whether OpenVINO loads it), then runs each with onnxruntime and
with OpenVINO (CPU, float32: ``qavtp.export.session.OPENVINO_CONFIG``) on the same easy-VQA test questions.
Prints a Markdown table: accuracy per runtime, the share of questions where OpenVINO keeps the same visual
tokens and gives the same answer as onnxruntime, the largest first-token logit difference, prefill latency
(median of --runs, one question) and greedy decode tokens/s.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

# bench/ is the script's directory, so its siblings import.
from _table import emit_table
from export_table import _bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True, help="W4A4 artifact of the reference model")
    ap.add_argument("--model", default="smollava-easyvqa", help="fp32 source model")
    ap.add_argument("--retain", type=float, default=0.125)
    ap.add_argument("--limit", type=int, default=200, help="easy-VQA test questions (seed 0)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/openvino_check.md", help="also write the table here")
    args = ap.parse_args()

    import openvino

    from qavtp.config import ExportConfig
    from qavtp.data import load_data
    from qavtp.errors import QavtpError
    from qavtp.export.accuracy import compare, evaluate_export
    from qavtp.export.export_model import load_source, write_export
    from qavtp.export.session import OPENVINO_CONFIG, ExportedModel

    ds = load_data("easy-vqa", "test", args.limit, 0)
    row = ds[0]
    lines = [
        f"onnxruntime vs OpenVINO {openvino.__version__.split('-')[0]} (CPU, {OPENVINO_CONFIG}), {args.threads} "
        f"threads; {len(ds)} easy-VQA test questions (seed 0), retention {args.retain:g}, scorer qapruner.",
        "",
        "| graph | runtime | accuracy | same kept tokens | same answers | max logit diff | prefill ms | decode tok/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory(prefix="qavtp-ov-") as tmp:
        for label, source, fmt in (
            ("fp32", args.model, "qdq"),
            ("W4A4 qdq", args.artifact, "qdq"),
            ("W4A4 ort", args.artifact, "ort"),
        ):
            d = write_export(
                load_source(source), Path(tmp) / label.replace(" ", "_"), ExportConfig(args.retain, "qapruner", fmt)
            )
            results = {}
            for runtime in ("onnxruntime", "openvino"):
                try:
                    em = ExportedModel(d, threads=args.threads, runtime=runtime)
                except QavtpError as e:
                    lines.append(f"| {label} | {runtime} | does not load: {e} | | | | | |")
                    continue
                res = evaluate_export(em, ds, progress=False)
                feeds = em.inputs([row["image"]], [row["question"]])
                res["logits"] = em.run_prefill(feeds)["logits"]
                ms, tok_s = _bench(d, row["image"], row["question"], args.runs, args.threads, runtime=runtime)
                results[runtime] = res
                cells = [f"{100 * res['accuracy']:.1f}", "", "", ""]
                if runtime != "onnxruntime" and "onnxruntime" in results:
                    ref = results["onnxruntime"]
                    agree = compare(res, ref, ref["kept"])
                    diff = float(np.abs(res["logits"].astype(np.float64) - ref["logits"]).max())
                    cells[1:] = [
                        f"{100 * agree['same_kept_tokens']:.1f} %",
                        f"{100 * agree['same_answers']:.1f} %",
                        f"{diff:.2g}",
                    ]
                lines.append(f"| {label} | {runtime} | {' | '.join(cells)} | {ms:.0f} | {tok_s:.1f} |")
    emit_table(lines, args.out)


if __name__ == "__main__":
    main()
