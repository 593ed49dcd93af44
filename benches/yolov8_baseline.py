#!/usr/bin/env python3
"""The baseline of the YOLOv8 bench: yolov8n-seg forward at 640x640, batch 1, in PyTorch and in
ONNX Runtime on this machine's CPU, both limited to 2 threads, in one run.

    ~/.venvs/kiln/bin/pip install torch==2.9.0 ultralytics onnx onnxruntime onnxslim
    YOLO_OFFLINE=1 ~/.venvs/kiln/bin/python benches/yolov8_baseline.py
"""
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from ultralytics import YOLO

THREADS = 2
RUNS = 20


def timed(fn, runs=RUNS, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), sorted(times)[int(0.9 * (len(times) - 1))]


def main():
    torch.set_num_threads(THREADS)
    model = YOLO("yolov8n-seg.yaml")  # random init, no download; latency does not depend on weights
    net = model.model.eval().fuse(verbose=False)
    x = torch.rand(1, 3, 640, 640)
    with torch.no_grad():
        median, p90 = timed(lambda: net(x))
    print(f"PyTorch {torch.__version__} (fused, {THREADS} threads): median {median:.1f} ms, p90 {p90:.1f} ms")

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        model.save(os.path.join(tmp, "yolov8n-seg.pt"))
        path = YOLO(os.path.join(tmp, "yolov8n-seg.pt")).export(format="onnx", imgsz=640, opset=17, simplify=True)
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.numpy().astype(np.float32)}
        median, p90 = timed(lambda: session.run(None, feed))
    print(f"ONNX Runtime {ort.__version__} ({THREADS} threads): median {median:.1f} ms, p90 {p90:.1f} ms")


if __name__ == "__main__":
    main()
