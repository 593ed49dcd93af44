#!/usr/bin/env bash
# Trajectory noise: both tools in lock step (unshuffled, 20 batches per epoch, 30 epochs, augmentation
# off) on kiln's 4800 dumped samples, from each named initial weights (perturb_init.py's copies of
# m0), one after the other. Usage: perturbed_pairs.sh m0p m0q ...
# Then, per name: kiln_to_ultralytics.py on kiln's last.safetensors, and parity_score.py
# --ultralytics-run on a directory holding each tool's final weights as weights/epoch30.pt.
cd /work/main && eval "$(scripts/libtorch.sh)"
export PYTHONPATH=$HOME/.cache/kiln/ultralytics-8.4 YOLO_OFFLINE=1 HF_HUB_OFFLINE=1 XDG_RUNTIME_DIR=/tmp
PY=$HOME/.cache/kiln/torch-venv/bin/python
V=$HOME/exp/parity/shapes4/val; O=$HOME/exp/cross/batches; D=$HOME/exp/augstats/kiln-dump
NOAUG="--set augment.mosaic=0 --set augment.scale=0 --set augment.translate=0 --set augment.hsv_h=0 --set augment.hsv_s=0 --set augment.hsv_v=0 --set augment.fliplr=0"
for I in "$@"; do
  $PY /work/main/benches/parity_replay/replay_ultra_b.py $D $V/val1.json $V/images $O/ultra-$I-kd600 0 30 160 $HOME/exp/init/$I.pt > $O/ultra-$I-kd600.log 2>&1
  env KILN_BATCH_LOG=1 KILN_REPLAY_PER_EPOCH=160 $HOME/exp/kiln-blog train-student --data $D/annotations.json --val $V/val1.json --epochs 30 --batch-size 8 --imgsz 256 --optimizer adamw --lr0 0.003 --seed 0 --device tch-cpu --output $O/kiln-$I-kd600 $NOAUG --set weights=$HOME/exp/init/$I.safetensors 2> $O/kiln-$I-kd600.batches > $O/kiln-$I-kd600.log
done
