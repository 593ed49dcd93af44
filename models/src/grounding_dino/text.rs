//! GroundingDINO's text side before BERT: the caption built from class names ("cat . dog ."), BERT's
//! WordPiece tokenizer (the `tokenizers` crate reading a Hugging Face `tokenizer.json`), and the
//! sub-sentence masks of `bertwarper.py` `generate_masks_with_special_tokens_and_transfer_map`: every
//! phrase (with its trailing ".") attends only to itself and gets position ids from 0, so each class
//! name is encoded as its own sentence. Also the per-class token maps used for training and scoring.

use std::path::{Path, PathBuf};

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("{path}: cannot read the tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("cannot tokenise {text:?}: {message}")]
    Encode { text: String, message: String },
    #[error("the caption is empty: give at least one class name")]
    Empty,
}

const BERT_BASE_UNCASED: &[u8] = include_bytes!("../../assets/bert-base-uncased-tokenizer.json");

/// A caption and, for each phrase (class name), its byte span in the caption.
#[derive(Debug, Clone, PartialEq)]
pub struct Caption {
    pub text: String,
    pub phrases: Vec<(usize, usize)>,
}

impl Caption {
    /// "name1 . name2 . … ." from class names, lower-cased and trimmed as the official
    /// `preprocess_caption`.
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Result<Self, TextError> {
        let mut text = String::new();
        let mut phrases = Vec::new();
        for name in names {
            let name = name.as_ref().trim().to_lowercase();
            if name.is_empty() {
                continue;
            }
            let start = text.len();
            text.push_str(&name);
            phrases.push((start, text.len()));
            text.push_str(" . ");
        }
        if phrases.is_empty() {
            return Err(TextError::Empty);
        }
        text.truncate(text.len() - 1);
        Ok(Self { text, phrases })
    }

    /// A user's prompt ("cat . dog ." or "cat. dog"): phrases split at ".", a final "." added.
    pub fn from_prompt(prompt: &str) -> Result<Self, TextError> {
        let names: Vec<&str> = prompt.split('.').map(str::trim).filter(|s| !s.is_empty()).collect();
        Self::from_names(&names)
    }

    pub fn phrase_names(&self) -> Vec<&str> {
        self.phrases.iter().map(|&(s, e)| &self.text[s..e]).collect()
    }
}

/// One tokenised caption: ids with [CLS]/[SEP], and each token's byte span in the caption.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub offsets: Vec<(usize, usize)>,
}

/// BERT's uncased WordPiece tokenizer plus the ids GroundingDINO cuts phrases at.
pub struct CaptionTokenizer {
    tokenizer: tokenizers::Tokenizer,
    /// [CLS], [SEP], ".", "?"
    pub special_ids: Vec<u32>,
}

impl CaptionTokenizer {
    pub fn from_file(path: &Path) -> Result<Self, TextError> {
        let error = |message: String| TextError::Tokenizer { path: path.to_path_buf(), message };
        let bytes = std::fs::read(path).map_err(|e| error(e.to_string()))?;
        Self::from_bytes(&bytes, path)
    }

    /// bert-base-uncased's tokenizer, built into kiln (`models/assets`).
    pub fn bert_base_uncased() -> Result<Self, TextError> {
        Self::from_bytes(BERT_BASE_UNCASED, Path::new("<built-in bert-base-uncased tokenizer>"))
    }

    fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self, TextError> {
        let error = |message: String| TextError::Tokenizer { path: path.to_path_buf(), message };
        let mut tokenizer = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| error(e.to_string()))?;
        // The official code calls the tokenizer without truncation or padding; a tokenizer.json may
        // carry sentence-transformers' settings for both.
        tokenizer.with_padding(None);
        tokenizer.with_truncation(None).map_err(|e| error(e.to_string()))?;
        let special_ids = ["[CLS]", "[SEP]", ".", "?"]
            .iter()
            .map(|t| {
                tokenizer.token_to_id(t).ok_or_else(|| error(format!("no `{t}` token: not a BERT WordPiece tokenizer")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { tokenizer, special_ids })
    }

    pub fn encode(&self, text: &str) -> Result<Encoded, TextError> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| TextError::Encode { text: text.to_string(), message: e.to_string() })?;
        Ok(Encoded { ids: encoding.get_ids().to_vec(), offsets: encoding.get_offsets().to_vec() })
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }

    /// For each phrase of `caption`, the token positions covering it (the official
    /// `create_positive_map_from_span`: char_to_token(start) ..= char_to_token(end - 1)).
    pub fn phrase_tokens(&self, caption: &Caption, encoded: &Encoded) -> Vec<Vec<usize>> {
        caption
            .phrases
            .iter()
            .map(|&(start, end)| {
                encoded
                    .offsets
                    .iter()
                    .enumerate()
                    .filter(|&(i, &(s, e))| {
                        e > s && s < end && e > start && !self.special_ids.contains(&encoded.ids[i])
                    })
                    .map(|(i, _)| i)
                    .collect()
            })
            .collect()
    }
}

