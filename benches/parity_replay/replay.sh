#!/usr/bin/env bash
# Full-schedule 2x2: {kiln, Ultralytics} x {kiln's, Ultralytics'} dumped samples of shapes4 seed 0.
set -u
cd /work/main && eval "$(scripts/libtorch.sh)"
export PYTHONPATH=$HOME/.cache/kiln/ultralytics-8.4 YOLO_OFFLINE=1 HF_HUB_OFFLINE=1
PY=$HOME/.cache/kiln/torch-venv/bin/python
V=$HOME/exp/parity/shapes4/val
O=$HOME/exp/cross
NOAUG="--set augment.mosaic=0 --set augment.scale=0 --set augment.translate=0 --set augment.hsv_h=0 --set augment.hsv_s=0 --set augment.hsv_v=0 --set augment.fliplr=0"
for job in ${JOBS:-kiln:ultra ultra:kiln ultra:ultra kiln:kiln}; do
  who=${job%%:*}; src=${job##*:}; D=$HOME/exp/augstats/$src-dump
  run=$O/replay-$who-on-$src
  if [ $who = kiln ]; then
    [ -f $run/weights/last.safetensors ] || (time KILN_REPLAY_PER_EPOCH=160 $HOME/exp/kiln-replay train-student --data $D/annotations.json --val $V/annotations.json --epochs 30 --batch-size 8 --imgsz 256 --optimizer adamw --lr0 0.003 --seed 0 --device tch-cpu --output $run $NOAUG) > $run.log 2>&1
    $HOME/exp/kiln-ml eval --model $run/weights/last.safetensors --data $V/annotations.json --device tch-cpu 2>&1 | grep "^all" > $run.final
  else
    if [ ! -f $run.scores ]; then
      (time $PY $O/replay_ultra.py $D $V/annotations.json $V/images $run 0 30 160) > $run.log 2>&1
      $PY benches/parity_score.py --truth $V/annotations.json --ultralytics-run $run/run --data $run/data/data.yaml --imgsz 256 > $run.scoring.log 2>&1
      grep -E '^[0-9]+ [0-9.]+ [0-9.]+ [0-9.]+ [0-9.]+$' $run.scoring.log > $run.scores
    fi
  fi
done
echo done > $O/replay.done
