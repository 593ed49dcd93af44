//! SAM's image encoder (Kirillov et al. 2023, "Segment Anything"; segment_anything/modeling/
//! image_encoder.py `ImageEncoderViT`): a ViT with 16-pixel patches, an absolute position embedding,
//! windowed attention (window 14) except at the global-attention blocks, decomposed relative position
//! embeddings in every attention, and a neck to 256 channels. Keys: `patch_embed.proj`, `pos_embed`,
//! `blocks.<i>.{norm1,attn.{qkv,proj,rel_pos_h,rel_pos_w},norm2,mlp.{lin1,lin2}}`, `neck.{0,1,2,3}`.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::common::{Activation, MlpBlock, Neck, neck, neck_forward};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageEncoderConfig {
    pub image_size: usize,
    pub patch_size: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    pub mlp_ratio: f64,
    pub out_chans: usize,
    pub window_size: usize,
    pub global_attn_indexes: Vec<usize>,
}

impl ImageEncoderConfig {
    fn vit(embed_dim: usize, depth: usize, num_heads: usize, global_attn_indexes: Vec<usize>) -> Self {
        Self {
            image_size: 1024,
            patch_size: 16,
            embed_dim,
            depth,
            num_heads,
            mlp_ratio: 4.0,
            out_chans: 256,
            window_size: 14,
            global_attn_indexes,
        }
    }

    /// `build_sam_vit_b`: 768 wide, 12 blocks, 12 heads, global attention at 2, 5, 8, 11.
    pub fn vit_b() -> Self {
        Self::vit(768, 12, 12, vec![2, 5, 8, 11])
    }

    /// `build_sam_vit_l`: 1024 wide, 24 blocks, 16 heads, global attention at 5, 11, 17, 23.
    pub fn vit_l() -> Self {
        Self::vit(1024, 24, 16, vec![5, 11, 17, 23])
    }

    /// `build_sam_vit_h`: 1280 wide, 32 blocks, 16 heads, global attention at 7, 15, 23, 31.
    pub fn vit_h() -> Self {
        Self::vit(1280, 32, 16, vec![7, 15, 23, 31])
    }

    /// Tokens per side of the image embedding.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    pub fn init(&self, device: &Device) -> ImageEncoderViT {
        ImageEncoderViT::new(self, device)
    }
}

/// `PatchEmbed`: a `patch_size` convolution with stride `patch_size`, output channels-last.
#[derive(Module, Debug)]
pub struct PatchEmbed {
    pub proj: Conv2d,
}

/// Multi-head attention with decomposed relative position embeddings over a `[B, H, W, C]` grid.
#[derive(Module, Debug)]
pub struct Attention {
    pub qkv: Linear,
    pub proj: Linear,
    pub rel_pos_h: Param<Tensor<2>>,
    pub rel_pos_w: Param<Tensor<2>>,
    #[module(skip)]
    pub num_heads: usize,
}

impl Attention {
    fn new(dim: usize, num_heads: usize, input_size: usize, device: &Device) -> Self {
        let head_dim = dim / num_heads;
        Self {
            qkv: LinearConfig::new(dim, dim * 3).init(device),
            proj: LinearConfig::new(dim, dim).init(device),
            // The official default `rel_pos_zero_init=True`.
            rel_pos_h: Param::from_tensor(Tensor::zeros([2 * input_size - 1, head_dim], device)),
            rel_pos_w: Param::from_tensor(Tensor::zeros([2 * input_size - 1, head_dim], device)),
            num_heads,
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, h, w, dim] = x.dims();
        let heads = self.num_heads;
        let head_dim = dim / heads;
        let tokens = h * w;
        // [B, HW, 3, nh, hd] -> [3, B*nh, HW, hd]
        let qkv = self.qkv.forward(x).reshape([b, tokens, 3, heads, head_dim]).permute([2, 0, 3, 1, 4]);
        let qkv = qkv.reshape([3, b * heads, tokens, head_dim]);
        let part = |i: usize| qkv.clone().narrow(0, i, 1).reshape([b * heads, tokens, head_dim]);
        let (q, k, v) = (part(0), part(1), part(2));
        let scale = (head_dim as f64).powf(-0.5);
        let (rel_h, rel_w) = self.decomposed_rel_pos(q.clone(), h, w);
        #[cfg(feature = "flex")]
        let fused = crate::nn::attention::flex::rel_pos_attention(&q, &k, &v, &rel_h, &rel_w, scale as f32);
        #[cfg(not(feature = "flex"))]
        let fused = None;
        let out = fused.unwrap_or_else(|| {
            let attention = (q * scale).matmul(k.swap_dims(1, 2));
            let attention = attention.reshape([b * heads, h, w, h, w])
                + rel_h.reshape([b * heads, h, w, h]).unsqueeze_dim::<5>(4)
                + rel_w.reshape([b * heads, h, w, w]).unsqueeze_dim::<5>(3);
            softmax(attention.reshape([b * heads, tokens, tokens]), 2).matmul(v)
        });
        let out = out.reshape([b, heads, h, w, head_dim]).permute([0, 2, 3, 1, 4]);
        self.proj.forward(out.reshape([b, h, w, dim]))
    }

