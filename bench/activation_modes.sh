#!/usr/bin/env bash
# Issue 25, item 1: accuracy of the main job's artifact exported with exact (the calibrated W4A4 quantizers in the
# graph) and runtime activations (the runtime's kernel: MatMulNBits accuracy level 4 in ort, onnxruntime's
# DequantizeLinear + MatMul fusion in qdq; fused decoder ops), all at 12.5 % with the learned scorer.
#
#   bash bench/activation_modes.sh [N_QUESTIONS]      (needs runs/main/w4a4 from the README's main job)
#
# Results under runs/modes/; bench/results/activation_modes.md quotes them.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-1000}"
ART=runs/main/w4a4
OUT=runs/modes
mkdir -p "$OUT"
for fmt in ort qdq; do
  for mode in exact runtime; do
    d="$OUT/onnx-$fmt-$mode"
    [ -f "$d/export.json" ] || qavtp export "$ART" -o "$d" --retain 0.125 --scorer qavtp --format "$fmt" --activations "$mode"
    qavtp eval-onnx "$d" --limit "$N" -o "$OUT/eval-$fmt-$mode"
  done
done
qavtp eval-onnx "$OUT/onnx-qdq-runtime" --limit "$N" --runtime openvino -o "$OUT/eval-qdq-runtime-openvino"
