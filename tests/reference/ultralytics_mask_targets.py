#!/usr/bin/env python3
"""Fixtures for kiln's training mask targets (issue 23): Ultralytics 8.4's `polygon2mask` (vertices
truncated to int32, `cv2.fillPoly`, `cv2.resize` to a quarter) on random polygons in a 256 x 256
sample: convex ones, star-shaped concave ones (thin points, as the synth's stars), and ones that
run past the sample's edges. Writes tests/fixtures/ultralytics_mask_targets.json: each case's
polygon, its full-size fill and its quarter-size target as row-major runs (zeros first).

    PYTHONPATH=~/.cache/kiln/ultralytics-8.4 ~/.cache/kiln/torch-venv/bin/python \\
        tests/reference/ultralytics_mask_targets.py tests/fixtures/ultralytics_mask_targets.json

Checked with ultralytics 8.4.190 and OpenCV 5.1.0.
"""
import json
import sys

import cv2
import numpy as np
from ultralytics.data.utils import polygon2mask


def runs(mask):
    flat = mask.reshape(-1).astype(np.uint8)
    out, value, count = [], 0, 0
    for v in flat:
        if v == value:
            count += 1
        else:
            out.append(count)
            value, count = v, 1
    out.append(count)
    return out


def main():
    rng = np.random.default_rng(23)
    size, cases = 256, []
    for i in range(60):
        n = int(rng.integers(3, 14))
        centre = rng.uniform(0, size, 2) if i % 4 == 3 else rng.uniform(60, size - 60, 2)
        radius = rng.uniform(3, 60, n)
        if i % 3 == 0:
            n = 10
            radius = np.tile([rng.uniform(10, 50), 0], 5)
            radius[1::2] = radius[0] * 0.38
        angles = np.sort(rng.uniform(0, 2 * np.pi, n)) if i % 3 else np.arange(n) * np.pi / 5 + rng.uniform(0, 1)
        polygon = np.stack([centre[0] + radius * np.cos(angles), centre[1] + radius * np.sin(angles)], 1)
        # Ultralytics clips a segment's points to its box inside the sample (`RandomPerspective`).
        polygon = polygon.clip(0, size)
        full = np.zeros((size, size), np.uint8)
        cv2.fillPoly(full, [np.asarray(polygon, dtype=np.int32)], color=1)
        target = polygon2mask((size, size), [polygon.reshape(-1)], color=1, downsample_ratio=4)
        cases.append(dict(polygon=[float(v) for v in polygon.reshape(-1)], size=size, downsample=4,
                          full_runs=runs(full), target_runs=runs(target)))
    json.dump(dict(cases=cases, opencv=cv2.__version__), open(sys.argv[1], "w"))
    print(f"{len(cases)} cases written to {sys.argv[1]}")


if __name__ == "__main__":
    main()
