//! Segment Anything (Kirillov et al. 2023; facebookresearch/segment-anything `modeling/sam.py`,
//! `build_sam.py`, `utils/transforms.py`): an image encoder run once per image, a prompt encoder, and
//! a light mask decoder run per prompt. Keys follow the official `sam_vit_{b,l,h}_*.pth` state
//! dicts (`image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`), so those files load as they are.

pub mod common;
pub mod image_encoder;
pub mod mask_decoder;
pub mod prompt_encoder;
pub mod tiny_vit;
pub mod transformer;

use std::path::Path;

use burn::module::Module;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

pub use image_encoder::{ImageEncoderConfig, ImageEncoderViT};
pub use mask_decoder::{MaskDecoder, MaskDecoderConfig, MaskPrediction};
pub use prompt_encoder::{PointPrompts, PromptEncoder};
pub use tiny_vit::{TinyViT, TinyVitConfig};

use crate::weights::WeightsError;

/// SAM's pixel normalisation (ImageNet statistics on 0–255 pixels).
pub const PIXEL_MEAN: [f32; 3] = [123.675, 116.28, 103.53];
pub const PIXEL_STD: [f32; 3] = [58.395, 57.12, 57.375];
/// Logits above this are mask.
pub const MASK_THRESHOLD: f32 = 0.0;

/// SAM's ViT encoder or MobileSAM's TinyViT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EncoderConfig {
    Vit(ImageEncoderConfig),
    TinyVit(TinyVitConfig),
}

impl EncoderConfig {
    pub fn image_size(&self) -> usize {
        match self {
            EncoderConfig::Vit(c) => c.image_size,
            EncoderConfig::TinyVit(c) => c.image_size,
        }
    }

    /// Tokens per side of the image embedding (S / 16 for both encoders).
    pub fn grid(&self) -> usize {
        self.image_size() / 16
    }

    pub fn init(&self, device: &Device) -> ImageEncoder {
        match self {
            EncoderConfig::Vit(c) => ImageEncoder::Vit(c.init(device)),
            EncoderConfig::TinyVit(c) => ImageEncoder::TinyVit(c.init(device)),
        }
    }
}

/// The image encoder. Weight files name no variant (`image_encoder.*`), as the official ones.
#[derive(Module, Debug)]
pub enum ImageEncoder {
    Vit(ImageEncoderViT),
    TinyVit(TinyViT),
}

