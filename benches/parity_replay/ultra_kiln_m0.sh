#!/usr/bin/env bash
# Ultralytics on kiln's (old) dumped stream, reshuffled per epoch (its own loader), from m0.
export PYTHONPATH=$HOME/.cache/kiln/ultralytics-8.4 YOLO_OFFLINE=1 HF_HUB_OFFLINE=1
PY=$HOME/.cache/kiln/torch-venv/bin/python
while pgrep -f "kiln-blog train-student" >/dev/null; do sleep 10; done
V=$HOME/exp/parity/shapes4/val; O=$HOME/exp/cross; D=$HOME/exp/augstats/kiln-dump
run=$O/replay-ultra-on-kiln-m0
(time $PY $O/replay_ultra.py $D $V/annotations.json $V/images $run 0 30 160 $HOME/exp/init/m0.pt) > $run.log 2>&1