    /// The terms of `add_decomposed_rel_pos` for query and key grids of the same size `h x w`
    /// (always the case in SAM's encoder), `attn + rel_h[..., None] + rel_w[..., None, :]`:
    /// rel_h [batch, h w, h] (per query, per key row) and rel_w [batch, h w, w] (per key column).
    fn decomposed_rel_pos(&self, q: Tensor<3>, h: usize, w: usize) -> (Tensor<3>, Tensor<3>) {
        let [batch, _, head_dim] = q.dims();
        let r_h = relative_positions(self.rel_pos_h.val(), h); // [h, h, C]
        let r_w = relative_positions(self.rel_pos_w.val(), w); // [w, w, C]
        let r_q = q.reshape([batch, h, w, head_dim]);
        // einsum("bhwc,hkc->bhwk")
        let rel_h = r_q
            .clone()
            .swap_dims(0, 1)
            .reshape([h, batch * w, head_dim])
            .matmul(r_h.swap_dims(1, 2))
            .reshape([h, batch, w, h])
            .swap_dims(0, 1);
        // einsum("bhwc,wkc->bhwk")
        let rel_w = r_q
            .permute([2, 0, 1, 3])
            .reshape([w, batch * h, head_dim])
            .matmul(r_w.swap_dims(1, 2))
            .reshape([w, batch, h, w])
            .permute([1, 2, 0, 3]);
        (rel_h.reshape([batch, h * w, h]), rel_w.reshape([batch, h * w, w]))
    }
}

/// `get_rel_pos(q_size, k_size, rel_pos)` with `q_size == k_size == size`: the embedding of the
/// relative offset `q - k + size - 1` for every (q, k) pair, `[size, size, C]`.
fn relative_positions(rel_pos: Tensor<2>, size: usize) -> Tensor<3> {
    let [length, channels] = rel_pos.dims();
    assert_eq!(length, 2 * size - 1, "relative position table of {length} rows for a grid of {size}");
    let indices: Vec<i64> =
        (0..size).flat_map(|q| (0..size).map(move |k| (q as i64 - k as i64) + size as i64 - 1)).collect();
    let indices = Tensor::<1, Int>::from_data(TensorData::new(indices, [size * size]), &rel_pos.device());
    rel_pos.select(0, indices).reshape([size, size, channels])
}

/// A transformer block: windowed (or global) attention and an MLP, both pre-norm with residuals.
#[derive(Module, Debug)]
pub struct Block {
    pub norm1: LayerNorm,
    pub attn: Attention,
    pub norm2: LayerNorm,
    pub mlp: MlpBlock,
    /// 0: global attention.
    #[module(skip)]
    pub window_size: usize,
}