impl ImageEncoder {
    pub fn forward(&self, images: Tensor<4>) -> Tensor<4> {
        match self {
            ImageEncoder::Vit(e) => e.forward(images),
            ImageEncoder::TinyVit(e) => e.forward(images),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamConfig {
    /// `vit_b`, `vit_l`, `vit_h`, `mobile`, `tiny`, or a custom name.
    pub name: String,
    pub encoder: EncoderConfig,
    pub prompt_embed_dim: usize,
    pub mask_in_chans: usize,
    pub decoder: MaskDecoderConfig,
}

impl SamConfig {
    fn official(name: &str, encoder: EncoderConfig) -> Self {
        Self {
            name: name.to_string(),
            encoder,
            prompt_embed_dim: 256,
            mask_in_chans: 16,
            decoder: MaskDecoderConfig::official(),
        }
    }

    pub fn vit_b() -> Self {
        Self::official("vit_b", EncoderConfig::Vit(ImageEncoderConfig::vit_b()))
    }

    pub fn vit_l() -> Self {
        Self::official("vit_l", EncoderConfig::Vit(ImageEncoderConfig::vit_l()))
    }

    pub fn vit_h() -> Self {
        Self::official("vit_h", EncoderConfig::Vit(ImageEncoderConfig::vit_h()))
    }

    /// MobileSAM: TinyViT-5M with SAM's prompt encoder and mask decoder (`mobile_sam.pt`).
    pub fn mobile() -> Self {
        Self::official("mobile", EncoderConfig::TinyVit(TinyVitConfig::mobile_sam()))
    }

    /// A SAM of the official structure at toy widths, for CPU tests and the demo: 256-pixel
    /// input (16 x 16 tokens), 2 blocks of width 64 with window 8 and one global block, 32-wide
    /// prompts and decoder.
    pub fn tiny() -> Self {
        Self {
            name: "tiny".into(),
            encoder: EncoderConfig::Vit(ImageEncoderConfig {
                image_size: 256,
                patch_size: 16,
                embed_dim: 64,
                depth: 2,
                num_heads: 2,
                mlp_ratio: 4.0,
                out_chans: 32,
                window_size: 8,
                global_attn_indexes: vec![1],
            }),
            prompt_embed_dim: 32,
            mask_in_chans: 16,
            decoder: MaskDecoderConfig {
                transformer_dim: 32,
                transformer_depth: 2,
                transformer_heads: 2,
                transformer_mlp_dim: 64,
                num_multimask_outputs: 3,
                iou_head_depth: 3,
                iou_head_hidden_dim: 32,
            },
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "vit_b" => Some(Self::vit_b()),
            "vit_l" => Some(Self::vit_l()),
            "vit_h" => Some(Self::vit_h()),
            "mobile" => Some(Self::mobile()),
            "tiny" => Some(Self::tiny()),
            _ => None,
        }
    }

    pub fn image_size(&self) -> usize {
        self.encoder.image_size()
    }

    pub fn init(&self, device: &Device) -> Sam {
        Sam::new(self, device)
    }
}

#[derive(Module, Debug)]
pub struct Sam {
    pub image_encoder: ImageEncoder,
    pub prompt_encoder: PromptEncoder,
    pub mask_decoder: MaskDecoder,
}

/// An image prepared for the encoder: `[1, 3, S, S]` normalised and padded, and the size of the
/// resized content inside it (the rest is padding) and of the original.
#[derive(Debug, Clone)]
pub struct SamInput {
    pub pixels: Tensor<4>,
    pub input_size: (usize, usize),
    pub original_size: (usize, usize),
}

impl Sam {
    pub fn new(config: &SamConfig, device: &Device) -> Self {
        let grid = config.encoder.grid();
        Self {
            image_encoder: config.encoder.init(device),
            prompt_encoder: PromptEncoder::new(
                config.prompt_embed_dim,
                grid,
                config.encoder.image_size(),
                config.mask_in_chans,
                device,
            ),
            mask_decoder: MaskDecoder::new(&config.decoder, device),
        }
    }

    /// Loads an official `sam_vit_*.pth` (or a kiln safetensors) into `config`'s architecture; a
    /// checkpoint of another size is refused with the keys that do not fit.
    pub fn load(config: &SamConfig, path: &Path, device: &Device) -> Result<Self, WeightsError> {
        use crate::weights::OfficialCheckpoint;
        let layout = Self::checkpoint_layout();
        crate::weights::load_checkpoint_with(config.init(device), path, &layout, &format!("SAM {}", config.name))
    }

    /// Saves the weights as safetensors under the official key names.
    pub fn save(&self, path: &Path, metadata: &[(String, String)]) -> Result<(), WeightsError> {
        crate::weights::save_safetensors(self, path, &[], metadata)
    }

    pub fn image_size(&self) -> usize {
        self.prompt_encoder.input_image_size
    }

    /// `[B, C, 64, 64]` embeddings of preprocessed `[B, 3, S, S]` images.
    pub fn embed(&self, pixels: Tensor<4>) -> Tensor<4> {
        self.image_encoder.forward(pixels)
    }

    /// Masks for `boxes` (`[N, 4]`, x1 y1 x2 y2 in the resized frame) on one image's `embedding`.
    pub fn predict_boxes(&self, embedding: Tensor<4>, boxes: Tensor<2>, multimask_output: bool) -> MaskPrediction {
        let (sparse, dense) = self.prompt_encoder.forward(None, Some(boxes), None);
        self.mask_decoder.forward(embedding, self.prompt_encoder.dense_pe(), sparse, dense, multimask_output)
    }

    /// The general prompt path (`Sam.forward` for one image): points and/or boxes and/or a mask.
    pub fn predict(
        &self,
        embedding: Tensor<4>,
        points: Option<&PointPrompts>,
        boxes: Option<Tensor<2>>,
        masks: Option<Tensor<4>>,
        multimask_output: bool,
    ) -> MaskPrediction {
        let (sparse, dense) = self.prompt_encoder.forward(points, boxes, masks);
        self.mask_decoder.forward(embedding, self.prompt_encoder.dense_pe(), sparse, dense, multimask_output)
    }

    /// `ResizeLongestSide` + `Sam.preprocess`: resize so the long side is S, normalise, pad
    /// bottom-right to S x S.
    pub fn preprocess(&self, image: &image::RgbImage, device: &Device) -> SamInput {
        let size = self.image_size();
        let (pixels, input_size) = prepare_pixels(image, size);
        SamInput {
            pixels: Tensor::from_data(TensorData::new(pixels, [1, 3, size, size]), device),
            input_size,
            original_size: (image.height() as usize, image.width() as usize),
        }
    }

    /// `Sam.postprocess_masks`: low-resolution logits `[B, M, 4h, 4w]` up to S x S, the padding cut
    /// away, then to the original size (bilinear, half-pixel centres, as `F.interpolate`).
    pub fn postprocess_masks(
        &self,
        masks: Tensor<4>,
        input_size: (usize, usize),
        original_size: (usize, usize),
    ) -> Tensor<4> {
        let size = self.image_size();
        let resize = |x: Tensor<4>, to: (usize, usize)| {
            interpolate(
                x,
                InterpolateOptions::new(InterpolateMode::Bilinear)
                    .with_align_corners(false)
                    .with_output_size([to.0, to.1]),
            )
        };
        let full = resize(masks, (size, size));
        let [b, m, _, _] = full.dims();
        resize(full.slice([0..b, 0..m, 0..input_size.0, 0..input_size.1]), original_size)
    }
}

/// [`Sam::preprocess`] without a model or device: the `3 x size x size` normalised, padded pixels
/// (channel-major) and the `(h, w)` of the resized content.
pub fn prepare_pixels(image: &image::RgbImage, size: usize) -> (Vec<f32>, (usize, usize)) {
    let original_size = (image.height() as usize, image.width() as usize);
    let (h, w) = resized_shape(original_size, size);
    let resized = image::imageops::resize(image, w as u32, h as u32, image::imageops::FilterType::Triangle);
    let mut pixels = vec![0f32; 3 * size * size];
    for (x, y, pixel) in resized.enumerate_pixels() {
        for c in 0..3 {
            pixels[c * size * size + y as usize * size + x as usize] = (pixel[c] as f32 - PIXEL_MEAN[c]) / PIXEL_STD[c];
        }
    }
    (pixels, (h, w))
}

/// `ResizeLongestSide.get_preprocess_shape`: `(h, w)` scaled so the long side is `long_side`.
pub fn resized_shape((h, w): (usize, usize), long_side: usize) -> (usize, usize) {
    let scale = long_side as f64 / h.max(w) as f64;
    ((h as f64 * scale + 0.5) as usize, (w as f64 * scale + 0.5) as usize)
}

/// `ResizeLongestSide.apply_boxes`: an `[x1, y1, x2, y2]` box of the original image in the resized frame.
pub fn resize_box(bbox: [f32; 4], original_size: (usize, usize), long_side: usize) -> [f32; 4] {
    let (h, w) = original_size;
    let (nh, nw) = resized_shape(original_size, long_side);
    let (sx, sy) = (nw as f32 / w as f32, nh as f32 / h as f32);
    [bbox[0] * sx, bbox[1] * sy, bbox[2] * sx, bbox[3] * sy]
}

/// SAM's checkpoints carry the official keys as they are; the prompt encoder's random Fourier
/// matrix is a buffer there.
impl crate::weights::OfficialCheckpoint for Sam {
    fn checkpoint_layout() -> crate::weights::CheckpointLayout {
        crate::weights::CheckpointLayout {
            buffers: vec!["positional_encoding_gaussian_matrix".into()],
            ..Default::default()
        }
    }
}
