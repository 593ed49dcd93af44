#!/usr/bin/env python3
"""Fixtures for kiln's training mask targets where objects overlap (issue 23): Ultralytics' default
`overlap_mask=True` turns a sample's instance masks into one index map (`polygons2masks_overlap`:
each instance's quarter-size `polygon2mask`, drawn largest first, so the smaller object owns the
cells two share), and its loss takes `map == index + 1` as each instance's target. Scenes of 2 to
20 overlapping random polygons in a 128 x 128 sample (no two masks of a scene with equal areas:
numpy may order those either way). Writes tests/fixtures/ultralytics_overlap_targets.json: per
scene, each instance's own quarter-size mask and its target under the overlap rule, both as
row-major runs (zeros first), in the instances' original order.

    PYTHONPATH=~/.cache/kiln/ultralytics-8.4 ~/.cache/kiln/torch-venv/bin/python \\
        tests/reference/ultralytics_overlap_targets.py tests/fixtures/ultralytics_overlap_targets.json

Checked with ultralytics 8.4.190 and OpenCV 5.1.0.
"""
import json
import sys

import cv2
import numpy as np
from ultralytics.data.utils import polygon2mask, polygons2masks_overlap

from ultralytics_mask_targets import runs  # this directory: the same run-length layout


def main():
    rng = np.random.default_rng(2324)
    size, ratio, scenes = 128, 4, []
    while len(scenes) < 40:
        count = int(rng.integers(2, 21))
        segments = []
        for _ in range(count):
            k = int(rng.integers(3, 12))
            centre = rng.uniform(20, size - 20, 2)
            radius = rng.uniform(4, 30, k)
            angles = np.sort(rng.uniform(0, 2 * np.pi, k))
            segments.append(np.stack([centre[0] + radius * np.cos(angles), centre[1] + radius * np.sin(angles)], 1))
        own = [polygon2mask((size, size), [s.reshape(-1)], color=1, downsample_ratio=ratio) for s in segments]
        areas = [int(m.sum()) for m in own]
        if len(set(areas)) < len(areas) or min(areas) == 0:
            continue
        index_map, order = polygons2masks_overlap((size, size), segments, downsample_ratio=ratio)
        rank = {int(j): r for r, j in enumerate(order)}
        targets = [(index_map == rank[j] + 1).astype(np.uint8) for j in range(count)]
        scenes.append(dict(size=size // ratio, masks=[runs(m) for m in own], targets=[runs(t) for t in targets],
                           shared_cells=int(sum(m.sum() for m in own) - sum(t.sum() for t in targets))))
    json.dump(dict(scenes=scenes, opencv=cv2.__version__), open(sys.argv[1], "w"))
    print(f"{len(scenes)} scenes written to {sys.argv[1]}, {sum(s['shared_cells'] for s in scenes)} cells given up")


if __name__ == "__main__":
    main()
