#!/usr/bin/env python3
"""Kiln's augmented training samples against Ultralytics 8.4's on the same COCO set (issue "student
training that learns as fast per epoch as Ultralytics"): objects per sample, box sizes, thin and
elongated boxes, mask cells per object, the padding grey and the pixel statistics, side by side.

    cargo build -p kiln-training --example augment_stats
    PYTHONPATH=~/.cache/kiln/ultralytics-8.4 ~/.cache/kiln/torch-venv/bin/python benches/augment_compare.py \\
        --train train/annotations.json --images train/images --imgsz 256 --samples 480 \\
        --kiln-stats $CARGO_TARGET_DIR/debug/examples/augment_stats --out OUT [--no-hsv]

`--no-hsv` turns the colour changes off on both sides, so the padding grey can be counted;
`--no-mosaic` compares the samples of the last epochs (mosaic closed); `--set KEY=VALUE ...` changes an
augmentation setting on both sides (Ultralytics' names, which are kiln's). Both
tools use their default recipe (mosaic, scale ±0.5, translate ±0.1, HSV, horizontal flip). About a
minute for 480 samples.
"""
import argparse
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np


def ultralytics_samples(data_yaml, imgsz, samples, no_hsv, no_mosaic=False, settings=()):
    """Ultralytics' training pipeline up to `Format`, in augment_stats.rs's line format."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.augment import Compose
    from ultralytics.data.utils import check_det_dataset, polygon2mask
    from ultralytics.utils import DEFAULT_CFG

    overrides = dict(task="segment", imgsz=imgsz, mode="train")
    if no_hsv:
        overrides.update(hsv_h=0, hsv_s=0, hsv_v=0)
    if no_mosaic:
        overrides.update(mosaic=0)
    overrides.update({k: float(v) for k, v in (s.split("=") for s in settings)})
    cfg = get_cfg(DEFAULT_CFG, overrides)
    data = check_det_dataset(data_yaml)
    dataset = build_yolo_dataset(cfg, os.path.join(data["path"], data["train"]), 8, data, mode="train", stride=32)
    random.seed(0)
    np.random.seed(0)
    before_format = Compose(dataset.transforms.transforms[:-1])
    order = []
    while len(order) < samples:
        epoch = list(range(len(dataset)))
        random.shuffle(epoch)
        order += epoch
    lines = []
    for k, i in enumerate(order[:samples]):
        labels = before_format(dataset.get_image_and_label(i))
        image, instances = labels["img"], labels["instances"]
        instances.convert_bbox("xyxy")
        instances.denormalize(*image.shape[:2][::-1])
        grey = np.all(image == 114, axis=2).mean()
        lines.append(f"S {k} {len(instances)} {image.mean():.2f} {image.std():.2f} {grey:.4f}")
        masks = [polygon2mask(image.shape[:2], [s.reshape(-1)], color=1, downsample_ratio=4) for s in instances.segments]
        areas = [int(m.sum()) for m in masks]
        owner = np.full(masks[0].shape if masks else (1, 1), -1)
        for j in np.argsort(-np.array(areas)) if masks else []:
            owner[masks[j] > 0] = j
        for j in range(len(instances)):
            b = instances.bboxes[j]
            lines.append(f"O {int(labels['cls'][j][0])} {b[2] - b[0]:.2f} {b[3] - b[1]:.2f} {areas[j]} {int((owner == j).sum())}")
    return lines


def summary(name, lines):
    samples = np.array([[float(x) for x in l.split()[2:]] for l in lines if l.startswith("S ")])
    objects = np.array([[float(x) for x in l.split()[1:]] for l in lines if l.startswith("O ")])
    w, h = objects[:, 1], objects[:, 2]
    side = np.sqrt(w * h)
    print(f"{name}: {len(samples)} samples, {samples[:, 0].mean():.2f} objects per sample, pixel mean "
          f"{samples[:, 1].mean():.1f} std {samples[:, 2].mean():.1f}, padding grey {samples[:, 3].mean():.3f}")
    print(f"  sqrt(box area) percentiles 5/25/50/75/95: {' / '.join(f'{v:.1f}' for v in np.percentile(side, [5, 25, 50, 75, 95]))}"
          f"; under 8 px {np.mean(side < 8):.3f}, under 16 px {np.mean(side < 16):.3f}, aspect over 3 "
          f"{np.mean(np.maximum(w / h, h / w) > 3):.3f}")
    print(f"  mask cells per object {objects[:, 3].mean():.1f} (not under a smaller object: {objects[:, 4].mean():.1f}), "
          f"objects without mask cells {np.mean(objects[:, 3] == 0):.3f}")
    # Per class: mask cells over the box's area in cells (a quarter of its side each way), where
    # thin shapes (stars, crosses, arrows) show how each tool rasterises a polygon at a quarter size.
    fill = objects[:, 3] / np.maximum(w * h / 16, 1e-6)
    print("  mask cells / box cells per class: " + ", ".join(
        f"{int(c)} {fill[objects[:, 0] == c].mean():.3f}" for c in np.unique(objects[:, 0])))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--imgsz", type=int, default=256)
    ap.add_argument("--samples", type=int, default=480)
    ap.add_argument("--kiln-stats", required=True, help="the augment_stats example binary")
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-hsv", action="store_true")
    ap.add_argument("--no-mosaic", action="store_true", help="the samples of the last epochs, once mosaic is closed")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="an augmentation setting on both sides, by Ultralytics' name (scale, translate, fliplr, ...): "
                         "with --no-mosaic --set scale=0 translate=0 fliplr=0 each image gives one sample, the same on both")
    args = ap.parse_args()
    for setting in args.set:
        key, _, value = setting.partition("=")
        try:
            float(value)
        except ValueError:
            ap.error(f"--set {setting!r}: expected KEY=NUMBER, e.g. scale=0")
    sys.path.insert(0, str(Path(__file__).parent))
    from student_train_baseline import convert
    import json

    out = Path(args.out).resolve()
    coco = json.loads(Path(args.train).read_text())
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    yolo = out / "yolo"
    if not (yolo / "data.yaml").exists():
        convert(args.train, args.images, yolo, "train", {c["id"]: i for i, c in enumerate(categories)})
        names = "".join(f"  {i}: {c['name']}\n" for i, c in enumerate(categories))
        (yolo / "data.yaml").write_text(f"path: {yolo}\ntrain: images/train\nval: images/train\nnames:\n{names}")
    env = dict(os.environ, **({"KILN_NO_HSV": "1"} if args.no_hsv else {}), **({"KILN_NO_MOSAIC": "1"} if args.no_mosaic else {}),
               **({"KILN_SET": " ".join(args.set)} if args.set else {}))
    kiln = subprocess.run([args.kiln_stats, args.train, args.images, str(args.imgsz), str(args.samples)],
                          check=True, capture_output=True, text=True, env=env).stdout.splitlines()
    summary("kiln", kiln)
    summary("Ultralytics", ultralytics_samples(str(yolo / "data.yaml"), args.imgsz, args.samples, args.no_hsv, args.no_mosaic,
                                          args.set))


if __name__ == "__main__":
    main()
