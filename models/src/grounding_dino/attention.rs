//! PyTorch's `nn.MultiheadAttention` as GroundingDINO uses it (the text enhancer's self-attention, the
//! decoder's self-attention and text cross-attention): one packed `in_proj_weight` `[3d, d]` with rows
//! `[q; k; v]` and `in_proj_bias`, kept in the official layout so `groundingdino_swint_ogc.pth` loads
//! as it is, and `out_proj` (a Linear, so LoRA can adapt it as PEFT does).

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Distribution, Tensor};

#[derive(Module, Debug)]
pub struct MultiheadAttention {
    pub in_proj_weight: Param<Tensor<2>>,
    pub in_proj_bias: Param<Tensor<1>>,
    pub out_proj: Linear,
    #[module(skip)]
    pub num_heads: usize,
}

impl MultiheadAttention {
    pub fn new(dim: usize, num_heads: usize, device: &Device) -> Self {
        let bound = (6.0 / (4 * dim) as f64).sqrt();
        Self {
            in_proj_weight: Param::from_tensor(Tensor::random(
                [3 * dim, dim],
                Distribution::Uniform(-bound, bound),
                device,
            )),
            in_proj_bias: Param::from_tensor(Tensor::zeros([3 * dim], device)),
            out_proj: LinearConfig::new(dim, dim).init(device),
            num_heads,
        }
    }

    fn project(&self, x: Tensor<3>, part: usize) -> Tensor<3> {
        let dim = self.in_proj_bias.dims()[0] / 3;
        let weight = self.in_proj_weight.val().narrow(0, part * dim, dim).transpose().unsqueeze::<3>();
        let bias = self.in_proj_bias.val().narrow(0, part * dim, dim).reshape([1, 1, dim]);
        x.matmul(weight) + bias
    }

    /// `query [B, Lq, d]`, `key`/`value [B, Lk, d]`; `bias` is added to the scaled scores before the
    /// softmax (broadcast from `[B or 1, heads or 1, Lq, Lk]`; `-inf` or a large negative value masks).
    pub fn forward(&self, query: Tensor<3>, key: Tensor<3>, value: Tensor<3>, bias: Option<Tensor<4>>) -> Tensor<3> {
        let [batch, lq, dim] = query.dims();
        let lk = key.dims()[1];
        let heads = self.num_heads;
        let head_dim = dim / heads;
        let split = |x: Tensor<3>, len: usize| x.reshape([batch, len, heads, head_dim]).swap_dims(1, 2);
        let q = split(self.project(query, 0), lq) * (head_dim as f64).powf(-0.5);
        let k = split(self.project(key, 1), lk);
        let v = split(self.project(value, 2), lk);
        let mut scores = q.matmul(k.swap_dims(2, 3));
        if let Some(bias) = bias {
            scores = scores + bias;
        }
        let out = softmax(scores, 3).matmul(v).swap_dims(1, 2).reshape([batch, lq, dim]);
        self.out_proj.forward(out)
    }
}

/// An additive attention bias from a boolean "may attend" mask: 0 where allowed, a large negative
/// value elsewhere (as HF BERT's `(1 - mask) * finfo.min`, finite so fully masked rows stay defined).
pub fn mask_to_bias<const D: usize>(allowed: Tensor<D, burn::tensor::Bool>) -> Tensor<D> {
    allowed.bool_not().float() * MASKED
}

/// The additive bias of a masked attention entry.
pub const MASKED: f32 = -1.0e9;