impl Block {
    fn new(config: &ImageEncoderConfig, window_size: usize, device: &Device) -> Self {
        let dim = config.embed_dim;
        let input_size = if window_size == 0 { config.grid() } else { window_size };
        Self {
            norm1: LayerNormConfig::new(dim).with_epsilon(1e-6).init(device),
            attn: Attention::new(dim, config.num_heads, input_size, device),
            norm2: LayerNormConfig::new(dim).with_epsilon(1e-6).init(device),
            mlp: MlpBlock::new(dim, (dim as f64 * config.mlp_ratio) as usize, Activation::Gelu, device),
            window_size,
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let shortcut = x.clone();
        let x = self.norm1.forward(x);
        let x = if self.window_size > 0 {
            let [_, h, w, _] = x.dims();
            let (windows, padded) = window_partition(x, self.window_size);
            window_unpartition(self.attn.forward(windows), self.window_size, padded, (h, w))
        } else {
            self.attn.forward(x)
        };
        let x = shortcut + x;
        x.clone() + self.mlp.forward(self.norm2.forward(x))
    }
}

/// Zero-pads `[B, H, W, C]` to multiples of `window` and cuts it into `[B * nw, window, window, C]`.
pub fn window_partition(x: Tensor<4>, window: usize) -> (Tensor<4>, (usize, usize)) {
    let [b, h, w, c] = x.dims();
    let (pad_h, pad_w) = ((window - h % window) % window, (window - w % window) % window);
    let device = x.device();
    let mut x = x;
    if pad_h > 0 {
        x = Tensor::cat(vec![x, Tensor::zeros([b, pad_h, w, c], &device)], 1);
    }
    if pad_w > 0 {
        x = Tensor::cat(vec![x, Tensor::zeros([b, h + pad_h, pad_w, c], &device)], 2);
    }
    let (hp, wp) = (h + pad_h, w + pad_w);
    let windows = x.reshape([b, hp / window, window, wp / window, window, c]).permute([0, 1, 3, 2, 4, 5]).reshape([
        b * (hp / window) * (wp / window),
        window,
        window,
        c,
    ]);
    (windows, (hp, wp))
}

/// The inverse of [`window_partition`], dropping the padding.
pub fn window_unpartition(
    windows: Tensor<4>,
    window: usize,
    padded: (usize, usize),
    size: (usize, usize),
) -> Tensor<4> {
    let [n, _, _, c] = windows.dims();
    let (hp, wp) = padded;
    let b = n / (hp / window * (wp / window));
    let x = windows
        .reshape([b, hp / window, wp / window, window, window, c])
        .permute([0, 1, 3, 2, 4, 5])
        .reshape([b, hp, wp, c]);
    if (hp, wp) == size { x } else { x.slice([0..b, 0..size.0, 0..size.1, 0..c]) }
}

/// `ImageEncoderViT`: `[B, 3, S, S]` normalised pixels to a `[B, out_chans, S/16, S/16]` embedding.
#[derive(Module, Debug)]
pub struct ImageEncoderViT {
    pub patch_embed: PatchEmbed,
    pub pos_embed: Param<Tensor<4>>,
    pub blocks: Vec<Block>,
    pub neck: Neck,
}

impl ImageEncoderViT {
    pub fn new(config: &ImageEncoderConfig, device: &Device) -> Self {
        let (p, dim, grid) = (config.patch_size, config.embed_dim, config.grid());
        let proj = Conv2dConfig::new([3, dim], [p, p]).with_stride([p, p]).init(device);
        let blocks = (0..config.depth)
            .map(|i| {
                let window = if config.global_attn_indexes.contains(&i) { 0 } else { config.window_size };
                Block::new(config, window, device)
            })
            .collect();
        let neck = neck(dim, config.out_chans, device);
        Self {
            patch_embed: PatchEmbed { proj },
            pos_embed: Param::from_tensor(Tensor::zeros([1, grid, grid, dim], device)),
            blocks,
            neck,
        }
    }

    pub fn forward(&self, images: Tensor<4>) -> Tensor<4> {
        let x = self.patch_embed.proj.forward(images).permute([0, 2, 3, 1]);
        let x = x + self.pos_embed.val();
        let x = self.blocks.iter().fold(x, |x, block| block.forward(x));
        neck_forward(&self.neck, x.permute([0, 3, 1, 2]))
    }
}
