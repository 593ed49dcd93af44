//! MobileSAM's image encoder, TinyViT-5M (Wu et al. 2022, "TinyViT"; Zhang et al. 2023, "Faster
//! Segment Anything"; code as in `mobile_sam/modeling/tiny_vit_sam.py` and Ultralytics'
//! `models/sam/modules/tiny_encoder.py`): a conv stem to 1/4 resolution, a stage of MBConv blocks,
//! three stages of windowed attention blocks with learned attention biases and a depthwise local
//! conv, patch merging between stages, and SAM's 256-channel neck. Keys: `patch_embed.seq.{0,2}`,
//! `layers.<i>.blocks.<j>...` (a tuple, stage 0 of another type), `layers.<i>.downsample.{conv1,conv2,conv3}`, `norm_head`, `head`,
//! `neck.{0,1,2,3}`; each `Conv2d_BN` is `{c, bn}`.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Gelu, LayerNorm, LayerNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::softmax;

use crate::nn::gelu;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::common::{Neck, neck, neck_forward};
use super::image_encoder::{window_partition, window_unpartition};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TinyVitConfig {
    pub image_size: usize,
    pub embed_dims: [usize; 4],
    pub depths: [usize; 4],
    pub num_heads: [usize; 4],
    pub window_sizes: [usize; 4],
    pub mlp_ratio: f64,
    pub mbconv_expand_ratio: f64,
    pub local_conv_size: usize,
    /// The ImageNet classifier MobileSAM keeps in its checkpoint (unused by SAM).
    pub num_classes: usize,
    pub out_chans: usize,
}

impl TinyVitConfig {
    /// MobileSAM (`build_sam_vit_t`): TinyViT-5M at 1024 px.
    pub fn mobile_sam() -> Self {
        Self {
            image_size: 1024,
            embed_dims: [64, 128, 160, 320],
            depths: [2, 2, 6, 2],
            num_heads: [2, 4, 5, 10],
            window_sizes: [7, 7, 14, 7],
            mlp_ratio: 4.0,
            mbconv_expand_ratio: 4.0,
            local_conv_size: 3,
            num_classes: 1000,
            out_chans: 256,
        }
    }

    /// Token grid entering stage `stage`: the stem quarters the image and each patch merging
    /// halves it, except merging into 320, 448 or 576 channels (the official rule).
    pub fn resolution(&self, stage: usize) -> usize {
        (0..stage)
            .fold(self.image_size / 4, |r, s| if merge_stride(self.embed_dims[s + 1]) == 2 { r.div_ceil(2) } else { r })
    }

    pub fn init(&self, device: &Device) -> TinyViT {
        TinyViT::new(self, device)
    }
}

/// `Conv2d_BN`: a bias-free conv and BatchNorm (eps 1e-5).
#[derive(Module, Debug)]
pub struct Conv2dBn {
    pub c: Conv2d,
    pub bn: BatchNorm,
}

