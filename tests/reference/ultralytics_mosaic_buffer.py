"""Fixture for kiln's mosaic buffer (`kiln_training::data::MosaicBuffer`): which images Ultralytics
8.4's mosaic draws its partners from, after each sample's own image is loaded.

Ultralytics' `BaseDataset.load_image` itself (not a copy) runs on a stand-in dataset of tiny images,
fed a fixed sequence of sample images (three shuffled epochs of 20 images), with the buffer length
a loader of batch 2 gets (`min(images, batch * 8, 1000)` = 16) and a short one (4). The buffer after
each load is what `Mosaic.get_indexes` draws from (`random.choices(list(self.dataset.buffer), k=3)`).

    PYTHONPATH=~/.cache/kiln/ultralytics-8.4 ~/.cache/kiln/torch-venv/bin/python \\
        tests/reference/ultralytics_mosaic_buffer.py tests/fixtures/ultralytics_mosaic_buffer.json
"""
import json
import sys
import tempfile
import types
from pathlib import Path

import cv2
import numpy as np
from ultralytics.data.base import BaseDataset

IMAGES = 20


def trajectory(files, sequence, capacity):
    stand_in = types.SimpleNamespace(
        ims=[None] * len(files),
        im_files=[str(f) for f in files],
        npy_files=[f.with_suffix(".npy") for f in files],
        im_hw0=[None] * len(files),
        im_hw=[None] * len(files),
        cache=None,
        cv2_flag=cv2.IMREAD_COLOR,
        imgsz=8,
        augment=True,
        buffer=[],
        max_buffer_length=capacity,
        channels=3,
        prefix="",
    )
    buffers = []
    for i in sequence:
        BaseDataset.load_image(stand_in, i)
        buffers.append(list(stand_in.buffer))
    return buffers


def main():
    out = Path(sys.argv[1])
    rng = np.random.default_rng(0)
    sequence = [int(i) for _ in range(3) for i in rng.permutation(IMAGES)]
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i in range(IMAGES):
            files.append(Path(tmp) / f"{i:02d}.png")
            cv2.imwrite(str(files[-1]), np.full((8, 8, 3), i, np.uint8))
        cases = [{"capacity": c, "buffers": trajectory(files, sequence, c)} for c in (16, 4)]
    out.write_text(json.dumps({"images": IMAGES, "sequence": sequence, "cases": cases}))
    print("wrote", out, [len(c["buffers"][-1]) for c in cases])


if __name__ == "__main__":
    main()
