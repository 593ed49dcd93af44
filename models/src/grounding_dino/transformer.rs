//! GroundingDINO's transformer glue (`transformer.py` `Transformer.forward`): flattening the levels,
//! the encoder's reference points, and the two-stage, language-guided query selection
//! (`gen_encoder_output_proposals`, `enc_output` + `enc_output_norm`, contrastive scores against the
//! enhanced text, top-k by the best token, boxes from `enc_out_bbox_embed` + the proposal), then the
//! decoder with the learned content queries `tgt_embed`.

use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::sigmoid;
use burn::tensor::{Bool, Device, Distribution, Int, Tensor, TensorData};

use super::decoder::{DecoderOutput, TransformerDecoder};
use super::encoder::{ImageTokens, TextTokens, TransformerEncoder};
use super::ms_deform_attn::Reference;
use crate::nn::Mlp;

/// The logit GroundingDINO gives a padded or out-of-range proposal (+inf there; any value whose
/// sigmoid is exactly 1 in f32 behaves the same, and a finite one keeps gradients finite).
const INVALID_PROPOSAL: f32 = 1.0e4;

#[derive(Module, Debug)]
pub struct Transformer {
    pub level_embed: Param<Tensor<2>>,
    pub tgt_embed: Embedding,
    pub enc_output: Linear,
    pub enc_output_norm: LayerNorm,
    pub enc_out_bbox_embed: Mlp,
    pub encoder: TransformerEncoder,
    pub decoder: TransformerDecoder,
}

/// The padding of every level of a batch, computed once on the host.
pub struct LevelMasks {
    pub shapes: Vec<(usize, usize)>,
    /// `[level][image][i * w + j]`, true on padding.
    pub padding: Vec<Vec<Vec<bool>>>,
}

impl LevelMasks {
    pub fn any_padding(&self) -> bool {
        self.padding.iter().flatten().flatten().any(|&p| p)
    }

    fn batch(&self) -> usize {
        self.padding.first().map_or(0, Vec::len)
    }

    /// `(unpadded rows, unpadded columns)` of image `b` at `level`, from its first column and row.
    fn valid(&self, level: usize, b: usize) -> (usize, usize) {
        let (h, w) = self.shapes[level];
        let mask = &self.padding[level][b];
        ((0..h).filter(|&i| !mask[i * w]).count(), (0..w).filter(|&j| !mask[j]).count())
    }

    /// `[B, L, 2]`: (valid w / W, valid h / H) per level.
    pub fn valid_ratios(&self, device: &Device) -> Tensor<3> {
        let (b, l) = (self.batch(), self.shapes.len());
        let mut out = Vec::with_capacity(b * l * 2);
        for image in 0..b {
            for (level, &(h, w)) in self.shapes.iter().enumerate() {
                let (vh, vw) = self.valid(level, image);
                out.extend([vw as f32 / w as f32, vh as f32 / h as f32]);
            }
        }
        Tensor::from_data(TensorData::new(out, [b, l, 2]), device)
    }

    /// `TransformerEncoder.get_reference_points`: `[B, N, L, 2]`.
    pub fn encoder_reference_points(&self, device: &Device) -> Tensor<4> {
        let (b, l) = (self.batch(), self.shapes.len());
        let n: usize = self.shapes.iter().map(|&(h, w)| h * w).sum();
        let mut out = Vec::with_capacity(b * n * l * 2);
        for image in 0..b {
            let ratios: Vec<(f32, f32)> = (0..l)
                .map(|level| {
                    let (vh, vw) = self.valid(level, image);
                    let (h, w) = self.shapes[level];
                    (vw as f32 / w as f32, vh as f32 / h as f32)
                })
                .collect();
            for (level, &(h, w)) in self.shapes.iter().enumerate() {
                let (rw, rh) = ratios[level];
                for i in 0..h {
                    for j in 0..w {
                        let y = (i as f32 + 0.5) / (rh * h as f32);
                        let x = (j as f32 + 0.5) / (rw * w as f32);
                        for &(rw2, rh2) in &ratios {
                            out.extend([x * rw2, y * rh2]);
                        }
                    }
                }
            }
        }
        Tensor::from_data(TensorData::new(out, [b, n, l, 2]), device)
    }

