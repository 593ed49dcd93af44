//! Grounding DINO (Liu et al. 2023, "Grounding DINO: Marrying DINO with Grounded Pre-Training for
//! Open-Set Object Detection"; IDEA-Research/GroundingDINO `models/GroundingDINO/groundingdino.py`):
//! a Swin backbone and a BERT text encoder, a feature enhancer fusing image and text, language-guided
//! query selection and a cross-modality decoder whose queries score every text token. Given an image
//! and a caption of class names ("cat . dog ."), it returns boxes and per-token logits. Keys follow
//! `groundingdino_swint_ogc.pth` (its `model` dict, `module.` prefix, shared box heads), so the
//! official file loads as it is.

pub mod attention;
pub mod bert;
pub mod decoder;
pub mod encoder;
pub mod fusion;
pub mod ms_deform_attn;
pub mod position_encoding;
pub mod postprocess;
pub mod swin;
pub mod text;
pub mod transformer;

use std::path::Path;

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, Linear, PaddingConfig2d};
use burn::tensor::activation::sigmoid;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

pub use bert::{BertConfig, BertModel};
pub use postprocess::{GroundedBox, PostprocessOptions};
pub use swin::{SwinConfig, SwinTransformer};
pub use text::{Caption, CaptionTokenizer, Encoded, TextBatch, TextError};

use crate::nn::Mlp;
use crate::weights::{CheckpointLayout, WeightsError};
use encoder::TextTokens;
use position_encoding::{image_position_embedding, text_position_embedding};
use transformer::{LevelMasks, Transformer, contrastive_logits, head_boxes};

/// ImageNet statistics on 0–1 pixels (`T.Normalize` of the official transforms).
pub const PIXEL_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const PIXEL_STD: [f32; 3] = [0.229, 0.224, 0.225];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroundingDinoConfig {
    /// `swint_ogc`, `swint_minilm`, `tiny_minilm`, `tiny`, or a custom name.
    pub name: String,
    pub swin: SwinConfig,
    pub bert: BertConfig,
    pub hidden_dim: usize,
    pub nheads: usize,
    pub enc_layers: usize,
    pub dec_layers: usize,
    pub enc_n_points: usize,
    pub dec_n_points: usize,
    pub dim_feedforward: usize,
    pub num_queries: usize,
    pub num_feature_levels: usize,
    pub max_text_len: usize,
    /// Temperature of the image sine position embedding (20 in the official config).
    pub pe_temperature: f64,
    /// BERT reads each phrase with `[CLS]` in view ([`text::SubSentences::attention_with_cls`]):
    /// on for the MiniLM presets, whose text encoder stays frozen; off (the official masks) for
    /// the official checkpoint, trained with them.
    #[serde(default)]
    pub phrases_see_cls: bool,
}

impl GroundingDinoConfig {
    /// `GroundingDINO_SwinT_OGC.py`: Swin-T, bert-base-uncased, 256 wide, 8 heads, 6 + 6 layers,
    /// 900 queries, FFN 2048, 4 levels, 4 points. A new model is initialised as the official
    /// constructor does where it matters for training (deformable attention, box heads, `feat_map`,
    /// input projections); pretrained weights replace all of it.
    pub fn swint_ogc() -> Self {
        Self {
            name: "swint_ogc".into(),
            swin: SwinConfig::swin_t(),
            bert: BertConfig::bert_base_uncased(),
            hidden_dim: 256,
            nheads: 8,
            enc_layers: 6,
            dec_layers: 6,
            enc_n_points: 4,
            dec_n_points: 4,
            dim_feedforward: 2048,
            num_queries: 900,
            num_feature_levels: 4,
            max_text_len: 256,
            pe_temperature: 20.0,
            phrases_see_cls: false,
        }
    }

    /// Swin-T OGC with all-MiniLM-L6-v2 (384 wide, 6 layers) as its text encoder: 22.7 M instead
    /// of 109.5 M text parameters.
    pub fn swint_minilm() -> Self {
        Self {
            name: "swint_minilm".into(),
            bert: BertConfig::all_minilm_l6_v2(),
            phrases_see_cls: true,
            ..Self::swint_ogc()
        }
    }

