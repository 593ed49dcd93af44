//! GroundingDINO's cross-modality decoder (`transformer.py` `TransformerDecoder`,
//! `DeformableTransformerDecoderLayer`): per layer, the query position from the sine embedding of the
//! current reference box (`ref_point_head`), self-attention, text cross-attention (`ca_text`),
//! deformable cross-attention into the image memory around the box, a ReLU FFN — all post-norm —
//! then iterative box refinement with the shared `bbox_embed` (the reference is detached between
//! layers, as in DINO). Each layer's output is normed by the shared `norm`.

use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::{relu, sigmoid};
use burn::tensor::{Bool, Device, Tensor};

use super::attention::{MultiheadAttention, mask_to_bias};
use super::encoder::ImageTokens;
use super::ms_deform_attn::{MsDeformAttn, Reference};
use super::position_encoding::box_sine_embedding;
use crate::nn::Mlp;

#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub cross_attn: MsDeformAttn,
    pub norm1: LayerNorm,
    pub ca_text: MultiheadAttention,
    pub catext_norm: LayerNorm,
    pub self_attn: MultiheadAttention,
    pub norm2: LayerNorm,
    pub linear1: Linear,
    pub linear2: Linear,
    pub norm3: LayerNorm,
}

#[derive(Module, Debug)]
pub struct TransformerDecoder {
    pub layers: Vec<DecoderLayer>,
    pub norm: LayerNorm,
    pub ref_point_head: Mlp,
}

/// What every decoder layer produced: the normed queries and the reference boxes (sigmoid space)
/// each layer *used*, from which the heads predict.
pub struct DecoderOutput {
    pub hidden: Vec<Tensor<3>>,
    pub references: Vec<Tensor<3>>,
}

/// `inverse_sigmoid` of GroundingDINO (`util/misc.py`): clamped to [0, 1], then eps 1e-3.
pub fn inverse_sigmoid(x: Tensor<3>) -> Tensor<3> {
    let x = x.clamp(0.0, 1.0);
    (x.clone().clamp_min(1e-3) / (x.neg() + 1.0).clamp_min(1e-3)).log()
}

impl TransformerDecoder {
    pub fn new(
        layers: usize,
        dim: usize,
        heads: usize,
        ffn: usize,
        levels: usize,
        points: usize,
        device: &Device,
    ) -> Self {
        let norm = || LayerNormConfig::new(dim).init(device);
        Self {
            layers: (0..layers)
                .map(|_| DecoderLayer {
                    cross_attn: MsDeformAttn::new(dim, heads, levels, points, device),
                    norm1: norm(),
                    ca_text: MultiheadAttention::new(dim, heads, device),
                    catext_norm: norm(),
                    self_attn: MultiheadAttention::new(dim, heads, device),
                    norm2: norm(),
                    linear1: LinearConfig::new(dim, ffn).init(device),
                    linear2: LinearConfig::new(ffn, dim).init(device),
                    norm3: norm(),
                })
                .collect(),
            norm: norm(),
            ref_point_head: Mlp::new(2 * dim, dim, dim, 2, device),
        }
    }

    /// `queries [B, Q, d]`, `reference_logits [B, Q, 4]` (unsigmoided cx cy w h), the encoder's image
    /// memory and text memory; `valid_ratios [B, L, 2]` (w, h) of each level's unpadded part.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        queries: Tensor<3>,
        reference_logits: Tensor<3>,
        memory: &ImageTokens,
        memory_text: Tensor<3>,
        text_padding: Tensor<2, Bool>,
        valid_ratios: Tensor<3>,
        bbox_embed: &Mlp,
    ) -> DecoderOutput {
        let [b, q, dim] = queries.dims();
        let text_bias = mask_to_bias(text_padding.bool_not()).unsqueeze_dim::<3>(1).unsqueeze_dim::<4>(1);
        let ratios = Tensor::cat(vec![valid_ratios.clone(), valid_ratios], 2).unsqueeze_dim::<4>(1); // [B, 1, L, 4]
        // Each layer samples around a detached reference; the heads see the attached one, so the box
        // loss of layer l also trains layer l-1's refinement (DINO's "look forward twice").
        let mut reference = sigmoid(reference_logits);
        let mut head_reference = reference.clone();
        let mut output = DecoderOutput { hidden: Vec::new(), references: Vec::new() };
        let mut tgt = queries;
        for layer in &self.layers {
            let reference_input = reference.clone().unsqueeze_dim::<4>(2) * ratios.clone(); // [B, Q, L, 4]
            let level0 = reference_input.clone().narrow(2, 0, 1).reshape([b, q, 4]);
            let query_pos = self.ref_point_head.forward(box_sine_embedding(level0, dim / 2));
            tgt = layer.forward(
                tgt,
                query_pos,
                &Reference::Boxes(reference_input),
                memory,
                memory_text.clone(),
                text_bias.clone(),
            );
            output.references.push(head_reference);
            let refined = sigmoid(bbox_embed.forward(tgt.clone()) + inverse_sigmoid(reference.clone()));
            head_reference = refined.clone();
            reference = refined.detach();
            output.hidden.push(self.norm.forward(tgt.clone()));
        }
        output
    }
}

impl DecoderLayer {
    fn forward(
        &self,
        tgt: Tensor<3>,
        query_pos: Tensor<3>,
        reference: &Reference,
        memory: &ImageTokens,
        memory_text: Tensor<3>,
        text_bias: Tensor<4>,
    ) -> Tensor<3> {
        let q = tgt.clone() + query_pos.clone();
        let tgt = self.norm2.forward(tgt.clone() + self.self_attn.forward(q.clone(), q, tgt, None));
        let attended =
            self.ca_text.forward(tgt.clone() + query_pos.clone(), memory_text.clone(), memory_text, Some(text_bias));
        let tgt = self.catext_norm.forward(tgt + attended);
        let attended = self.cross_attn.forward(
            tgt.clone() + query_pos,
            memory.tokens.clone(),
            memory.padding.clone(),
            reference,
            &memory.shapes,
        );
        let tgt = self.norm1.forward(tgt + attended);
        let inner = self.linear2.forward(relu(self.linear1.forward(tgt.clone())));
        self.norm3.forward(tgt + inner)
    }
}
