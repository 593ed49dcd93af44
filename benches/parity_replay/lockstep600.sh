#!/usr/bin/env bash
# Both tools from the same initial weights on the same fixed sequence of Ultralytics' augmented
# samples, one batch per epoch, so each epoch's training loss is one batch's.
set -u
cd /work/main && eval "$(scripts/libtorch.sh)"
export PYTHONPATH=$HOME/.cache/kiln/ultralytics-8.4 YOLO_OFFLINE=1 HF_HUB_OFFLINE=1
PY=$HOME/.cache/kiln/torch-venv/bin/python
O=$HOME/exp/cross/lockstep600; mkdir -p $O
E=${E:-64}; SRC=${SRC:-ultra}; D=$HOME/exp/augstats/$SRC-dump; W0=$HOME/exp/step-dense2/w0.pt
NOAUG="--set augment.mosaic=0 --set augment.scale=0 --set augment.translate=0 --set augment.hsv_h=0 --set augment.hsv_s=0 --set augment.hsv_v=0 --set augment.fliplr=0"
(time KILN_REPLAY_PER_EPOCH=32 $HOME/exp/kiln-replay2 train-student --data $D/annotations.json --val $HOME/exp/parity/shapes4/val/val1.json --epochs $E --batch-size 8 --imgsz 256 --optimizer adamw --lr0 0.003 --seed 0 --device tch-cpu --output $O/kiln-$SRC $NOAUG --set weights=$W0 --set close_mosaic=0 --set warmup_epochs=15) > $O/kiln-$SRC.log 2>&1
(time WARMUP=15 $PY /work/main/benches/parity_replay/lockstep_ultra.py $D $HOME/exp/parity/shapes4/val/val1.json $HOME/exp/parity/shapes4/val/images $O/ultra-$SRC $E 32 $W0) > $O/ultra-$SRC.log 2>&1
echo done > $O/done-$SRC
