"""Reference sentence embeddings for kiln's all-MiniLM-L6-v2 text encoder, from HF transformers.

Run once, offline, from the repository root (kept so the fixture can be rebuilt); the same venv as
tests/reference/grounding_dino_reference.py serves:

    python3 -m venv ~/.cache/kiln/gdino-venv
    ~/.cache/kiln/gdino-venv/bin/pip install torch==2.15.0 numpy==2.4.6 safetensors==0.8.0 \
        transformers==4.40.2 tokenizers==0.19.1
    ~/.cache/kiln/gdino-venv/bin/python tests/reference/minilm_reference.py

The model is the real all-MiniLM-L6-v2 in shared/weights/all-minilm-l6-v2 (BertModel layout
safetensors + tokenizer.json), loaded with `BertModel.from_pretrained` and
`AutoTokenizer.from_pretrained` (no hub access: HF_HUB_OFFLINE=1). For each sentence: the input_ids
of the tokenizer's default call ([CLS] ... [SEP], no padding, no truncation needed) and the
sentence-transformers embedding, i.e. the attention-masked mean of last_hidden_state, L2-normalised
(384 floats, float32 computed, written at full precision). The first sentence's last_hidden_state is
included as well, to localise errors. Writes tests/fixtures/minilm/reference.json.
"""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoTokenizer, BertModel  # noqa: E402

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "minilm")
MINILM = os.environ.get("MINILM_DIR", os.path.join(ROOT, "..", "shared", "weights", "all-minilm-l6-v2"))
if not os.path.isdir(MINILM):
    MINILM = "/work/shared/weights/all-minilm-l6-v2"
MINILM = os.path.abspath(MINILM)

SENTENCES = [
    "A cat sits on the mat.",
    "cat",
    "Traffic light, stop sign; and a bicycle!",
    "The quick brown fox jumps over the lazy dog while 3 dogs bark at 7:45 pm.",
    "I had an espresso at the café near the Louvre.",
    "Unbelievably, the photosynthesizing microorganisms outnumbered everything.",
    "MiXeD CaSe WoRdS ShOuLd Be LoWeReD",
    "What's the defect on this label? Is it a scratch, a dent or a misprint?",
    "ear of bag . defect . label .",
    "Price: $1,299.99 (incl. 20% VAT) -- order #A-1024 shipped 2024-03-15.",
    "naïve résumé façade über straße",
    "A person riding a red bicycle down a narrow cobblestone street in the old town, past shops, "
    "cafés and a fountain, while pigeons scatter and tourists take photographs of the cathedral "
    "tower that rises above the rooftops in the warm evening light.",
]


def main():
    torch.set_num_threads(2)
    os.makedirs(OUT, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    model = BertModel.from_pretrained(MINILM).eval()
    entries = []
    first_hidden = None
    with torch.no_grad():
        for i, sentence in enumerate(SENTENCES):
            enc = tokenizer(sentence, return_tensors="pt")
            hidden = model(**enc).last_hidden_state  # 1 x n x 384
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            emb = torch.nn.functional.normalize(mean, p=2, dim=1)[0]
            ids = enc["input_ids"][0].tolist()
            entries.append({
                "sentence": sentence,
                "tokens": tokenizer.convert_ids_to_tokens(ids),
                "input_ids": ids,
                "embedding": [float(x) for x in emb.tolist()],
            })
            if i == 0:
                first_hidden = hidden[0]
    ref = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (shared/weights/all-minilm-l6-v2)",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "pooling": "attention-masked mean of last_hidden_state, then L2 normalisation",
        "sentences": entries,
        "first_last_hidden_state": {
            "sentence": SENTENCES[0],
            "shape": list(first_hidden.shape),
            "values": [[float(x) for x in row] for row in first_hidden.tolist()],
        },
    }
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1, ensure_ascii=False)
    for e in entries:
        print(len(e["input_ids"]), e["tokens"])


if __name__ == "__main__":
    main()
