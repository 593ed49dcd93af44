"""Reference numbers for kiln's GroundingDINO from the official IDEA-Research code (`groundingdino-py`).

Run once, offline, from the repository root (kept so the fixtures can be rebuilt). The official code
is only imported, never copied: its source distribution is unpacked outside the repository and put
on sys.path (its C++/CUDA `_C` extension is not built and not needed: this version's
`MultiScaleDeformableAttention` always runs `multi_scale_deformable_attn_pytorch`).

    python3 -m venv ~/.cache/kiln/gdino-venv
    ~/.cache/kiln/gdino-venv/bin/pip install torch==2.15.0 torchvision==0.29.2 numpy==2.4.6 \
        safetensors==0.8.0 transformers==4.40.2 tokenizers==0.19.1 timm==1.0.31 addict==2.4.0 \
        yapf==0.43.0 matplotlib==3.11.2 pycocotools==2.0.11 opencv-python-headless==5.0.0.93
    ~/.cache/kiln/gdino-venv/bin/pip download --no-deps --no-binary :all: groundingdino-py==0.4.0 -d /tmp/gd
    mkdir -p ~/.cache/kiln/groundingdino-src && tar xzf /tmp/gd/groundingdino-py-0.4.0.tar.gz -C ~/.cache/kiln/groundingdino-src
    ~/.cache/kiln/gdino-venv/bin/python tests/reference/grounding_dino_reference.py

(matplotlib, pycocotools and OpenCV are only there because `groundingdino.py` imports the official
visualizer at module level; GROUNDINGDINO_SRC overrides where the unpacked source is looked for.)
The text encoder is the real all-MiniLM-L6-v2 in shared/weights/all-minilm-l6-v2 (BertModel layout),
passed to the official code as `text_encoder_type` = that directory (its `get_tokenlizer` and
`get_pretrained_language_model` accept a directory). Nothing is downloaded: HF_HUB_OFFLINE=1.

Tiny model (kiln's tiny config, Rust builds the same): Swin (patch 4, embed 16, depths [2,2,2,2],
heads [1,2,4,8], window 7, MLP ratio 4, qkv bias, no APE, patch norm, out_indices (1,2,3), no drop
path), MiniLM text encoder + feat_map 384 -> 64, hidden 64, 4 heads, 2 + 2 layers, 4 + 4 points,
FFN 128 (text enhancer: 2 heads, FFN 64; fusion: embed 64, 2 heads), 4 levels, 30 queries, two-stage
"standard", unshared two-stage heads, shared decoder box head, embed_init_tgt, sine position
embedding (32 per axis, temperature 20, normalised). The official `build_groundingdino(args)` and
`build_transformer(args)` build it from an args namespace holding the SwinT_OGC values with these
sizes changed; only `build_backbone` is replaced, by the same Joiner(SwinTransformer,
PositionEmbeddingSineHW) built with the tiny widths (the official one only knows the named Swins).

Two official constants assume d_model = 256 and are patched to their d_model generalisation (the
one HF transformers' GroundingDINO uses); both reduce to the official code at d_model = 256, which
the script checks:
  * the decoder's query sine embedding `gen_sineembed_for_position` uses 128 features per
    coordinate -> d_model / 2 (here 32; the 4-d reference box gives 2 * d_model = 128 features for
    `ref_point_head`, which the official code already sizes as 2 * d_model);
  * the text enhancer's position embedding `get_sine_pos_embed(position_ids, num_pos_feats=256)` ->
    num_pos_feats = d_model (temperature 10000, no x/y exchange).
`use_checkpoint`/`use_transformer_ckpt` are off in the tiny build (gradient checkpointing only; no
parameter or numeric effect, and the torch of today rejects the official calls' missing
`use_reentrant`).

Weights: torch.manual_seed(0), official init, then every float parameter outside `bert.*` is
re-randomised in `named_parameters()` order so that no path is trivially zero: matrices and convs
uniform(+-sqrt(3 / fan_in)), fan_in = numel / shape[0]; biases normal(0, 0.1); LayerNorm/GroupNorm
weights 1 + uniform(+-0.2); fusion gamma_v/gamma_l uniform(0.3, 0.7); relative_position_bias_table
normal(0, 0.5); level_embed and tgt_embed normal(0, 1); MSDA sampling_offsets bias normal(0, 1).
The BERT weights stay the real MiniLM ones. Saved as tiny_minilm.pth in the official checkpoint
layout: {"model": {"module." + key: tensor}}, BERT keys left out (Rust loads MiniLM from shared/).

Input: torch.manual_seed(1); image = randn(1, 3, 136, 170) (already normalised), mask all False,
caption "cat . dog . traffic light .". Everything is recorded from the official modules (forward
hooks, or the official forward's own one-line head code on the hooked tensors) as little-endian
float32 row-major .bin files listed in reference.json (name -> {"file", "shape"}); integers go
straight into the JSON. Also: the official text masks for a few captions, and the key inventory
of the full SwinT_OGC model (swint_ogc_keys.json).
"""

