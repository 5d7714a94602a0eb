#!/usr/bin/env bash
# Issue 26's measurements on the reference model: DivPrune, CDPruner and qavtp's DPP against the other scorers,
# FP32 and the main job's W4A4 artifact, at 1, 0.5, 0.25 and 0.125, with paired intervals; then the exported
# greedy selections against torch (eval-onnx --compare, onnxruntime and OpenVINO) and their prefill cost.
#
#   bash bench/diversity_sweep.sh [N_QUESTIONS]      (needs runs/main/w4a4 from the README's main job)
#
# Results under runs/div/; bench/results/diversity_sweep.md quotes them.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-500}"
ART=runs/main/w4a4
OUT=runs/div
mkdir -p "$OUT"

# The main job learns fusion weights for 12.5 % only: a copy of its artifact learns them for every ratio (same
# weights and projector), so qavtp and qavtp-dpp have every column too.
ALL="$OUT/w4a4-all-ratios"
if [ ! -f "$ALL/config.json" ]; then
  rm -rf "$ALL.tmp" && cp -r "$ART" "$ALL.tmp"
  qavtp fuse "$ALL.tmp" --retain 0.5,0.25,0.125
  mv "$ALL.tmp" "$ALL"
fi
SCORERS=semantic,random,divprune,cdpruner,qapruner
qavtp eval --artifact "$ART" --limit "$N" --retain 1,0.5,0.25,0.125 --scorer "$SCORERS" -o "$OUT/sweep-w4a4"
qavtp eval --artifact "$ALL" --limit "$N" --retain 0.5,0.25,0.125 --scorer qavtp,qavtp-dpp -o "$OUT/sweep-w4a4-learned"
qavtp eval --limit "$N" --retain 1,0.5,0.25,0.125 --scorer "$SCORERS" -o "$OUT/sweep-fp"
for ref in qavtp cdpruner; do
  python bench/paired_diff.py "$OUT/sweep-w4a4/results.json" "$OUT/sweep-w4a4-learned/results.json" --ref "$ref"
done
python bench/paired_diff.py "$OUT/sweep-fp/results.json" --ref cdpruner

# The exported selections at 12.5 %: torch and onnxruntime (ort graphs, eval-onnx --compare), onnxruntime and
# OpenVINO (the qdq graphs, the same questions) keep the same tokens; the main job's eval-onnx --compare covers qavtp.
for scorer in cdpruner divprune qavtp-dpp; do
  qavtp export "$ART" -o "$OUT/onnx-$scorer" --retain 0.125 --scorer "$scorer" --format ort --overwrite
  qavtp eval-onnx "$OUT/onnx-$scorer" --limit 200 --compare -o "$OUT/eval-$scorer"
  qavtp export "$ART" -o "$OUT/onnx-$scorer-qdq" --retain 0.125 --scorer "$scorer" --format qdq --overwrite
  qavtp eval-onnx "$OUT/onnx-$scorer-qdq" --limit 200 --runtime openvino -o "$OUT/eval-$scorer-ov"
done
python bench/kept_agreement.py $(for s in cdpruner divprune qavtp-dpp; do echo "$OUT/eval-$s/results.json $OUT/eval-$s-ov/results.json"; done)
python bench/selection_parity.py "$OUT"/onnx-{cdpruner,divprune,qavtp-dpp}-qdq --questions 4
python bench/selection_cost.py --artifact "$ART" --retain 0.125 --runs 20 --threads 2
