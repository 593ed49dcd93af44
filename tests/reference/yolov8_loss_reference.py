#!/usr/bin/env python3
"""Reference values for kiln's YOLOv8 losses, from Ultralytics' own `v8SegmentationLoss` (which runs
`v8DetectionLoss` and its `TaskAlignedAssigner` inside).

Random head outputs (as kiln's `HeadOutput`: per level `[B, 64 + nc, H, W]`, mask coefficients per
level, prototypes) and hand-made targets (overlapping boxes, a box smaller than a stride, an image
with one instance) go through the official loss with instance masks (`overlap_mask=False`, kiln's
layout). Writes into tests/fixtures/yolov8_loss/: the inputs, the assigner's outputs, the loss
parts (box, seg, cls, dfl, with the default gains 7.5 / 7.5 / 0.5 / 1.5) and the gradients of their
sum with respect to every input.

    YOLO_OFFLINE=1 ~/.venvs/kiln/bin/python tests/reference/yolov8_loss_reference.py
"""
import importlib.metadata
import json
import os

import torch
from ultralytics.cfg import get_cfg
from ultralytics.nn.tasks import SegmentationModel
from ultralytics.utils.loss import v8SegmentationLoss

OUT = "tests/fixtures/yolov8_loss"
NC = 3
H, W = 96, 128  # input size, non-square
STRIDES = (8, 16, 32)
NM = 32


def save(name, tensor):
    path = f"{OUT}/{name}.bin"
    tensor.detach().to(torch.float32).contiguous().numpy().astype("<f4").tofile(path)
    return {"file": os.path.basename(path), "shape": list(tensor.shape)}


def ellipse_mask(box, mh, mw):
    """A filled ellipse inscribed in `box` (input pixels), at prototype resolution."""
    x1, y1, x2, y2 = [v / 4 for v in box]
    ys = torch.arange(mh).float()[:, None] + 0.5
    xs = torch.arange(mw).float()[None, :] + 0.5
    cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, max((x2 - x1) / 2, 0.5), max((y2 - y1) / 2, 0.5)
    return (((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1).float()


def main():
    os.makedirs(OUT, exist_ok=True)
    g = torch.Generator().manual_seed(4)
    bs = 2
    levels = [torch.randn(bs, 64 + NC, H // s, W // s, generator=g) for s in STRIDES]
    for level in levels:  # class logits around -1 so scores are neither all high nor all tiny
        level[:, 64:] -= 1.0
    coefficients = [torch.randn(bs, NM, H // s, W // s, generator=g) for s in STRIDES]
    prototypes = torch.randn(bs, NM, H // 4, W // 4, generator=g)
    for t in (*levels, *coefficients, prototypes):
        t.requires_grad_(True)

    # Targets: (image, class, x1, y1, x2, y2) in input pixels.
    targets = [
        (0, 0, 10.0, 12.0, 60.0, 70.0),
        (0, 2, 40.0, 30.0, 110.0, 90.0),  # overlaps the first
        (0, 1, 100.0, 8.0, 111.0, 17.0),  # smaller than a stride on both sides
        (1, 1, 20.5, 20.5, 100.25, 60.75),
    ]
    boxes = torch.tensor([t[2:] for t in targets])
    xywh = torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], 1)
    batch = {
        "batch_idx": torch.tensor([float(t[0]) for t in targets]),
        "cls": torch.tensor([[float(t[1])] for t in targets]),
        "bboxes": xywh / torch.tensor([W, H, W, H]),
        "masks": torch.stack([ellipse_mask(t[2:], H // 4, W // 4) for t in targets]),
    }

    model = SegmentationModel("yolov8n-seg.yaml", nc=NC, verbose=False)
    model.args = get_cfg(overrides={"overlap_mask": False})
    criterion = v8SegmentationLoss(model)
    preds = {
        "boxes": torch.cat([l[:, :64].reshape(bs, 64, -1) for l in levels], 2),
        "scores": torch.cat([l[:, 64:].reshape(bs, NC, -1) for l in levels], 2),
        "feats": levels,
        "mask_coefficient": torch.cat([c.reshape(bs, NM, -1) for c in coefficients], 2),
        "proto": prototypes,
    }
    captured = {}
    criterion.assigner.register_forward_hook(lambda m, i, o: captured.setdefault("assigned", o))
    loss, _ = criterion.loss(preds, batch)
    parts = (loss / bs)[:4]  # box, seg, cls, dfl (the fifth, semantic, is zero for YOLOv8-seg)
    parts.sum().backward()
    _, target_bboxes, target_scores, fg_mask, target_gt_idx = captured["assigned"]

    reference = {
        "generator": "tests/reference/yolov8_loss_reference.py",
        "ultralytics_version": importlib.metadata.version("ultralytics"),
        "torch_version": torch.__version__,
        "num_classes": NC,
        "input_size": [H, W],
        "targets": [list(t) for t in targets],
        "gains": {"box": model.args.box, "cls": model.args.cls, "dfl": model.args.dfl},
        "loss": {"box": parts[0].item(), "seg": parts[1].item(), "cls": parts[2].item(), "dfl": parts[3].item()},
        "inputs": {f"level{i}": save(f"level{i}", l) for i, l in enumerate(levels)}
        | {f"coefficients{i}": save(f"coefficients{i}", c) for i, c in enumerate(coefficients)}
        | {"prototypes": save("prototypes", prototypes), "masks": save("masks", batch["masks"])},
        "assigned": {
            "foreground": save("foreground", fg_mask.float()),
            "target_gt_index": save("target_gt_index", target_gt_idx.float()),
            "target_boxes": save("target_boxes", target_bboxes),
            "target_scores": save("target_scores", target_scores),
        },
        "gradients": {f"level{i}": save(f"grad_level{i}", l.grad) for i, l in enumerate(levels)}
        | {f"coefficients{i}": save(f"grad_coefficients{i}", c.grad) for i, c in enumerate(coefficients)}
        | {"prototypes": save("grad_prototypes", prototypes.grad)},
    }
    with open(f"{OUT}/reference.json", "w") as f:
        json.dump(reference, f, indent=1)
    print(json.dumps(reference["loss"]), "foreground anchors:", int(fg_mask.sum()))


if __name__ == "__main__":
    main()
