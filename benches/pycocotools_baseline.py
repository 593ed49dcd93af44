#!/usr/bin/env python3
"""The baseline of the data bench: pycocotools loading a COCO file and computing every
annotation's area and bbox from its polygons (COCO.annToRLE, mask.area, mask.toBbox).

    cargo run --release -p kiln-benches --example write_large_coco -- /tmp/large.json
    ~/.venvs/kiln/bin/python benches/pycocotools_baseline.py /tmp/large.json
"""
import statistics
import sys
import time

from pycocotools import mask as mask_utils
from pycocotools.coco import COCO


def run(path):
    coco = COCO(path)
    for ann in coco.dataset["annotations"]:
        rle = coco.annToRLE(ann)
        ann["area"] = float(mask_utils.area(rle))
        ann["bbox"] = mask_utils.toBbox(rle).tolist()
    return coco


def main():
    path = sys.argv[1]
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(path)
        times.append(time.perf_counter() - start)
    print(f"pycocotools load + area/bbox: median {statistics.median(times):.2f} s over {runs} runs "
          f"(min {min(times):.2f} s)")


if __name__ == "__main__":
    main()