    /// The official structure at CPU-test widths with MiniLM as the text encoder (the reference
    /// fixture's model): Swin width 16, hidden 64, 4 heads, 2 + 2 layers, FFN 128, 30 queries.
    pub fn tiny_minilm() -> Self {
        Self {
            name: "tiny_minilm".into(),
            swin: SwinConfig::tiny(),
            bert: BertConfig::all_minilm_l6_v2(),
            hidden_dim: 64,
            nheads: 4,
            enc_layers: 2,
            dec_layers: 2,
            dim_feedforward: 128,
            num_queries: 30,
            phrases_see_cls: true,
            ..Self::swint_ogc()
        }
    }

    /// [`Self::tiny_minilm`] with a 2-layer, 64-wide BERT: no pretrained file needed.
    pub fn tiny() -> Self {
        // A random BERT has not learned to collapse position 0: the official masks.
        Self { name: "tiny".into(), bert: BertConfig::tiny(), phrases_see_cls: false, ..Self::tiny_minilm() }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "swint_ogc" => Some(Self::swint_ogc()),
            "swint_minilm" => Some(Self::swint_minilm()),
            "tiny_minilm" => Some(Self::tiny_minilm()),
            "tiny" => Some(Self::tiny()),
            _ => None,
        }
    }

    pub fn init(&self, device: &Device) -> GroundingDino {
        GroundingDino::new(self, device)
    }
}

#[derive(Module, Debug)]
pub struct GroundingDino {
    pub backbone: SwinTransformer,
    pub bert: BertModel,
    pub feat_map: Linear,
    pub input_proj: Vec<(Conv2d, GroupNorm)>,
    pub transformer: Transformer,
    pub bbox_embed: Mlp,
    #[module(skip)]
    pub pe_temperature: f64,
    #[module(skip)]
    pub max_text_len: usize,
    #[module(skip)]
    pub phrases_see_cls: bool,
}

/// A batch of images: `[B, 3, H, W]` normalised pixels padded bottom-right to the batch size, and each
/// image's unpadded `(h, w)`.
#[derive(Debug, Clone)]
pub struct ImageBatch {
    pub pixels: Tensor<4>,
    pub sizes: Vec<(usize, usize)>,
}

/// One head's prediction: `[B, Q, T]` token logits (-inf on padded tokens) and `[B, Q, 4]` boxes
/// (cx, cy, w, h normalised to the unpadded image).
#[derive(Debug, Clone)]
pub struct HeadOutput {
    pub logits: Tensor<3>,
    pub boxes: Tensor<3>,
}

/// Everything a forward pass produces: the decoder layers' predictions (the last is the model's),
/// the encoder proposals' prediction, and intermediate tensors for checks and distillation.
#[derive(Debug, Clone)]
pub struct GroundingDinoOutput {
    pub layers: Vec<HeadOutput>,
    pub encoder: HeadOutput,
    /// `[B, Q]` the selected image tokens.
    pub selected: Tensor<2, Int>,
    pub memory: Tensor<3>,
    /// The `(rows, columns)` of each level in `memory`'s tokens, finest first (stride 8).
    pub memory_shapes: Vec<(usize, usize)>,
    pub memory_text: Tensor<3>,
    /// `[B, T, d]` the text features before the encoder (after `feat_map`).
    pub encoded_text: Tensor<3>,
    /// `[B, T]` true on real tokens.
    pub text_mask: Tensor<2, Bool>,
}

impl GroundingDinoOutput {
    pub fn prediction(&self) -> &HeadOutput {
        self.layers.last().expect("GroundingDINO has at least one decoder layer")
    }
}

