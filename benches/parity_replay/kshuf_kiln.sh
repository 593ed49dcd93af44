#!/usr/bin/env bash
# kiln on kiln's old (overlapping-stream) dumped samples, each epoch's 160 reshuffled, from m0.
cd /work/main && eval "$(scripts/libtorch.sh)"
while pgrep -f "kiln-fork train-student" >/dev/null; do sleep 10; done
V=$HOME/exp/parity/shapes4/val; O=$HOME/exp/cross; D=$HOME/exp/augstats/kiln-dump; run=$O/replay-kiln-on-kiln-shuf-m0
NOAUG="--set augment.mosaic=0 --set augment.scale=0 --set augment.translate=0 --set augment.hsv_h=0 --set augment.hsv_s=0 --set augment.hsv_v=0 --set augment.fliplr=0"
(time KILN_REPLAY_SHUFFLE=1 KILN_REPLAY_PER_EPOCH=160 $HOME/exp/kiln-blog train-student --data $D/annotations.json --val $V/annotations.json --epochs 30 --batch-size 8 --imgsz 256 --optimizer adamw --lr0 0.003 --seed 0 --device tch-cpu --output $run $NOAUG --set weights=$HOME/exp/init/m0.safetensors) > $run.log 2>&1
