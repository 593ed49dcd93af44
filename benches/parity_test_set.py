#!/usr/bin/env python3
"""Scores finished runs of the learning comparison (`benches/parity_experiment.sh`) on a larger test
set drawn like the val set, so that less of a run's spread is the scoring of 40 images: kiln's final
weights by `kiln eval` (its COCO evaluation equals pycocotools: tests/coco_eval.rs), Ultralytics'
final EMA weights (`last.pt`) by pycocotools on its own validator's results, as
`benches/parity_score.py` scores each epoch. Prints one line per run (`tool seed box50 mask50`),
then over the seeds both tools finished: the means, the paired mean difference with twice its
standard error, and each class's box AP50.

    kiln synth --output TEST --num-images 400 --synth-seed 144 --style shifted --classes 8 \
        --size 256 --max-objects 4                                      # shifted8's test set
    PYTHONPATH=~/.cache/kiln/ultralytics-8.4 ~/.cache/kiln/torch-venv/bin/python \
        benches/parity_test_set.py --test TEST/annotations.json --kiln BIN --set-dir OUT/shifted8 \
        --seeds 0 1 2 [--kiln-prefix kiln-s] [--ultra-prefix ultra-s]

About 75 s a seed (both tools, 400 images at 256 px) on the 2-core CPU.
"""
import argparse
import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parity_score import load_truth, normalise  # noqa: E402
from student_train_baseline import convert  # noqa: E402

from pycocotools.cocoeval import COCOeval  # noqa: E402


def evaluate(truth, results):
    """(box AP50, mask AP50, per-class box AP50 by category id)."""
    figures, per_class = [], {}
    for kind in ("bbox", "segm"):
        usable = [r for r in results if kind == "bbox" or "segmentation" in r]
        if not usable:
            figures.append(0.0)
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(truth, truth.loadRes(usable), kind)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        figures.append(max(ev.stats[1], 0.0))
        if kind == "bbox":
            # precision[T, R, K, A, M]: IoU 0.5, every recall, class k, all areas, 100 detections.
            for k, category in enumerate(ev.params.catIds):
                p = ev.eval["precision"][0, :, k, 0, 2]
                per_class[category] = float(p[p > -1].mean()) if (p > -1).any() else 0.0
    return figures[0], figures[1], per_class


def ultralytics_results(weights, data_yaml, imgsz, truth):
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")  # its logger writes past the redirection
    from ultralytics import YOLO

    categories = sorted(c["id"] for c in truth.dataset["categories"])
    with tempfile.TemporaryDirectory() as tmp:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            YOLO(str(weights)).val(
                data=str(data_yaml), imgsz=imgsz, batch=8, conf=0.001, iou=0.7, max_det=300, save_json=True,
                plots=False, project=tmp, name="val", device="cpu", workers=0, verbose=False,
            )
        written = Path(tmp, "val", "predictions.json")
        predictions = json.loads(written.read_text()) if written.is_file() else []
    return normalise(predictions, truth, {i + 1: c for i, c in enumerate(categories)})


def kiln_figures(kiln, weights, test, imgsz, names):
    """kiln's own evaluation (equal to pycocotools: tests/coco_eval.rs), read from its table."""
    run = subprocess.run(
        [kiln, "eval", "--model", str(weights), "--data", str(test), "--imgsz", str(imgsz)],
        capture_output=True, text=True,
    )
    if run.returncode != 0:
        raise SystemExit(f"kiln eval of {weights} failed:\n{run.stderr}")
    table = run.stdout
    by_name = {name: c for c, name in names.items()}
    box = mask = None
    per_class = {}
    for line in table.splitlines():
        fields = line.split()
        if fields and fields[0] == "all":
            box, mask = float(fields[5]), float(fields[9])
        elif fields and fields[0] in by_name and len(fields) >= 4:
            per_class[by_name[fields[0]]] = float(fields[4])
    if box is None:
        raise SystemExit(f"kiln eval of {weights} printed no 'all' line:\n{table}")
    return box, mask, per_class