import json
import math
import os
import sys
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "grounding_dino")
SRC = os.environ.get(
    "GROUNDINGDINO_SRC", os.path.expanduser("~/.cache/kiln/groundingdino-src/groundingdino-py-0.4.0")
)
MINILM = os.environ.get("MINILM_DIR", os.path.join(ROOT, "..", "shared", "weights", "all-minilm-l6-v2"))
if not os.path.isdir(MINILM):
    MINILM = "/work/shared/weights/all-minilm-l6-v2"
MINILM = os.path.abspath(MINILM)
sys.path.insert(0, SRC)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoTokenizer, BertConfig, BertModel  # noqa: E402

import groundingdino.models.GroundingDINO.groundingdino as gd_main  # noqa: E402
import groundingdino.models.GroundingDINO.transformer as gd_transformer  # noqa: E402
import groundingdino.models.GroundingDINO.utils as gd_utils  # noqa: E402
from groundingdino.models.GroundingDINO.backbone.backbone import Joiner  # noqa: E402
from groundingdino.models.GroundingDINO.backbone.position_encoding import PositionEmbeddingSineHW  # noqa: E402
from groundingdino.models.GroundingDINO.backbone.swin_transformer import SwinTransformer  # noqa: E402
from groundingdino.models.GroundingDINO.bertwarper import (  # noqa: E402
    generate_masks_with_special_tokens_and_transfer_map,
)
from groundingdino.models.GroundingDINO.fuse_modules import BiAttentionBlock  # noqa: E402
from groundingdino.util import get_tokenlizer  # noqa: E402
from groundingdino.util.misc import NestedTensor, inverse_sigmoid  # noqa: E402
from groundingdino.util.slconfig import SLConfig  # noqa: E402

torch.set_num_threads(2)
CAPTION = "cat . dog . traffic light ."
MASK_CAPTIONS = [
    "cat . dog . traffic light .",
    "a person . bicycle .",
    "ear of bag . defect . label .",
    "cat . dog",
    "traffic light.",
]
BATCH_CAPTIONS = ["cat . dog .", "a person . bicycle . traffic light ."]

TINY = dict(
    swin=dict(patch_size=4, embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=7,
              mlp_ratio=4.0, qkv_bias=True, ape=False, patch_norm=True, out_indices=[1, 2, 3],
              drop_path_rate=0.0),
    hidden_dim=64, nheads=4, enc_layers=2, dec_layers=2, enc_n_points=4, dec_n_points=4,
    dim_feedforward=128, num_feature_levels=4, num_queries=30, max_text_len=256,
    pe_temperatureH=20, pe_temperatureW=20,
)


# ----------------------------------------------------------------------------------------------
# d_model generalisations of the two d_model = 256 constants (see the docstring)
# ----------------------------------------------------------------------------------------------
_official_gen_sineembed = gd_utils.gen_sineembed_for_position
_official_get_sine_pos_embed = gd_utils.get_sine_pos_embed