    /// `gen_encoder_output_proposals`: `[B, N, 4]` proposal logits and `[B, N]` "usable" (unpadded,
    /// all four values inside (0.01, 0.99)).
    pub fn proposals(&self, device: &Device) -> (Tensor<3>, Tensor<2, Bool>) {
        let b = self.batch();
        let n: usize = self.shapes.iter().map(|&(h, w)| h * w).sum();
        let mut logits = Vec::with_capacity(b * n * 4);
        let mut usable = Vec::with_capacity(b * n);
        for image in 0..b {
            for (level, &(h, w)) in self.shapes.iter().enumerate() {
                let (vh, vw) = self.valid(level, image);
                let size = 0.05 * 2f32.powi(level as i32);
                for i in 0..h {
                    for j in 0..w {
                        let proposal = [(j as f32 + 0.5) / vw as f32, (i as f32 + 0.5) / vh as f32, size, size];
                        let ok =
                            !self.padding[level][image][i * w + j] && proposal.iter().all(|&p| p > 0.01 && p < 0.99);
                        usable.push(ok);
                        logits.extend(proposal.map(|p| if ok { (p / (1.0 - p)).ln() } else { INVALID_PROPOSAL }));
                    }
                }
            }
        }
        (
            Tensor::from_data(TensorData::new(logits, [b, n, 4]), device),
            Tensor::from_data(TensorData::new(usable, [b, n]), device),
        )
    }
}

/// The two-stage selection's result.
pub struct QuerySelection {
    /// `[B, Q]` indices into the flattened image tokens, best first.
    pub indices: Tensor<2, Int>,
    /// `[B, Q, d]` the selected `output_memory` rows (the encoder head's queries).
    pub memory: Tensor<3>,
    /// `[B, Q, 4]` unsigmoided boxes of the selected proposals (not detached).
    pub box_logits: Tensor<3>,
}

