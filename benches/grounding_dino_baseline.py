"""PyTorch baseline for `benches/grounding_dino.rs`: the official GroundingDINO Swin-T OGC (IDEA-Research
`groundingdino-py` 0.4.0, random weights, bert-base-uncased shape) forward pass at the official
800 x 1333 input with the caption "cat . dog .", on this machine's CPU with 2 threads. Median of 3 runs
after one warm-up. Same environment as tests/reference/grounding_dino_reference.py (see its docstring):

    ~/.cache/kiln/gdino-venv/bin/python benches/grounding_dino_baseline.py
"""

import os
import statistics
import sys
import time
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SRC = os.environ.get("GROUNDINGDINO_SRC", os.path.expanduser("~/.cache/kiln/groundingdino-src/groundingdino-py-0.4.0"))
MINILM = os.environ.get("MINILM_DIR", "/work/shared/weights/all-minilm-l6-v2")
sys.path.insert(0, SRC)

import torch  # noqa: E402
from transformers import AutoTokenizer, BertConfig, BertModel  # noqa: E402

import groundingdino.models.GroundingDINO.groundingdino as gd_main  # noqa: E402
from groundingdino.util import get_tokenlizer  # noqa: E402
from groundingdino.util.slconfig import SLConfig  # noqa: E402

torch.set_num_threads(2)
cfg = SLConfig.fromfile(os.path.join(SRC, "groundingdino", "config", "GroundingDINO_SwinT_OGC.py"))
args = types.SimpleNamespace(**cfg._cfg_dict.to_dict())
args.use_checkpoint = False
args.use_transformer_ckpt = False
# No download: the bert-base-uncased vocabulary (MiniLM's tokenizer is the same) and a random BERT-base.
get_tokenlizer.get_tokenlizer = lambda _t: AutoTokenizer.from_pretrained(MINILM)
get_tokenlizer.get_pretrained_language_model = lambda _t: BertModel(BertConfig())
torch.manual_seed(0)
model = gd_main.build_groundingdino(args).eval()
image = torch.randn(1, 3, 800, 1333)
times = []
with torch.no_grad():
    model(image, captions=["cat . dog ."])
    for _ in range(3):
        start = time.perf_counter()
        out = model(image, captions=["cat . dog ."])
        times.append(time.perf_counter() - start)
print(f"GroundingDINO Swin-T OGC forward, 800x1333, PyTorch {torch.__version__}, 2 threads: "
      f"median {statistics.median(times):.2f} s (runs {', '.join(f'{t:.2f}' for t in times)})")