/// `generate_masks_with_special_tokens_and_transfer_map` for one row of (possibly padded) ids.
#[derive(Debug, Clone, PartialEq)]
pub struct SubSentences {
    /// `[n * n]`, row-major: token i may attend to token j.
    pub attention: Vec<bool>,
    pub position_ids: Vec<i64>,
    /// [`Self::attention`] where every phrase's tokens also see `[CLS]`, and
    /// [`Self::position_ids`] shifted to start each phrase at 1 behind it: each phrase as BERT
    /// would read `[CLS] name .` alone. For a frozen text encoder (MiniLM): at position 0 without
    /// `[CLS]` it gives every phrase's first word almost the same vector (cosine distance ~3e-4
    /// between class names, against ~0.8 with `[CLS]` seen), so the class names become
    /// indistinguishable. The official models fine-tune BERT, which learns around it.
    pub attention_with_cls: Vec<bool>,
    pub position_ids_with_cls: Vec<i64>,
    /// The tokens of each phrase between two delimiters (the official `cate_to_token_mask`).
    pub phrase_tokens: Vec<Vec<usize>>,
}

pub fn sub_sentences(ids: &[u32], special_ids: &[u32]) -> SubSentences {
    let n = ids.len();
    let mut attention = vec![false; n * n];
    for i in 0..n {
        attention[i * n + i] = true;
    }
    let mut position_ids = vec![0i64; n];
    let mut phrase_tokens = Vec::new();
    let mut phrase_rows = Vec::new();
    let mut previous = 0usize;
    for (col, id) in ids.iter().enumerate() {
        if !special_ids.contains(id) {
            continue;
        }
        if col != 0 && col != n - 1 {
            for i in previous + 1..=col {
                for j in previous + 1..=col {
                    attention[i * n + j] = true;
                }
                position_ids[i] = (i - previous - 1) as i64;
                phrase_rows.push(i);
            }
            phrase_tokens.push((previous + 1..col).collect());
        }
        previous = col;
    }
    let mut attention_with_cls = attention.clone();
    let mut position_ids_with_cls = position_ids.clone();
    for &i in &phrase_rows {
        attention_with_cls[i * n] = true;
        position_ids_with_cls[i] += 1;
    }
    SubSentences { attention, position_ids, attention_with_cls, position_ids_with_cls, phrase_tokens }
}

/// Tokenised captions of a batch, padded to the longest ("longest" padding, id 0) and cut at
/// `max_len` tokens, with the sub-sentence masks BERT and the encoder use.
#[derive(Debug, Clone)]
pub struct TextBatch {
    pub input_ids: Tensor<2, Int>,
    pub position_ids: Vec<Vec<i64>>,
    /// `[B, T, T]`: may attend.
    pub self_attention: Tensor<3, Bool>,
    /// BERT's mask and position ids when the phrases see `[CLS]` ([`SubSentences::attention_with_cls`]).
    pub self_attention_with_cls: Tensor<3, Bool>,
    pub position_ids_with_cls: Vec<Vec<i64>>,
    /// `[B, T]`: true on real tokens (the tokenizer's attention mask).
    pub token_mask: Tensor<2, Bool>,
    pub lengths: Vec<usize>,
}

impl TextBatch {
    pub fn new(encoded: &[&Encoded], special_ids: &[u32], max_len: usize, device: &Device) -> Self {
        let batch = encoded.len();
        let longest = encoded.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let padded = longest.min(max_len);
        let mut ids = Vec::with_capacity(batch * padded);
        let mut attention = Vec::with_capacity(batch * padded * padded);
        let mut attention_with_cls = Vec::with_capacity(batch * padded * padded);
        let mut position_ids_with_cls = Vec::with_capacity(batch);
        let mut token_mask = Vec::with_capacity(batch * padded);
        let mut position_ids = Vec::with_capacity(batch);
        let mut lengths = Vec::with_capacity(batch);
        for e in encoded {
            // The official code builds the masks on the padded row, then truncates.
            let mut row: Vec<u32> = e.ids.clone();
            row.resize(longest, 0);
            let masks = sub_sentences(&row, special_ids);
            for i in 0..padded {
                attention.extend_from_slice(&masks.attention[i * longest..i * longest + padded]);
                attention_with_cls.extend_from_slice(&masks.attention_with_cls[i * longest..i * longest + padded]);
            }
            position_ids_with_cls.push(masks.position_ids_with_cls[..padded].to_vec());
            ids.extend(row[..padded].iter().map(|&id| id as i64));
            token_mask.extend((0..padded).map(|i| i < e.ids.len()));
            position_ids.push(masks.position_ids[..padded].to_vec());
            lengths.push(e.ids.len().min(padded));
        }
        Self {
            input_ids: Tensor::from_data(TensorData::new(ids, [batch, padded]), device),
            position_ids,
            self_attention: Tensor::from_data(TensorData::new(attention, [batch, padded, padded]), device),
            self_attention_with_cls: Tensor::from_data(
                TensorData::new(attention_with_cls, [batch, padded, padded]),
                device,
            ),
            position_ids_with_cls,
            token_mask: Tensor::from_data(TensorData::new(token_mask, [batch, padded]), device),
            lengths,
        }
    }

    pub fn position_ids_tensor(&self, device: &Device) -> Tensor<2, Int> {
        ids_tensor(&self.position_ids, device)
    }

    pub fn position_ids_with_cls_tensor(&self, device: &Device) -> Tensor<2, Int> {
        ids_tensor(&self.position_ids_with_cls, device)
    }
}

fn ids_tensor(rows: &[Vec<i64>], device: &Device) -> Tensor<2, Int> {
    let len = rows.first().map_or(0, Vec::len);
    let flat: Vec<i64> = rows.iter().flatten().copied().collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), len]), device)
}

impl TextBatch {}
