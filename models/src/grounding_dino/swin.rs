//! Swin Transformer (Liu et al. 2021, "Swin Transformer: Hierarchical Vision Transformer using Shifted
//! Windows"), the detection variant GroundingDINO uses (`groundingdino/models/GroundingDINO/backbone/
//! swin_transformer.py`): 4x4 patch embedding + LayerNorm, stages of window attention with a relative
//! position bias (odd blocks shifted by half a window, cross-region pairs masked with -100), zero
//! padding to whole windows after `norm1`, PatchMerging between stages, and LayerNorms `norm1..3` on
//! the outputs of stages 1–3 (strides 8, 16, 32). Keys as `backbone.0.*` of the official checkpoint.
//! Feature maps are channels-last `[B, H, W, C]` inside the backbone.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::softmax;

use crate::nn::gelu;
use burn::tensor::ops::PadMode;
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwinConfig {
    pub patch_size: usize,
    pub embed_dim: usize,
    pub depths: Vec<usize>,
    pub num_heads: Vec<usize>,
    pub window_size: usize,
    pub mlp_ratio: f64,
}

impl SwinConfig {
    /// `swin_T_224_1k`: embed 96, depths [2, 2, 6, 2], heads [3, 6, 12, 24], window 7.
    pub fn swin_t() -> Self {
        Self {
            patch_size: 4,
            embed_dim: 96,
            depths: vec![2, 2, 6, 2],
            num_heads: vec![3, 6, 12, 24],
            window_size: 7,
            mlp_ratio: 4.0,
        }
    }

    /// Swin-T's structure at width 16 (head width 16), for CPU tests.
    pub fn tiny() -> Self {
        Self {
            patch_size: 4,
            embed_dim: 16,
            depths: vec![2, 2, 2, 2],
            num_heads: vec![1, 2, 4, 8],
            window_size: 7,
            mlp_ratio: 4.0,
        }
    }

    /// Channels of stage `i`'s output.
    pub fn channels(&self, stage: usize) -> usize {
        self.embed_dim << stage
    }

    pub fn init(&self, device: &Device) -> SwinTransformer {
        SwinTransformer::new(self, device)
    }
}

#[derive(Module, Debug)]
pub struct PatchEmbed {
    pub proj: Conv2d,
    pub norm: LayerNorm,
}

#[derive(Module, Debug)]
pub struct WindowAttention {
    pub qkv: Linear,
    pub proj: Linear,
    /// `[(2w - 1)^2, heads]`.
    pub relative_position_bias_table: Param<Tensor<2>>,
    #[module(skip)]
    pub num_heads: usize,
    #[module(skip)]
    pub window_size: usize,
}

#[derive(Module, Debug)]
pub struct SwinMlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

#[derive(Module, Debug)]
pub struct SwinBlock {
    pub norm1: LayerNorm,
    pub attn: WindowAttention,
    pub norm2: LayerNorm,
    pub mlp: SwinMlp,
    #[module(skip)]
    pub shift_size: usize,
}

#[derive(Module, Debug)]
pub struct PatchMerging {
    pub norm: LayerNorm,
    pub reduction: Linear,
}

#[derive(Module, Debug)]
pub struct BasicLayer {
    pub blocks: Vec<SwinBlock>,
    pub downsample: Option<PatchMerging>,
}

#[derive(Module, Debug)]
pub struct SwinTransformer {
    pub patch_embed: PatchEmbed,
    pub layers: Vec<BasicLayer>,
    pub norm1: LayerNorm,
    pub norm2: LayerNorm,
    pub norm3: LayerNorm,
    #[module(skip)]
    pub patch_size: usize,
}

