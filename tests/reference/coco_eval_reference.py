#!/usr/bin/env python3
"""Reference COCO metrics from pycocotools' COCOeval, for kiln's evaluator.

Ground truth: coco8-seg (real photos, polygons) with `area` and `bbox` filled by pycocotools and one
annotation turned into a crowd region. Detections: made from the ground truth with noise (shifted,
scaled boxes; shifted, dilated or eroded masks; some with the wrong class; duplicates), random false
positives, and 120 low-score boxes on one image so the 100-detection cap matters. COCOeval runs
for `bbox` and `segm`.

Writes into tests/fixtures/coco_eval/: gt.json, detections.json (COCO results, compressed RLE) and
reference.json (the 12 summary numbers per IoU type, per-class AP50-95 and AP50, and the
precision array at IoU 0.5, all areas, 100 detections, averaged over classes).

    ~/.venvs/kiln/bin/python tests/reference/coco_eval_reference.py
"""
import contextlib
import io
import json
import os

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

SOURCE = "../shared/data/coco8-seg/annotations.json"
OUT = "tests/fixtures/coco_eval"


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(7)
    gt = json.load(open(SOURCE))
    images = {im["id"]: im for im in gt["images"]}
    for ann in gt["annotations"]:
        im = images[ann["image_id"]]
        rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], im["height"], im["width"]))
        ann["area"] = float(mask_utils.area(rle))
        ann["bbox"] = [float(v) for v in mask_utils.toBbox(rle)]
    gt["annotations"][3]["iscrowd"] = 1
    with open(f"{OUT}/gt.json", "w") as f:
        json.dump(gt, f)

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(f"{OUT}/gt.json")
    present = sorted({a["category_id"] for a in gt["annotations"]})
    detections = []

    def add(image, category, box, mask, score):
        h, w = image["height"], image["width"]
        x, y, bw, bh = box
        x, y = min(max(x, 0.0), w - 2.0), min(max(y, 0.0), h - 2.0)
        bw, bh = max(min(bw, w - x), 1.0), max(min(bh, h - y), 1.0)
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        detections.append({
            "image_id": image["id"],
            "category_id": int(category),
            "bbox": [round(float(v), 2) for v in (x, y, bw, bh)],
            "score": round(float(score), 5),
            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
        })

    for ann in gt["annotations"]:
        image = images[ann["image_id"]]
        truth = coco.annToMask(ann)
        for copy in range(1 + (rng.random() < 0.25)):  # some duplicates
            if rng.random() < 0.12:
                continue  # missed
            x, y, w, h = ann["bbox"]
            jitter = rng.normal(0, 0.08, 4) * [w, h, w, h]
            box = [x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]]
            dx, dy = rng.integers(-4, 5, 2)
            mask = np.roll(np.roll(truth, dy, 0), dx, 1)
            kind = rng.integers(3)
            if kind == 1:  # dilate by one pixel
                mask = mask | np.roll(mask, 1, 0) | np.roll(mask, 1, 1)
            elif kind == 2:  # erode by one pixel
                mask = mask & np.roll(mask, 1, 0) & np.roll(mask, 1, 1)
            category = ann["category_id"] if rng.random() > 0.1 else rng.choice(present)
            add(image, category, box, mask, rng.uniform(0.3, 1.0) if copy == 0 else rng.uniform(0.05, 0.6))
    for image in gt["images"]:  # false positives
        for _ in range(rng.integers(1, 6)):
            h, w = image["height"], image["width"]
            bw, bh = rng.uniform(10, w / 2), rng.uniform(10, h / 2)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            mask = np.zeros((h, w), np.uint8)
            mask[int(y) : int(y + bh), int(x) : int(x + bw)] = 1
            add(image, rng.choice(present), [x, y, bw, bh], mask, rng.uniform(0.0, 0.7))
    crowded = gt["images"][1]
    for _ in range(120):
        h, w = crowded["height"], crowded["width"]
        x, y = rng.uniform(0, w - 40), rng.uniform(0, h - 40)
        mask = np.zeros((h, w), np.uint8)
        mask[int(y) : int(y) + 30, int(x) : int(x) + 30] = 1
        add(crowded, rng.choice(present), [x, y, 30, 30], mask, rng.uniform(0.0, 0.2))
    with open(f"{OUT}/detections.json", "w") as f:
        json.dump(detections, f)

    reference = {"generator": "tests/reference/coco_eval_reference.py", "detections": len(detections)}
    for iou_type in ("bbox", "segm"):
        with contextlib.redirect_stdout(io.StringIO()):
            results = coco.loadRes(f"{OUT}/detections.json")
            evaluation = COCOeval(coco, results, iou_type)
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        precision = evaluation.eval["precision"]  # [T, R, K, A, M]
        per_class = {}
        for k, category in enumerate(evaluation.params.catIds):
            p = precision[:, :, k, 0, -1]
            if (p > -1).any():
                per_class[str(category)] = {
                    "ap": float(np.mean(p[p > -1])),
                    "ap50": float(np.mean(p[0][p[0] > -1])),
                }
        pr50 = precision[0, :, :, 0, -1]
        pr50 = [float(np.mean(row[row > -1])) for row in pr50]
        reference[iou_type] = {"stats": [float(s) for s in evaluation.stats], "per_class": per_class, "pr50": pr50}
    with open(f"{OUT}/reference.json", "w") as f:
        json.dump(reference, f, indent=1)
    print(len(detections), reference["bbox"]["stats"], reference["segm"]["stats"])


if __name__ == "__main__":
    main()
