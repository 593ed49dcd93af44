"""Ultralytics' own YOLOv8-seg training on a kiln COCO split: the per-epoch yardstick for
`kiln train-student` (README "Measured").

Converts the train/val COCO files (polygons or compressed RLE) into a YOLO segmentation
dataset, then trains `yolov8n-seg.yaml` from scratch with the settings given, on the CPU,
and prints Ultralytics' results.csv. Run once, offline, in a venv with `ultralytics` and
`pycocotools` (not part of the test suite):

    YOLO_OFFLINE=1 python benches/student_train_baseline.py --train splits/train.json \
        --val splits/val.json --images images --imgsz 160 --batch 8 --epochs 80 \
        --optimizer AdamW --lr0 0.003 --out /tmp/ultra
"""

import argparse
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils


def polygons_of(segmentation, height, width):
    if isinstance(segmentation, list):
        return [np.array(p, dtype=np.float64).reshape(-1, 2) for p in segmentation if len(p) >= 6]
    rle = segmentation
    if isinstance(rle.get("counts"), list):
        rle = mask_utils.frPyObjects(rle, height, width)
    binary = mask_utils.decode(rle).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1, 2).astype(np.float64) for c in contours if len(c) >= 3]


def merge_parts(polys):
    if len(polys) == 1:
        return polys[0]
    from ultralytics.data.converter import merge_multi_segment

    return np.concatenate(merge_multi_segment([q.reshape(-1).tolist() for q in polys]), axis=0)


def convert(coco_path, images_dir, out_dir, split, class_index):
    coco = json.loads(Path(coco_path).read_text())
    (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
    (out_dir / "labels" / split).mkdir(parents=True, exist_ok=True)
    by_image = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for image in coco["images"]:
        w, h = image["width"], image["height"]
        src = Path(images_dir) / image["file_name"]
        shutil.copy(src, out_dir / "images" / split / src.name)
        lines = []
        for a in by_image.get(image["id"], []):
            if a.get("iscrowd", 0):
                continue
            polys = polygons_of(a["segmentation"], h, w)
            if not polys:
                continue
            # YOLO takes one polygon per instance. An object in several parts (an RLE mask split by
            # an occluder, a multi-polygon) is joined into one as Ultralytics' own `convert_coco`
            # joins it (`merge_multi_segment`: the parts linked by thin bridges), so its label
            # keeps every part and the box around them all, as a user converting with Ultralytics
            # gets it (taking the largest part alone dropped the rest: 9 % of dense6's objects).
            p = merge_parts(polys)
            coords = " ".join(f"{x / w:.6f} {y / h:.6f}" for x, y in p)
            lines.append(f"{class_index[a['category_id']]} {coords}")
        (out_dir / "labels" / split / (src.stem + ".txt")).write_text("\n".join(lines) + "\n")
    return coco


def model_defaults():
    from ultralytics.cfg import get_cfg

    return vars(get_cfg())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", required=True)
    ap.add_argument("--val", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--val-images", help="the val images' directory when it is not --images")
    ap.add_argument("--imgsz", type=int, default=160)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=80)
    ap.add_argument("--optimizer", default="AdamW")
    ap.add_argument("--lr0", type=float, default=0.003)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", nargs="*", default=[], help="more Ultralytics train settings, KEY=VALUE (e.g. mosaic=0)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()  # Ultralytics 8.4 puts a relative project under runs/<task>/
    data_dir = out / "data"
    coco = json.loads(Path(args.train).read_text())
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    class_index = {c["id"]: i for i, c in enumerate(categories)}
    convert(args.train, args.images, data_dir, "train", class_index)
    convert(args.val, args.val_images or args.images, data_dir, "val", class_index)
    names = "\n".join(f"  {i}: {c['name']}" for i, c in enumerate(categories))
    (data_dir / "data.yaml").write_text(f"path: {data_dir}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")

    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO

    import yaml  # an Ultralytics dependency

    extra = {}
    for setting in args.set:
        key, value = setting.split("=", 1)
        if key not in model_defaults():
            raise SystemExit(f"--set {setting}: Ultralytics has no setting {key!r}")
        extra[key] = yaml.safe_load(value)  # typed as Ultralytics' own YAML would be (0, 0.5, false, ...)
    model = YOLO("yolov8n-seg.yaml")
    model.train(
        **extra,
        data=str(data_dir / "data.yaml"),
        imgsz=args.imgsz,
        batch=args.batch,
        epochs=args.epochs,
        optimizer=args.optimizer,
        lr0=args.lr0,
        device="cpu",
        workers=0,
        project=str(out),
        name="run",
        exist_ok=True,
        pretrained=False,
        amp=False,
        plots=False,
        seed=args.seed,
        deterministic=True,
        verbose=False,
    )
    print((Path(model.trainer.save_dir) / "results.csv").read_text())


if __name__ == "__main__":
    main()
