#!/usr/bin/env bash
# The augmentation-from-characteristics experiment of README "Augmentation from what you know":
# the labelled images are clean, the images the model will meet are darker and blurred (night
# footage from a moving camera). A yolov8n-seg student trained with kiln's default recipe is
# compared with one trained with `--environment low-light,motion`, same epochs, seed and settings.
#
#   benches/augment_experiment.sh OUT [ROW ...]      rows: default lowlight lowlight-low (default: all)
#
# Data: `kiln synth` (4 classes, 128 px, seed 300), split 180 train / 60 val (clean: the user's
# own validation split, which picks each run's best epoch); a test set of the same generator with
# another seed (301, 64 images) degraded by the kept Python below (gain 0.45, gamma 1.6, Gaussian
# blur radius 1, a 5-pixel horizontal motion blur, noise sigma 6), never used to choose anything.
# Each run is scored on the clean validation split and on the degraded test set.
#
# KILN (default: target/release/kiln) is the binary; PYTHON a Python with Pillow and NumPy;
# SEED (default 0) the students' seed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: benches/augment_experiment.sh OUT [ROW ...]}
shift
ROWS=${*:-default lowlight lowlight-low}
KILN=${KILN:-target/release/kiln}
PYTHON=${PYTHON:-python3}
SEED=${SEED:-0}
mkdir -p "$OUT"
D=$OUT/data
TEST=$OUT/test

if [ ! -f "$D/splits/val.json" ]; then
  "$KILN" synth --output "$D" --num-images 240 --classes 4 --size 128 --max-objects 4 --synth-seed 300
  "$KILN" validate --data "$D/annotations.json" --split train:0.75,val:0.25
fi
if [ ! -d "$TEST/dark" ]; then
  [ -f "$TEST/annotations.json" ] || "$KILN" synth --output "$TEST" --num-images 64 --classes 4 --size 128 \
    --max-objects 4 --synth-seed 301
  "$PYTHON" - "$TEST" <<'EOF'
import json, os, sys
import numpy as np
from PIL import Image, ImageFilter
root = sys.argv[1]
rng = np.random.default_rng(0)
os.makedirs(f"{root}/dark.tmp", exist_ok=True)
for image in json.load(open(f"{root}/annotations.json"))["images"]:
    name = image["file_name"]
    pixels = np.asarray(Image.open(f"{root}/images/{name}").convert("RGB"), dtype=np.float64) / 255.0
    pixels = (pixels * 0.45) ** 1.6  # less light, deeper shadows
    out = Image.fromarray((pixels * 255.0).round().astype(np.uint8)).filter(ImageFilter.GaussianBlur(1))
    out = out.filter(ImageFilter.Kernel((5, 5), [0] * 10 + [1] * 5 + [0] * 10, scale=5))  # horizontal motion
    noisy = np.asarray(out, dtype=np.float64) + rng.normal(0.0, 6.0, size=(out.height, out.width, 3))
    path = f"{root}/dark.tmp/{name}"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(noisy.round().clip(0, 255).astype(np.uint8)).save(path)
os.rename(f"{root}/dark.tmp", f"{root}/dark")
EOF
fi

STUDENT="--data $D/splits/train.json --val $D/splits/val.json --images $D/images --model yolov8n-seg --epochs 30
  --batch-size 8 --imgsz 128 --optimizer adamw --lr0 0.003 --close-mosaic 5 --set nbs=8 --seed $SEED"
for row in $ROWS; do
  case $row in
    default) [ -d "$OUT/default_s$SEED" ] || "$KILN" train-student $STUDENT --output "$OUT/default_s$SEED" ;;
    lowlight) [ -d "$OUT/lowlight_s$SEED" ] || "$KILN" train-student $STUDENT --environment low-light,motion \
      --output "$OUT/lowlight_s$SEED" ;;
    lowlight-low) [ -d "$OUT/lowlight-low_s$SEED" ] || "$KILN" train-student $STUDENT \
      --environment low-light,motion --augment-intensity low --output "$OUT/lowlight-low_s$SEED" ;;
    *) echo "unknown row $row (default lowlight lowlight-low)" >&2; exit 2 ;;
  esac
done

score() {
  python3 -c '
import json, sys
text = sys.stdin.read()
m = json.loads(text[text.index("\n{") + 1:])
mask = m["mask"] or {"map50": 0.0}
print("box mAP50 %.3f  mask mAP50 %.3f" % (m["box"]["map50"], mask["map50"]))'
}
for set in "$D/splits/val.json $D/images clean-val" "$TEST/annotations.json $TEST/images clean-test" \
  "$TEST/annotations.json $TEST/dark dark-test"; do
  read -r data images name <<<"$set"
  echo "on $name ($data, images in $images):"
  for run in "$OUT"/*_s*/; do
    run=${run%/}
    [ -f "$run/weights/best.safetensors" ] || continue
    printf '  %-16s ' "$(basename "$run")"
    "$KILN" eval --model "$run" --data "$data" --images "$images" --imgsz 128 --json 2>/dev/null | score
  done
done
