#!/usr/bin/env bash
# Runs every cargo-fuzz target for RUNS inputs (default 1,000,000) from its committed corpus
# (tests/fuzz/corpus/<target>, read-only) into a scratch corpus, and prints each target's count.
# Built optimised with debug assertions (-O -a): integer overflow panics, as in the test build.
#   fuzz/run_all.sh [RUNS] [TARGET ...]        needs: rustup nightly, cargo install cargo-fuzz
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-1000000}
shift || true
TARGETS=${*:-coco_json rle polygon yolo_labels yolo_yaml image pytorch_checkpoint safetensors_checkpoint onnx_model}
WORK=${FUZZ_WORK:-${TMPDIR:-/tmp}/kiln-fuzz}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/kiln/fuzz-target}
for target in $TARGETS; do
  mkdir -p "$WORK/$target"
  case $target in pytorch_checkpoint | safetensors_checkpoint | onnx_model) features="--features models" ;; *) features="" ;; esac
  # Polygons of up to 63 points: at the default 4096 bytes (511 points) each input walks long
  # boundaries and the target runs 50-400 inputs/s, so a million would take hours on 2 cores.
  case $target in polygon) limits="-max_len=512" ;; *) limits="" ;; esac
  cargo +nightly fuzz run -O -a $features --fuzz-dir fuzz "$target" "$WORK/$target" "tests/fuzz/corpus/$target" -- \
    -runs="$RUNS" -rss_limit_mb=2048 -timeout=10 $limits 2>"$WORK/$target.log" || true
  printf '%-12s %s\n' "$target" "$(grep -E '^Done|^SUMMARY|^==[0-9]+== ERROR' "$WORK/$target.log" | head -2 | tr '\n' ' ')"
  grep -E 'Test unit written|panicked at' "$WORK/$target.log" | head -2 || true
done