impl GroundingDino {
    pub fn new(config: &GroundingDinoConfig, device: &Device) -> Self {
        let d = config.hidden_dim;
        let levels = config.num_feature_levels;
        let backbone_outputs = 3;
        let input_proj = (0..levels)
            .map(|level| {
                let xavier = burn::nn::Initializer::XavierUniform { gain: 1.0 };
                let mut conv = if level < backbone_outputs {
                    Conv2dConfig::new([config.swin.channels(level + 1), d], [1, 1])
                        .with_initializer(xavier)
                        .init(device)
                } else {
                    let c_in = if level == backbone_outputs { config.swin.channels(3) } else { d };
                    Conv2dConfig::new([c_in, d], [3, 3])
                        .with_stride([2, 2])
                        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                        .with_initializer(xavier)
                        .init(device)
                };
                conv.bias = Some(burn::module::Param::from_tensor(Tensor::zeros([d], device)));
                (conv, GroupNormConfig::new(32, d).init(device))
            })
            .collect();
        let mut bbox_embed = Mlp::new(d, d, 4, 3, device);
        zero_last_layer(&mut bbox_embed, device);
        Self {
            backbone: config.swin.init(device),
            bert: config.bert.init(device),
            feat_map: ms_deform_attn::xavier_linear(config.bert.hidden_size, d, device),
            input_proj,
            transformer: Transformer::new(
                d,
                config.nheads,
                config.enc_layers,
                config.dec_layers,
                config.dim_feedforward,
                levels,
                config.enc_n_points,
                config.dec_n_points,
                config.num_queries,
                device,
            ),
            bbox_embed,
            pe_temperature: config.pe_temperature,
            max_text_len: config.max_text_len,
            phrases_see_cls: config.phrases_see_cls,
        }
    }

    /// The official checkpoint layout: `{"model": {"module.<key>": …}}`, Swin under `backbone.0.`,
    /// one box head stored once per decoder layer and again under `transformer.decoder.`.
    pub fn checkpoint_layout() -> CheckpointLayout {
        let mut layout = CheckpointLayout {
            renames: vec![
                ("^module.".into(), String::new()),
                ("^backbone.0.".into(), "backbone.".into()),
                ("^bbox_embed.0.".into(), "bbox_embed.".into()),
            ],
            top_level_key: Some("model".into()),
            ignored: vec![
                r"^bbox_embed\.\d+\.".into(),
                r"^transformer\.decoder\.bbox_embed\.".into(),
                r"\.relative_position_index$".into(),
                r"^label_enc\.".into(),
                r"^bert\.embeddings\.position_ids$".into(),
            ],
            provided_elsewhere: Vec::new(),
            buffers: Vec::new(),
        };
        layout.renames.extend(bert::bert_renames());
        layout
    }

    /// Loads an official `groundingdino_swint_ogc.pth` (or a kiln safetensors of the same keys) into
    /// `config`'s architecture. With `text_encoder`, BERT comes from that Hugging Face `BertModel`
    /// file instead (and may be absent from `path`). All or nothing: a checkpoint of another
    /// architecture is refused with the keys that do not fit.
    pub fn load(
        config: &GroundingDinoConfig,
        path: &Path,
        text_encoder: Option<&Path>,
        device: &Device,
    ) -> Result<Self, WeightsError> {
        let mut layout = Self::checkpoint_layout();
        if text_encoder.is_some() {
            layout.provided_elsewhere.push("bert.".into());
        }
        let is_pth = !path.extension().is_some_and(|e| e == "safetensors");
        let name = format!("GroundingDINO {}", config.name);
        let model = match crate::weights::load_checkpoint_with(config.init(device), path, &layout, &name) {
            // A plain state dict (no top-level `model`), as some exports write it.
            Err(WeightsError::Read { .. }) if is_pth && path.is_file() => {
                layout.top_level_key = None;
                crate::weights::load_checkpoint_with(config.init(device), path, &layout, &name)?
            }
            other => other?,
        };
        match text_encoder {
            None => Ok(model),
            Some(text_path) => Ok(Self { bert: BertModel::load(&config.bert, text_path, device)?, ..model }),
        }
    }

    /// Saves the weights as safetensors under the official key names (without `module.`); without
    /// `with_text_encoder`, BERT is left out (for a model whose text encoder is its own file).
    pub fn save(
        &self,
        path: &Path,
        metadata: &[(String, String)],
        with_text_encoder: bool,
    ) -> Result<(), WeightsError> {
        let keep: Option<fn(&str, &str) -> bool> =
            (!with_text_encoder).then_some(|path: &str, _: &str| !path.starts_with("bert."));
        crate::weights::save_safetensors_with(self, path, &Self::checkpoint_layout(), metadata, keep)
    }

