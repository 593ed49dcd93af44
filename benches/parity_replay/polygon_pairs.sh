#!/usr/bin/env bash
# perturbed_pairs.sh on polygon_dump.py's dump (~/exp/polydump): the same polygons and boxes on both sides.
# Usage: polygon_pairs.sh m0 m0t ...
cd /work/main && eval "$(scripts/libtorch.sh)"
export PYTHONPATH=$HOME/.cache/kiln/ultralytics-8.4 YOLO_OFFLINE=1 HF_HUB_OFFLINE=1 XDG_RUNTIME_DIR=/tmp
PY=$HOME/.cache/kiln/torch-venv/bin/python
V=$HOME/exp/parity/shapes4/val; O=$HOME/exp/cross/batches; D=$HOME/exp/polydump
NOAUG="--set augment.mosaic=0 --set augment.scale=0 --set augment.translate=0 --set augment.hsv_h=0 --set augment.hsv_s=0 --set augment.hsv_v=0 --set augment.fliplr=0"
for I in "$@"; do
  env KILN_BATCH_LOG=1 KILN_REPLAY_PER_EPOCH=160 $HOME/exp/kiln-blog train-student --data $D/annotations.json --val $V/val1.json --epochs 30 --batch-size 8 --imgsz 256 --optimizer adamw --lr0 0.003 --seed 0 --device tch-cpu --output $O/kiln-$I-poly $NOAUG --set weights=$HOME/exp/init/$I.safetensors 2> $O/kiln-$I-poly.batches > $O/kiln-$I-poly.log
  $PY /work/main/benches/parity_replay/replay_ultra_b.py $D $V/val1.json $V/images $O/ultra-$I-poly 0 30 160 $HOME/exp/init/$I.pt > $O/ultra-$I-poly.log 2>&1
  rm -rf $O/ultra-$I-poly/data
done
