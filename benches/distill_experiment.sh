#!/usr/bin/env bash
# The label-efficiency experiment of README "Distilling the teachers into the student": kiln's
# shipped tiny bases (pretrained on the *source* domain, models/bases/README.md) are LoRA-tuned on
# 32 labelled images of a *target* domain they never saw (`kiln synth --style shifted`: other
# backgrounds, colours and object sizes, plus the arrow, a class the bases never saw), then teach a
# yolov8n-seg student with 256 unlabelled images; scored on 64 validation images.
#
#   benches/distill_experiment.sh OUT [ROW ...]     rows: a b c d e s c10 s10 cauto dauto d10 (default: a b c d e s)
#
# KILN (default: target/release/kiln) is the binary; MINILM the all-MiniLM-L6-v2 model.safetensors
# (default: ../shared/weights/all-minilm-l6-v2/model.safetensors). Every row writes its run into
# OUT/<row>; `kiln eval` prints each row's box / mask mAP50 on the validation split at the end.
# Another seed of the students on the same images, split and teachers (the README's seeds 2 and 3):
#   SEED=2 FROM=OUT benches/distill_experiment.sh OUT2 a c10 d10
# (FROM: an earlier OUT whose target, target_test and teachers b are linked into OUT2).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: benches/distill_experiment.sh OUT [ROW ...]}
shift
ROWS=${*:-a b c d e s}
TEACHER_S="$OUT/s_teacher"
KILN=${KILN:-target/release/kiln}
MINILM=${MINILM:-../shared/weights/all-minilm-l6-v2/model.safetensors}
mkdir -p "$OUT"
if [ -n "${FROM:-}" ]; then
  for shared in target target_test b; do
    [ -e "$OUT/$shared" ] || ln -s "$(cd "$FROM" && pwd)/$shared" "$OUT/$shared"
  done
fi
T=$OUT/target

if [ ! -f "$T/splits/val.json" ]; then
  # 352 images at 128 px, 8 classes (the bases saw the first 7), split 32 / 256 / 64 exactly.
  "$KILN" synth --output "$T" --num-images 352 --classes 8 --size 128 --max-objects 4 --style shifted --synth-seed 200
  "$KILN" validate --data "$T/annotations.json" --split train:0.0909,unl:0.7273,val:0.1818
  # (e)'s training set: the 32 labelled images plus the 256 "unlabelled" ones with their true labels.
  python3 - "$T/splits" <<'EOF'
import json, sys
d = sys.argv[1]
train, unl = json.load(open(f"{d}/train.json")), json.load(open(f"{d}/unl.json"))
train["images"] += unl["images"]
train["annotations"] += unl["annotations"]
for i, a in enumerate(train["annotations"], 1):
    a["id"] = i
json.dump(train, open(f"{d}/all.json", "w"))
EOF
fi

# A held-out test set of the same target domain (another generator seed), never used to choose
# anything: the rows' figures on it check what the validation split (which picks each run's best
# epoch and the settings compared) says.
TEST=$OUT/target_test
[ -f "$TEST/annotations.json" ] || "$KILN" synth --output "$TEST" --num-images 128 --classes 8 --size 128 \
  --max-objects 4 --style shifted --synth-seed 201

DATA="--images $T/images --val $T/splits/val.json"
# SEED (default: kiln's) seeds the students' initialisation, batch order and augmentation.
STUDENT="$DATA --model yolov8n-seg --epochs 30 --batch-size 8 --imgsz 128 --optimizer adamw --lr0 0.003 --close-mosaic 5 --set nbs=8${SEED:+ --seed $SEED}"
TEACHERS=$OUT/b
taught() { # name, extra flags
  local name=$1
  shift
  [ -d "$OUT/$name" ] || "$KILN" train-student --data "$T/splits/train.json" $STUDENT --teachers "$TEACHERS" \
    --unlabeled "$T/splits/unl.json" --output "$OUT/$name" "$@"
}

