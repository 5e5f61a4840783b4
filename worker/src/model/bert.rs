//! BERT-family text tower (`model.text.kind = "bert"` or `"roberta"`), parameter for parameter
//! Hugging Face transformers' `BertModel` (post-LayerNorm blocks, learned absolute positions
//! from 0, token type 0 everywhere, GELU, LayerNorm ε 1e-12; `RobertaModel`: positions from
//! the pad id + 1, one token type, ε 1e-5), as Chinese-CLIP's text tower is (its
//! RoBERTa-wwm checkpoints are BERT architectures): built on the VarStore root the names are
//! `bert.embeddings.{word,position,token_type}_embeddings.weight`, `bert.embeddings.LayerNorm.*`,
//! `bert.encoder.layer.N.{attention.self.{query,key,value}, attention.output.{dense,LayerNorm},
//! intermediate.dense, output.{dense,LayerNorm}}.*`, and the projection into the joint space
//! `text_projection` (width × embed), Chinese-CLIP's layout. A Hugging Face
//! `model.safetensors` (`embeddings.*`, `encoder.*`) loads under the `bert.` mapping of
//! `model::init_weights`; its `pooler.*` is not used (Chinese-CLIP pools without it).
//!
//! Pad tokens are masked as keys (the attention mask transformers' tokenizer returns: every
//! non-pad token). Pooling: `[CLS]`, the first token's hidden state (Chinese-CLIP), or the
//! mean over the non-pad tokens.

use super::lora::{adapted, Lora};
use super::transformer::{layer_norm, Norm};
use anyhow::ensure;
use contrail_common::config::{AdapterSettings, TextKind, TextPooling};
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

/// What differs between BERT and RoBERTa (XLM-R) checkpoints: LayerNorm epsilon, token types
/// (BERT's sentence A and B, RoBERTa's one; contrail uses type 0), and where positions count
/// from (BERT: 0 for every slot; RoBERTa: pad id + 1 over the non-pad tokens, pad slots at
/// the pad id, transformers' `create_position_ids_from_input_ids`).
pub(crate) fn flavor(kind: TextKind) -> (f64, i64) {
    match kind {
        TextKind::Roberta => (1e-5, 1),
        _ => (1e-12, 2),
    }
}

/// Sizes and token conventions of a BERT tower.
#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    /// Tokens per caption (`[CLS]` and `[SEP]` included).
    pub context_length: i64,
    pub vocab_size: i64,
    pub width: i64,
    pub layers: i64,
    pub heads: i64,
    /// Hidden width of each block's feed-forward layer (`intermediate_size`).
    pub intermediate: i64,
    /// Rows of the position table (`max_position_embeddings`), at least `context_length`.
    pub max_positions: i64,
    /// Size of the joint image–text embedding.
    pub output_dim: i64,
    pub pad_id: i64,
    pub pooling: TextPooling,
    /// `TextKind::Bert` or `TextKind::Roberta`.
    pub kind: TextKind,
}

impl BertConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            self.context_length > 0
                && self.vocab_size > 0
                && self.width > 0
                && self.layers > 0
                && self.heads > 0
                && self.intermediate > 0
                && self.output_dim > 0,
            "bert: sizes must be positive (got {self:?})"
        );
        ensure!(
            self.width % self.heads == 0,
            "bert: width {} is not a multiple of heads {}",
            self.width,
            self.heads
        );
        ensure!(
            self.max_positions > self.last_position(),
            "bert: {} positions cannot hold captions of context_length {} (the last position \
             is {})",
            self.max_positions,
            self.context_length,
            self.last_position()
        );
        ensure!(
            (0..self.vocab_size).contains(&self.pad_id),
            "bert: pad id {} is outside the vocabulary 0..{}",
            self.pad_id,
            self.vocab_size
        );
        Ok(())
    }
}

impl BertConfig {
    /// The largest position id a caption can use.
    fn last_position(&self) -> i64 {
        match self.kind {
            TextKind::Roberta => self.pad_id + self.context_length,
            _ => self.context_length - 1,
        }
    }
}

