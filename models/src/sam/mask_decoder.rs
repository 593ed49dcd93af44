//! SAM's mask decoder (segment_anything/modeling/mask_decoder.py `MaskDecoder`): an IoU token and
//! 3 + 1 mask tokens join the prompt tokens, pass the two-way transformer with the image embedding,
//! the image is upscaled 4x by two transposed convolutions, and each mask token's hypernetwork MLP
//! turns it into weights over the upscaled channels; an MLP on the IoU token predicts mask quality.
//! Keys: `transformer.*`, `iou_token`, `mask_tokens`, `output_upscaling.{0,1,3}`,
//! `output_hypernetworks_mlps.<i>.layers.<j>`, `iou_prediction_head.layers.<j>`.

use burn::module::Module;
use burn::nn::conv::{ConvTranspose2d, ConvTranspose2dConfig};
use burn::nn::{Embedding, EmbeddingConfig, Gelu};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::transformer::TwoWayTransformer;
use crate::nn::{LayerNorm2d, Mlp};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaskDecoderConfig {
    pub transformer_dim: usize,
    pub transformer_depth: usize,
    pub transformer_heads: usize,
    pub transformer_mlp_dim: usize,
    pub num_multimask_outputs: usize,
    pub iou_head_depth: usize,
    pub iou_head_hidden_dim: usize,
}

impl MaskDecoderConfig {
    /// `build_sam`'s decoder, the same for every SAM size and MobileSAM.
    pub fn official() -> Self {
        Self {
            transformer_dim: 256,
            transformer_depth: 2,
            transformer_heads: 8,
            transformer_mlp_dim: 2048,
            num_multimask_outputs: 3,
            iou_head_depth: 3,
            iou_head_hidden_dim: 256,
        }
    }
}

/// Low-resolution mask logits `[B, masks, 4h, 4w]` and predicted IoUs `[B, masks]`.
#[derive(Debug, Clone)]
pub struct MaskPrediction {
    pub masks: Tensor<4>,
    pub iou_predictions: Tensor<2>,
}

#[derive(Module, Debug)]
pub struct MaskDecoder {
    pub transformer: TwoWayTransformer,
    pub iou_token: Embedding,
    pub mask_tokens: Embedding,
    /// ConvTranspose 2x2/2, LayerNorm2d, GELU, ConvTranspose 2x2/2, GELU.
    pub output_upscaling: (ConvTranspose2d, LayerNorm2d, Gelu, ConvTranspose2d, Gelu),
    pub output_hypernetworks_mlps: Vec<Mlp>,
    pub iou_prediction_head: Mlp,
}

impl MaskDecoder {
    pub fn new(config: &MaskDecoderConfig, device: &Device) -> Self {
        let dim = config.transformer_dim;
        let num_mask_tokens = config.num_multimask_outputs + 1;
        let upscale = |c_in: usize, c_out: usize| {
            ConvTranspose2dConfig::new([c_in, c_out], [2, 2]).with_stride([2, 2]).init(device)
        };
        Self {
            transformer: TwoWayTransformer::new(
                config.transformer_depth,
                dim,
                config.transformer_heads,
                config.transformer_mlp_dim,
                device,
            ),
            iou_token: EmbeddingConfig::new(1, dim).init(device),
            mask_tokens: EmbeddingConfig::new(num_mask_tokens, dim).init(device),
            output_upscaling: (
                upscale(dim, dim / 4),
                LayerNorm2d::new(dim / 4, device),
                Gelu::new(),
                upscale(dim / 4, dim / 8),
                Gelu::new(),
            ),
            output_hypernetworks_mlps: (0..num_mask_tokens).map(|_| Mlp::new(dim, dim, dim / 8, 3, device)).collect(),
            iou_prediction_head: Mlp::new(
                dim,
                config.iou_head_hidden_dim,
                num_mask_tokens,
                config.iou_head_depth,
                device,
            ),
        }
    }

    fn num_mask_tokens(&self) -> usize {
        self.output_hypernetworks_mlps.len()
    }

    /// `forward`: with `multimask_output` the 3 multi-mask outputs, else the single-mask output.
    /// `image_embeddings` is `[1, C, h, w]` (shared by every prompt) or one per prompt.
    pub fn forward(
        &self,
        image_embeddings: Tensor<4>,
        image_pe: Tensor<4>,
        sparse_prompt_embeddings: Tensor<3>,
        dense_prompt_embeddings: Tensor<4>,
        multimask_output: bool,
    ) -> MaskPrediction {
        let all = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings);
        let [b, n, h, w] = all.masks.dims();
        let range = if multimask_output { 1..n } else { 0..1 };
        MaskPrediction {
            masks: all.masks.slice([0..b, range.clone(), 0..h, 0..w]),
            iou_predictions: all.iou_predictions.slice([0..b, range]),
        }
    }

    /// `predict_masks`: every mask token's output.
    pub fn predict_masks(
        &self,
        image_embeddings: Tensor<4>,
        image_pe: Tensor<4>,
        sparse_prompt_embeddings: Tensor<3>,
        dense_prompt_embeddings: Tensor<4>,
    ) -> MaskPrediction {
        let [batch, prompt_tokens, dim] = sparse_prompt_embeddings.dims();
        let num_masks = self.num_mask_tokens();
        let output_tokens = Tensor::cat(vec![self.iou_token.weight.val(), self.mask_tokens.weight.val()], 0)
            .unsqueeze_dim::<3>(0)
            .expand([batch, num_masks + 1, dim]);
        let tokens = if prompt_tokens == 0 {
            output_tokens
        } else {
            Tensor::cat(vec![output_tokens, sparse_prompt_embeddings], 1)
        };
        let per_prompt = |x: Tensor<4>| if x.dims()[0] == batch { x } else { x.repeat_dim(0, batch) };
        let src = per_prompt(image_embeddings) + dense_prompt_embeddings;
        let pos_src = per_prompt(image_pe);
        let [b, c, h, w] = src.dims();

        let (hs, src) = self.transformer.forward(src, pos_src, tokens);
        let iou_token_out = hs.clone().narrow(1, 0, 1).reshape([b, dim]);
        let src = src.swap_dims(1, 2).reshape([b, c, h, w]);
        let (up1, norm, gelu1, up2, gelu2) = &self.output_upscaling;
        let upscaled = gelu2.forward(up2.forward(gelu1.forward(norm.forward(up1.forward(src)))));
        let hyper_in = Tensor::stack::<3>(
            self.output_hypernetworks_mlps
                .iter()
                .enumerate()
                .map(|(i, mlp)| mlp.forward(hs.clone().narrow(1, 1 + i, 1).reshape([b, dim])))
                .collect(),
            1,
        );
        let [_, c_up, h_up, w_up] = upscaled.dims();
        let masks = hyper_in.matmul(upscaled.reshape([b, c_up, h_up * w_up])).reshape([b, num_masks, h_up, w_up]);
        let iou_predictions = self.iou_prediction_head.forward(iou_token_out);
        MaskPrediction { masks, iou_predictions }
    }
}
