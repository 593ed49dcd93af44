#!/usr/bin/env bash
# The memory estimate against the measured peak: each run prints its estimate when it starts and
# writes it with the peak resident memory it reached (Linux VmHWM, reset when the estimate is made)
# to memory.json when it ends. One epoch per run is enough: the first epoch holds the peak.
#
#   benches/memory_estimate.sh [WORK_DIR]      (KILN=path/to/kiln, default: the debug build)
#
# Prints one table row per run: what, batch, estimated, measured, estimate / measured - 1.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
KILN="${KILN:-${CARGO_TARGET_DIR:-$HOME/.cache/kiln/target}/debug/kiln}"
WORK="${1:-$(mktemp -d)}"
mkdir -p "$WORK"
cd "$WORK"
COCO8="$ROOT/../shared/data/coco8-seg/annotations.json"
if [ ! -f synth/annotations.json ]; then
  "$KILN" synth --output synth --num-images 24 --size 256 >/dev/null
  "$KILN" validate --data synth/annotations.json --output-dir split >/dev/null
fi
row() { # NAME BATCH RUN_DIR_WITH_MEMORY_JSON
  python3 - "$1" "$2" "$3/memory.json" <<'PY'
import json, sys
name, batch, path = sys.argv[1:]
r = json.load(open(path))
est, peak = r["estimate"]["total_bytes"], r["measured_peak_bytes"]
mib = lambda b: f"{b / 2**20:.0f} MiB"
print(f"| {name} | {batch} | {mib(est)} | {mib(peak)} | {100 * (est / peak - 1):+.0f} % |")
e, heap = r["estimate"], r.get("measured_peak_heap_bytes") or 0
print(f"<!-- resident at the estimate {mib(e['program_and_data_bytes'])} (heap {mib(e['heap_bytes'])}), "
      f"step {mib(e['step']['fixed_bytes'])} + {mib(e['step']['per_image_bytes'])}/image; heap peak {mib(heap)} -->",
      file=sys.stderr)
PY
}
slug() { echo "$1" | tr -c 'A-Za-z0-9\n' '-' | tr -s '-'; }
echo "| run | batch | estimated | measured peak | error |"
echo "|---|---|---|---|---|"
student() { # NAME IMGSZ BATCH DATA VAL [ARGS...]
  local name=$1 imgsz=$2 batch=$3 data=$4 val=$5; shift 5
  local out; out="student-$(slug "$name")-$imgsz-$batch"
  rm -rf "$out"
  "$KILN" train-student --data "$data" --val "$val" --epochs 1 --imgsz "$imgsz" --batch-size "$batch" \
    --output "$out" "$@" >/dev/null 2>"$out.log"
  row "yolov8n-seg, $name, $imgsz px" "$batch" "$out"
}
teacher() { # NAME BATCH [ARGS...]
  local name=$1 batch=$2; shift 2
  local out; out="teacher-$(slug "$name")-$batch"
  rm -rf "$out"
  "$KILN" train-teacher --data split/train.json --val split/val.json --images synth/images --epochs 1 \
    --batch-size "$batch" --output "$out" "$@" >/dev/null 2>"$out.log"
  row "$name" "$batch" "$(dirname "$(find "$out" -name memory.json | head -1)")"
}
for b in 2 8; do student "coco8-seg, no mosaic" 320 $b "$COCO8" "$COCO8" --set augment.mosaic=0; done
for b in 4 8; do student "coco8-seg" 640 $b "$COCO8" "$COCO8"; done
for b in 4 16; do student "synth" 256 $b split/train.json split/val.json --images synth/images; done
for b in 1 4; do teacher "SAM tiny, LoRA, encoder frozen" $b --teacher sam --sam tiny; done
for b in 1 4; do
  teacher "SAM tiny, LoRA in the encoder too" $b --teacher sam --sam tiny \
    --lora-targets q_proj,k_proj,v_proj,out_proj,qkv
done
for b in 1 2; do teacher "GroundingDINO tiny, LoRA, 320 px" $b --teacher grounding_dino --gdino tiny --imgsz 320; done
