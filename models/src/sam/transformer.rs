//! SAM's two-way transformer (segment_anything/modeling/transformer.py `TwoWayTransformer`,
//! `TwoWayAttentionBlock`, `Attention`): prompt tokens attend to themselves, tokens attend to the
//! image, an MLP on the tokens, and the image attends back to the tokens; a final token-to-image
//! attention. Cross attentions run at half width (`attention_downsample_rate` 2). Keys:
//! `layers.<i>.{self_attn,norm1,cross_attn_token_to_image,norm2,mlp.{lin1,lin2},norm3,norm4,
//! cross_attn_image_to_token}`, `final_attn_token_to_image`, `norm_final_attn`.

use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor};

use super::common::{Activation, MlpBlock};

/// Attention with `q/k/v/out` projections through an internal width of `dim / downsample_rate`.
#[derive(Module, Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    #[module(skip)]
    pub num_heads: usize,
}

impl Attention {
    pub fn new(dim: usize, num_heads: usize, downsample_rate: usize, device: &Device) -> Self {
        let internal = dim / downsample_rate;
        assert!(internal % num_heads == 0, "num_heads must divide embedding_dim / downsample_rate");
        Self {
            q_proj: LinearConfig::new(dim, internal).init(device),
            k_proj: LinearConfig::new(dim, internal).init(device),
            v_proj: LinearConfig::new(dim, internal).init(device),
            out_proj: LinearConfig::new(internal, dim).init(device),
            num_heads,
        }
    }

    fn separate_heads(&self, x: Tensor<3>) -> Tensor<4> {
        let [b, n, c] = x.dims();
        x.reshape([b, n, self.num_heads, c / self.num_heads]).swap_dims(1, 2)
    }

    pub fn forward(&self, q: Tensor<3>, k: Tensor<3>, v: Tensor<3>) -> Tensor<3> {
        let q = self.separate_heads(self.q_proj.forward(q));
        let k = self.separate_heads(self.k_proj.forward(k));
        let v = self.separate_heads(self.v_proj.forward(v));
        let [b, heads, n, head_dim] = q.dims();
        let attention = q.matmul(k.swap_dims(2, 3)) / (head_dim as f64).sqrt();
        let out = softmax(attention, 3).matmul(v);
        self.out_proj.forward(out.swap_dims(1, 2).reshape([b, n, heads * head_dim]))
    }
}

#[derive(Module, Debug)]
pub struct TwoWayAttentionBlock {
    pub self_attn: Attention,
    pub norm1: LayerNorm,
    pub cross_attn_token_to_image: Attention,
    pub norm2: LayerNorm,
    pub mlp: MlpBlock,
    pub norm3: LayerNorm,
    pub norm4: LayerNorm,
    pub cross_attn_image_to_token: Attention,
    #[module(skip)]
    pub skip_first_layer_pe: bool,
}

impl TwoWayAttentionBlock {
    fn new(dim: usize, num_heads: usize, mlp_dim: usize, skip_first_layer_pe: bool, device: &Device) -> Self {
        let norm = || LayerNormConfig::new(dim).init(device);
        Self {
            self_attn: Attention::new(dim, num_heads, 1, device),
            norm1: norm(),
            cross_attn_token_to_image: Attention::new(dim, num_heads, 2, device),
            norm2: norm(),
            mlp: MlpBlock::new(dim, mlp_dim, Activation::Relu, device),
            norm3: norm(),
            norm4: norm(),
            cross_attn_image_to_token: Attention::new(dim, num_heads, 2, device),
            skip_first_layer_pe,
        }
    }

    pub fn forward(
        &self,
        queries: Tensor<3>,
        keys: Tensor<3>,
        query_pe: Tensor<3>,
        key_pe: Tensor<3>,
    ) -> (Tensor<3>, Tensor<3>) {
        let queries = if self.skip_first_layer_pe {
            self.self_attn.forward(queries.clone(), queries.clone(), queries)
        } else {
            let q = queries.clone() + query_pe.clone();
            queries.clone() + self.self_attn.forward(q.clone(), q, queries)
        };
        let queries = self.norm1.forward(queries);

        let q = queries.clone() + query_pe.clone();
        let k = keys.clone() + key_pe.clone();
        let queries = self.norm2.forward(queries + self.cross_attn_token_to_image.forward(q, k, keys.clone()));

        let queries = self.norm3.forward(queries.clone() + self.mlp.forward(queries));

        let q = queries.clone() + query_pe;
        let k = keys.clone() + key_pe;
        let keys = self.norm4.forward(keys + self.cross_attn_image_to_token.forward(k, q, queries.clone()));
        (queries, keys)
    }
}

#[derive(Module, Debug)]
pub struct TwoWayTransformer {
    pub layers: Vec<TwoWayAttentionBlock>,
    pub final_attn_token_to_image: Attention,
    pub norm_final_attn: LayerNorm,
}

impl TwoWayTransformer {
    pub fn new(depth: usize, dim: usize, num_heads: usize, mlp_dim: usize, device: &Device) -> Self {
        Self {
            layers: (0..depth).map(|i| TwoWayAttentionBlock::new(dim, num_heads, mlp_dim, i == 0, device)).collect(),
            final_attn_token_to_image: Attention::new(dim, num_heads, 2, device),
            norm_final_attn: LayerNormConfig::new(dim).init(device),
        }
    }

    /// `image_embedding`, `image_pe`: `[B, C, h, w]`; `point_embedding`: `[B, tokens, C]`.
    /// Returns the processed tokens and the image as `[B, h*w, C]`.
    pub fn forward(
        &self,
        image_embedding: Tensor<4>,
        image_pe: Tensor<4>,
        point_embedding: Tensor<3>,
    ) -> (Tensor<3>, Tensor<3>) {
        let [b, c, h, w] = image_embedding.dims();
        let image = image_embedding.reshape([b, c, h * w]).swap_dims(1, 2);
        let image_pe = image_pe.reshape([b, c, h * w]).swap_dims(1, 2);
        let (mut queries, mut keys) = (point_embedding.clone(), image);
        for layer in &self.layers {
            (queries, keys) = layer.forward(queries, keys, point_embedding.clone(), image_pe.clone());
        }
        let q = queries.clone() + point_embedding;
        let k = keys.clone() + image_pe;
        let queries =
            self.norm_final_attn.forward(queries + self.final_attn_token_to_image.forward(q, k, keys.clone()));
        (queries, keys)
    }
}
