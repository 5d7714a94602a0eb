"""Do two runtimes keep the same visual tokens and give the same answers? (``qavtp eval-onnx`` results, same questions)

    python bench/kept_agreement.py A/results.json B/results.json [C/results.json D/results.json ...]

Files come in pairs (e.g. onnxruntime on the ort export, OpenVINO on the qdq export of the same artifact, scorer
and ratio); prints one Markdown row per pair: each side's runtime and accuracy, the share of questions with the same
kept-token indices and the share with the same answer. Needs no torch: it compares what both runs recorded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qavtp.export.accuracy import compare


def _onnx(path: str) -> dict:
    data = json.loads(Path(path).read_text())
    return data.get("onnx", data)  # eval-onnx --compare nests the export's results under "onnx"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="results.json files, in pairs")
    args = ap.parse_args()
    if len(args.results) % 2:
        sys.exit("kept_agreement.py: error: results.json files come in pairs")
    lines = [
        "| A | B | A accuracy | B accuracy | same kept tokens | same answers | n |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for a_path, b_path in zip(args.results[::2], args.results[1::2], strict=True):
        a, b = _onnx(a_path), _onnx(b_path)
        if a["n"] != b["n"]:
            sys.exit(f"kept_agreement.py: error: {a_path} has {a['n']} questions, {b_path} {b['n']}")
        agree = compare(a, b, b["kept"])  # what eval-onnx --compare reports, with B in torch's place
        kept, same, n = agree["same_kept_tokens"], agree["same_answers"], agree["n"]
        label = f"{Path(a_path).parent.name} ({a['runtime']})", f"{Path(b_path).parent.name} ({b['runtime']})"
        lines.append(
            f"| {label[0]} | {label[1]} | {100 * a['accuracy']:.1f} % | {100 * b['accuracy']:.1f} % "
            f"| {100 * kept:.1f} % | {100 * same:.1f} % | {n} |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
