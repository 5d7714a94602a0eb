#!/usr/bin/env bash
# Issue 25, item 1: accuracy of the main job's artifact exported with exact activations (the calibrated W4A4
# quantizers in the graph) and runtime activations (int8 inside the kernel: MatMulNBits accuracy level 4 in ort,
# onnxruntime's DequantizeLinear + MatMul fusion at that level in qdq; fused decoder ops), all at 12.5 % with the
# learned scorer. The ort pair on the whole test set, the portable qdq pair and OpenVINO on a 1,000-question subset.
#
#   bash bench/activation_modes.sh [N_QUESTIONS_ORT] [N_QUESTIONS_QDQ]   (needs runs/main/w4a4; 0: the whole set)
#
# Results under runs/modes/; bench/results/activation_modes.md quotes them.
set -euo pipefail
cd "$(dirname "$0")/.."
N_ORT="${1:-0}"
N_QDQ="${2:-1000}"
ART=runs/main/w4a4
OUT=runs/modes
mkdir -p "$OUT"
for fmt in ort qdq; do
  n=$([ "$fmt" = ort ] && echo "$N_ORT" || echo "$N_QDQ")
  for mode in exact runtime; do
    d="$OUT/onnx-$fmt-$mode"
    [ -f "$d/export.json" ] || qavtp export "$ART" -o "$d" --retain 0.125 --scorer qavtp --format "$fmt" --activations "$mode"
    qavtp eval-onnx "$d" --limit "$n" -o "$OUT/eval-$fmt-$mode"
  done
done
qavtp eval-onnx "$OUT/onnx-qdq-runtime" --limit "$N_QDQ" --runtime openvino -o "$OUT/eval-qdq-runtime-openvino"
