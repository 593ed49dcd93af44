#!/usr/bin/env python3
"""Reference values for kiln's YOLOv8 / YOLOv8-seg modules, from the official `ultralytics` package.

Builds each model from its yaml (random init, no download), gives every BatchNorm non-trivial
statistics and affine parameters (else the outputs prove little), rounds all weights to float16
(so the committed checkpoints stay small) and runs the float32 model on a fixed input.

Writes into tests/fixtures/yolov8/:
  <name>.pt              float16 weights: yolov8n as Ultralytics ships checkpoints (the pickled
                         model object under "model"), yolov8n-seg as a plain state dict
  <name>.<tensor>.bin    float32 little-endian: the input, the raw head outputs, the decoded output
  reference.json         shapes, file names, parameter counts of every scale at nc=80, GFLOPs at
                         640 (n and s, fused as Ultralytics reports them), and the
                         final detections (original-image boxes, scores, classes; masks as RLE)

    python3 -m venv ~/.venvs/kiln && ~/.venvs/kiln/bin/pip install torch==2.9.0 ultralytics
    YOLO_OFFLINE=1 ~/.venvs/kiln/bin/python tests/reference/yolov8_reference.py
"""
import copy
import importlib.metadata
import json
import os

import numpy as np
import torch
from ultralytics.nn.tasks import DetectionModel, SegmentationModel
from pycocotools import mask as mask_utils
from ultralytics.utils import nms, ops
from ultralytics.utils.torch_utils import get_flops

OUT = "tests/fixtures/yolov8"
INPUT_SHAPE = (1, 3, 96, 128)  # non-square, multiples of 32
# The input is a real photo (random features of a random input are nearly constant in space, so
# scores would tie): coco8-seg's 000000000025.jpg, 426x640, letterboxed to 96x128 (5 rows of padding
# on top, 6 below) by Ultralytics' own LetterBox.
IMAGE = "../shared/data/coco8-seg/images/train/000000000025.jpg"
ORIGINAL_SHAPE = (426, 640)
IOU = 0.7
MAX_DET = 300


def randomise_batchnorm(model, generator):
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.weight.data = torch.rand(n, generator=generator) + 0.5
            module.bias.data = torch.randn(n, generator=generator) * 0.1
            module.running_mean.data = torch.randn(n, generator=generator) * 0.1
            module.running_var.data = torch.rand(n, generator=generator) + 0.5


def randomise_head_biases(model, generator):
    """Ultralytics initialises the class biases for 640 px images of 80 rare classes (scores ~1e-4)
    and the box biases to 2.0; spread them so the random model scores and places boxes diversely.
    The features of a random network barely vary across the image, so the class convolution gets
    large weights (std 0.5): otherwise the class biases alone rank the anchors and many tie."""
    head = model.model[-1]
    for branch in head.cv2:
        branch[-1].weight.data *= 0.1
        branch[-1].bias.data = torch.randn(branch[-1].bias.shape, generator=generator) * 2.0
    for branch in head.cv3:
        branch[-1].weight.data = torch.randn(branch[-1].weight.shape, generator=generator) * 0.5
        branch[-1].bias.data = torch.randn(branch[-1].bias.shape, generator=generator) * 0.5 - 4.0
    for branch in getattr(head, "cv4", []):
        branch[-1].bias.data = torch.randn(branch[-1].bias.shape, generator=generator)


def save_tensor(name, tensor):
    path = f"{OUT}/{name}.bin"
    tensor.detach().to(torch.float32).contiguous().numpy().astype("<f4").tofile(path)
    return {"file": os.path.basename(path), "shape": list(tensor.shape)}


def raw_outputs(model, x):
    """The head's raw outputs, computed from the features it receives."""
    head = model.model[-1]
    captured = {}
    hook = head.register_forward_hook(lambda m, inputs, output: captured.setdefault("features", inputs[0]))
    with torch.no_grad():
        model(x)
    hook.remove()
    features = captured["features"]
    outputs = {}
    with torch.no_grad():
        for i, f in enumerate(features):
            outputs[f"level{i}"] = torch.cat([head.cv2[i](f), head.cv3[i](f)], 1)
            if hasattr(head, "cv4"):
                outputs[f"coefficients{i}"] = head.cv4[i](f)
        if hasattr(head, "proto"):
            outputs["prototypes"] = head.proto(features[0])
    return outputs


