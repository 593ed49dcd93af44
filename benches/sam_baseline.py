#!/usr/bin/env python3
"""Baseline of the SAM bench: the image encoder's forward pass in PyTorch with the official
segment-anything code, on this machine's CPU with 2 threads, for kiln's tiny config (256²) and for
vit_b at 1024² (random weights, as benches/sam.rs).

    ~/.venvs/kiln/bin/python benches/sam_baseline.py
"""
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import ImageEncoderViT

THREADS = 2


def time_forward(encoder, size, runs):
    x = torch.randn(1, 3, size, size)
    with torch.inference_mode():
        encoder(x)  # warm-up
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            encoder(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    torch.set_num_threads(THREADS)
    norm = partial(torch.nn.LayerNorm, eps=1e-6)
    tiny = ImageEncoderViT(img_size=256, patch_size=16, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4.0,
                           out_chans=32, qkv_bias=True, norm_layer=norm, use_rel_pos=True, window_size=8,
                           global_attn_indexes=(1,)).eval()
    vit_b = ImageEncoderViT(img_size=1024, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                            out_chans=256, qkv_bias=True, norm_layer=norm, use_rel_pos=True, window_size=14,
                            global_attn_indexes=(2, 5, 8, 11)).eval()
    print(f"tiny encoder 256x256: {time_forward(tiny, 256, 20) * 1e3:.1f} ms (median of 20, {THREADS} threads)")
    print(f"vit_b encoder 1024x1024: {time_forward(vit_b, 1024, 3):.2f} s (median of 3, {THREADS} threads)")


if __name__ == "__main__":
    sys.exit(main())
