"""Scores detections with pycocotools: box and mask mAP50 / mAP50-95 of COCO results against a COCO
ground truth. Part of the kiln-vs-Ultralytics learning comparison (`benches/parity_experiment.sh`).

Two sources of results:
  --results FILE            COCO results (kiln's `predictions.json` from `kiln infer`, or any
                            file of {image_id | file_name, category_id, bbox, score, segmentation})
  --ultralytics-run DIR     every `weights/epochN.pt` of an Ultralytics run (trained with
                            save_period=1; each holds the EMA weights, as kiln validates): each is
                            run through Ultralytics' own validator (conf 0.001, IoU 0.7, 300
                            detections, `save_json`), and its predictions are scored here

Prints one line per scored file: `epoch box50 box50-95 mask50 mask50-95` (epoch 0 for --results).

    python benches/parity_score.py --truth val/annotations.json --results predictions.json
    python benches/parity_score.py --truth val/annotations.json --ultralytics-run ultra/run \
        --data ultra/data/data.yaml --imgsz 256
"""

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
from pathlib import Path

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def load_truth(path):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(path)
    # pycocotools' loadRes needs these keys; kiln's COCO files may omit them.
    coco.dataset.setdefault("info", {})
    coco.dataset.setdefault("licenses", [])
    return coco


def image_ids_by_stem(coco):
    return {Path(image["file_name"]).stem: image["id"] for image in coco.dataset["images"]}


def normalise(results, coco, category_of_class=None):
    """Image ids from stems or file names, category ids from class indices where needed."""
    stems = image_ids_by_stem(coco)
    ids = {image["id"] for image in coco.dataset["images"]}
    out = []
    for r in results:
        r = dict(r)
        key = r.pop("file_name", None)
        if key is not None:
            r["image_id"] = stems[Path(key).stem]
        elif r["image_id"] not in ids:
            r["image_id"] = stems[str(r["image_id"])]
        if category_of_class is not None:
            r["category_id"] = category_of_class[r["category_id"]]
        out.append(r)
    return out


def score(coco, results):
    """(box mAP50, box mAP50-95, mask mAP50, mask mAP50-95); 0 for a kind with no results."""
    figures = []
    for kind in ("bbox", "segm"):
        usable = [r for r in results if kind == "bbox" or "segmentation" in r]
        if not usable:
            figures += [0.0, 0.0]
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            dt = coco.loadRes(usable)
            ev = COCOeval(coco, dt, kind)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        figures += [max(ev.stats[1], 0.0), max(ev.stats[0], 0.0)]
    return figures


def ultralytics_epochs(run, data, imgsz, truth):
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO

    # Ultralytics numbers classes 0..n-1 in the sorted order of the truth's category ids
    # (benches/student_train_baseline.py writes data.yaml so).
    categories = sorted(c["id"] for c in truth.dataset["categories"])
    weights = sorted(
        Path(run, "weights").glob("epoch*.pt"), key=lambda p: int(re.search(r"epoch(\d+)", p.stem).group(1))
    )
    for w in weights:
        # Ultralytics names the checkpoint after its 0-based epoch: epoch0.pt ends the first one.
        epoch = int(re.search(r"epoch(\d+)", w.stem).group(1)) + 1
        with tempfile.TemporaryDirectory() as tmp:
            model = YOLO(str(w))
            validator_out = io.StringIO()
            with contextlib.redirect_stdout(validator_out), contextlib.redirect_stderr(validator_out):
                model.val(
                    data=data, imgsz=imgsz, batch=8, conf=0.001, iou=0.7, max_det=300, save_json=True,
                    plots=False, project=tmp, name="val", device="cpu", workers=0, verbose=False,
                )
            written = Path(tmp, "val", "predictions.json")
            # An untrained model may detect nothing at all; Ultralytics then writes no file.
            predictions = json.loads(written.read_text()) if written.is_file() else []
        # Ultralytics writes class index + 1 as the category of a dataset that is not COCO's own.
        results = normalise(predictions, truth, {i + 1: c for i, c in enumerate(categories)})
        yield epoch, score(truth, results)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--truth", required=True, help="the val split's COCO JSON")
    ap.add_argument("--results", help="COCO results to score")
    ap.add_argument("--ultralytics-run", help="an Ultralytics run directory with weights/epochN.pt")
    ap.add_argument("--data", help="the run's data.yaml (with --ultralytics-run)")
    ap.add_argument("--imgsz", type=int, default=640)
    args = ap.parse_args()
    truth = load_truth(args.truth)
    if args.results:
        results = normalise(json.loads(Path(args.results).read_text()), truth)
        print("0 " + " ".join(f"{f:.4f}" for f in score(truth, results)))
    elif args.ultralytics_run:
        for epoch, figures in ultralytics_epochs(args.ultralytics_run, args.data, args.imgsz, truth):
            print(f"{epoch} " + " ".join(f"{f:.4f}" for f in figures), flush=True)
    else:
        sys.exit("give --results or --ultralytics-run")


if __name__ == "__main__":
    main()
