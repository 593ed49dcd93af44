#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU and its driver, builds kiln with the LibTorch (`tch`)
# and CubeCL CUDA (`cuda`) backends, measures, and prints a table (also written to OUT/gpu_check.md):
#
#   benches/gpu_check.sh [OUT]            OUT defaults to gpu_check/; about 30 min with cold builds
#
# - student training step, yolov8n-seg, batch 16, 640x640 (steps/s), per backend, in float32 and
#   with --precision bf16;
# - SAM vit_b step (1 image 1024x1024, 16 boxes): LoRA, full fine-tuning, LoRA with gradient
#   checkpointing; GroundingDINO Swin-T OGC step (800x1333): LoRA, full; time and peak GPU memory;
# - student inference latency, batch 1, 640x640 (the seeds' 8 ms);
# - `kiln train-student --device cuda` end to end on a small generated set, its export to ONNX, and
#   the TensorRT engine build and latency (fp16) when `trtexec` is on PATH; the same training on two
#   GPUs (`--device cuda:0,1`) when the machine has them.
# Peak GPU memory is what `nvidia-smi` reports for the whole GPU while one measurement runs alone in
# its process (sampled every 50 ms), less what was in use before it started.
#
# Needs: Rust, Python 3 with venv, network for PyPI (PyTorch 2.9.0's CUDA wheel, through
# scripts/libtorch.sh) and for cubecl's LLVM bundle on the first `cuda` build (github.com).
#
# GPU_CHECK_BACKENDS overrides the backends (default "tch cuda"; e.g. "tch" where cuda does not build).
# GPU_CHECK_QUICK=1 runs the tiny configs at small sizes (a check of this script; any machine), and
# GPU_CHECK_PROFILE=dev (or test) builds faster for it (timings then mean nothing); CI runs it so on
# the CPU, with the test profile of its tch test build.
# Exits non-zero when a measurement or a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
backends="${GPU_CHECK_BACKENDS:-tch cuda}"
quick=()
[ "${GPU_CHECK_QUICK:-0}" = 1 ] && quick=(--quick)
has_gpu=0
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  has_gpu=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
elif [ ${#quick[@]} -eq 0 ]; then
  echo "no NVIDIA GPU (nvidia-smi finds none): run with GPU_CHECK_QUICK=1 GPU_CHECK_BACKENDS=\"cpu tch-cpu\" to check the script" >&2
  exit 1
fi

eval "$(scripts/libtorch.sh)"
features="tch"
case " $backends " in *" cuda"*) features="tch,cuda" ;; esac
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kiln/target}-gpu"
profile="${GPU_CHECK_PROFILE:-release}"
case "$profile" in
  dev | test) bin="$CARGO_TARGET_DIR/debug" ;;
  release | bench) bin="$CARGO_TARGET_DIR/release" ;;
  *) bin="$CARGO_TARGET_DIR/$profile" ;;
esac
echo "building ($profile, --features $features)" >&2
# One cargo call for both programs, over the whole workspace: its features then resolve as in
# `cargo test --workspace --features tch`, so Burn is built once (two calls, `-p kiln-cli` and
# `-p kiln-benches`, resolved Burn's features differently and built it twice), and with
# GPU_CHECK_PROFILE=test CI's tch test build is reused whole.
cargo build --profile "$profile" --workspace --features "$features" --bin kiln --example gpu_check 2>&1 | tail -1 >&2
check="$bin/examples/gpu_check"
kiln="$bin/kiln"

failures=0
# One measurement in its own process, with the GPU's memory sampled beside it.
measure() { # DEVICE WHAT
  local before=0 peak="-" line sampler=""
  if [ $has_gpu = 1 ]; then
    before=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 >"$out/memory.$$" &
    sampler=$!
  fi
  line=$("$check" "$1" "$2" "${quick[@]}" 2>>"$out/errors.log") || { line="$2 $1 failed - -"; failures=$((failures + 1)); }
  if [ -n "$sampler" ]; then
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    peak=$(sort -n "$out/memory.$$" | tail -1)
    peak="$((peak - before)) MiB"
    rm -f "$out/memory.$$"
  fi
  set -- $line
  printf '| %s | %s | %s ms | %s /s | %s |\n' "$1" "$2" "$3" "$4" "$peak" | tee -a "$out/gpu_check.md"
}

