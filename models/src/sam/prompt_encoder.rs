//! SAM's prompt encoder (segment_anything/modeling/prompt_encoder.py `PromptEncoder`,
//! `PositionEmbeddingRandom`): points and box corners become random-Fourier positional encodings
//! plus a learned embedding per kind (negative point, positive point, top-left, bottom-right,
//! padding); a low-resolution mask becomes a dense embedding through a small conv stack, and no mask
//! becomes the learned `no_mask_embed`. Keys: `pe_layer.positional_encoding_gaussian_matrix`,
//! `point_embeddings.<0..3>`, `not_a_point_embed`, `mask_downscaling.{0,1,3,4,6}`, `no_mask_embed`.

use std::f64::consts::PI;

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Embedding, EmbeddingConfig, Gelu};
use burn::tensor::{Device, Tensor, TensorData};

use crate::nn::LayerNorm2d;

/// `PositionEmbeddingRandom`: `[sin, cos](2π (2c - 1) G)` for coordinates `c` in [0, 1].
#[derive(Module, Debug)]
pub struct PositionEmbeddingRandom {
    /// `[2, embed_dim / 2]`, a fixed buffer drawn from N(0, 1) at init.
    pub positional_encoding_gaussian_matrix: Param<Tensor<2>>,
}

impl PositionEmbeddingRandom {
    pub fn new(num_pos_feats: usize, device: &Device) -> Self {
        let gaussian = Tensor::random([2, num_pos_feats], burn::tensor::Distribution::Normal(0.0, 1.0), device);
        Self { positional_encoding_gaussian_matrix: Param::from_tensor(gaussian).set_require_grad(false) }
    }

    /// `_pe_encoding` of `[N, 2]` normalised (x, y) coordinates: `[N, embed_dim]`.
    pub fn encode(&self, coords: Tensor<2>) -> Tensor<2> {
        let projected = (coords * 2.0 - 1.0).matmul(self.positional_encoding_gaussian_matrix.val()) * (2.0 * PI);
        Tensor::cat(vec![projected.clone().sin(), projected.cos()], 1)
    }

    /// The encoding of every cell centre of an `h x w` grid: `[embed_dim, h, w]`.
    pub fn grid(&self, h: usize, w: usize) -> Tensor<3> {
        let device = self.positional_encoding_gaussian_matrix.device();
        let coords: Vec<f32> = (0..h)
            .flat_map(|y| (0..w).flat_map(move |x| [(x as f32 + 0.5) / w as f32, (y as f32 + 0.5) / h as f32]))
            .collect();
        let encoded = self.encode(Tensor::from_data(TensorData::new(coords, [h * w, 2]), &device));
        let [_, channels] = encoded.dims();
        encoded.reshape([h, w, channels]).permute([2, 0, 1])
    }

    /// `forward_with_coords`: pixel coordinates `[B, N, 2]` in an image of `(height, width)`.
    pub fn encode_pixels(&self, coords: Tensor<3>, image_size: (usize, usize)) -> Tensor<3> {
        let [b, n, _] = coords.dims();
        let device = coords.device();
        let scale = Tensor::<1>::from_data(
            TensorData::new(vec![1.0 / image_size.1 as f32, 1.0 / image_size.0 as f32], [2]),
            &device,
        );
        let normalised = coords * scale.reshape([1, 1, 2]);
        let encoded = self.encode(normalised.reshape([b * n, 2]));
        let [_, channels] = encoded.dims();
        encoded.reshape([b, n, channels])
    }
}

/// Point prompts: pixel coordinates `[B, N, 2]` in the resized (1024) frame and labels `[B, N]`
/// (1 foreground, 0 background, -1 padding).
#[derive(Debug, Clone)]
pub struct PointPrompts {
    pub coords: Tensor<3>,
    pub labels: Tensor<2>,
}

#[derive(Module, Debug)]
pub struct PromptEncoder {
    pub pe_layer: PositionEmbeddingRandom,
    pub point_embeddings: Vec<Embedding>,
    pub not_a_point_embed: Embedding,
    pub mask_downscaling: (Conv2d, LayerNorm2d, Gelu, Conv2d, LayerNorm2d, Gelu, Conv2d),
    pub no_mask_embed: Embedding,
    #[module(skip)]
    pub embed_dim: usize,
    /// Tokens per side of the image embedding (64 for a 1024 input).
    #[module(skip)]
    pub embedding_size: usize,
    #[module(skip)]
    pub input_image_size: usize,
}

