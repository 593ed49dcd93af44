#!/usr/bin/env python3
"""Baseline of the training-step bench: one YOLOv8n-seg training step at 320x320, batch 8, in
PyTorch with Ultralytics' own v8SegmentationLoss and SGD (forward, loss, backward, update), on this
machine's CPU with 2 threads, and the same three objects per image as benches/train_step.rs.

    YOLO_OFFLINE=1 ~/.venvs/kiln/bin/python benches/train_step_baseline.py
"""
import statistics
import time

import torch
from ultralytics.cfg import get_cfg
from ultralytics.nn.tasks import SegmentationModel
from ultralytics.utils.loss import v8SegmentationLoss

THREADS, BATCH, SIZE, RUNS = 2, 8, 320, 10


def main():
    torch.set_num_threads(THREADS)
    model = SegmentationModel("yolov8n-seg.yaml", nc=3, verbose=False)
    model.args = get_cfg(overrides={"overlap_mask": False})
    model.train()
    criterion = v8SegmentationLoss(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.937, nesterov=True, weight_decay=5e-4)
    images = torch.rand(BATCH, 3, SIZE, SIZE)
    boxes, classes, index, masks = [], [], [], []
    ms = SIZE // 4
    ys, xs = torch.meshgrid(torch.arange(ms) + 0.5, torch.arange(ms) + 0.5, indexing="ij")
    for b in range(BATCH):
        for k in range(3):
            x1, y1 = 20.0 + 80.0 * k + b, 30.0 + 60.0 * k
            x2, y2 = x1 + 70.0, y1 + 90.0
            boxes.append([(x1 + x2) / 2 / SIZE, (y1 + y2) / 2 / SIZE, (x2 - x1) / SIZE, (y2 - y1) / SIZE])
            classes.append([float(k)])
            index.append(float(b))
            cx, cy, rx, ry = (x1 + x2) / 8, (y1 + y2) / 8, (x2 - x1) / 8, (y2 - y1) / 8
            masks.append((((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1).float())
    batch = {
        "batch_idx": torch.tensor(index),
        "cls": torch.tensor(classes),
        "bboxes": torch.tensor(boxes),
        "masks": torch.stack(masks),
    }

    def step():
        optimizer.zero_grad()
        loss, _ = criterion(model(images), batch)
        loss.sum().backward()
        optimizer.step()

    for _ in range(2):
        step()
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(f"PyTorch {torch.__version__}, {THREADS} threads: yolov8n-seg train step, batch {BATCH}, {SIZE}x{SIZE}: "
          f"median {statistics.median(times) * 1000:.0f} ms, min {min(times) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