{
  echo "# kiln GPU check, $(date -u +%Y-%m-%d), $(cat "$out/gpu.txt" 2>/dev/null || echo 'no GPU')"
  echo
  echo "| what | backend | median | rate | peak GPU memory |"
  echo "|---|---|---|---|---|"
} | tee "$out/gpu_check.md"
for backend in $backends; do
  for what in student-train student-train-bf16 student-infer sam-lora sam-full sam-lora-checkpointed gdino-lora gdino-full; do
    measure "$backend" "$what"
  done
done

# End to end through the CLI on the first GPU backend: train, export, TensorRT.
first="${backends%% *}"
data="$out/synth"
if [ ! -f "$data/splits/train.json" ]; then
  rm -rf "$data"
  "$kiln" synth --output "$data" --num-images 64 --classes 3 --size 256 >&2
  "$kiln" validate --data "$data/annotations.json" --split train:0.75,val:0.25 >&2
fi
run="$out/student-$first"
rm -rf "$run" "$out/student.onnx" "$out/student.engine"
started=$(date +%s)
if "$kiln" train-student --data "$data/splits/train.json" --val "$data/splits/val.json" --images "$data/images" \
  --output "$run" --epochs 3 --imgsz 256 --device "$first" >"$out/train-student.log" 2>&1; then
  echo "| kiln train-student, 3 epochs of 48 images at 256 | $first | $(($(date +%s) - started)) s | | |" \
    | tee -a "$out/gpu_check.md"
  if ! "$kiln" export --model "$run" --output "$out/student.onnx" --imgsz 640 >"$out/export.log" 2>&1; then
    echo "export failed: $out/export.log" | tee -a "$out/gpu_check.md"
    failures=$((failures + 1))
  elif command -v trtexec >/dev/null; then
    trtexec --onnx="$out/student.onnx" --fp16 --saveEngine="$out/student.engine" >"$out/trtexec.log" 2>&1 \
      && grep -E "GPU Compute Time|Latency" "$out/trtexec.log" | tail -2 | tee -a "$out/gpu_check.md"
  else
    echo "TensorRT: trtexec is not on PATH; the ONNX is $out/student.onnx" | tee -a "$out/gpu_check.md"
  fi
else
  echo "| kiln train-student | $first | failed: $out/train-student.log | | |" | tee -a "$out/gpu_check.md"
  failures=$((failures + 1))
fi
# Two GPUs together (data parallelism), when the machine has them.
if [ $has_gpu = 1 ] && [ "$(nvidia-smi -L | wc -l)" -ge 2 ] && [ "$first" = cuda ]; then
  rm -rf "$out/student-cuda01"
  started=$(date +%s)
  if "$kiln" train-student --data "$data/splits/train.json" --val "$data/splits/val.json" --images "$data/images" \
    --output "$out/student-cuda01" --epochs 3 --imgsz 256 --device cuda:0,1 >"$out/train-student-2gpu.log" 2>&1; then
    echo "| kiln train-student, the same on two GPUs | cuda:0,1 | $(($(date +%s) - started)) s | | |" | tee -a "$out/gpu_check.md"
  else
    echo "| kiln train-student on two GPUs | cuda:0,1 | failed: $out/train-student-2gpu.log | | |" | tee -a "$out/gpu_check.md"
    failures=$((failures + 1))
  fi
fi
echo "written: $out/gpu_check.md" >&2
if [ $failures -gt 0 ]; then
  echo "$failures measurements failed (errors: $out/errors.log and the logs beside it)" >&2
  exit 1
fi
