//! A CLIP model's BERT or RoBERTa text tower as Hugging Face transformers loads it:
//! `config.json` (a `BertConfig` or `RobertaConfig`), `model.safetensors` (`BertModel`'s or
//! `RobertaModel`'s names: the tower's `bert.*` variables without the prefix),
//! `tokenizer.json` and `tokenizer_config.json` (the job's tokenizer), so
//! `AutoModel.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` load it; beside
//! them `text_projection.safetensors` (width × embed) and `contrail_text.json` (the pooling and
//! the joint-space width) say how the caption embedding is made: the first token's hidden
//! state (or the mean over the attention mask) times `text_projection`. The pooler the
//! library builds is not trained by contrail and transformers initialises it (its output is
//! not used).
//!
//! A RoBERTa tower's config carries what makes it one: one token type, LayerNorm ε 1e-5, and
//! the pad id from which `RobertaModel` counts positions (contrail's tower counts them the
//! same way). Its tokenizer is declared as the generic `PreTrainedTokenizerFast` with the
//! special tokens contrail found in `tokenizer.json`, so any RoBERTa-family tokenizer file
//! (XLM-R's `<s>`/`</s>`/`<pad>`, or a Chinese RoBERTa-wwm's BERT vocabulary) loads as is.

use super::{config_and_weights, json, safetensors, variables, Export, ExportFormat, ExportInput};
use crate::model::bert::flavor;
use crate::tokenize::{HfTokenizer, SpecialTokens};
use anyhow::{Context, Result};
use contrail_common::config::{TextKind, TextPooling};
use serde_json::json;

const FORMAT: ExportFormat = ExportFormat::Hf;

pub fn export(input: &ExportInput<'_>) -> Result<Export> {
    let model = input.model;
    let bert = model.bert_config().with_context(|| {
        format!(
            "cannot export to {}: only a BERT or RoBERTa text tower (model.text.kind = \"bert\" \
             or \"roberta\") has Hugging Face's layout (--format open_clip exports a CLIP text transformer)",
            FORMAT.as_str()
        )
    })?;
    let Some(tokenizer) = input.tokenizer_json else {
        anyhow::bail!(
            "cannot export to {}: the job's tokenizer is the built-in byte tokenizer, which \
             transformers cannot load (set model.text.tokenizer to a tokenizer.json)",
            FORMAT.as_str()
        );
    };
    let mut named = Vec::new();
    let mut projection = Vec::new();
    for (name, t) in variables(model) {
        if let Some(local) = name.strip_prefix("bert.") {
            named.push((local.to_string(), t.detach()));
        } else if name == "text_projection" {
            projection.push((name, t.detach()));
        }
    }
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let roberta = bert.kind == TextKind::Roberta;
    let (architecture, model_type) = if roberta {
        ("RobertaModel", "roberta")
    } else {
        ("BertModel", "bert")
    };
    // The LayerNorm epsilon and token types the tower was built with.
    let (layer_norm_eps, token_types) = flavor(bert.kind);
    let config = json!({
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": bert.vocab_size,
        "hidden_size": bert.width,
        "num_hidden_layers": bert.layers,
        "num_attention_heads": bert.heads,
        "intermediate_size": bert.intermediate,
        "max_position_embeddings": bert.max_positions,
        "type_vocab_size": token_types,
        "hidden_act": "gelu",
        "layer_norm_eps": layer_norm_eps,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "pad_token_id": bert.pad_id,
        "initializer_range": 0.02,
    });
    let tokenizer_config = if roberta {
        let SpecialTokens { sot, eot, pad } = HfTokenizer::usual_special_tokens(tokenizer)
            .context("finding the special tokens of the job's tokenizer.json")?;
        // Without a start or pad token the end token stands in (contrail pads with it).
        let sot = sot.unwrap_or_else(|| eot.clone());
        let pad = pad.unwrap_or_else(|| eot.clone());
        json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": bert.context_length,
            "bos_token": sot,
            "cls_token": sot,
            "eos_token": eot,
            "sep_token": eot,
            "pad_token": pad,
        })
    } else {
        json!({
            "tokenizer_class": "BertTokenizerFast",
            "model_max_length": bert.context_length,
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "unk_token": "[UNK]",
            "mask_token": "[MASK]",
        })
    };
    let text = json!({
        "pooling": match bert.pooling {
            TextPooling::Cls => "cls",
            TextPooling::Mean => "mean",
        },
        "embed_dim": bert.output_dim,
        "context_length": bert.context_length,
    });
    let mut files = config_and_weights(&config, &named)?;
    files.extend([
        ("tokenizer.json".to_string(), tokenizer.to_vec()),
        (
            "tokenizer_config.json".to_string(),
            json(&tokenizer_config)?,
        ),
        (
            "text_projection.safetensors".to_string(),
            safetensors(&projection)?,
        ),
        ("contrail_text.json".to_string(), json(&text)?),
    ]);
    Ok(Export {
        files,
        notes: vec![
            format!(
                "Hugging Face {architecture}: width {} × {} layers, {} heads, {} positions, {} \
                 tensors; text_projection {} → {}, {} pooling",
                bert.width,
                bert.layers,
                bert.heads,
                bert.max_positions,
                named.len(),
                bert.width,
                bert.output_dim,
                text["pooling"].as_str().unwrap_or_default()
            ),
            format!(
                "load with transformers.{architecture}.from_pretrained(\"DIR\") (or AutoModel) \
                 and AutoTokenizer.from_pretrained(\"DIR\"); embed = hidden[:, 0] @ \
                 text_projection"
            ),
        ],
    })
}