/// `nn.Linear` with BERT's initialisation: N(0, 0.02) weights, zero bias.
fn linear(p: nn::Path, c_in: i64, c_out: i64) -> nn::Linear {
    nn::linear(
        p,
        c_in,
        c_out,
        nn::LinearConfig {
            ws_init: Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
            bs_init: Some(Init::Const(0.0)),
            bias: true,
        },
    )
}

fn bert_norm(p: nn::Path, width: i64, eps: f64) -> Norm {
    let mut n = layer_norm(p, width);
    n.set_eps(eps);
    n
}

fn embedding(p: nn::Path, rows: i64, width: i64) -> nn::Embedding {
    nn::embedding(
        p,
        rows,
        width,
        nn::EmbeddingConfig {
            ws_init: Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
            ..Default::default()
        },
    )
}

/// One post-LayerNorm encoder block (`BertLayer`).
#[derive(Debug)]
struct BertLayer {
    query: nn::Linear,
    key: nn::Linear,
    value: nn::Linear,
    attention_out: nn::Linear,
    attention_norm: Norm,
    intermediate: nn::Linear,
    output: nn::Linear,
    output_norm: Norm,
    heads: i64,
    /// LoRA adapters, in the order of the projections above (`[model.adapters]`).
    lora: [Option<Lora>; 6],
}

impl BertLayer {
    fn new(p: &nn::Path, cfg: &BertConfig) -> Self {
        let w = cfg.width;
        let attention = p / "attention";
        let own = &attention / "self";
        Self {
            query: linear(&own / "query", w, w),
            key: linear(&own / "key", w, w),
            value: linear(&own / "value", w, w),
            attention_out: linear(&attention / "output" / "dense", w, w),
            attention_norm: bert_norm(&attention / "output" / "LayerNorm", w, flavor(cfg.kind).0),
            intermediate: linear(p / "intermediate" / "dense", w, cfg.intermediate),
            output: linear(p / "output" / "dense", cfg.intermediate, w),
            output_norm: bert_norm(p / "output" / "LayerNorm", w, flavor(cfg.kind).0),
            heads: cfg.heads,
            lora: Default::default(),
        }
    }

    /// Adapters beside the projections `settings` targets, named after them (`p` is the
    /// layer's path).
    fn add_adapters(&mut self, p: &nn::Path, settings: &AdapterSettings) {
        let attention = p / "attention";
        let own = &attention / "self";
        let w = self.query.ws.size()[0];
        let hidden = self.intermediate.ws.size()[0];
        let lora = |path: nn::Path, c_in, c_out| Some(Lora::new(&path, c_in, c_out, settings));
        if settings.targets_attention() {
            self.lora[0] = lora(&own / "query", w, w);
            self.lora[1] = lora(&own / "key", w, w);
            self.lora[2] = lora(&own / "value", w, w);
            self.lora[3] = lora(&attention / "output" / "dense", w, w);
        }
        if settings.targets_mlp() {
            self.lora[4] = lora(p / "intermediate" / "dense", w, hidden);
            self.lora[5] = lora(p / "output" / "dense", hidden, w);
        }
    }

    /// Projection `i` (query, key, value, attention output, intermediate, output) of `x`.
    fn project(&self, i: usize, x: &Tensor) -> Tensor {
        let l = [
            &self.query,
            &self.key,
            &self.value,
            &self.attention_out,
            &self.intermediate,
            &self.output,
        ][i];
        adapted(x, &l.ws, l.bs.as_ref(), self.lora[i].as_ref())
    }

    /// `x`: N × L × width; `keys`: N × 1 × 1 × L bool, true where a key may be attended to.
    fn forward(&self, x: &Tensor, keys: &Tensor) -> Tensor {
        let (n, l, w) = x.size3().expect("N × L × width");
        let split = |t: Tensor| t.view([n, l, self.heads, w / self.heads]).transpose(1, 2);
        let (q, k, v) = (
            split(self.project(0, x)),
            split(self.project(1, x)),
            split(self.project(2, x)),
        );
        let context =
            Tensor::scaled_dot_product_attention(&q, &k, &v, Some(keys), 0.0, false, None, false)
                .transpose(1, 2)
                .reshape([n, l, w]);
        let x = (self.project(3, &context) + x).apply(&self.attention_norm);
        let h = self.project(5, &self.project(4, &x).gelu("none"));
        (h + x).apply(&self.output_norm)
    }
}