def paired(differences):
    n = len(differences)
    mean = sum(differences) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
    return mean, 2 * sd / math.sqrt(n)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--test", required=True, help="the test set's COCO JSON (images beside it in images/)")
    ap.add_argument("--kiln", required=True, help="the kiln binary")
    ap.add_argument("--set-dir", required=True, help="a set's directory of parity_experiment.sh")
    ap.add_argument("--seeds", nargs="+", type=int, required=True)
    ap.add_argument("--kiln-prefix", default="kiln-s")
    ap.add_argument("--ultra-prefix", default="ultra-s")
    ap.add_argument("--imgsz", type=int, default=256)
    args = ap.parse_args()
    for path, what in ((args.test, "test set"), (args.kiln, "kiln binary"), (args.set_dir, "set directory")):
        if not Path(path).exists():
            raise SystemExit(f"{path}: no such {what}")
    truth = load_truth(args.test)
    names = {c["id"]: c["name"] for c in truth.dataset["categories"]}
    set_dir = Path(args.set_dir)
    data_dir = Path(tempfile.mkdtemp(prefix="parity-test-"))
    try:
        score_runs(args, truth, names, set_dir, data_dir)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def score_runs(args, truth, names, set_dir, data_dir):
    categories = sorted(names)
    convert(args.test, Path(args.test).parent / "images", data_dir, "val",
            {c: i for i, c in enumerate(categories)})
    listing = "\n".join(f"  {i}: {names[c]}" for i, c in enumerate(categories))
    data_yaml = data_dir / "data.yaml"
    data_yaml.write_text(f"path: {data_dir}\ntrain: images/val\nval: images/val\nnames:\n{listing}\n")

    rows = {"kiln": {}, "ultralytics": {}}
    for seed in args.seeds:
        kiln_weights = set_dir / f"{args.kiln_prefix}{seed}" / "weights" / "last.safetensors"
        ultra_weights = set_dir / f"{args.ultra_prefix}{seed}" / "run" / "weights" / "last.pt"
        for tool, weights in (("kiln", kiln_weights), ("ultralytics", ultra_weights)):
            if not weights.is_file():
                print(f"{tool} seed {seed}: no {weights}, skipped", file=sys.stderr)
                continue
            if tool == "kiln":
                rows[tool][seed] = kiln_figures(args.kiln, weights, args.test, args.imgsz, names)
            else:
                rows[tool][seed] = evaluate(truth, ultralytics_results(weights, data_yaml, args.imgsz, truth))
            box, mask, _ = rows[tool][seed]
            print(f"{tool} {seed} {box:.4f} {mask:.4f}", flush=True)

    both = [s for s in args.seeds if s in rows["kiln"] and s in rows["ultralytics"]]
    if not both:
        return
    for i, what in ((0, "box"), (1, "mask")):
        k = sum(rows["kiln"][s][i] for s in both) / len(both)
        u = sum(rows["ultralytics"][s][i] for s in both) / len(both)
        mean, two_se = paired([rows["kiln"][s][i] - rows["ultralytics"][s][i] for s in both])
        print(f"{what} mAP50 over seeds {' '.join(map(str, both))}: kiln {k:.3f} · Ultralytics {u:.3f} = "
              f"{k / u if u else float('nan'):.2f}x, paired {mean:+.3f} ± {two_se:.3f}")
    print("per-class box AP50 (mean over those seeds), kiln · Ultralytics:")
    for c in categories:
        k = sum(rows["kiln"][s][2].get(c, 0.0) for s in both) / len(both)
        u = sum(rows["ultralytics"][s][2].get(c, 0.0) for s in both) / len(both)
        print(f"  {names[c]:>12} {k:.3f} · {u:.3f}")


if __name__ == "__main__":
    main()
