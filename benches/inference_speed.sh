#!/usr/bin/env bash
# Inference latency of one yolov8n-seg student, Burn flex against ONNX Runtime on kiln's own export
# of the same weights, at 640 and 160 px, batch 1: the ratio issue 20's target is stated in. Flex runs
# twice: with kiln's fused convolution (the default) and with Burn's conv2d + SiLU (KILN_FLEX_KERNELS=0).
# The engines alternate, ROUNDS times each, in one session, so all see the same machine state.
#
#   benches/inference_speed.sh OUT [STUDENT.safetensors] [ROUNDS]
#   SIZES=160 benches/inference_speed.sh OUT      (one size only)
#
# Needs a release `kiln` (cargo build --release -p kiln-cli; KILN=path to use another) and a Python
# with onnxruntime (KILN_PYTHON, as `kiln bench` finds it). Prints each `kiln bench` table and, at the
# end, the medians per engine and size and the ratio flex / ONNX Runtime. About 3 minutes.
set -euo pipefail
out=${1:?usage: benches/inference_speed.sh OUT [STUDENT.safetensors] [ROUNDS]}
student=${2:-tests/fixtures/students/synth160_yolov8n_seg.safetensors}
rounds=${3:-3}
kiln=${KILN:-${CARGO_TARGET_DIR:-target}/release/kiln}
mkdir -p "$out"
: > "$out/medians.tsv"
for size in ${SIZES:-640 160}; do
  onnx="$out/student_$size.onnx"
  [ -f "$onnx" ] || "$kiln" export --model "$student" --imgsz "$size" --output "$onnx" > /dev/null
  runs=$([ "$size" = 640 ] && echo 20 || echo 100)
  for round in $(seq "$rounds"); do
    for engine in flex flex_burn_conv onnxruntime; do
      if [ "$engine" = flex ]; then
        "$kiln" bench --model "$student" --imgsz "$size" --runs "$runs" > "$out/bench.txt"
      elif [ "$engine" = flex_burn_conv ]; then
        KILN_FLEX_KERNELS=0 "$kiln" bench --model "$student" --imgsz "$size" --runs "$runs" > "$out/bench.txt"
      else
        "$kiln" bench --model "$onnx" --engine onnxruntime --threads 2 --runs "$runs" > "$out/bench.txt"
      fi
      cat "$out/bench.txt"
      median=$(grep 'latency median' "$out/bench.txt" | grep -Eo '[0-9]+(\.[0-9]+)? ms' | cut -d' ' -f1)
      printf '%s\t%s\t%s\t%s\n' "$size" "$engine" "$round" "$median" >> "$out/medians.tsv"
    done
  done
done
python3 - "$out/medians.tsv" <<'PY'
import statistics, sys
rows = [line.split("\t") for line in open(sys.argv[1]).read().split("\n") if line]
for size in sorted({r[0] for r in rows}, key=int, reverse=True):
    med = {e: statistics.median(float(r[3]) for r in rows if r[0] == size and r[1] == e) for e in ("flex", "flex_burn_conv", "onnxruntime")}
    ort = med["onnxruntime"]
    print(f"{size} px: flex {med['flex']:.2f} ms ({med['flex'] / ort:.2f}x ONNX Runtime), flex with Burn's conv2d + SiLU "
          f"{med['flex_burn_conv']:.2f} ms ({med['flex_burn_conv'] / ort:.2f}x), ONNX Runtime {ort:.2f} ms")
PY