for row in $ROWS; do
  case $row in
    a) [ -d "$OUT/a" ] || "$KILN" train-student --data "$T/splits/train.json" $STUDENT --output "$OUT/a" ;;
    b) # LoRA on both teachers (default targets), from the shipped bases; GroundingDINO at 128 short side.
      [ -d "$TEACHERS/teachers" ] || "$KILN" train-teacher --data "$T/splits/train.json" $DATA --sam tiny \
        --gdino tiny_minilm --text-encoder "$MINILM" --imgsz 128 --epochs 20 --batch-size 4 --lr0 0.001 \
        --output "$TEACHERS" ;;
    c) taught c ;;
    d) for term in teacher_labels logit mask feature; do taught "d_no_$term" --set "distill.$term=0"; done ;;
    e) [ -d "$OUT/e" ] || "$KILN" train-student --data "$T/splits/all.json" $STUDENT --output "$OUT/e" ;;
    s) # a kiln student as the teacher: yolov8s-seg on the same 32 labels teaches yolov8n-seg.
      [ -d "$OUT/s_teacher" ] || "$KILN" train-student --data "$T/splits/train.json" \
        ${STUDENT/yolov8n-seg/yolov8s-seg} --output "$OUT/s_teacher"
      [ -d "$OUT/s_taught" ] || "$KILN" train-student --data "$T/splits/train.json" $STUDENT \
        --teachers "$OUT/s_teacher" --unlabeled "$T/splits/unl.json" --output "$OUT/s_taught" ;;
    # (c) and (s) with the teachers' boxes kept down to a score of 0.1 instead of 0.25 (what kiln's
    # warning advises when a teacher labels nothing on most images); GroundingDINO's phrases too.
    c10) taught c_threshold_0.1 --set distill.box_threshold=0.1 --set distill.text_threshold=0.1 ;;
    # (c) with the threshold chosen from the data: the score of the teachers' best F1 on the 32 labels.
    cauto) taught c_threshold_auto --set distill.box_threshold=auto ;;
    # (d) on (cauto): each loss off in turn.
    dauto) for term in teacher_labels logit mask feature; do
        taught "d_auto_no_$term" --set distill.box_threshold=auto --set "distill.$term=0"
      done ;;
    # (d) on (c10): each loss off in turn, both thresholds 0.1.
    d10) for term in teacher_labels logit mask feature; do
        taught "d10_no_$term" --set distill.box_threshold=0.1 --set distill.text_threshold=0.1 --set "distill.$term=0"
      done ;;
    s10) [ -d "$OUT/s_taught_box_threshold_0.1" ] || "$KILN" train-student --data "$T/splits/train.json" $STUDENT \
        --teachers "$TEACHER_S" --unlabeled "$T/splits/unl.json" --set distill.box_threshold=0.1 \
        --output "$OUT/s_taught_box_threshold_0.1" ;;
    *) echo "unknown row $row (a b c d e s c10 s10 cauto dauto d10)" >&2; exit 2 ;;
  esac
done

# The JSON that `kiln eval --json` prints after its table, as one line per row.
score() {
  python3 -c '
import json, sys
text = sys.stdin.read()
m = json.loads(text[text.index("\n{") + 1:])
mask = m["mask"] or {"map50": 0.0, "map50_95": 0.0}
print("box mAP50 %.3f  mask mAP50 %.3f  box mAP50-95 %.3f  mask mAP50-95 %.3f"
      % (m["box"]["map50"], mask["map50"], m["box"]["map50_95"], mask["map50_95"]))'
}

for set in "$T/splits/val.json $T/images" "$TEST/annotations.json $TEST/images"; do
  read -r data images <<<"$set"
  echo "on $data:"
  for run in "$OUT"/*/; do
    run=${run%/}
    name=$(basename "$run")
    if [ -f "$run/weights/best.safetensors" ]; then
      printf '%-24s ' "$name"
      "$KILN" eval --model "$run" --data "$data" --images "$images" --imgsz 128 --json 2>/dev/null | score
    elif [ -d "$run/teachers" ]; then
      printf '%-24s ' "$name (teachers)"
      "$KILN" eval --teachers "$run" --data "$data" --images "$images" --json 2>/dev/null | score
    fi
  done
done
