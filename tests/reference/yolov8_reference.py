#!/usr/bin/env python3
"""Reference values for kiln's YOLOv8 / YOLOv8-seg modules, from the official `ultralytics` package.

Builds each model from its yaml (random init, no download), gives every BatchNorm non-trivial
statistics and affine parameters (else the outputs prove little), rounds all weights to float16
(so the committed checkpoints stay small) and runs the float32 model on a fixed input.

Writes into tests/fixtures/yolov8/:
  <name>.pt              the state dict (official `model.<i>...` keys, float16)
  <name>.<tensor>.bin    float32 little-endian: the input and the raw head outputs
  reference.json         shapes, file names, and parameter counts of every scale at nc=80

    python3 -m venv ~/.venvs/kiln && ~/.venvs/kiln/bin/pip install torch==2.9.0 ultralytics
    YOLO_OFFLINE=1 ~/.venvs/kiln/bin/python tests/reference/yolov8_reference.py
"""
import importlib.metadata
import json
import os

import numpy as np
import torch
from ultralytics.nn.tasks import DetectionModel, SegmentationModel

OUT = "tests/fixtures/yolov8"
INPUT_SHAPE = (1, 3, 96, 128)  # non-square, multiples of 32


def randomise_batchnorm(model, generator):
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.weight.data = torch.rand(n, generator=generator) + 0.5
            module.bias.data = torch.randn(n, generator=generator) * 0.1
            module.running_mean.data = torch.randn(n, generator=generator) * 0.1
            module.running_var.data = torch.rand(n, generator=generator) + 0.5


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

    generator = torch.Generator().manual_seed(20261122)
    x = torch.rand(INPUT_SHAPE, generator=generator)
    reference["input"] = save_tensor("input", x)
    for name, cls in (("yolov8n", DetectionModel), ("yolov8n-seg", SegmentationModel)):
        torch.manual_seed(0)
        model = cls(f"{name}.yaml", nc=80, verbose=False)
        randomise_batchnorm(model, generator)
        state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
        torch.save(state, f"{OUT}/{name}.pt")
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        model.eval()
        outputs = raw_outputs(model, x)
        reference["models"][name] = {
            "checkpoint": f"{name}.pt",
            "outputs": {key: save_tensor(f"{name}.{key}", value) for key, value in outputs.items()},
        }
    with open(f"{OUT}/reference.json", "w") as f:
        json.dump(reference, f, indent=1)
    print(json.dumps(reference["parameters"], indent=1))


if __name__ == "__main__":
    main()
