"""Reference numbers for kiln's SAM (models/src/sam) from the official `segment-anything` package.

Run once, offline, from the repository root (kept so the fixtures can be rebuilt):

    pip install torch==2.9.0 segment-anything numpy
    python tests/reference/sam_reference.py

Three models of the official classes (`ImageEncoderViT`, `PromptEncoder`, `MaskDecoder`,
`TwoWayTransformer`, `Sam`):
  tiny   kiln's `SamConfig::tiny()` (256-px input, 2 blocks of width 64, window 8, one global block,
         32-wide prompts and decoder); its state dict is saved as `tiny.pth` for the loader.
  vit_b2 vit_b's real widths and windowing (768 wide, 12 heads, window 14, block 1 global, MLP 3072)
         cut to 2 blocks, at a 320-px input (20 x 20 tokens, padded to 28 for the windows), with the
         official 256-wide decoder.
  mobile256 MobileSAM: TinyViT-5M (Ultralytics' `TinyViT`, the official code) at a 256-px input.
         The ~16 M / ~10 M parameters of these two are not committed: every parameter is a
         deterministic function of its official key (below), which the Rust test recomputes bit for
         bit, writes as a safetensors file and loads through the same loader.

Weights (both models): value = scale * (2u - 1), u = top 24 bits of splitmix64(fnv1a(key) + index)
/ 2^24, computed in float32; scale sqrt(3 / fan_in) for matrices (fan_in = numel / shape[0]),
1.0 for embeddings and the Fourier matrix, 0.5 for position embeddings (absolute and relative, not
zero as at official init), 0.1 for biases; norm weights and BatchNorm running variances 1 + 0.5 (2u - 1).

Outputs: image embedding; masks and IoU predictions for a two-box batch (multimask), a point
prompt (single mask, so the padding point is used), points + box + a mask input, and a mask input
alone (multimask);
the box masks post-processed to an original size; parameter counts of vit_b/l/h.
"""

import json
import math
import os
from functools import partial

import numpy as np
import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything import sam_model_registry

OUT = os.path.join(os.path.dirname(__file__), "..", "fixtures", "sam")
MASK64 = (1 << 64) - 1

CONFIGS = {
    "tiny": dict(image_size=256, embed_dim=64, depth=2, heads=2, window=8, global_attn=[1], prompt_dim=32,
                 decoder_heads=2, decoder_mlp=64, iou_hidden=32),
    "vit_b2": dict(image_size=320, embed_dim=768, depth=2, heads=12, window=14, global_attn=[1], prompt_dim=256,
                   decoder_heads=8, decoder_mlp=2048, iou_hidden=256),
    # MobileSAM's TinyViT-5M (Ultralytics' port of the official code) at a 256-px input.
    "mobile256": dict(image_size=256, tiny_vit=True, prompt_dim=256, decoder_heads=8, decoder_mlp=2048,
                      iou_hidden=256),
}


def build(c):
    grid = c["image_size"] // 16
    if c.get("tiny_vit"):
        from ultralytics.models.sam.modules.tiny_encoder import TinyViT

        encoder = TinyViT(img_size=c["image_size"], in_chans=3, num_classes=1000, embed_dims=[64, 128, 160, 320],
                          depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0,
                          drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0,
                          local_conv_size=3, layer_lr_decay=0.8)
    else:
        encoder = ImageEncoderViT(
            depth=c["depth"], embed_dim=c["embed_dim"], img_size=c["image_size"], mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=c["heads"], patch_size=16,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=c["global_attn"], window_size=c["window"],
            out_chans=c["prompt_dim"])
    return Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=c["prompt_dim"], image_embedding_size=(grid, grid),
            input_image_size=(c["image_size"], c["image_size"]), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=c["prompt_dim"], mlp_dim=c["decoder_mlp"],
                                          num_heads=c["decoder_heads"]),
            transformer_dim=c["prompt_dim"], iou_head_depth=3, iou_head_hidden_dim=c["iou_hidden"]),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])


def fnv1a(text):
    h = 0xCBF29CE484222325
    for byte in text.encode():
        h = ((h ^ byte) * 0x100000001B3) & MASK64
    return h


def unit(seed, n):
    """2u - 1 for u = top 24 bits of splitmix64(seed + i) / 2^24, float32."""
    with np.errstate(over="ignore"):
        z = (np.uint64(seed) + np.arange(n, dtype=np.uint64)) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24)
    return np.float32(2.0) * u - np.float32(1.0)


EMBEDDINGS = ("point_embeddings", "not_a_point_embed", "no_mask_embed", "iou_token", "mask_tokens",
              "positional_encoding_gaussian_matrix")