#[derive(Debug)]
pub struct BertTower {
    word_embeddings: nn::Embedding,
    position_embeddings: nn::Embedding,
    token_type_embeddings: nn::Embedding,
    embedding_norm: Norm,
    layers: Vec<BertLayer>,
    text_projection: Tensor,
    cfg: BertConfig,
}

impl BertTower {
    /// Creates the variables: the encoder under `root / "bert"`, `text_projection` under
    /// `root` (N(0, width^-0.5), as Chinese-CLIP and open_clip draw it).
    pub fn new(root: &nn::Path, cfg: &BertConfig) -> anyhow::Result<Self> {
        cfg.validate()?;
        let bert = root / "bert";
        let emb = &bert / "embeddings";
        let w = cfg.width;
        let (eps, types) = flavor(cfg.kind);
        Ok(Self {
            word_embeddings: embedding(&emb / "word_embeddings", cfg.vocab_size, w),
            position_embeddings: embedding(&emb / "position_embeddings", cfg.max_positions, w),
            token_type_embeddings: embedding(&emb / "token_type_embeddings", types, w),
            embedding_norm: bert_norm(&emb / "LayerNorm", w, eps),
            layers: (0..cfg.layers)
                .map(|i| BertLayer::new(&(&bert / "encoder" / "layer" / i), cfg))
                .collect(),
            text_projection: root.var(
                "text_projection",
                &[w, cfg.output_dim],
                Init::Randn {
                    mean: 0.0,
                    stdev: (w as f64).powf(-0.5),
                },
            ),
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    /// LoRA adapters on every layer; `root` is the path the tower was built on.
    pub fn add_adapters(&mut self, root: &nn::Path, settings: &AdapterSettings) {
        let layers = root / "bert" / "encoder" / "layer";
        for (i, layer) in self.layers.iter_mut().enumerate() {
            layer.add_adapters(&(&layers / i as i64), settings);
        }
    }

    /// Every token's last hidden state, N × L × width (transformers' `last_hidden_state`).
    pub fn hidden_states(&self, tokens: &Tensor) -> Tensor {
        let (n, l) = tokens.size2().expect("token ids must be N × L");
        assert!(
            l <= self.cfg.context_length,
            "{l} tokens per caption exceed the text tower's context_length {}",
            self.cfg.context_length
        );
        let device = tokens.device();
        let positions = match self.cfg.kind {
            TextKind::Roberta => {
                let valid = self.valid(tokens).to_kind(Kind::Int64);
                valid.cumsum(1, Kind::Int64) * &valid + self.cfg.pad_id
            }
            _ => Tensor::arange(l, (Kind::Int64, device)).unsqueeze(0),
        };
        let types = Tensor::zeros([1, l], (Kind::Int64, device));
        let x = tokens.apply(&self.word_embeddings)
            + positions.apply(&self.position_embeddings)
            + types.apply(&self.token_type_embeddings);
        let mut x = x.apply(&self.embedding_norm);
        let keys = self.valid(tokens).view([n, 1, 1, l]);
        for layer in &self.layers {
            x = layer.forward(&x, &keys);
        }
        x
    }

    /// Token ids N × L (int64, as a [`crate::tokenize::Tokenizer`] writes them) → N ×
    /// output_dim (not normalised).
    pub fn forward(&self, tokens: &Tensor) -> Tensor {
        let hidden = self.hidden_states(tokens);
        let pooled = match self.cfg.pooling {
            TextPooling::Cls => hidden.select(1, 0),
            TextPooling::Mean => {
                let valid = self.valid(tokens).to_kind(hidden.kind()).unsqueeze(-1);
                (&hidden * &valid).sum_dim_intlist(1, false, None)
                    / valid.sum_dim_intlist(1, false, None)
            }
        };
        pooled.matmul(&self.text_projection)
    }

    /// N × L bool: the tokens that are not padding (transformers' attention mask).
    fn valid(&self, tokens: &Tensor) -> Tensor {
        tokens.ne(self.cfg.pad_id)
    }
}