    pub fn hidden_dim(&self) -> usize {
        self.feat_map.weight.dims()[1]
    }

    /// Text features for the encoder: BERT with the sub-sentence mask and position ids (with
    /// `[CLS]` in view when `phrases_see_cls`), `feat_map`.
    pub fn encode_text(&self, text: &TextBatch) -> Tensor<3> {
        let device = self.feat_map.weight.device();
        let hidden = if self.phrases_see_cls {
            self.bert.forward(
                text.input_ids.clone(),
                Some(text.position_ids_with_cls_tensor(&device)),
                text.self_attention_with_cls.clone(),
            )
        } else {
            self.bert.forward(
                text.input_ids.clone(),
                Some(text.position_ids_tensor(&device)),
                text.self_attention.clone(),
            )
        };
        self.feat_map.forward(hidden)
    }

    /// The full forward pass (`GroundingDINO.forward`) of a batch of images, each with its caption.
    pub fn forward(&self, images: &ImageBatch, text: &TextBatch) -> GroundingDinoOutput {
        let device = images.pixels.device();
        let encoded_text = self.encode_text(text);
        let features = self.backbone.forward(images.pixels.clone());
        let [_, _, height, width] = images.pixels.dims();
        let mut sources = Vec::new();
        for (level, (conv, norm)) in self.input_proj.iter().enumerate() {
            let input = if level < features.len() {
                features[level].clone()
            } else if level == features.len() {
                features[features.len() - 1].clone()
            } else {
                sources.last().cloned().expect("an earlier level")
            };
            sources.push(norm.forward(conv.forward(input)));
        }
        let masks = level_masks(&images.sizes, (height, width), &sources);
        let feats = self.hidden_dim() / 2;
        let positions: Vec<Tensor<4>> = masks
            .shapes
            .iter()
            .zip(&masks.padding)
            .map(|(&(h, w), padding)| image_position_embedding(padding, h, w, feats, self.pe_temperature, &device))
            .collect();
        let image = self.transformer.flatten(sources, positions, &masks);
        let text_tokens = TextTokens {
            features: encoded_text.clone(),
            padding: text.token_mask.clone().bool_not(),
            self_attention: text.self_attention.clone(),
            positions: text_position_embedding(&text.position_ids, self.hidden_dim(), &device),
        };
        let (memory, memory_text) = self.transformer.encode(&image, &text_tokens, &masks);
        let selection =
            self.transformer.select_queries(memory.clone(), memory_text.clone(), text.token_mask.clone(), &masks);
        let image = encoder::ImageTokens { tokens: memory.clone(), ..image };
        let decoded = self.transformer.decode(
            &selection,
            &image,
            memory_text.clone(),
            text.token_mask.clone(),
            &masks,
            &self.bbox_embed,
        );
        let layers = decoded
            .hidden
            .into_iter()
            .zip(decoded.references)
            .map(|(hidden, reference)| HeadOutput {
                logits: contrastive_logits(hidden.clone(), memory_text.clone(), text.token_mask.clone()),
                boxes: head_boxes(&self.bbox_embed, hidden, reference),
            })
            .collect();
        let encoder = HeadOutput {
            logits: contrastive_logits(selection.memory.clone(), memory_text.clone(), text.token_mask.clone()),
            boxes: sigmoid(selection.box_logits.clone()),
        };
        GroundingDinoOutput {
            layers,
            encoder,
            selected: selection.indices,
            memory,
            memory_shapes: masks.shapes.clone(),
            memory_text,
            encoded_text,
            text_mask: text.token_mask.clone(),
        }
    }
}

/// The official box heads start at zero (`constant_(layers[-1], 0)`): boxes start as the proposals.
pub(crate) fn zero_last_layer(mlp: &mut Mlp, device: &Device) {
    if let Some(last) = mlp.layers.last_mut() {
        let [i, o] = last.weight.dims();
        last.weight = burn::module::Param::from_tensor(Tensor::zeros([i, o], device));
        last.bias = Some(burn::module::Param::from_tensor(Tensor::zeros([o], device)));
    }
}

