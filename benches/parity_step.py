#!/usr/bin/env python3
"""Step-by-step parity of kiln's student training with Ultralytics 8.4 (issue "student training that
learns as fast per epoch as Ultralytics"): the same initial weights, the same batch, the same
settings, and the losses and weights compared after every optimiser step.

Data: 8 images of 256 px with up to three axis-aligned rectangles each, corners on the 4-pixel grid
of the mask prototypes, so that every rasteriser (Ultralytics draws polygons at full size and
shrinks them with cv2.resize; kiln samples the cell centres) makes the same mask targets. Initial
weights: Ultralytics' yolov8n-seg for 4 classes under torch.manual_seed(0), saved as a .pt both
tools load. Settings: one batch of 8 (so the order of the images does not matter), no
augmentation, nbs=8 (a step per batch), no warm-up, AdamW lr0 0.003, EPOCHS epochs.

    PYTHONPATH=~/.cache/kiln/ultralytics-8.4 ~/.cache/kiln/torch-venv/bin/python benches/parity_step.py OUT \
        --kiln ~/.cache/kiln/target-gpu/debug/kiln --device tch-cpu [--layout dense]

`--layout dense` puts up to 14 rectangles in each image, from 7 px (under the assigner's 8-px
stride) and touching one another, as a mosaic does: the assigner with many objects per image, tiny
boxes widened to the stride, anchors claimed by several objects.

(`eval "$(scripts/libtorch.sh)"` first for a tch build.) Prints both tools' losses per step and,
after the first and the last step, how far kiln's weight update is from Ultralytics' (the norm of
the difference over the norm of Ultralytics' update, per tensor). Exits 1 when the first step's
losses differ by more than 1e-4 relative or its update by more than 1e-3: the forward, the loss,
the backward, clipping, AdamW with its parameter groups, BatchNorm or the EMA then differ.
About 1 minute.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

SETTINGS = dict(imgsz=256, batch=8, lr0=0.003, nbs=8, warmup_epochs=0)
NO_AUGMENT = dict(mosaic=0, scale=0, translate=0, hsv_h=0, hsv_s=0, hsv_v=0, fliplr=0)


def make_data(out: Path, layout: str):
    from PIL import Image

    rng = np.random.default_rng(5)
    colors = [(220, 40, 40), (40, 200, 60), (50, 80, 230), (230, 210, 40)]
    images, annotations = [], []
    (out / "images").mkdir(parents=True, exist_ok=True)
    # sparse: up to 3 rectangles of 3+ cells, apart; dense: up to 14 of 1+ cells (boxes from 7 px,
    # under the assigner's 8-px stride), touching but not overlapping, as in a mosaic.
    count, least, gap = (3, 3, 4) if layout == "sparse" else (14, 1, -1)
    for i in range(8):
        pixels = rng.integers(60, 140, (256, 256, 3)).astype(np.uint8)
        taken = []
        for _ in range(count):
            for _ in range(100):
                a, b = sorted(int(v) for v in rng.integers(1, 62, 2))
                c, d = sorted(int(v) for v in rng.integers(1, 62, 2))
                if b - a < least or d - c < least or (layout == "dense" and (b - a) * (d - c) > 200):
                    continue
                # Pixels 4a..4b+3: cell k's centre (4k+2) and Ultralytics' samples (4k+1, 4k+2)
                # are inside exactly for k in a..b.
                x1, x2, y1, y2 = 4 * a, 4 * b + 3, 4 * c, 4 * d + 3
                if any(not (x2 < p[0] - gap or x1 > p[2] + gap or y2 < p[1] - gap or y1 > p[3] + gap) for p in taken):
                    continue
                taken.append((x1, y1, x2, y2))
                cls = int(rng.integers(0, 4))
                pixels[y1:y2, x1:x2] = colors[cls]
                annotations.append(
                    dict(id=len(annotations) + 1, image_id=i + 1, category_id=cls + 1, bbox=[x1, y1, x2 - x1, y2 - y1],
                         area=(x2 - x1) * (y2 - y1), iscrowd=0, segmentation=[[x1, y1, x2, y1, x2, y2, x1, y2]]))
                break
        Image.fromarray(pixels).save(out / "images" / f"r{i}.png")
        images.append(dict(id=i + 1, file_name=f"r{i}.png", width=256, height=256))
    categories = [dict(id=k + 1, name=f"c{k}") for k in range(4)]
    (out / "annotations.json").write_text(json.dumps(dict(images=images, annotations=annotations, categories=categories)))


def run_ultralytics(out: Path, epochs: int):
    import torch
    from safetensors.torch import save_file
    from ultralytics import YOLO
    from ultralytics.nn.tasks import SegmentationModel

    sys.path.insert(0, str(Path(__file__).parent))
    from student_train_baseline import convert

    torch.manual_seed(0)
    net = SegmentationModel("yolov8n-seg.yaml", nc=4, verbose=False)
    torch.save({"model": net}, out / "w0.pt")
    tensors = lambda sd: {k: v.detach().float().contiguous() for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    save_file(tensors(net.state_dict()), out / "w0.safetensors")
    yolo = out / "yolo"
    index = {k + 1: k for k in range(4)}
    for split in ("train", "val"):
        convert(out / "data/annotations.json", out / "data/images", yolo, split, index)
    (yolo / "data.yaml").write_text(
        f"path: {yolo}\ntrain: images/train\nval: images/val\nnames:\n" + "".join(f"  {k}: c{k}\n" for k in range(4)))
    losses = []

    def dump(trainer):
        step = trainer.epoch + 1
        save_file(tensors(trainer.ema.ema.state_dict()), out / f"ultralytics-ema-{step}.safetensors")
        losses.append([float(trainer.tloss[k]) for k in ("box_loss", "seg_loss", "cls_loss", "dfl_loss")])

    model = YOLO("yolov8n-seg.yaml")
    model.add_callback("on_train_epoch_end", dump)
    model.train(data=str(yolo / "data.yaml"), epochs=epochs, optimizer="AdamW", **SETTINGS, **NO_AUGMENT,
                device="cpu", workers=0, project=str(out), name="ultralytics", exist_ok=True,
                pretrained=str(out / "w0.pt"), amp=False, plots=False, seed=0, deterministic=True, verbose=False,
                val=False, close_mosaic=0)
    return losses


def run_kiln(out: Path, kiln: str, device: str, epochs: int):
    run = out / f"kiln-{epochs}"
    shutil.rmtree(run, ignore_errors=True)
    flags = [f"augment.{k}=0" for k in NO_AUGMENT] + [f"weights={out / 'w0.pt'}", "nbs=8", "warmup_epochs=0"]
    command = [kiln, "train-student", "--data", str(out / "data/annotations.json"), "--val",
               str(out / "data/annotations.json"), "--epochs", str(epochs), "--batch-size", "8", "--imgsz", "256",
               "--optimizer", "adamw", "--lr0", "0.003", "--seed", "0", "--device", device, "--output", str(run)]
    for flag in flags:
        command += ["--set", flag]
    with open(f"{run}.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    rows = [line.split(",") for line in (run / "results.csv").read_text().splitlines()]
    header = rows[0]
    return run, [[float(r[header.index(f"train/{k}")]) for k in ("box_loss", "seg_loss", "cls_loss", "dfl_loss")]
                 for r in rows[1:]]


def update_difference(kiln_file: Path, ultralytics_file: Path, initial_file: Path):
    from safetensors.numpy import load_file

    kiln, ultra, initial = load_file(kiln_file), load_file(ultralytics_file), load_file(initial_file)
    differences = []
    for key, theirs in ultra.items():
        if key not in kiln or key not in initial or "running" in key:
            continue
        theirs_update = theirs.astype(np.float64) - initial[key]
        ours_update = kiln[key].astype(np.float64) - initial[key]
        norm = np.linalg.norm(theirs_update)
        if norm > 0:
            differences.append((np.linalg.norm(ours_update - theirs_update) / norm, key))
    differences.sort()
    return differences


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--kiln", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--layout", choices=["sparse", "dense"], default="sparse",
                        help="dense: up to 14 rectangles per image, from 7 px, touching (mosaic-like)")
    args = parser.parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    import torch

    torch.set_num_threads(2)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "data/annotations.json").exists():
        make_data(out / "data", args.layout)
    theirs = run_ultralytics(out, args.epochs)
    _, first_ours = run_kiln(out, args.kiln, args.device, 1)
    last_run, ours = run_kiln(out, args.kiln, args.device, args.epochs)
    print("step | kiln box / seg / cls / dfl | Ultralytics box / seg / cls / dfl")
    for step, (k, u) in enumerate(zip(ours, theirs), 1):
        print(f"{step:4} | {' / '.join(f'{v:.4f}' for v in k)} | {' / '.join(f'{v:.4f}' for v in u)}")
    failed = False
    first_loss = max(abs(k - u) / abs(u) for k, u in zip(first_ours[0], theirs[0]))
    print(f"step 1 losses: largest relative difference {first_loss:.2e}")
    failed |= first_loss > 1e-4
    for step, run in ((1, out / "kiln-1"), (args.epochs, last_run)):
        diffs = update_difference(run / "weights/last.safetensors", out / f"ultralytics-ema-{step}.safetensors",
                                  out / "w0.safetensors")
        median = float(np.median([d for d, _ in diffs]))
        worst = diffs[-1]
        print(f"after step {step}: kiln's update vs Ultralytics' (|diff| / |theirs| per tensor): median {median:.2e}, "
              f"largest {worst[0]:.2e} ({worst[1]})")
        if step == 1:
            failed |= median > 1e-3
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