impl PromptEncoder {
    pub fn new(
        embed_dim: usize,
        embedding_size: usize,
        input_image_size: usize,
        mask_in_chans: usize,
        device: &Device,
    ) -> Self {
        let embedding = || EmbeddingConfig::new(1, embed_dim).init(device);
        let quarter = mask_in_chans / 4;
        Self {
            pe_layer: PositionEmbeddingRandom::new(embed_dim / 2, device),
            point_embeddings: (0..4).map(|_| embedding()).collect(),
            not_a_point_embed: embedding(),
            mask_downscaling: (
                Conv2dConfig::new([1, quarter], [2, 2]).with_stride([2, 2]).init(device),
                LayerNorm2d::new(quarter, device),
                Gelu::new(),
                Conv2dConfig::new([quarter, mask_in_chans], [2, 2]).with_stride([2, 2]).init(device),
                LayerNorm2d::new(mask_in_chans, device),
                Gelu::new(),
                Conv2dConfig::new([mask_in_chans, embed_dim], [1, 1]).init(device),
            ),
            no_mask_embed: embedding(),
            embed_dim,
            embedding_size,
            input_image_size,
        }
    }

    /// `get_dense_pe`: `[1, embed_dim, 64, 64]`.
    pub fn dense_pe(&self) -> Tensor<4> {
        self.pe_layer.grid(self.embedding_size, self.embedding_size).unsqueeze_dim(0)
    }

    fn learned(embedding: &Embedding) -> Tensor<3> {
        let [_, dim] = embedding.weight.dims();
        embedding.weight.val().reshape([1, 1, dim])
    }

    /// `_embed_points`: `pad` appends a padding point (label -1) when no box follows.
    fn embed_points(&self, points: &PointPrompts, pad: bool) -> Tensor<3> {
        let (mut coords, mut labels) = (points.coords.clone() + 0.5, points.labels.clone());
        if pad {
            let [b, _, _] = coords.dims();
            let device = coords.device();
            coords = Tensor::cat(vec![coords, Tensor::zeros([b, 1, 2], &device)], 1);
            labels = Tensor::cat(vec![labels, Tensor::full([b, 1], -1.0, &device)], 1);
        }
        let size = self.input_image_size;
        let encoded = self.pe_layer.encode_pixels(coords, (size, size));
        let is = |label: f32| labels.clone().equal_elem(label).float().unsqueeze_dim::<3>(2);
        let (padding, negative, positive) = (is(-1.0), is(0.0), is(1.0));
        encoded * (padding.clone().neg() + 1.0)
            + padding * Self::learned(&self.not_a_point_embed)
            + negative * Self::learned(&self.point_embeddings[0])
            + positive * Self::learned(&self.point_embeddings[1])
    }

    /// `_embed_boxes`: `[B, 4]` boxes (x1, y1, x2, y2 in the 1024 frame) to two corner tokens each.
    fn embed_boxes(&self, boxes: Tensor<2>) -> Tensor<3> {
        let [b, _] = boxes.dims();
        let size = self.input_image_size;
        let corners = self.pe_layer.encode_pixels((boxes + 0.5).reshape([b, 2, 2]), (size, size));
        let device = corners.device();
        let kind =
            Tensor::cat(vec![Self::learned(&self.point_embeddings[2]), Self::learned(&self.point_embeddings[3])], 1);
        corners + kind.to_device(&device)
    }

    fn embed_masks(&self, masks: Tensor<4>) -> Tensor<4> {
        let (c1, n1, g1, c2, n2, g2, c3) = &self.mask_downscaling;
        let x = g1.forward(n1.forward(c1.forward(masks)));
        let x = g2.forward(n2.forward(c2.forward(x)));
        c3.forward(x)
    }

    /// The sparse `[B, tokens, embed_dim]` and dense `[B, embed_dim, 64, 64]` prompt embeddings.
    /// At least one prompt must be given (the batch size comes from it).
    pub fn forward(
        &self,
        points: Option<&PointPrompts>,
        boxes: Option<Tensor<2>>,
        masks: Option<Tensor<4>>,
    ) -> (Tensor<3>, Tensor<4>) {
        let batch = points
            .map(|p| p.coords.dims()[0])
            .or_else(|| boxes.as_ref().map(|b| b.dims()[0]))
            .or_else(|| masks.as_ref().map(|m| m.dims()[0]))
            .unwrap_or(1);
        let device = self.no_mask_embed.weight.device();
        let mut sparse = Vec::new();
        if let Some(points) = points {
            sparse.push(self.embed_points(points, boxes.is_none()));
        }
        if let Some(boxes) = boxes {
            sparse.push(self.embed_boxes(boxes));
        }
        let sparse =
            if sparse.is_empty() { Tensor::zeros([batch, 0, self.embed_dim], &device) } else { Tensor::cat(sparse, 1) };
        let s = self.embedding_size;
        let dense = match masks {
            Some(masks) => self.embed_masks(masks),
            None => {
                self.no_mask_embed.weight.val().reshape([1, self.embed_dim, 1, 1]).expand([batch, self.embed_dim, s, s])
            }
        };
        (sparse, dense)
    }
}
