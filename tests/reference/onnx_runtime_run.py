"""Runs an ONNX model in ONNX Runtime (CPU) on one input for kiln's export tests.

usage: onnx_runtime_run.py MODEL INPUT.bin OUT_DIR SHAPE
INPUT.bin holds float32 little-endian values of SHAPE (comma-separated); a batch larger than the
model's fixed one runs a batch at a time. The input is cast to the
model's input type (float16 for --half exports). Writes OUT_DIR/<output>.bin (float32) per output
and OUT_DIR/outputs.json (names, shapes, input names, custom metadata).
"""
import json
import os
import sys

import numpy as np
import onnxruntime as ort

model, input_file, out_dir, shape = sys.argv[1:5]
shape = [int(d) for d in shape.split(",")]
options = ort.SessionOptions()
options.intra_op_num_threads = 2
session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
inputs = session.get_inputs()
dtype = np.float16 if inputs[0].type == "tensor(float16)" else np.float32
x = np.fromfile(input_file, dtype="<f4").reshape(shape).astype(dtype)
batch = inputs[0].shape[0]
if isinstance(batch, int) and x.shape[0] > batch:
    # More images than the model's fixed batch: run them a batch at a time.
    parts = [session.run(None, {inputs[0].name: x[i:i + batch]}) for i in range(0, x.shape[0], batch)]
    results = [np.concatenate(outs, axis=0) for outs in zip(*parts)]
else:
    results = session.run(None, {inputs[0].name: x})
os.makedirs(out_dir, exist_ok=True)
summary = {
    "inputs": [i.name for i in inputs],
    "metadata": session.get_modelmeta().custom_metadata_map,
    "outputs": [],
}
for meta, value in zip(session.get_outputs(), results):
    file = meta.name + ".bin"
    np.asarray(value, dtype="<f4").tofile(os.path.join(out_dir, file))
    summary["outputs"].append({"name": meta.name, "shape": list(value.shape), "file": file})
with open(os.path.join(out_dir, "outputs.json"), "w") as f:
    json.dump(summary, f)
