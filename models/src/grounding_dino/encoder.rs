//! GroundingDINO's feature enhancer (`transformer.py` `TransformerEncoder`): per layer, image–text
//! fusion (`fusion_layers`), the text enhancer (`text_layers`: self-attention within each phrase,
//! sine positions of the per-phrase position ids, post-norm, ReLU FFN; `transformer_vanilla.py`
//! `TransformerEncoderLayer`), then multi-scale deformable self-attention over the image tokens
//! (`layers`: `DeformableTransformerEncoderLayer`, post-norm, ReLU FFN).

use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::relu;
use burn::tensor::{Bool, Device, Tensor};

use super::attention::{MultiheadAttention, mask_to_bias};
use super::fusion::BiAttentionBlock;
use super::ms_deform_attn::{MsDeformAttn, Reference};

#[derive(Module, Debug)]
pub struct DeformableEncoderLayer {
    pub self_attn: MsDeformAttn,
    pub norm1: LayerNorm,
    pub linear1: Linear,
    pub linear2: Linear,
    pub norm2: LayerNorm,
}

#[derive(Module, Debug)]
pub struct TextEnhancerLayer {
    pub self_attn: MultiheadAttention,
    pub linear1: Linear,
    pub linear2: Linear,
    pub norm1: LayerNorm,
    pub norm2: LayerNorm,
}

#[derive(Module, Debug)]
pub struct TransformerEncoder {
    pub layers: Vec<DeformableEncoderLayer>,
    pub text_layers: Vec<TextEnhancerLayer>,
    pub fusion_layers: Vec<BiAttentionBlock>,
}

/// The image side of the encoder's input: flattened tokens of every level with their positions.
pub struct ImageTokens {
    /// `[B, N, d]`
    pub tokens: Tensor<3>,
    /// `[B, N, d]`: sine position + level embedding.
    pub positions: Tensor<3>,
    /// `[B, N]`, true on padded cells; `None` when no image of the batch is padded.
    pub padding: Option<Tensor<2, Bool>>,
    pub shapes: Vec<(usize, usize)>,
}

/// The text side: features `[B, T, d]`, padding `[B, T]` (true = pad), the sub-sentence mask
/// `[B, T, T]` (true = may attend) and the positions `[B, T, d]` from the per-phrase position ids.
pub struct TextTokens {
    pub features: Tensor<3>,
    pub padding: Tensor<2, Bool>,
    pub self_attention: Tensor<3, Bool>,
    pub positions: Tensor<3>,
}

impl TransformerEncoder {
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
        let linear = |i: usize, o: usize| LinearConfig::new(i, o).init(device);
        Self {
            layers: (0..layers)
                .map(|_| DeformableEncoderLayer {
                    self_attn: MsDeformAttn::new(dim, heads, levels, points, device),
                    norm1: norm(),
                    linear1: linear(dim, ffn),
                    linear2: linear(ffn, dim),
                    norm2: norm(),
                })
                .collect(),
            text_layers: (0..layers)
                .map(|_| TextEnhancerLayer {
                    self_attn: MultiheadAttention::new(dim, heads / 2, device),
                    linear1: linear(dim, ffn / 2),
                    linear2: linear(ffn / 2, dim),
                    norm1: norm(),
                    norm2: norm(),
                })
                .collect(),
            fusion_layers: (0..layers).map(|_| BiAttentionBlock::new(dim, ffn / 2, heads / 2, device)).collect(),
        }
    }

    /// `(memory [B, N, d], memory_text [B, T, d])`. `reference` holds the encoder's reference
    /// points `[B, N, L, 2]`.
    pub fn forward(&self, image: &ImageTokens, text: &TextTokens, reference: &Reference) -> (Tensor<3>, Tensor<3>) {
        let mut memory = image.tokens.clone();
        let mut memory_text = text.features.clone();
        let text_bias = mask_to_bias(text.self_attention.clone()).unsqueeze_dim::<4>(1);
        for ((layer, text_layer), fusion) in self.layers.iter().zip(&self.text_layers).zip(&self.fusion_layers) {
            (memory, memory_text) = fusion.forward(memory, memory_text, image.padding.clone(), text.padding.clone());
            memory_text = text_layer.forward(memory_text, text.positions.clone(), text_bias.clone());
            memory = layer.forward(memory, image, reference);
        }
        (memory, memory_text)
    }
}

impl TextEnhancerLayer {
    /// The official layer ignores the padding mask: padding tokens only see themselves anyway.
    fn forward(&self, text: Tensor<3>, positions: Tensor<3>, bias: Tensor<4>) -> Tensor<3> {
        let q = text.clone() + positions;
        let attended = self.self_attn.forward(q.clone(), q, text.clone(), Some(bias));
        let text = self.norm1.forward(text + attended);
        let inner = self.linear2.forward(relu(self.linear1.forward(text.clone())));
        self.norm2.forward(text + inner)
    }
}

impl DeformableEncoderLayer {
    fn forward(&self, memory: Tensor<3>, image: &ImageTokens, reference: &Reference) -> Tensor<3> {
        let attended = self.self_attn.forward(
            memory.clone() + image.positions.clone(),
            memory.clone(),
            image.padding.clone(),
            reference,
            &image.shapes,
        );
        let memory = self.norm1.forward(memory + attended);
        let inner = self.linear2.forward(relu(self.linear1.forward(memory.clone())));
        self.norm2.forward(memory + inner)
    }
}
