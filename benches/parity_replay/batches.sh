#!/usr/bin/env bash
# Per-batch losses of both tools from the same init on the replay stream, first STOP epochs.
cd /work/main && eval "$(scripts/libtorch.sh)"
export PYTHONPATH=$HOME/.cache/kiln/ultralytics-8.4 YOLO_OFFLINE=1 HF_HUB_OFFLINE=1
PY=$HOME/.cache/kiln/torch-venv/bin/python
V=$HOME/exp/parity/shapes4/val; O=$HOME/exp/cross/batches; D=$HOME/exp/augstats/ultra-dump; mkdir -p $O
NOAUG="--set augment.mosaic=0 --set augment.scale=0 --set augment.translate=0 --set augment.hsv_h=0 --set augment.hsv_s=0 --set augment.hsv_v=0 --set augment.fliplr=0"
STOP=${STOP:-5}
timeout $((STOP*16+20)) env KILN_BATCH_LOG=1 KILN_REPLAY_PER_EPOCH=160 $HOME/exp/kiln-blog train-student --data $D/annotations.json --val $V/val1.json --epochs 30 --batch-size 8 --imgsz 256 --optimizer adamw --lr0 0.003 --seed 0 --device tch-cpu --output $O/kiln-$TAG $NOAUG --set weights=$W.safetensors 2> $O/kiln-$TAG.batches > $O/kiln-$TAG.log
STOP_EPOCHS=$STOP $PY /work/main/benches/parity_replay/replay_ultra_b.py $D $V/val1.json $V/images $O/ultra-$TAG 0 30 160 $W.pt > $O/ultra-$TAG.log 2>&1
echo done > $O/done-$TAG