def patch_for_d_model(d_model):
    def gen_sineembed_for_position(pos_tensor):
        return _official_get_sine_pos_embed(pos_tensor, num_pos_feats=d_model // 2, temperature=10000,
                                            exchange_xy=True)

    def get_sine_pos_embed(pos_tensor, num_pos_feats=128, temperature=10000, exchange_xy=True):
        if num_pos_feats == 256:  # the text enhancer's position ids (the only call passing 256)
            num_pos_feats = d_model
        return _official_get_sine_pos_embed(pos_tensor, num_pos_feats, temperature, exchange_xy)

    gd_transformer.gen_sineembed_for_position = gen_sineembed_for_position
    gd_transformer.get_sine_pos_embed = get_sine_pos_embed


def unpatch():
    gd_transformer.gen_sineembed_for_position = _official_gen_sineembed
    gd_transformer.get_sine_pos_embed = _official_get_sine_pos_embed


def check_patch_is_official_at_256():
    g = torch.Generator().manual_seed(5)
    boxes = torch.rand(7, 2, 4, generator=g)
    patch_for_d_model(256)
    assert torch.equal(gd_transformer.gen_sineembed_for_position(boxes), _official_gen_sineembed(boxes))
    ids = torch.randint(0, 9, (2, 11), generator=g)[..., None]
    assert torch.equal(gd_transformer.get_sine_pos_embed(ids, num_pos_feats=256, exchange_xy=False),
                       _official_get_sine_pos_embed(ids, num_pos_feats=256, exchange_xy=False))
    unpatch()


# ----------------------------------------------------------------------------------------------
# building
# ----------------------------------------------------------------------------------------------
def official_args(**overrides):
    cfg = SLConfig.fromfile(os.path.join(SRC, "groundingdino", "config", "GroundingDINO_SwinT_OGC.py"))
    args = types.SimpleNamespace(**cfg._cfg_dict.to_dict())
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def build_tiny():
    args = official_args(
        hidden_dim=TINY["hidden_dim"], nheads=TINY["nheads"], enc_layers=TINY["enc_layers"],
        dec_layers=TINY["dec_layers"], enc_n_points=TINY["enc_n_points"], dec_n_points=TINY["dec_n_points"],
        dim_feedforward=TINY["dim_feedforward"], num_feature_levels=TINY["num_feature_levels"],
        num_queries=TINY["num_queries"], text_encoder_type=MINILM, dropout=0.0, text_dropout=0.0,
        fusion_dropout=0.0, fusion_droppath=0.0, use_checkpoint=False, use_transformer_ckpt=False,
    )
    s = TINY["swin"]

    def build_backbone(a):
        position_embedding = PositionEmbeddingSineHW(a.hidden_dim // 2, temperatureH=a.pe_temperatureH,
                                                     temperatureW=a.pe_temperatureW, normalize=True)
        swin = SwinTransformer(pretrain_img_size=224, patch_size=s["patch_size"], embed_dim=s["embed_dim"],
                               depths=s["depths"], num_heads=s["num_heads"], window_size=s["window_size"],
                               mlp_ratio=s["mlp_ratio"], qkv_bias=s["qkv_bias"], ape=s["ape"],
                               patch_norm=s["patch_norm"], out_indices=tuple(a.return_interm_indices),
                               drop_path_rate=s["drop_path_rate"], dilation=False, use_checkpoint=False)
        joiner = Joiner(swin, position_embedding)
        joiner.num_channels = swin.num_features[4 - len(a.return_interm_indices):]
        return joiner

    assert list(args.return_interm_indices) == s["out_indices"]
    official_build_backbone = gd_main.build_backbone
    gd_main.build_backbone = build_backbone
    try:
        model = gd_main.build_groundingdino(args)
    finally:
        gd_main.build_backbone = official_build_backbone
    return model, args


