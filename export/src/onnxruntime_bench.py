# kiln bench for ONNX files: ONNX Runtime (CPU) latency of one model, as JSON on stdout.
# usage: python -c <this> MODEL RUNS WARMUP THREADS
import json, resource, sys, time
import numpy as np
import onnxruntime as ort

model, runs, warmup, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
options = ort.SessionOptions()
if threads > 0:
    options.intra_op_num_threads = threads
session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
i = session.get_inputs()[0]
shape = [d if isinstance(d, int) else 1 for d in i.shape]
dtype = np.float16 if i.type == "tensor(float16)" else np.float32
x = np.random.RandomState(0).rand(*shape).astype(dtype)
for _ in range(warmup):
    session.run(None, {i.name: x})
times = []
for _ in range(runs):
    start = time.perf_counter()
    session.run(None, {i.name: x})
    times.append(time.perf_counter() - start)
print(json.dumps({"times": times, "batch": shape[0], "input": shape, "version": ort.__version__,
                  "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
