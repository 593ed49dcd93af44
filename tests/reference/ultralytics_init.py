"""Fixture for kiln's YOLOv8 start drawn as PyTorch (`YoloConfig::init_drawn_as_pytorch`): the
initial weights of Ultralytics 8.4's own model for a seed.

A training run with `seed=s` seeds every generator with `s` (`BaseTrainer.__init__`:
`init_seeds(self.args.seed + 1 + RANK)`, RANK -1 outside distributed runs) and then builds its
model (`get_model`: `SegmentationModel(cfg, nc=data["nc"], ch=3)`; `DetectionModel` for boxes).
That this is the model a run trains from was checked on a real run's weights captured at
`on_pretrain_routine_end` (benches/parity_replay/capture_ultralytics_init.py): all 417 entries equal. The same is done here
for two configs, and per state-dict entry the shape, the first four and the last value (float32,
written exactly) and the float64 sum and sum of squares are kept: every value then has to match,
not just the distribution. Also `torch.manual_seed(s); torch.empty(n).uniform_(a, b)` for the
generator alone.

    PYTHONPATH=~/.cache/kiln/ultralytics-8.4 ~/.cache/kiln/torch-venv/bin/python \\
        tests/reference/ultralytics_init.py tests/fixtures/ultralytics_init.json
"""
import json
import sys

import torch
from ultralytics.nn.tasks import DetectionModel, SegmentationModel
from ultralytics.utils import RANK
from ultralytics.utils.torch_utils import init_seeds

CASES = [("yolov8n-seg.yaml", SegmentationModel, 4, 0), ("yolov8n.yaml", DetectionModel, 3, 7)]


def floats(t):
    return [float(v) for v in t.reshape(-1).tolist()]


def model_entries(cfg, cls, nc, seed):
    init_seeds(seed + 1 + RANK, deterministic=True)
    model = cls(cfg, nc=nc, ch=3, verbose=False)
    entries = {}
    for key, value in model.state_dict().items():
        if not value.is_floating_point():
            continue  # num_batches_tracked
        flat = value.detach().reshape(-1)
        entries[key] = {
            "shape": list(value.shape),
            "first": floats(flat[:4]),
            "last": float(flat[-1]),
            "sum": float(flat.double().sum()),
            "sum_of_squares": float((flat.double() ** 2).sum()),
        }
    return {"config": cfg, "classes": nc, "seed": seed, "torch_seed": seed + 1 + RANK, "entries": entries}


def main(out):
    torch.manual_seed(3)
    uniform = floats(torch.empty(1000).uniform_(-0.25, 0.75))
    fixture = {
        "torch": torch.__version__,
        "uniform": {"seed": 3, "from": -0.25, "to": 0.75, "values": uniform},
        "models": [model_entries(*case) for case in CASES],
    }
    with open(out, "w") as f:
        json.dump(fixture, f)
    print(out, sum(len(m["entries"]) for m in fixture["models"]), "entries")


main(sys.argv[1])