def postprocess(model, x, segment):
    """Ultralytics' predictor path: decode, NMS, masks (process_mask at input size, then
    scale_masks to the original image), boxes scaled to the original image."""
    with torch.no_grad():
        out = model(x)
    y, proto = (out[0][0], out[0][1]) if segment else (out[0], None)
    # This random-weight model scores many anchors almost alike, and NMS's order among equal
    # scores is the sort's business, not a fact to compare. The confidence threshold is set just
    # above the first score within 1e-6 of the next one (at most the 40 best), so every candidate
    # has a score of its own.
    nc = 80
    best = y[0, 4 : 4 + nc].amax(0).sort(descending=True).values
    cut = 40
    for k in range(1, 41):
        if best[k - 1] - best[k] < 1e-6:
            cut = k - 1
            break
    conf = float((best[cut - 1] + best[cut]) / 2)
    kept = nms.non_max_suppression(y, conf, IOU, max_det=MAX_DET, nc=nc)[0]
    result = {"decoded": y, "conf": conf, "boxes_input": kept[:, :4].clone()}
    boxes = ops.scale_boxes(x.shape[2:], kept[:, :4].clone(), ORIGINAL_SHAPE)
    result["detections"] = torch.cat([boxes, kept[:, 4:6]], 1)
    if segment:
        masks = ops.process_mask(proto[0], kept[:, 6:], kept[:, :4], x.shape[2:], upsample=True)
        masks = ops.scale_masks(masks[None].float(), ORIGINAL_SHAPE)[0] > 0.5
        result["masks"] = [
            mask_utils.encode(np.asfortranarray(m.numpy().astype(np.uint8)))["counts"].decode("ascii") for m in masks
        ]
    return result


def multi_label_nms(generator):
    """The validator's NMS (`DetectionValidator.postprocess`: `multi_label=True`, every class above
    the threshold at an anchor is a candidate) on 60 random anchors of 3 classes with distinct
    scores, overlapping boxes and 2 mask coefficients."""
    anchors, nc = 60, 3
    centres = torch.rand(2, anchors, generator=generator) * 100
    sizes = 10 + torch.rand(2, anchors, generator=generator) * 30
    scores = torch.rand(nc, anchors, generator=generator)
    coefficients = torch.randn(2, anchors, generator=generator)
    y = torch.cat([centres, sizes, scores, coefficients])[None]
    conf, iou = 0.4, 0.5
    kept = nms.non_max_suppression(y, conf, iou, max_det=MAX_DET, nc=nc, multi_label=True)[0]
    assert kept[:, 5].unique().numel() > 1 and len(kept) > 10
    return {"decoded": y[0].tolist(), "classes": nc, "conf": conf, "iou": iou, "detections": kept[:, :6].tolist()}


def main():
    os.makedirs(OUT, exist_ok=True)
    reference = {
        "generator": "tests/reference/yolov8_reference.py",
        "ultralytics_version": importlib.metadata.version("ultralytics"),
        "torch_version": torch.__version__,
        "input_shape": list(INPUT_SHAPE),
        "models": {},
        "parameters": {},
    }
    for scale in "nsmlx":
        for suffix, cls in (("", DetectionModel), ("-seg", SegmentationModel)):
            model = cls(f"yolov8{scale}{suffix}.yaml", nc=80, verbose=False)
            reference["parameters"][f"yolov8{scale}{suffix}"] = sum(p.numel() for p in model.parameters())
            if scale in "ns":
                model.eval().fuse(verbose=False)  # as Ultralytics reports it: BatchNorm folded
                reference.setdefault("gflops_640", {})[f"yolov8{scale}{suffix}"] = get_flops(model, 640)

    generator = torch.Generator().manual_seed(20261122)
    import cv2
    from ultralytics.data.augment import LetterBox

    bgr = cv2.imread(IMAGE)
    assert bgr.shape[:2] == ORIGINAL_SHAPE
    boxed = LetterBox(INPUT_SHAPE[2:], auto=False, stride=32)(image=bgr)
    x = torch.from_numpy(boxed[..., ::-1].copy()).permute(2, 0, 1)[None].float() / 255.0
    assert tuple(x.shape) == INPUT_SHAPE
    reference["input"] = save_tensor("input", x)
    for name, cls in (("yolov8n", DetectionModel), ("yolov8n-seg", SegmentationModel)):
        torch.manual_seed(0)
        model = cls(f"{name}.yaml", nc=80, verbose=False)
        randomise_batchnorm(model, generator)
        randomise_head_biases(model, generator)
        state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
        if name == "yolov8n":
            # As Ultralytics ships its checkpoints (yolov8n.pt): the whole model object, half precision.
            torch.save({"epoch": -1, "model": copy.deepcopy(model).half(), "ema": None}, f"{OUT}/{name}.pt")
        else:  # a plain state dict
            torch.save(state, f"{OUT}/{name}.pt")
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        model.eval()
        outputs = raw_outputs(model, x)
        post = postprocess(model, x, name.endswith("-seg"))
        reference["models"][name] = {
            "checkpoint": f"{name}.pt",
            "outputs": {key: save_tensor(f"{name}.{key}", value) for key, value in outputs.items()},
            "decoded": save_tensor(f"{name}.decoded", post["decoded"]),
            "conf": post["conf"],
            "iou": IOU,
            "max_det": MAX_DET,
            "original_shape": list(ORIGINAL_SHAPE),
            "detections": post["detections"].tolist(),
        }
        if "masks" in post:  # compressed COCO RLE at the original size
            reference["models"][name]["masks"] = post["masks"]
    reference["multi_label_nms"] = multi_label_nms(generator)
    with open(f"{OUT}/reference.json", "w") as f:
        json.dump(reference, f, indent=1)
    print(json.dumps(reference["parameters"], indent=1))


if __name__ == "__main__":
    main()
