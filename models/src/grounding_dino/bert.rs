//! BERT (Devlin et al. 2019) in the layout of Hugging Face's `BertModel` (`modeling_bert.py`), the text
//! encoder of GroundingDINO (`bert.*` keys of `groundingdino_swint_ogc.pth`, bert-base-uncased) and of
//! sentence-transformers' all-MiniLM-L6-v2: embeddings (word + position + token type, LayerNorm),
//! post-norm encoder layers (`attention.self.{query,key,value}`, `attention.output.{dense,LayerNorm}`,
//! `intermediate.dense` with exact GELU, `output.{dense,LayerNorm}`), and the pooler (loaded, unused).
//! GroundingDINO feeds it custom position ids and a 3-D attention mask (one sentence per phrase).
//! `attention.self` is a Rust keyword and `LayerNorm` not a field name: the fields are `self_attn`
//! and `layer_norm`, and the loader renames them.

use std::path::Path;

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::softmax;

use crate::nn::gelu;
use burn::tensor::{Bool, Device, Int, Tensor};
use serde::{Deserialize, Serialize};

use super::attention::mask_to_bias;
use crate::weights::{CheckpointLayout, WeightsError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
}

impl BertConfig {
    /// bert-base-uncased: 12 layers, 768 wide, 12 heads.
    pub fn bert_base_uncased() -> Self {
        Self {
            vocab_size: 30522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
        }
    }

    /// all-MiniLM-L6-v2: 6 layers, 384 wide, 12 heads (bert-base-uncased's vocabulary).
    pub fn all_minilm_l6_v2() -> Self {
        Self { hidden_size: 384, num_hidden_layers: 6, intermediate_size: 1536, ..Self::bert_base_uncased() }
    }

    /// A 2-layer, 64-wide BERT with the same vocabulary, for CPU tests.
    pub fn tiny() -> Self {
        Self {
            hidden_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 128,
            ..Self::bert_base_uncased()
        }
    }

    /// Reads a Hugging Face `config.json` (the fields above; others are ignored).
    pub fn from_hf_json(path: &Path) -> Result<Self, WeightsError> {
        let read_error = |message: String| WeightsError::Read { path: path.to_path_buf(), message };
        let text = std::fs::read_to_string(path).map_err(|e| read_error(e.to_string()))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| read_error(format!("not a JSON config: {e}")))?;
        let base = Self::bert_base_uncased();
        let field = |name: &str, default: usize| -> Result<usize, WeightsError> {
            match value.get(name) {
                None => Ok(default),
                Some(v) => v.as_u64().map(|v| v as usize).ok_or_else(|| read_error(format!("`{name}` is not a count"))),
            }
        };
        Ok(Self {
            vocab_size: field("vocab_size", base.vocab_size)?,
            hidden_size: field("hidden_size", base.hidden_size)?,
            num_hidden_layers: field("num_hidden_layers", base.num_hidden_layers)?,
            num_attention_heads: field("num_attention_heads", base.num_attention_heads)?,
            intermediate_size: field("intermediate_size", base.intermediate_size)?,
            max_position_embeddings: field("max_position_embeddings", base.max_position_embeddings)?,
            type_vocab_size: field("type_vocab_size", base.type_vocab_size)?,
            layer_norm_eps: value.get("layer_norm_eps").and_then(|v| v.as_f64()).unwrap_or(base.layer_norm_eps),
        })
    }

    pub fn init(&self, device: &Device) -> BertModel {
        BertModel::new(self, device)
    }
}

#[derive(Module, Debug)]
pub struct BertEmbeddings {
    pub word_embeddings: Embedding,
    pub position_embeddings: Embedding,
    pub token_type_embeddings: Embedding,
    pub layer_norm: LayerNorm,
}

#[derive(Module, Debug)]
pub struct BertSelfAttention {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    #[module(skip)]
    pub num_heads: usize,
}

#[derive(Module, Debug)]
pub struct BertSelfOutput {
    pub dense: Linear,
    pub layer_norm: LayerNorm,
}

#[derive(Module, Debug)]
pub struct BertAttention {
    pub self_attn: BertSelfAttention,
    pub output: BertSelfOutput,
}

#[derive(Module, Debug)]
pub struct BertIntermediate {
    pub dense: Linear,
}

#[derive(Module, Debug)]
pub struct BertLayer {
    pub attention: BertAttention,
    pub intermediate: BertIntermediate,
    pub output: BertSelfOutput,
}

#[derive(Module, Debug)]
pub struct BertEncoder {
    pub layer: Vec<BertLayer>,
}

#[derive(Module, Debug)]
pub struct BertPooler {
    pub dense: Linear,
}

#[derive(Module, Debug)]
pub struct BertModel {
    pub embeddings: BertEmbeddings,
    pub encoder: BertEncoder,
    pub pooler: BertPooler,
}

/// How kiln's BERT field names differ from Hugging Face's.
pub fn bert_renames() -> Vec<(String, String)> {
    vec![(".attention.self.".into(), ".attention.self_attn.".into()), (".LayerNorm.".into(), ".layer_norm.".into())]
}