impl SwinTransformer {
    pub fn new(config: &SwinConfig, device: &Device) -> Self {
        let norm = |d: usize| LayerNormConfig::new(d).init(device);
        let w = config.window_size;
        let stages = config.depths.len();
        let layers = (0..stages)
            .map(|stage| {
                let dim = config.channels(stage);
                let heads = config.num_heads[stage];
                let hidden = (dim as f64 * config.mlp_ratio) as usize;
                let blocks = (0..config.depths[stage])
                    .map(|i| SwinBlock {
                        norm1: norm(dim),
                        attn: WindowAttention {
                            qkv: LinearConfig::new(dim, 3 * dim).init(device),
                            proj: LinearConfig::new(dim, dim).init(device),
                            relative_position_bias_table: Param::from_tensor(Tensor::random(
                                [(2 * w - 1) * (2 * w - 1), heads],
                                Distribution::Normal(0.0, 0.02),
                                device,
                            )),
                            num_heads: heads,
                            window_size: w,
                        },
                        norm2: norm(dim),
                        mlp: SwinMlp {
                            fc1: LinearConfig::new(dim, hidden).init(device),
                            fc2: LinearConfig::new(hidden, dim).init(device),
                        },
                        shift_size: if i % 2 == 0 { 0 } else { w / 2 },
                    })
                    .collect();
                let downsample = (stage + 1 < stages).then(|| PatchMerging {
                    norm: norm(4 * dim),
                    reduction: LinearConfig::new(4 * dim, 2 * dim).with_bias(false).init(device),
                });
                BasicLayer { blocks, downsample }
            })
            .collect();
        Self {
            patch_embed: PatchEmbed {
                proj: Conv2dConfig::new([3, config.embed_dim], [config.patch_size, config.patch_size])
                    .with_stride([config.patch_size, config.patch_size])
                    .init(device),
                norm: norm(config.embed_dim),
            },
            layers,
            norm1: norm(config.channels(1)),
            norm2: norm(config.channels(2)),
            norm3: norm(config.channels(3)),
            patch_size: config.patch_size,
        }
    }

    /// The normed outputs of stages 1, 2 and 3 as `[B, C, H, W]` maps (strides 8, 16, 32) of
    /// `[B, 3, H, W]` normalised pixels.
    pub fn forward(&self, pixels: Tensor<4>) -> Vec<Tensor<4>> {
        let [_, _, h, w] = pixels.dims();
        let p = self.patch_size;
        let pixels = pixels.pad([(0, 0), (0, 0), (0, (p - h % p) % p), (0, (p - w % p) % p)], PadMode::Constant(0.0));
        let x = self.patch_embed.proj.forward(pixels).permute([0, 2, 3, 1]);
        let mut x = self.patch_embed.norm.forward(x);
        let norms = [None, Some(&self.norm1), Some(&self.norm2), Some(&self.norm3)];
        let mut outputs = Vec::new();
        for (stage, layer) in self.layers.iter().enumerate() {
            for block in &layer.blocks {
                x = block.forward(x);
            }
            if let Some(Some(norm)) = norms.get(stage) {
                outputs.push(norm.forward(x.clone()).permute([0, 3, 1, 2]));
            }
            if let Some(merge) = &layer.downsample {
                x = merge.forward(x);
            }
        }
        outputs
    }
}

impl SwinBlock {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, h, w, c] = x.dims();
        let ws = self.attn.window_size;
        let (hp, wp) = (h.div_ceil(ws) * ws, w.div_ceil(ws) * ws);
        let shortcut = x.clone();
        let mut y = self.norm1.forward(x).pad([(0, 0), (0, hp - h), (0, wp - w), (0, 0)], PadMode::Constant(0.0));
        let s = self.shift_size as i64;
        if s > 0 {
            y = y.roll(&[-s, -s], &[1, 2]);
        }
        let windows = y.reshape([b, hp / ws, ws, wp / ws, ws, c]).permute([0, 1, 3, 2, 4, 5]).reshape([
            b * (hp / ws) * (wp / ws),
            ws * ws,
            c,
        ]);
        let mask = (s > 0).then(|| shift_mask(hp, wp, ws, self.shift_size, &windows.device()));
        let attended = self.attn.forward(windows, mask, b);
        let mut y =
            attended.reshape([b, hp / ws, wp / ws, ws, ws, c]).permute([0, 1, 3, 2, 4, 5]).reshape([b, hp, wp, c]);
        if s > 0 {
            y = y.roll(&[s, s], &[1, 2]);
        }
        let x = shortcut + y.slice([0..b, 0..h, 0..w, 0..c]);
        let inner = self.mlp.fc2.forward(gelu(self.mlp.fc1.forward(self.norm2.forward(x.clone()))));
        x + inner
    }
}