def rerandomise(model):
    owner = {}
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            owner[f"{mname}.{pname}" if mname else pname] = module
    done = []
    with torch.no_grad():
        for name, p in model.named_parameters():  # shared tensors appear once
            if name.startswith("bert."):
                continue
            assert p.dtype == torch.float32, name
            module = owner[name]
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("gamma_v", "gamma_l"):
                p.uniform_(0.3, 0.7)
            elif leaf == "relative_position_bias_table":
                p.normal_(0.0, 0.5)
            elif name in ("transformer.level_embed", "transformer.tgt_embed.weight"):
                p.normal_(0.0, 1.0)
            elif name.endswith("sampling_offsets.bias"):
                p.normal_(0.0, 1.0)
            elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
                if leaf == "weight":
                    p.copy_(1.0 + (torch.rand_like(p) * 2 - 1) * 0.2)
                else:
                    assert leaf == "bias", name
                    p.normal_(0.0, 0.1)
            elif p.dim() >= 2:
                fan_in = p.numel() // p.shape[0]
                bound = math.sqrt(3.0 / fan_in)
                p.uniform_(-bound, bound)
            elif leaf.endswith("bias"):  # Linear/Conv bias, MultiheadAttention in_proj_bias
                p.normal_(0.0, 0.1)
            else:
                raise RuntimeError(f"no re-randomisation rule for {name} {tuple(p.shape)}")
            done.append(name)
    return done


# ----------------------------------------------------------------------------------------------
# saving
# ----------------------------------------------------------------------------------------------
def save(name, tensor):
    t = tensor.detach().to(torch.float32).contiguous()
    assert torch.isfinite(t).all(), name
    path = os.path.join(OUT, f"{name}.bin")
    t.numpy().astype("<f4").tofile(path)
    return {"file": os.path.basename(path), "shape": list(t.shape)}


def text_masks(tokenizer, special, captions):
    tokenized = tokenizer(captions, padding="longest", return_tensors="pt")
    masks, position_ids, cate = generate_masks_with_special_tokens_and_transfer_map(tokenized, special, tokenizer)
    out = []
    for b, caption in enumerate(captions):
        ids = tokenized["input_ids"][b].tolist()
        out.append({
            "caption": caption,
            "tokens": tokenizer.convert_ids_to_tokens(ids),
            "input_ids": ids,
            "attention_mask": tokenized["attention_mask"][b].tolist(),
            "token_type_ids": tokenized["token_type_ids"][b].tolist(),
            "text_self_attention_mask": masks[b].to(torch.int64).tolist(),
            "position_ids": position_ids[b].tolist(),
            "cate_to_token_mask": [torch.nonzero(row).flatten().tolist() for row in cate[b]],
        })
    return out


