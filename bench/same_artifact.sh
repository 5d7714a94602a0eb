#!/usr/bin/env bash
# Does a code change leave the numbers alone? The main job's recipe (`--recipe aligned --vocab-bits 4 --retain 0.125`,
# then `export --format ort`, `run`, `eval-onnx --compare`) with short alignment and small sets (~2.5 min on 2 cores),
# then the SHA-256 of the artifact's weights and the export's graphs and weights. Run it before and after a change
# (e.g. with QAVTP=/path/to/other/venv/bin/qavtp) and compare the printed table: equal hashes, equal answers.
#   bash bench/same_artifact.sh [OUT_DIR]
set -euo pipefail
Q=${QAVTP:-qavtp}
OUT=${1:-runs/same_artifact}
IMG=$(cd "$(dirname "$0")/.." && pwd)/examples/red-triangle.png
$Q calibrate --recipe aligned --vocab-bits 4 --retain 0.125 --n-samples 16 --align-projector 4 --fusion-samples 8 \
  -o "$OUT/w4a4" --overwrite
$Q export "$OUT/w4a4" -o "$OUT/onnx" --retain 0.125 --scorer qavtp --format ort --overwrite
$Q run "$OUT/onnx" --image "$IMG" --question "What is the red shape?" | tee "$OUT/run.txt"
$Q eval-onnx "$OUT/onnx" --limit 24 --compare -o "$OUT/eval" | tail -2
echo "| file | sha256 (first 16) |"
echo "|---|---|"
for f in w4a4/quantized.safetensors onnx/weights.bin onnx/prefill.onnx onnx/decode.onnx; do
  echo "| $f | $(sha256sum "$OUT/$f" | cut -c1-16) |"
done