impl WindowAttention {
    /// `x [B·nW, N, C]`; `mask [nW, N, N]` for shifted windows.
    fn forward(&self, x: Tensor<3>, mask: Option<Tensor<3>>, batch: usize) -> Tensor<3> {
        let [bw, n, c] = x.dims();
        let heads = self.num_heads;
        let head_dim = c / heads;
        let qkv = self.qkv.forward(x).reshape([bw, n, 3, heads, head_dim]).permute([2, 0, 3, 1, 4]);
        let part = |i: usize| qkv.clone().narrow(0, i, 1).reshape([bw, heads, n, head_dim]);
        let (q, k, v) = (part(0) * (head_dim as f64).powf(-0.5), part(1), part(2));
        let mut attn = q.matmul(k.swap_dims(2, 3)) + self.relative_position_bias(n).unsqueeze::<4>();
        if let Some(mask) = mask {
            let windows = mask.dims()[0];
            attn = (attn.reshape([batch, windows, heads, n, n]) + mask.unsqueeze_dim::<4>(1).unsqueeze::<5>())
                .reshape([bw, heads, n, n]);
        }
        let out = softmax(attn, 3).matmul(v).swap_dims(1, 2).reshape([bw, n, c]);
        self.proj.forward(out)
    }

    /// `[heads, N, N]` bias from the table: index(i, j) = (dy + w - 1)(2w - 1) + (dx + w - 1).
    fn relative_position_bias(&self, n: usize) -> Tensor<3> {
        let w = self.window_size as i64;
        let device = self.relative_position_bias_table.device();
        let mut index = Vec::with_capacity(n * n);
        for i in 0..n as i64 {
            for j in 0..n as i64 {
                let (dy, dx) = (i / w - j / w, i % w - j % w);
                index.push((dy + w - 1) * (2 * w - 1) + (dx + w - 1));
            }
        }
        let index = Tensor::<1, Int>::from_data(TensorData::new(index, [n * n]), &device);
        let heads = self.num_heads;
        self.relative_position_bias_table.val().select(0, index).reshape([n, n, heads]).permute([2, 0, 1])
    }
}

/// `BasicLayer`'s attention mask for shifted windows: regions `[0, Hp-w)`, `[Hp-w, Hp-s)`,
/// `[Hp-s, Hp)` per axis; pairs of tokens from different regions get -100.
fn shift_mask(hp: usize, wp: usize, ws: usize, shift: usize, device: &Device) -> Tensor<3> {
    let region = |i: usize, len: usize| usize::from(i >= len - ws) + usize::from(i >= len - shift);
    let (nh, nw) = (hp / ws, wp / ws);
    let n = ws * ws;
    let mut mask = vec![0f32; nh * nw * n * n];
    for wy in 0..nh {
        for wx in 0..nw {
            let ids: Vec<usize> =
                (0..n).map(|t| region(wy * ws + t / ws, hp) * 3 + region(wx * ws + t % ws, wp)).collect();
            let base = (wy * nw + wx) * n * n;
            for i in 0..n {
                for j in 0..n {
                    if ids[i] != ids[j] {
                        mask[base + i * n + j] = -100.0;
                    }
                }
            }
        }
    }
    Tensor::from_data(TensorData::new(mask, [nh * nw, n, n]), device)
}

impl PatchMerging {
    /// `[B, H, W, C]` → `[B, ⌈H/2⌉, ⌈W/2⌉, 2C]`; channels concatenated as (even row, even col),
    /// (odd, even), (even, odd), (odd, odd).
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, h, w, c] = x.dims();
        let x = x.pad([(0, 0), (0, h % 2), (0, w % 2), (0, 0)], PadMode::Constant(0.0));
        let (h2, w2) = (h.div_ceil(2), w.div_ceil(2));
        let x = x.reshape([b, h2, 2, w2, 2, c]).permute([0, 1, 3, 4, 2, 5]).reshape([b, h2, w2, 4 * c]);
        self.reduction.forward(self.norm.forward(x))
    }
}
