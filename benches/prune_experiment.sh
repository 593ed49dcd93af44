#!/usr/bin/env bash
# Pruning measured on the README's 30-minute student: train it (s160, 60 epochs), then
# `kiln optimize --prune 0.3`, which prunes, fine-tunes, exports and scores and times every artifact.
#
#   benches/prune_experiment.sh [WORK_DIR]   (KILN=path/to/kiln, default: the debug build;
#                                             KILN_PYTHON=a python with onnxruntime for its column)
#
# Prints WORK_DIR/student/optimized/report.md, then both students scored on a held-out test set
# (another synth seed) nothing was chosen on. A second call resumes the training where it stopped.
# About 40 min on 2 cores (training 29, optimize 9).
set -euo pipefail
KILN="${KILN:-${CARGO_TARGET_DIR:-$HOME/.cache/kiln/target}/debug/kiln}"
WORK="${1:-$(mktemp -d)}"
mkdir -p "$WORK" && cd "$WORK"
[ -d s160 ] || "$KILN" synth --num-images 300 --classes 3 --size 160 --max-objects 2 --output s160
[ -d test160 ] || "$KILN" synth --num-images 150 --classes 3 --size 160 --max-objects 2 --synth-seed 160 --output test160
[ -d s160/splits ] || "$KILN" validate --data s160/annotations.json --split train:0.85,val:0.15 --output-dir s160/splits
resume=()
[ -d student ] && resume=(--resume)
"$KILN" train-student --data s160/splits/train.json --val s160/splits/val.json --images s160/images \
  --imgsz 160 --batch-size 8 --optimizer adamw --lr0 0.003 --epochs 60 --output student "${resume[@]}"
"$KILN" optimize --model student --prune 0.3 --runs 30
cat student/optimized/report.md
for model in student student/optimized/pruned; do
  echo "== $model on the held-out test set"
  "$KILN" eval --model "$model" --data test160/annotations.json --images test160/images | grep -E "^(class|all) "
done