def formula(key, shape):
    n = int(np.prod(shape))
    v = unit(fnv1a(key), n)
    if any(e in key for e in EMBEDDINGS):
        out = v
    elif "pos_embed" in key or "rel_pos" in key:
        out = v * np.float32(0.5)
    elif len(shape) == 1 and (key.endswith("weight") or key.endswith("running_var")):
        out = v * np.float32(0.5) + np.float32(1.0)
    elif len(shape) == 1:
        out = v * np.float32(0.1)
    else:
        out = v * np.float32(math.sqrt(3.0 / (n // shape[0])))
    return torch.from_numpy(out.astype(np.float32).reshape(shape))


def save_tensor(prefix, name, tensor):
    path = f"{OUT}/{prefix}.{name}.bin"
    tensor.detach().to(torch.float32).contiguous().numpy().astype("<f4").tofile(path)
    return {"file": os.path.basename(path), "shape": list(tensor.shape)}


def run(name, c, generator):
    sam = build(c)
    state = sam.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            if value.is_floating_point():
                value.copy_(formula(key, tuple(value.shape)))
    # After the weights: TinyViT caches its attention biases when switched to eval.
    sam.eval()
    size, grid = c["image_size"], c["image_size"] // 16
    entry = {"config": c, "keys": {k: list(v.shape) for k, v in state.items() if v.is_floating_point()}}
    if name == "tiny":
        torch.save(state, f"{OUT}/tiny.pth")
        entry["checkpoint"] = "tiny.pth"

    pixels = torch.randn(1, 3, size, size, generator=generator)
    boxes = torch.tensor([[0.10, 0.20, 0.55, 0.70], [0.40, 0.05, 0.95, 0.45]]) * size
    point_coords = torch.tensor([[[0.30, 0.40], [0.70, 0.20]]]) * size
    point_labels = torch.tensor([[1.0, 0.0]])
    mask_input = torch.randn(1, 1, 4 * grid, 4 * grid, generator=generator)
    outputs = {}
    with torch.no_grad():
        embedding = sam.image_encoder(pixels)
        dense_pe = sam.prompt_encoder.get_dense_pe()
        outputs["embedding"] = embedding
        outputs["dense_pe"] = dense_pe

        sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
        masks, iou = sam.mask_decoder(embedding, dense_pe, sparse, dense, multimask_output=True)
        outputs["box_masks"], outputs["box_iou"] = masks, iou
        input_size, original_size = (size, size * 3 // 4), (size // 2, size * 3 // 8)
        outputs["box_masks_original"] = sam.postprocess_masks(masks, input_size, original_size)

        sparse, dense = sam.prompt_encoder(points=(point_coords, point_labels), boxes=None, masks=None)
        masks, iou = sam.mask_decoder(embedding, dense_pe, sparse, dense, multimask_output=False)
        outputs["point_masks"], outputs["point_iou"] = masks, iou

        sparse, dense = sam.prompt_encoder(points=(point_coords, point_labels), boxes=boxes[:1], masks=mask_input)
        masks, iou = sam.mask_decoder(embedding, dense_pe, sparse, dense, multimask_output=True)
        outputs["all_masks"], outputs["all_iou"] = masks, iou

        sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=mask_input)
        masks, iou = sam.mask_decoder(embedding, dense_pe, sparse, dense, multimask_output=True)
        outputs["mask_only_masks"], outputs["mask_only_iou"] = masks, iou

    entry["inputs"] = {
        "pixels": save_tensor(name, "pixels", pixels),
        "boxes": boxes.tolist(),
        "point_coords": point_coords.tolist(),
        "point_labels": point_labels.tolist(),
        "mask_input": save_tensor(name, "mask_input", mask_input),
        "input_size": list(input_size),
        "original_size": list(original_size),
    }
    entry["outputs"] = {k: save_tensor(name, k, v) for k, v in outputs.items()}
    entry["parameters"] = sum(p.numel() for p in sam.parameters())
    return entry


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    reference = {"models": {name: run(name, c, generator) for name, c in CONFIGS.items()}}
    reference["parameters"] = {
        name: sum(p.numel() for p in sam_model_registry[name]().parameters()) for name in ("vit_b", "vit_l", "vit_h")
    }
    from ultralytics.models.sam.build import build_mobile_sam

    reference["parameters"]["mobile"] = sum(p.numel() for p in build_mobile_sam().parameters())
    reference["formula_check"] = {"key": "image_encoder.blocks.0.attn.qkv.weight", "first": formula(
        "image_encoder.blocks.0.attn.qkv.weight", (8,)).tolist()}
    with open(f"{OUT}/reference.json", "w") as f:
        json.dump(reference, f, indent=1)
    print(json.dumps(reference["parameters"]), {k: v["parameters"] for k, v in reference["models"].items()})


if __name__ == "__main__":
    main()