impl BertModel {
    pub fn new(config: &BertConfig, device: &Device) -> Self {
        let h = config.hidden_size;
        let norm = || LayerNormConfig::new(h).with_epsilon(config.layer_norm_eps).init(device);
        let layer = || BertLayer {
            attention: BertAttention {
                self_attn: BertSelfAttention {
                    query: LinearConfig::new(h, h).init(device),
                    key: LinearConfig::new(h, h).init(device),
                    value: LinearConfig::new(h, h).init(device),
                    num_heads: config.num_attention_heads,
                },
                output: BertSelfOutput { dense: LinearConfig::new(h, h).init(device), layer_norm: norm() },
            },
            intermediate: BertIntermediate { dense: LinearConfig::new(h, config.intermediate_size).init(device) },
            output: BertSelfOutput {
                dense: LinearConfig::new(config.intermediate_size, h).init(device),
                layer_norm: norm(),
            },
        };
        Self {
            embeddings: BertEmbeddings {
                word_embeddings: EmbeddingConfig::new(config.vocab_size, h).init(device),
                position_embeddings: EmbeddingConfig::new(config.max_position_embeddings, h).init(device),
                token_type_embeddings: EmbeddingConfig::new(config.type_vocab_size, h).init(device),
                layer_norm: norm(),
            },
            encoder: BertEncoder { layer: (0..config.num_hidden_layers).map(|_| layer()).collect() },
            pooler: BertPooler { dense: LinearConfig::new(h, h).init(device) },
        }
    }

    /// Loads a Hugging Face `BertModel` checkpoint (`model.safetensors` or `pytorch_model.bin`,
    /// keys with or without a `bert.` prefix) into `config`'s architecture, all or nothing.
    pub fn load(config: &BertConfig, path: &Path, device: &Device) -> Result<Self, WeightsError> {
        use crate::weights::OfficialCheckpoint;
        let layout = Self::checkpoint_layout();
        crate::weights::load_checkpoint_with(config.init(device), path, &layout, "a BERT of this configuration")
    }

    pub fn hidden_size(&self) -> usize {
        self.pooler.dense.weight.dims()[0]
    }

    /// `last_hidden_state [B, L, H]` of `input_ids [B, L]`. `position_ids` default to `0..L`;
    /// `attention` is `[B, L, L]` ("query i may attend to key j", GroundingDINO's sub-sentence mask)
    /// or, from a `[B, L]` padding mask, the same mask for every query. Token types are all 0.
    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        position_ids: Option<Tensor<2, Int>>,
        attention: Tensor<3, Bool>,
    ) -> Tensor<3> {
        let [batch, len] = input_ids.dims();
        let device = input_ids.device();
        let position_ids = position_ids
            .unwrap_or_else(|| Tensor::<1, Int>::arange(0..len as i64, &device).unsqueeze::<2>().repeat_dim(0, batch));
        let token_types = Tensor::<2, Int>::zeros([batch, len], &device);
        let e = &self.embeddings;
        let x = e.word_embeddings.forward(input_ids)
            + e.position_embeddings.forward(position_ids)
            + e.token_type_embeddings.forward(token_types);
        let mut x = e.layer_norm.forward(x);
        let bias = mask_to_bias(attention).unsqueeze_dim::<4>(1);
        for layer in &self.encoder.layer {
            x = layer.forward(x, bias.clone());
        }
        x
    }

    /// sentence-transformers' embedding: the attention-masked mean of the last hidden state, L2-normalised.
    pub fn sentence_embedding(&self, input_ids: Tensor<2, Int>, padding_mask: Tensor<2, Bool>) -> Tensor<2> {
        let len = input_ids.dims()[1];
        let keys = padding_mask.clone().unsqueeze_dim::<3>(1).repeat_dim(1, len);
        let hidden = self.forward(input_ids, None, keys);
        let weights = padding_mask.float().unsqueeze_dim::<3>(2);
        let summed = (hidden * weights.clone()).sum_dim(1).squeeze_dim::<2>(1);
        let counts = weights.sum_dim(1).squeeze_dim::<2>(1).clamp_min(1e-9);
        let mean = summed / counts;
        let norm = mean.clone().square().sum_dim(1).sqrt().clamp_min(1e-12);
        mean / norm
    }
}

impl BertLayer {
    fn forward(&self, x: Tensor<3>, bias: Tensor<4>) -> Tensor<3> {
        let a = &self.attention.self_attn;
        let [batch, len, hidden] = x.dims();
        let heads = a.num_heads;
        let head_dim = hidden / heads;
        let split = |t: Tensor<3>| t.reshape([batch, len, heads, head_dim]).swap_dims(1, 2);
        let q = split(a.query.forward(x.clone()));
        let k = split(a.key.forward(x.clone()));
        let v = split(a.value.forward(x.clone()));
        let scores = q.matmul(k.swap_dims(2, 3)) * (head_dim as f64).powf(-0.5) + bias;
        let context = softmax(scores, 3).matmul(v).swap_dims(1, 2).reshape([batch, len, hidden]);
        let out = &self.attention.output;
        let x = out.layer_norm.forward(out.dense.forward(context) + x);
        let inner = gelu(self.intermediate.dense.forward(x.clone()));
        self.output.layer_norm.forward(self.output.dense.forward(inner) + x)
    }
}

/// Hugging Face's `BertModel` keys, with or without a `bert.` prefix.
impl crate::weights::OfficialCheckpoint for BertModel {
    fn checkpoint_layout() -> CheckpointLayout {
        let mut layout = CheckpointLayout::default();
        layout.renames.push(("^bert.".into(), String::new()));
        layout.renames.extend(bert_renames());
        layout.ignored.push(r"^embeddings\.position_ids$".into());
        layout
    }
}
