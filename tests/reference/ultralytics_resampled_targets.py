#!/usr/bin/env python3
"""Fixtures for kiln's training mask targets as Ultralytics' pipeline makes them (issue 23): every
segment of a training image is first resampled to 1000 points (`resample_segments` in
`YOLODataset.update_labels_info`, on the labels' normalised float32 coordinates), and only then
drawn by `polygon2mask` (points truncated to int32, `cv2.fillPoly`, `cv2.resize` to a quarter).
The truncated points step along each edge, so the target is fuller than the vertices alone give.
Random convex and star-shaped polygons inside a 256 x 256 sample. Writes
tests/fixtures/ultralytics_resampled_targets.json: each case's polygon (pixels), the resample count
and the quarter-size target as row-major runs (zeros first).

    PYTHONPATH=~/.cache/kiln/ultralytics-8.4 ~/.cache/kiln/torch-venv/bin/python \\
        tests/reference/ultralytics_resampled_targets.py tests/fixtures/ultralytics_resampled_targets.json

Checked with ultralytics 8.4.190 and OpenCV 5.1.0.
"""
import json
import sys

import cv2
import numpy as np
from ultralytics.data.utils import polygon2mask
from ultralytics.utils.ops import resample_segments

from ultralytics_mask_targets import runs  # this directory: the same run-length layout


def main():
    rng = np.random.default_rng(2323)
    size, n, cases = 256, 1000, []
    for i in range(60):
        k = int(rng.integers(3, 14))
        centre = rng.uniform(60, size - 60, 2)
        radius = rng.uniform(3, 55, k)
        if i % 3 == 0:
            k = 10
            radius = np.tile([rng.uniform(10, 50), 0], 5)
            radius[1::2] = radius[0] * 0.38
        angles = np.sort(rng.uniform(0, 2 * np.pi, k)) if i % 3 else np.arange(k) * np.pi / 5 + rng.uniform(0, 1)
        polygon = np.stack([centre[0] + radius * np.cos(angles), centre[1] + radius * np.sin(angles)], 1)
        # As the dataset holds it: normalised, float32; resampled there; back to pixels.
        normalised = (polygon / size).astype(np.float32)
        resampled = resample_segments([normalised], n=n)[0] * np.float32(size)
        target = polygon2mask((size, size), [resampled.reshape(-1)], color=1, downsample_ratio=4)
        cases.append(dict(polygon=[float(v) for v in polygon.reshape(-1)], size=size, downsample=4, resample=n,
                          target_runs=runs(target)))
    json.dump(dict(cases=cases, opencv=cv2.__version__), open(sys.argv[1], "w"))
    print(f"{len(cases)} cases written to {sys.argv[1]}")


if __name__ == "__main__":
    main()
