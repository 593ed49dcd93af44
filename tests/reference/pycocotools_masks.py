#!/usr/bin/env python3
"""Reference values for kiln's mask code, computed with pycocotools (the official COCO API).

Run once, offline, from the repository root; it writes tests/fixtures/pycocotools_masks.json,
which the Rust tests (data/tests/masks_vs_pycocotools.rs) compare against exactly.

    python3 -m venv ~/.venvs/kiln && ~/.venvs/kiln/bin/pip install pycocotools numpy
    cargo run -p kiln-cli -- synth --output /tmp/kiln-ref-synth --num-images 6 --size 96 --synth-seed 7
    ~/.venvs/kiln/bin/python tests/reference/pycocotools_masks.py \
        --coco8 ../shared/data/coco8-seg/annotations.json --synth /tmp/kiln-ref-synth/annotations.json

Cases:
  polygons   seeded random polygons (convex, star-shaped, self-intersecting, partly outside the
             image, sub-pixel): RLE counts, compressed string, area, bbox
  dense      seeded random binary masks: pycocotools.encode -> counts and compressed string
  coco8      every annotation of coco8-seg (polygons, no bbox/area): bbox and area via annToRLE
  synth      every annotation of a small `kiln synth` dataset (polygons and compressed RLE)
"""
import argparse
import importlib.metadata
import json

import numpy as np
from pycocotools import mask as mask_utils


def rle_record(rle, h, w):
    uncompressed = mask_utils.frPyObjects(rle, h, w) if isinstance(rle, dict) and isinstance(rle.get("counts"), list) else rle
    decoded = mask_utils.decode(uncompressed)
    counts = dense_counts(decoded)
    return {
        "counts": counts,
        "compressed": uncompressed["counts"].decode("ascii"),
        "area": int(mask_utils.area(uncompressed)),
        "bbox": [float(v) for v in mask_utils.toBbox(uncompressed)],
    }


def dense_counts(mask):
    """Run lengths over the column-major mask, starting with zeros (COCO's uncompressed RLE)."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            run, current = 0, v
        run += 1
    counts.append(run)
    return counts


def ann_rle(segmentation, h, w):
    """pycocotools COCO.annToRLE."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, h, w)
    return {"size": segmentation["size"], "counts": segmentation["counts"].encode("ascii")}


def dataset_cases(path):
    data = json.load(open(path))
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    out = []
    for ann in data["annotations"]:
        h, w = sizes[ann["image_id"]]
        rle = ann_rle(ann["segmentation"], h, w)
        out.append({
            "id": ann["id"],
            "area": int(mask_utils.area(rle)),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "compressed": rle["counts"].decode("ascii"),
        })
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--coco8", required=True)
    parser.add_argument("--synth", required=True)
    parser.add_argument("--output", default="tests/fixtures/pycocotools_masks.json")
    args = parser.parse_args()
    rng = np.random.default_rng(20261122)

    polygons = []
    for case in range(40):
        h, w = int(rng.integers(5, 60)), int(rng.integers(5, 60))
        k = int(rng.integers(3, 14))
        kind = case % 4
        if kind == 0:  # star-shaped around a centre, inside the image
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            angles = np.sort(rng.uniform(0, 2 * np.pi, k))
            radii = rng.uniform(0.5, max(w, h) / 2, k)
            xy = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
        elif kind == 1:  # random points: self-intersecting
            xy = np.stack([rng.uniform(0, w, k), rng.uniform(0, h, k)], 1)
        elif kind == 2:  # partly outside the image, negative coordinates
            xy = np.stack([rng.uniform(-10, w + 10, k), rng.uniform(-10, h + 10, k)], 1)
        else:  # sub-pixel slivers
            x0, y0 = rng.uniform(0, w - 1), rng.uniform(0, h - 1)
            xy = np.stack([x0 + rng.uniform(0, 1.5, k), y0 + rng.uniform(0, 1.5, k)], 1)
        poly = [round(float(v), 3) for v in xy.flatten()]
        rle = mask_utils.frPyObjects([poly], h, w)[0]
        record = rle_record(rle, h, w)
        record.update({"polygon": poly, "height": h, "width": w})
        polygons.append(record)

    dense = []
    for case in range(20):
        h, w = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        density = [0.0, 1.0, 0.05, 0.5, 0.95][case % 5]
        mask = (rng.uniform(size=(h, w)) < density).astype(np.uint8)
        rle = mask_utils.encode(np.asfortranarray(mask))
        dense.append({
            "height": h, "width": w, "rows": mask.tolist(),
            "counts": dense_counts(mask), "compressed": rle["counts"].decode("ascii"),
            "area": int(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        })

    fixture = {
        "generator": "tests/reference/pycocotools_masks.py",
        "pycocotools_version": importlib.metadata.version("pycocotools"),
        "polygons": polygons,
        "dense": dense,
        "coco8": dataset_cases(args.coco8),
        "synth": {"seed": 7, "images": 6, "size": 96, "annotations": dataset_cases(args.synth)},
    }
    with open(args.output, "w") as f:
        json.dump(fixture, f, separators=(",", ":"))
    print(f"wrote {args.output}: {len(polygons)} polygons, {len(dense)} dense masks, "
          f"{len(fixture['coco8'])} coco8 and {len(fixture['synth']['annotations'])} synth annotations")


if __name__ == "__main__":
    main()
