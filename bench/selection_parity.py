"""Do onnx.reference, OpenVINO and onnxruntime keep the same visual tokens in a ``qdq`` export? (issue 26)

    python bench/selection_parity.py runs/div/onnx-cdpruner-qdq runs/div/onnx-divprune-qdq [--questions 4]

Runs the first ``--questions`` easy-VQA test questions, one at a time, through each export's prefill graph in
onnxruntime, OpenVINO (if installed) and onnx's pure-Python ``ReferenceEvaluator`` (slow: seconds per question at the
reference model's size), and prints per export how many questions kept identical token indices in each runtime as in
onnxruntime. ``qavtp eval-onnx --compare`` holds onnxruntime (or OpenVINO) to torch on many more questions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun


class GatherElements(OpRun):
    """GatherElements by its definition; onnx's own kernel takes at most 32 choices (np.choose)."""

    op_domain = ""

    def _run(self, data, indices, axis=None):
        return (np.take_along_axis(data, indices, axis=axis),)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("exports", nargs="+")
    ap.add_argument("--questions", type=int, default=4)
    args = ap.parse_args()

    from qavtp.data.easyvqa import load_easyvqa
    from qavtp.export.session import ExportedModel

    rows = load_easyvqa("test").select(range(args.questions))
    print("| export | scorer | questions | onnx.reference = onnxruntime | OpenVINO = onnxruntime |")
    print("|---|---|---:|---:|---:|")
    for d in map(Path, args.exports):
        scorer = json.loads((d / "export.json").read_text())["pruning"]["scorer"]
        ort_model = ExportedModel(d)
        try:
            ov_model = ExportedModel(d, runtime="openvino")
        except Exception as e:  # noqa: BLE001 - a runtime that is missing or refuses the graph is a table cell
            ov_model, ov_why = None, type(e).__name__
        ref = ReferenceEvaluator(str(d / "prefill.onnx"), new_ops=[GatherElements])
        same_ref = same_ov = 0
        for row in rows:
            feeds = ort_model.inputs([row["image"]], [row["question"]])
            want = ort_model.run_prefill(feeds)["kept_indices"]
            got = dict(zip(ref.output_names, ref.run(None, feeds), strict=True))["kept_indices"]
            same_ref += bool(np.array_equal(got, want))
            if ov_model is not None:
                same_ov += bool(np.array_equal(ov_model.run_prefill(feeds)["kept_indices"], want))
        ov = f"{same_ov}/{len(rows)}" if ov_model is not None else f"not run ({ov_why})"
        print(f"| {d.name} | {scorer} | {len(rows)} | {same_ref}/{len(rows)} | {ov} |")


if __name__ == "__main__":
    main()