def main():
    os.makedirs(OUT, exist_ok=True)
    check_patch_is_official_at_256()
    ref = {"caption": CAPTION, "config": TINY, "versions": {
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "numpy": np.__version__, "groundingdino-py": "0.4.0"}}
    notes = []

    # ---------------- tiny model ----------------
    patch_for_d_model(TINY["hidden_dim"])
    torch.manual_seed(0)
    model, _ = build_tiny()
    ref["rerandomised_parameters"] = len(rerandomise(model))
    model.eval()
    assert not hasattr(model, "label_enc")

    sd = model.state_dict()
    ckpt = {"module." + k: v for k, v in sd.items() if not k.startswith("bert.")}
    assert not any("position_ids" in k for k in ckpt)
    torch.save({"model": ckpt}, os.path.join(OUT, "tiny_minilm.pth"))
    ref["tiny_checkpoint"] = {
        "file": "tiny_minilm.pth",
        "keys": len(ckpt),
        "float_parameters_excluding_bert": sum(
            p.numel() for n, p in model.named_parameters() if not n.startswith("bert.")),
        "bert_parameters": sum(p.numel() for n, p in model.named_parameters() if n.startswith("bert.")),
        "bert_state_dict_has_position_ids": "bert.embeddings.position_ids" in sd,
    }

    # text tokens via the official function with the model's own tokenizer and special tokens
    tok = model.tokenizer
    special = model.specical_tokens
    ref["special_tokens"] = {"[CLS]": special[0], "[SEP]": special[1], ".": special[2], "?": special[3]}
    ref["tokens"] = text_masks(tok, special, [CAPTION])[0]
    n = len(ref["tokens"]["input_ids"])

    # hooks
    rec = {}

    def keep(name, fn=lambda o: o):
        def hook(_module, _inputs, output):
            rec.setdefault(name, []).append(fn(output))
        return hook

    hooks = [
        model.bert.register_forward_hook(keep("bert", lambda o: o["last_hidden_state"])),
        model.feat_map.register_forward_hook(keep("feat_map")),
        model.backbone[0].register_forward_hook(keep("swin", lambda o: [o[k].tensors for k in sorted(o)])),
        model.backbone[1].register_forward_hook(keep("pos")),
        model.transformer.encoder.register_forward_hook(keep("encoder")),
        model.transformer.enc_out_class_embed.register_forward_hook(keep("enc_class")),
        model.transformer.enc_out_bbox_embed.register_forward_hook(keep("enc_bbox")),
        model.transformer.register_forward_hook(keep("transformer")),
        model.class_embed[0].register_forward_hook(keep("class_embed")),  # shared by all layers
    ]
    for l, proj in enumerate(model.input_proj):
        hooks.append(proj.register_forward_hook(keep(f"input_proj_{l}")))
    enc = model.transformer.encoder
    for i in range(enc.num_layers):
        hooks.append(enc.fusion_layers[i].register_forward_hook(keep(f"fusion_{i}")))
        hooks.append(enc.text_layers[i].register_forward_hook(keep(f"text_{i}")))
        hooks.append(enc.layers[i].register_forward_hook(keep(f"deform_{i}")))
    for i, layer in enumerate(model.transformer.decoder.layers):
        hooks.append(layer.register_forward_hook(keep(f"dec_layer_{i}")))

    torch.manual_seed(1)
    image = torch.randn(1, 3, 136, 170)
    samples = NestedTensor(image, torch.zeros(1, 136, 170, dtype=torch.bool))
    with torch.no_grad():
        out = model(samples, captions=[CAPTION])
    for h in hooks:
        h.remove()

    t = {}
    t["image"] = save("image", image)
    t["bert_hidden"] = save("bert_hidden", rec["bert"][0])
    t["encoded_text"] = save("encoded_text", rec["feat_map"][0])
    assert rec["bert"][0].shape == (1, n, 384)
    swin = rec["swin"][0]
    for i, f in enumerate(swin):
        t[f"backbone_{i}"] = save(f"backbone_{i}", f)
    assert len(rec["pos"]) == 4
    spatial = []
    for l in range(4):
        src = rec[f"input_proj_{l}"][0]
        t[f"srcs_{l}"] = save(f"srcs_{l}", src)
        t[f"pos_{l}"] = save(f"pos_{l}", rec["pos"][l])
        assert rec["pos"][l].shape == src.shape
        spatial.append(list(src.shape[-2:]))
    ref["spatial_shapes"] = spatial
    ref["level_start_index"] = [int(x) for x in np.cumsum([0] + [h * w for h, w in spatial])[:-1]]
    assert spatial == [[17, 22], [9, 11], [5, 6], [3, 3]], spatial
    ref["swin_stage_shapes"] = [list(f.shape) for f in swin]

    memory, memory_text = rec["encoder"][0]
    t["memory"] = save("memory", memory)
    t["memory_text"] = save("memory_text", memory_text)
    for i in range(enc.num_layers):
        v, lang = rec[f"fusion_{i}"][0]
        t[f"enc_fusion_v_{i}"] = save(f"enc_fusion_v_{i}", v)
        t[f"enc_fusion_l_{i}"] = save(f"enc_fusion_l_{i}", lang)
        if i < enc.num_layers - 1:  # the last layer's are memory_text / memory
            t[f"enc_text_{i}"] = save(f"enc_text_{i}", rec[f"text_{i}"][0].transpose(0, 1))  # seq-first -> bs
            t[f"enc_deform_{i}"] = save(f"enc_deform_{i}", rec[f"deform_{i}"][0])
    assert torch.equal(rec[f"deform_{enc.num_layers - 1}"][0], memory)
    assert torch.equal(rec[f"text_{enc.num_layers - 1}"][0].transpose(0, 1), memory_text)

    # two-stage selection (official out["interm_outputs"] is commented out in this version:
    # recomputed from the transformer's hs_enc / ref_enc returns exactly as that commented code does)
    hs, references, hs_enc, ref_enc, init_box_proposal = rec["transformer"][0]
    text_dict = {"encoded_text": memory_text, "text_token_mask": torch.ones(1, n, dtype=torch.bool)}
    enc_class = rec["enc_class"][0]  # 1 x N x 256
    assert enc_class.shape[-1] == 256 and torch.isinf(enc_class[..., n:]).all()
    topk_logits = enc_class.max(-1)[0]
    topk = torch.topk(topk_logits, TINY["num_queries"], dim=1)[1]
    _, output_proposals = gd_utils.gen_encoder_output_proposals(
        memory, torch.zeros(1, memory.shape[1], dtype=torch.bool), torch.as_tensor(spatial))
    coords_unsel = rec["enc_bbox"][0] + output_proposals
    gathered_boxes = torch.gather(coords_unsel, 1, topk.unsqueeze(-1).repeat(1, 1, 4)).sigmoid()
    assert torch.equal(gathered_boxes, ref_enc[-1]), "topk indices do not reproduce ref_enc"
    with torch.no_grad():
        interm_logits = model.transformer.enc_out_class_embed(hs_enc[-1], text_dict)
    assert torch.equal(interm_logits, torch.gather(enc_class, 1, topk.unsqueeze(-1).repeat(1, 1, 256)))
    scores_sorted = topk_logits[0].sort(descending=True)[0]
    ref["topk_indices"] = topk[0].tolist()
    ref["topk_scores"] = topk_logits[0, topk[0]].tolist()
    ref["topk_min_gap"] = float((scores_sorted[:-1] - scores_sorted[1:])[: TINY["num_queries"]].min())
    t["enc_logits"] = save("enc_logits", enc_class[..., :n])
    t["enc_bbox_delta"] = save("enc_bbox_delta", rec["enc_bbox"][0])
    t["enc_proposals"] = save("enc_proposals", output_proposals)
    t["interm_logits"] = save("interm_logits", interm_logits[..., :n])
    t["interm_boxes"] = save("interm_boxes", ref_enc[-1])
    t["init_box_proposal"] = save("init_box_proposal", init_box_proposal)

    # decoder
    assert len(rec["class_embed"]) == TINY["dec_layers"]
    inf_ok = True
    for l in range(TINY["dec_layers"]):
        logits = rec["class_embed"][l]
        inf_ok &= bool(torch.isneginf(logits[..., n:]).all())
        with torch.no_grad():  # the official forward's anchor update, on the official modules
            boxes = (model.bbox_embed[l](hs[l]) + inverse_sigmoid(references[l])).sigmoid()
        t[f"dec_out_{l}"] = save(f"dec_out_{l}", rec[f"dec_layer_{l}"][0].transpose(0, 1))
        t[f"hs_{l}"] = save(f"hs_{l}", hs[l])
        t[f"logits_{l}"] = save(f"logits_{l}", logits[..., :n])
        t[f"boxes_{l}"] = save(f"boxes_{l}", boxes)
    for l, r in enumerate(references):
        t[f"ref_{l}"] = save(f"ref_{l}", r)
    assert torch.equal(boxes, out["pred_boxes"])
    assert torch.equal(rec["class_embed"][-1], out["pred_logits"])
    inf_ok &= bool(torch.isneginf(out["pred_logits"][..., n:]).all()) and out["pred_logits"].shape[-1] == 256
    t["pred_logits"] = save("pred_logits", out["pred_logits"][..., :n])
    t["pred_boxes"] = save("pred_boxes", out["pred_boxes"])
    ref["logits_width"] = 256
    ref["logits_columns_from_n_are_neg_inf"] = inf_ok
    ref["tensors"] = t
    notes.append("logits_l / pred_logits / interm_logits / enc_logits keep the first n token columns; the "
                 "official tensors are 256 wide and columns >= n are -inf (logits_columns_from_n_are_neg_inf).")
    notes.append("boxes_l = sigmoid(bbox_embed(hs_l) + inverse_sigmoid(ref_l)) with hs_l the NORMED decoder "
                 "output, while the decoder's own reference update ref_{l+1} = sigmoid(bbox_embed(dec_out_l) + "
                 "inverse_sigmoid(ref_l)) uses the UNNORMED layer output dec_out_l; so boxes_l != ref_{l+1}.")
    notes.append("ref_0 = sigmoid of the selected two-stage boxes = interm_boxes; interm_logits are the "
                 "enc_out_class_embed of the selected enc_output_norm(enc_output(memory)) rows against memory_text.")
    notes.append("enc_fusion_v_i / enc_fusion_l_i / enc_text_i / enc_deform_i are encoder layer i's sub-module "
                 "outputs (each layer runs fusion -> text enhancer -> deformable self-attention); the last "
                 "layer's enc_text / enc_deform are memory_text / memory.")

    # ---------------- text masks ----------------
    ref["text_masks"] = [text_masks(tok, special, [c])[0] for c in MASK_CAPTIONS]  # each caption alone
    ref["text_masks_batched"] = text_masks(tok, special, BATCH_CAPTIONS)
    notes.append("text_masks_batched: both captions tokenised together with padding='longest' (the official "
                 "call); the shorter row's [SEP] is then not the last column and counts as a separator.")
    ref["notes"] = notes
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
    unpatch()

    # ---------------- full SwinT_OGC key inventory ----------------
    args = official_args(text_encoder_type="bert-base-uncased")
    real_tok, real_lm = get_tokenlizer.get_tokenlizer, get_tokenlizer.get_pretrained_language_model
    get_tokenlizer.get_tokenlizer = lambda _t: AutoTokenizer.from_pretrained(MINILM)  # same uncased vocab
    get_tokenlizer.get_pretrained_language_model = lambda _t: BertModel(BertConfig())
    try:
        torch.manual_seed(0)
        full = gd_main.build_groundingdino(args)
    finally:
        get_tokenlizer.get_tokenlizer, get_tokenlizer.get_pretrained_language_model = real_tok, real_lm
    fsd = full.state_dict()
    keys = [["module." + k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in fsd.items()]
    unique = {}
    for k, v in fsd.items():
        if v.is_floating_point():
            unique.setdefault(v.data_ptr(), v.numel())
    inventory = {
        "config": "groundingdino/config/GroundingDINO_SwinT_OGC.py (swin_T_224_1k, bert-base-uncased shape)",
        "float_parameters_unique": sum(p.numel() for p in full.parameters()),
        "float_state_tensors_unique": sum(unique.values()),
        "state_dict_entries": len(keys),
        "has_label_enc": any(k.startswith("label_enc") for k in fsd),
        "has_bert_position_ids": "bert.embeddings.position_ids" in fsd,
        "keys": keys,
    }
    with open(os.path.join(OUT, "swint_ogc_keys.json"), "w") as f:
        json.dump(inventory, f, indent=0)

    print("spatial", spatial, "n", n, "topk min gap", ref["topk_min_gap"])
    print("tiny params (no bert)", ref["tiny_checkpoint"]["float_parameters_excluding_bert"])
    print("full params", inventory["float_parameters_unique"], inventory["float_state_tensors_unique"],
          "label_enc", inventory["has_label_enc"], "position_ids", inventory["has_bert_position_ids"])


if __name__ == "__main__":
    main()
