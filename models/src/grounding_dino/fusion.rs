//! GroundingDINO's image–text feature fusion (`fuse_modules.py` `BiAttentionBlock` /
//! `BiMultiHeadAttention`, after GLIP): one attention matrix between image tokens and text tokens,
//! softmaxed over the text for the image update and over the image for the text update; both updates
//! are scaled by learned per-channel `gamma_v` / `gamma_l` and added to the *normalised* inputs.

use burn::module::{Module, Param};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::softmax;
use burn::tensor::{Bool, Device, Tensor};

#[derive(Module, Debug)]
pub struct BiMultiHeadAttention {
    pub v_proj: Linear,
    pub l_proj: Linear,
    pub values_v_proj: Linear,
    pub values_l_proj: Linear,
    pub out_v_proj: Linear,
    pub out_l_proj: Linear,
    #[module(skip)]
    pub num_heads: usize,
}

#[derive(Module, Debug)]
pub struct BiAttentionBlock {
    pub layer_norm_v: LayerNorm,
    pub layer_norm_l: LayerNorm,
    pub attn: BiMultiHeadAttention,
    pub gamma_v: Param<Tensor<1>>,
    pub gamma_l: Param<Tensor<1>>,
}

impl BiAttentionBlock {
    /// `v_dim = l_dim = dim`, attention width `embed_dim` in `num_heads` heads; layer scale 1e-4.
    pub fn new(dim: usize, embed_dim: usize, num_heads: usize, device: &Device) -> Self {
        let linear = |i: usize, o: usize| LinearConfig::new(i, o).init(device);
        Self {
            layer_norm_v: LayerNormConfig::new(dim).init(device),
            layer_norm_l: LayerNormConfig::new(dim).init(device),
            attn: BiMultiHeadAttention {
                v_proj: linear(dim, embed_dim),
                l_proj: linear(dim, embed_dim),
                values_v_proj: linear(dim, embed_dim),
                values_l_proj: linear(dim, embed_dim),
                out_v_proj: linear(embed_dim, dim),
                out_l_proj: linear(embed_dim, dim),
                num_heads,
            },
            gamma_v: Param::from_tensor(Tensor::ones([dim], device) * 1e-4),
            gamma_l: Param::from_tensor(Tensor::ones([dim], device) * 1e-4),
        }
    }

    /// `v [B, Nv, d]` image tokens, `l [B, Nt, d]` text tokens; `*_padding` true on padding.
    pub fn forward(
        &self,
        v: Tensor<3>,
        l: Tensor<3>,
        v_padding: Option<Tensor<2, Bool>>,
        l_padding: Tensor<2, Bool>,
    ) -> (Tensor<3>, Tensor<3>) {
        let v = self.layer_norm_v.forward(v);
        let l = self.layer_norm_l.forward(l);
        let a = &self.attn;
        let [b, nv, _] = v.dims();
        let nt = l.dims()[1];
        let embed = a.v_proj.weight.dims()[1];
        let heads = a.num_heads;
        let hd = embed / heads;
        let split = |x: Tensor<3>, n: usize| x.reshape([b, n, heads, hd]).swap_dims(1, 2);
        let q = split(a.v_proj.forward(v.clone()), nv) * (hd as f64).powf(-0.5);
        let k = split(a.l_proj.forward(l.clone()), nt);
        let values_v = split(a.values_v_proj.forward(v.clone()), nv);
        let values_l = split(a.values_l_proj.forward(l.clone()), nt);
        let scores = q.matmul(k.swap_dims(2, 3)); // [B, h, Nv, Nt]

        let text_masked = scores.clone().mask_fill(
            l_padding.unsqueeze_dim::<3>(1).unsqueeze_dim::<4>(1).expand([b, heads, nv, nt]),
            f32::NEG_INFINITY,
        );
        let to_image = softmax(text_masked, 3).matmul(values_l); // [B, h, Nv, hd]
        let mut image_scores = scores.swap_dims(2, 3); // [B, h, Nt, Nv]
        if let Some(padding) = v_padding {
            image_scores = image_scores.mask_fill(
                padding.unsqueeze_dim::<3>(1).unsqueeze_dim::<4>(1).expand([b, heads, nt, nv]),
                f32::NEG_INFINITY,
            );
        }
        let to_text = softmax(image_scores, 3).matmul(values_v); // [B, h, Nt, hd]
        let delta_v = a.out_v_proj.forward(to_image.swap_dims(1, 2).reshape([b, nv, embed]));
        let delta_l = a.out_l_proj.forward(to_text.swap_dims(1, 2).reshape([b, nt, embed]));
        let dim = self.gamma_v.dims()[0];
        (v + delta_v * self.gamma_v.val().reshape([1, 1, dim]), l + delta_l * self.gamma_l.val().reshape([1, 1, dim]))
    }
}