impl Transformer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dim: usize,
        heads: usize,
        enc_layers: usize,
        dec_layers: usize,
        ffn: usize,
        levels: usize,
        enc_points: usize,
        dec_points: usize,
        queries: usize,
        device: &Device,
    ) -> Self {
        let mut enc_out_bbox_embed = Mlp::new(dim, dim, 4, 3, device);
        super::zero_last_layer(&mut enc_out_bbox_embed, device);
        Self {
            level_embed: Param::from_tensor(Tensor::random([levels, dim], Distribution::Normal(0.0, 1.0), device)),
            tgt_embed: EmbeddingConfig::new(queries, dim).init(device),
            enc_output: LinearConfig::new(dim, dim).init(device),
            enc_output_norm: LayerNormConfig::new(dim).init(device),
            enc_out_bbox_embed,
            encoder: TransformerEncoder::new(enc_layers, dim, heads, ffn, levels, enc_points, device),
            decoder: TransformerDecoder::new(dec_layers, dim, heads, ffn, levels, dec_points, device),
        }
    }

    pub fn num_queries(&self) -> usize {
        self.tgt_embed.weight.dims()[0]
    }

    /// Flattens per-level `[B, d, h, w]` sources and positions into encoder tokens.
    pub fn flatten(&self, sources: Vec<Tensor<4>>, positions: Vec<Tensor<4>>, masks: &LevelMasks) -> ImageTokens {
        let device = self.level_embed.device();
        let dim = self.level_embed.dims()[1];
        let to_tokens = |x: Tensor<4>| {
            let [b, c, h, w] = x.dims();
            x.reshape([b, c, h * w]).swap_dims(1, 2)
        };
        let tokens = Tensor::cat(sources.into_iter().map(to_tokens).collect(), 1);
        let positions = Tensor::cat(
            positions
                .into_iter()
                .enumerate()
                .map(|(level, pos)| to_tokens(pos) + self.level_embed.val().narrow(0, level, 1).reshape([1, 1, dim]))
                .collect(),
            1,
        );
        let padding = masks.any_padding().then(|| {
            let b = masks.batch();
            let flat: Vec<bool> = (0..b)
                .flat_map(|image| masks.padding.iter().flat_map(move |level| level[image].iter().copied()))
                .collect();
            let n = flat.len() / b.max(1);
            Tensor::from_data(TensorData::new(flat, [b, n]), &device)
        });
        ImageTokens { tokens, positions, padding, shapes: masks.shapes.clone() }
    }

    pub fn encode(&self, image: &ImageTokens, text: &TextTokens, masks: &LevelMasks) -> (Tensor<3>, Tensor<3>) {
        let reference = Reference::Points(masks.encoder_reference_points(&image.tokens.device()));
        self.encoder.forward(image, text, &reference)
    }

    /// Language-guided query selection on the encoder's memory. Also returns the scores of every
    /// token `[B, N, T]` (padded text columns -inf).
    pub fn select_queries(
        &self,
        memory: Tensor<3>,
        memory_text: Tensor<3>,
        text_mask: Tensor<2, Bool>,
        masks: &LevelMasks,
    ) -> QuerySelection {
        let device = memory.device();
        let [b, n, d] = memory.dims();
        let (proposals, usable) = masks.proposals(&device);
        let output_memory = memory.mask_fill(usable.bool_not().unsqueeze_dim::<3>(2).expand([b, n, d]), 0.0);
        let output_memory = self.enc_output_norm.forward(self.enc_output.forward(output_memory));
        let scores = contrastive_logits(output_memory.clone(), memory_text, text_mask).max_dim(2).reshape([b, n]);
        let queries = self.num_queries().min(n);
        let (_, indices) = scores.topk_with_indices(queries, 1);
        let box_logits_all = self.enc_out_bbox_embed.forward(output_memory.clone()) + proposals;
        let gather =
            |x: Tensor<3>, width: usize| x.gather(1, indices.clone().unsqueeze_dim::<3>(2).expand([b, queries, width]));
        QuerySelection { memory: gather(output_memory, d), box_logits: gather(box_logits_all, 4), indices }
    }

    /// The decoder from the selected proposals with the learned content queries.
    pub fn decode(
        &self,
        selection: &QuerySelection,
        image: &ImageTokens,
        memory_text: Tensor<3>,
        text_mask: Tensor<2, Bool>,
        masks: &LevelMasks,
        bbox_embed: &Mlp,
    ) -> DecoderOutput {
        let device = memory_text.device();
        let b = memory_text.dims()[0];
        let queries = selection.indices.dims()[1];
        let tgt = self.tgt_embed.weight.val().narrow(0, 0, queries).unsqueeze::<3>().repeat_dim(0, b);
        self.decoder.forward(
            tgt,
            selection.box_logits.clone().detach(),
            image,
            memory_text,
            text_mask.bool_not(),
            masks.valid_ratios(&device),
            bbox_embed,
        )
    }
}

/// `ContrastiveEmbed`: `x · textᵀ` (no scale, no bias), -inf on padded text tokens.
pub fn contrastive_logits(x: Tensor<3>, text: Tensor<3>, text_mask: Tensor<2, Bool>) -> Tensor<3> {
    let [b, q, _] = x.dims();
    let t = text.dims()[1];
    let logits = x.matmul(text.swap_dims(1, 2));
    logits.mask_fill(text_mask.bool_not().unsqueeze_dim::<3>(1).expand([b, q, t]), f32::NEG_INFINITY)
}

/// Boxes of a head: `sigmoid(bbox_embed(hidden) + inverse_sigmoid(reference))`.
pub fn head_boxes(bbox_embed: &Mlp, hidden: Tensor<3>, reference: Tensor<3>) -> Tensor<3> {
    sigmoid(bbox_embed.forward(hidden) + super::decoder::inverse_sigmoid(reference))
}