/// Each level's padding: the pixel mask (true outside each image's `(h, w)`) resized with nearest
/// interpolation (`F.interpolate(mask, size)`) to the level's size.
fn level_masks(sizes: &[(usize, usize)], (height, width): (usize, usize), sources: &[Tensor<4>]) -> LevelMasks {
    let shapes: Vec<(usize, usize)> = sources.iter().map(|s| (s.dims()[2], s.dims()[3])).collect();
    let padding = shapes
        .iter()
        .map(|&(h, w)| {
            sizes
                .iter()
                .map(|&(ih, iw)| {
                    let (sy, sx) = (height as f32 / h as f32, width as f32 / w as f32);
                    let mut mask = Vec::with_capacity(h * w);
                    for i in 0..h {
                        let y = ((i as f32 * sy).floor() as usize).min(height - 1);
                        for j in 0..w {
                            let x = ((j as f32 * sx).floor() as usize).min(width - 1);
                            mask.push(y >= ih || x >= iw);
                        }
                    }
                    mask
                })
                .collect()
        })
        .collect();
    LevelMasks { shapes, padding }
}

/// The official test transform: resize so the short side is `short` and the long side at most
/// `max_size` (`RandomResize([800], max_size=1333)`), then normalise. Returns `3 x h x w` planar
/// pixels and `(h, w)`.
pub fn prepare_pixels(image: &image::RgbImage, short: usize, max_size: usize) -> (Vec<f32>, (usize, usize)) {
    let (h, w) = resized_shape((image.height() as usize, image.width() as usize), short, max_size);
    let resized = image::imageops::resize(image, w as u32, h as u32, image::imageops::FilterType::Triangle);
    let mut pixels = vec![0f32; 3 * h * w];
    for (x, y, pixel) in resized.enumerate_pixels() {
        for c in 0..3 {
            pixels[c * h * w + y as usize * w + x as usize] = (pixel[c] as f32 / 255.0 - PIXEL_MEAN[c]) / PIXEL_STD[c];
        }
    }
    (pixels, (h, w))
}

/// torchvision's `get_size_with_aspect_ratio` as the official `RandomResize` uses it.
pub fn resized_shape((h, w): (usize, usize), short: usize, max_size: usize) -> (usize, usize) {
    let (min_side, max_side) = (h.min(w) as f64, h.max(w) as f64);
    let mut size = short as f64;
    if max_side / min_side * size > max_size as f64 {
        size = (max_size as f64 * min_side / max_side).round();
    }
    if (w <= h && w as f64 == size) || (h <= w && h as f64 == size) {
        return (h, w);
    }
    if w < h {
        (((size * h as f64 / w as f64) as usize), size as usize)
    } else {
        (size as usize, (size * w as f64 / h as f64) as usize)
    }
}

impl ImageBatch {
    /// Pads `(pixels, (h, w))` images bottom-right to the largest and stacks them.
    pub fn from_planar(images: &[(Vec<f32>, (usize, usize))], device: &Device) -> Self {
        let height = images.iter().map(|(_, (h, _))| *h).max().unwrap_or(1);
        let width = images.iter().map(|(_, (_, w))| *w).max().unwrap_or(1);
        let mut data = vec![0f32; images.len() * 3 * height * width];
        for (b, (pixels, (h, w))) in images.iter().enumerate() {
            for c in 0..3 {
                for y in 0..*h {
                    let src = &pixels[(c * h + y) * w..(c * h + y) * w + w];
                    let dst = ((b * 3 + c) * height + y) * width;
                    data[dst..dst + w].copy_from_slice(src);
                }
            }
        }
        Self {
            pixels: Tensor::from_data(TensorData::new(data, [images.len(), 3, height, width]), device),
            sizes: images.iter().map(|(_, size)| *size).collect(),
        }
    }
}

impl crate::weights::OfficialCheckpoint for GroundingDino {
    fn checkpoint_layout() -> CheckpointLayout {
        GroundingDino::checkpoint_layout()
    }
}