impl Conv2dBn {
    fn new(c_in: usize, c_out: usize, kernel: usize, stride: usize, groups: usize, device: &Device) -> Self {
        let pad = kernel / 2;
        Self {
            c: Conv2dConfig::new([c_in, c_out], [kernel, kernel])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
                .with_groups(groups)
                .with_bias(false)
                .init(device),
            bn: BatchNormConfig::new(c_out).init(device),
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.bn.forward(self.c.forward(x))
    }
}

#[derive(Module, Debug)]
pub struct PatchEmbed {
    /// Conv 3x3/2, GELU, conv 3x3/2.
    pub seq: (Conv2dBn, Gelu, Conv2dBn),
}

/// Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, GELU after the residual sum.
#[derive(Module, Debug)]
pub struct MbConv {
    pub conv1: Conv2dBn,
    pub conv2: Conv2dBn,
    pub conv3: Conv2dBn,
}

impl MbConv {
    fn new(dim: usize, expand_ratio: f64, device: &Device) -> Self {
        let hidden = (dim as f64 * expand_ratio) as usize;
        Self {
            conv1: Conv2dBn::new(dim, hidden, 1, 1, 1, device),
            conv2: Conv2dBn::new(hidden, hidden, 3, 1, hidden, device),
            conv3: Conv2dBn::new(hidden, dim, 1, 1, 1, device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let y = gelu(self.conv1.forward(x.clone()));
        let y = gelu(self.conv2.forward(y));
        gelu(self.conv3.forward(y) + x)
    }
}

fn merge_stride(out_dim: usize) -> usize {
    if [320, 448, 576].contains(&out_dim) { 1 } else { 2 }
}

/// `PatchMerging`: 1x1, depthwise 3x3 (stride 2, or 1 into 320/448/576 channels as the official
/// code has it), 1x1; `[B, C, H, W]` in, `[B, H'W', C']` out.
#[derive(Module, Debug)]
pub struct PatchMerging {
    pub conv1: Conv2dBn,
    pub conv2: Conv2dBn,
    pub conv3: Conv2dBn,
}

impl PatchMerging {
    fn new(dim: usize, out_dim: usize, device: &Device) -> Self {
        let stride = merge_stride(out_dim);
        Self {
            conv1: Conv2dBn::new(dim, out_dim, 1, 1, 1, device),
            conv2: Conv2dBn::new(out_dim, out_dim, 3, stride, out_dim, device),
            conv3: Conv2dBn::new(out_dim, out_dim, 1, 1, 1, device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<3> {
        let x = gelu(self.conv1.forward(x));
        let x = gelu(self.conv2.forward(x));
        let x = self.conv3.forward(x);
        let [b, c, h, w] = x.dims();
        x.reshape([b, c, h * w]).swap_dims(1, 2)
    }
}

/// Window attention with a learned bias per head and per |Δy|, |Δx| offset.
#[derive(Module, Debug)]
pub struct Attention {
    pub norm: LayerNorm,
    pub qkv: Linear,
    pub proj: Linear,
    pub attention_biases: Param<Tensor<2>>,
    #[module(skip)]
    pub num_heads: usize,
    #[module(skip)]
    pub bias_index: Vec<i64>,
}

impl Attention {
    fn new(dim: usize, num_heads: usize, window: usize, device: &Device) -> Self {
        let key_dim = dim / num_heads;
        // Offsets numbered in first-seen order over (p1, p2) pairs, as the official code does.
        let points: Vec<(i64, i64)> =
            (0..window as i64).flat_map(|y| (0..window as i64).map(move |x| (y, x))).collect();
        let mut offsets: Vec<(i64, i64)> = Vec::new();
        let mut bias_index = Vec::with_capacity(points.len() * points.len());
        for p1 in &points {
            for p2 in &points {
                let offset = ((p1.0 - p2.0).abs(), (p1.1 - p2.1).abs());
                let index = offsets.iter().position(|o| *o == offset).unwrap_or_else(|| {
                    offsets.push(offset);
                    offsets.len() - 1
                });
                bias_index.push(index as i64);
            }
        }
        Self {
            norm: LayerNormConfig::new(dim).init(device),
            qkv: LinearConfig::new(dim, 3 * key_dim * num_heads).init(device),
            proj: LinearConfig::new(key_dim * num_heads, dim).init(device),
            attention_biases: Param::from_tensor(Tensor::zeros([num_heads, offsets.len()], device)),
            num_heads,
            bias_index,
        }
    }

    /// `[B, N, C]` tokens of `N = window²`.
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, n, _] = x.dims();
        let heads = self.num_heads;
        let qkv = self.qkv.forward(self.norm.forward(x));
        let [_, _, width] = qkv.dims();
        let per_head = width / heads / 3;
        let qkv = qkv.reshape([b, n, heads, 3 * per_head]).swap_dims(1, 2);
        let q = qkv.clone().narrow(3, 0, per_head);
        let k = qkv.clone().narrow(3, per_head, per_head);
        let v = qkv.narrow(3, 2 * per_head, per_head);
        let device = q.device();
        let index = Tensor::<1, Int>::from_data(TensorData::new(self.bias_index.clone(), [n * n]), &device);
        let bias = self.attention_biases.val().select(1, index).reshape([1, heads, n, n]);
        let attention = q.matmul(k.swap_dims(2, 3)) * (per_head as f64).powf(-0.5) + bias;
        let out = softmax(attention, 3).matmul(v).swap_dims(1, 2).reshape([b, n, heads * per_head]);
        self.proj.forward(out)
    }
}

/// TinyViT's MLP: LayerNorm, fc1, GELU, fc2.
#[derive(Module, Debug)]
pub struct Mlp {
    pub norm: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
}

#[derive(Module, Debug)]
pub struct TinyVitBlock {
    pub attn: Attention,
    pub mlp: Mlp,
    pub local_conv: Conv2dBn,
    #[module(skip)]
    pub window_size: usize,
    #[module(skip)]
    pub resolution: usize,
}

impl TinyVitBlock {
    fn new(config: &TinyVitConfig, stage: usize, device: &Device) -> Self {
        let dim = config.embed_dims[stage];
        let hidden = (dim as f64 * config.mlp_ratio) as usize;
        let window = config.window_sizes[stage];
        Self {
            attn: Attention::new(dim, config.num_heads[stage], window, device),
            mlp: Mlp {
                norm: LayerNormConfig::new(dim).init(device),
                fc1: LinearConfig::new(dim, hidden).init(device),
                fc2: LinearConfig::new(hidden, dim).init(device),
            },
            local_conv: Conv2dBn::new(dim, dim, config.local_conv_size, 1, dim, device),
            window_size: window,
            resolution: config.resolution(stage),
        }
    }

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, n, c] = x.dims();
        let (h, w, window) = (self.resolution, self.resolution, self.window_size);
        let attended = if h == window && w == window {
            self.attn.forward(x.clone())
        } else {
            let (windows, padded) = window_partition(x.clone().reshape([b, h, w, c]), window);
            let [nw, _, _, _] = windows.dims();
            let out = self.attn.forward(windows.reshape([nw, window * window, c])).reshape([nw, window, window, c]);
            window_unpartition(out, window, padded, (h, w)).reshape([b, n, c])
        };
        let x = x + attended;
        let x = self.local_conv.forward(x.swap_dims(1, 2).reshape([b, c, h, w]));
        let x = x.reshape([b, c, n]).swap_dims(1, 2);
        let y = self.mlp.fc2.forward(gelu(self.mlp.fc1.forward(self.mlp.norm.forward(x.clone()))));
        x + y
    }
}

/// Stage 0: MBConv blocks on `[B, C, H, W]`, then the patch merging into stage 1.
#[derive(Module, Debug)]
pub struct ConvLayer {
    pub blocks: Vec<MbConv>,
    pub downsample: PatchMerging,
}

/// Stages 1–3: attention blocks on `[B, N, C]`, then the patch merging (not after the last).
#[derive(Module, Debug)]
pub struct BasicLayer {
    pub blocks: Vec<TinyVitBlock>,
    pub downsample: Option<PatchMerging>,
}

impl BasicLayer {
    fn new(config: &TinyVitConfig, stage: usize, device: &Device) -> Self {
        let dims = config.embed_dims;
        Self {
            blocks: (0..config.depths[stage]).map(|_| TinyVitBlock::new(config, stage, device)).collect(),
            downsample: (stage < 3).then(|| PatchMerging::new(dims[stage], dims[stage + 1], device)),
        }
    }
}

#[derive(Module, Debug)]
pub struct TinyViT {
    pub patch_embed: PatchEmbed,
    pub layers: (ConvLayer, BasicLayer, BasicLayer, BasicLayer),
    pub norm_head: LayerNorm,
    pub head: Linear,
    pub neck: Neck,
    #[module(skip)]
    pub config: TinyVitConfig,
}

impl TinyViT {
    pub fn new(config: &TinyVitConfig, device: &Device) -> Self {
        let dims = config.embed_dims;
        let layers = (
            ConvLayer {
                blocks: (0..config.depths[0])
                    .map(|_| MbConv::new(dims[0], config.mbconv_expand_ratio, device))
                    .collect(),
                downsample: PatchMerging::new(dims[0], dims[1], device),
            },
            BasicLayer::new(config, 1, device),
            BasicLayer::new(config, 2, device),
            BasicLayer::new(config, 3, device),
        );
        Self {
            patch_embed: PatchEmbed {
                seq: (
                    Conv2dBn::new(3, dims[0] / 2, 3, 2, 1, device),
                    Gelu::new(),
                    Conv2dBn::new(dims[0] / 2, dims[0], 3, 2, 1, device),
                ),
            },
            layers,
            norm_head: LayerNormConfig::new(dims[3]).init(device),
            head: LinearConfig::new(dims[3], config.num_classes).init(device),
            neck: neck(dims[3], config.out_chans, device),
            config: config.clone(),
        }
    }

    pub fn forward(&self, images: Tensor<4>) -> Tensor<4> {
        let (c1, act, c2) = &self.patch_embed.seq;
        let x = c2.forward(act.forward(c1.forward(images)));
        let (stem, stage1, stage2, stage3) = &self.layers;
        let x = stem.blocks.iter().fold(x, |x, block| block.forward(x));
        let mut tokens = stem.downsample.forward(x);
        for (stage, layer) in [(1, stage1), (2, stage2), (3, stage3)] {
            tokens = layer.blocks.iter().fold(tokens, |x, block| block.forward(x));
            if let Some(merge) = &layer.downsample {
                let [b, _, c] = tokens.dims();
                let r = self.config.resolution(stage);
                tokens = merge.forward(tokens.swap_dims(1, 2).reshape([b, c, r, r]));
            }
        }
        let [b, n, c] = tokens.dims();
        let side = (n as f64).sqrt() as usize;
        let x = tokens.swap_dims(1, 2).reshape([b, c, side, side]);
        neck_forward(&self.neck, x)
    }
}
