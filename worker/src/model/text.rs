//! Text tower of a CLIP model, parameter for parameter open_clip 3.3.0's text transformer as
//! the top-level `CLIP` model holds it: built on the VarStore root the names are
//! `token_embedding.weight`, `positional_embedding`, `transformer.resblocks.N.*`,
//! `ln_final.*` and `text_projection` (the `visual.*` tower sits beside it).
//!
//! Pooling differs from open_clip on purpose. open_clip pools CLIP's causal tower at
//! `text.argmax(-1)`, which is the end-of-text token only because CLIP's BPE gives EOT the
//! largest id. Our tokenizers need not (an HF tokenizer's `</s>` is often id 2), so
//! [`TextMode::Causal`] pools at the *first* end-of-text token of each row, and at the last
//! non-pad position for a row that has none. Both agree whenever EOT is the row's largest id,
//! which is how the conformance fixture is built. [`TextMode::Bidirectional`] has no open_clip
//! counterpart for the CLIP tower: keys after the end position are masked (open_clip's
//! `use_pad_mask`) and the output is the mean over positions up to and including it.

use super::transformer::{layer_norm, AttentionMask, BlockInit, MoeBlocks, Norm, Transformer};
use crate::tokenize::Tokenizer;
use anyhow::ensure;
use contrail_common::config::Activation;
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

/// Attention pattern and the pooling that goes with it (`model.text.mode`): causal
/// self-attention pooled at the end-of-text token (CLIP), or every token seeing every non-pad
/// token with the mean over them.
pub use contrail_common::config::TextMode;

/// Sizes and token conventions of a text tower.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub context_length: i64,
    pub vocab_size: i64,
    pub width: i64,
    pub layers: i64,
    pub heads: i64,
    pub mlp_ratio: f64,
    /// Size of the joint image–text embedding (`embed_dim` in open_clip configs).
    pub output_dim: i64,
    pub mode: TextMode,
    pub pad_id: i64,
    /// End-of-text id: the pooling position in causal mode and the end of the valid tokens.
    pub eot_id: i64,
    pub activation: Activation,
}

impl TextConfig {
    /// The text tower of open_clip's ViT-B-32 / ViT-B-16: context 77, width 512, 12 layers,
    /// 8 heads, embed 512, with CLIP's BPE ids (vocab 49408, pad 0, EOT 49407). Use
    /// [`TextConfig::with_tokenizer`] for another tokenizer.
    pub fn clip_b() -> Self {
        Self {
            context_length: 77,
            vocab_size: 49408,
            width: 512,
            layers: 12,
            heads: 8,
            mlp_ratio: 4.0,
            output_dim: 512,
            mode: TextMode::Causal,
            pad_id: 0,
            eot_id: 49407,
            activation: Activation::Gelu,
        }
    }

    /// The text tower of open_clip's ViT-S-32 / ViT-S-16: width 384, 6 heads, embed 384.
    pub fn clip_s() -> Self {
        Self {
            width: 384,
            heads: 6,
            output_dim: 384,
            ..Self::clip_b()
        }
    }

    /// Takes the vocabulary size and the pad / end-of-text ids from `tokenizer`, so the
    /// embedding table fits its ids.
    pub fn with_tokenizer(self, tokenizer: &dyn Tokenizer) -> Self {
        Self {
            vocab_size: tokenizer.vocab_size(),
            pad_id: tokenizer.pad_id(),
            eot_id: tokenizer.eot_id(),
            ..self
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            self.context_length > 0
                && self.vocab_size > 0
                && self.width > 0
                && self.layers > 0
                && self.heads > 0
                && self.output_dim > 0
                && self.mlp_ratio > 0.0,
            "text: sizes must be positive (got {self:?})"
        );
        ensure!(
            self.width % self.heads == 0,
            "text: width {} is not a multiple of heads {}",
            self.width,
            self.heads
        );
        for (what, id) in [("pad_id", self.pad_id), ("eot_id", self.eot_id)] {
            ensure!(
                (0..self.vocab_size).contains(&id),
                "text: {what} {id} is outside the vocabulary 0..{}",
                self.vocab_size
            );
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct TextTransformer {
    token_embedding: nn::Embedding,
    positional_embedding: Tensor,
    transformer: Transformer,
    ln_final: Norm,
    text_projection: Tensor,
    cfg: TextConfig,
}

impl TextTransformer {
    /// Creates the variables under `p` with open_clip's `TextTransformer.init_parameters`.
    pub fn new(p: &nn::Path, cfg: &TextConfig) -> anyhow::Result<Self> {
        Self::with_moe(p, cfg, None)
    }

    /// [`Self::new`] with the blocks `moe` lists as mixture-of-experts blocks.
    pub fn with_moe(
        p: &nn::Path,
        cfg: &TextConfig,
        moe: Option<&MoeBlocks>,
    ) -> anyhow::Result<Self> {
        cfg.validate()?;
        let width = cfg.width;
        let normal = |stdev: f64| Init::Randn { mean: 0.0, stdev };
        Ok(Self {
            token_embedding: nn::embedding(
                p / "token_embedding",
                cfg.vocab_size,
                width,
                nn::EmbeddingConfig {
                    ws_init: normal(0.02),
                    ..Default::default()
                },
            ),
            positional_embedding: p.var(
                "positional_embedding",
                &[cfg.context_length, width],
                normal(0.01),
            ),
            transformer: Transformer::new(
                &(p / "transformer"),
                width,
                cfg.layers,
                cfg.heads,
                cfg.mlp_ratio,
                BlockInit::open_clip_text(width, cfg.layers),
                moe,
            )?
            .with_activation(cfg.activation),
            ln_final: layer_norm(p / "ln_final", width),
            text_projection: p.var(
                "text_projection",
                &[width, cfg.output_dim],
                normal((width as f64).powf(-0.5)),
            ),
            cfg: cfg.clone(),
        })
    }

    /// LoRA adapters on every block; `p` is the path the tower was built on.
    pub fn add_adapters(
        &mut self,
        p: &nn::Path,
        settings: &contrail_common::config::AdapterSettings,
    ) {
        self.transformer
            .add_adapters(&(p / "transformer"), settings);
    }

    /// The block stack (for the MoE idle pass).
    pub fn transformer(&self) -> &Transformer {
        &self.transformer
    }

    /// Token ids N × L (int64, L ≤ context_length, as a [`Tokenizer`] writes them) →
    /// N × output_dim (not normalised).
    pub fn forward(&self, tokens: &Tensor) -> Tensor {
        let hidden = self.hidden_states(tokens);
        let pooled = match self.cfg.mode {
            TextMode::Causal => {
                let (n, _, width) = hidden.size3().expect("N × L × width");
                let at = self
                    .end_positions(tokens)
                    .view([n, 1, 1])
                    .expand([n, 1, width], false);
                hidden.gather(1, &at, false).squeeze_dim(1)
            }
            TextMode::Bidirectional => {
                let valid = self.valid_positions(tokens).to_kind(hidden.kind());
                let sum = (&hidden * valid.unsqueeze(-1)).sum_dim_intlist(1, false, None);
                sum / valid.sum_dim_intlist(1, true, None)
            }
        };
        pooled.matmul(&self.text_projection)
    }

    /// Every position after `ln_final`, N × L × width, under the mode's attention mask.
    pub fn hidden_states(&self, tokens: &Tensor) -> Tensor {
        let (_, l) = tokens.size2().expect("token ids must be N × L");
        assert!(
            l <= self.cfg.context_length,
            "{l} tokens per caption exceed the text tower's context_length {}",
            self.cfg.context_length
        );
        let x = tokens.apply(&self.token_embedding);
        let x = &x + self.positional_embedding.narrow(0, 0, l).to_kind(x.kind());
        let x = match self.cfg.mode {
            TextMode::Causal => self.transformer.forward(&x, &AttentionMask::Causal),
            TextMode::Bidirectional => {
                let valid = self.valid_positions(tokens);
                self.transformer
                    .forward(&x, &AttentionMask::KeyPadding(&valid))
            }
        };
        x.apply(&self.ln_final)
    }

    /// Per row (int64, N): the first end-of-text position, or the last non-pad position in a
    /// row without one (trailing padding assumed, as the tokenizers write it).
    pub fn end_positions(&self, tokens: &Tensor) -> Tensor {
        let is_eot = tokens.eq(self.cfg.eot_id);
        let has_eot = is_eot.any_dim(1, false);
        // argmax returns the first maximal index, i.e. the first EOT.
        let first_eot = is_eot.to_kind(Kind::Int).argmax(1, false);
        let last_non_pad = (tokens
            .ne(self.cfg.pad_id)
            .sum_dim_intlist(1, false, Kind::Int64)
            - 1)
        .clamp_min(0);
        first_eot.where_self(&has_eot, &last_non_pad)
    }

    /// N × L bool: positions up to and including the end position. This is "not padding"
    /// even when a tokenizer pads with its EOT id.
    fn valid_positions(&self, tokens: &Tensor) -> Tensor {
        let l = tokens.size()[1];
        let positions = Tensor::arange(l, (Kind::Int64, tokens.device())).unsqueeze(0);
        positions.le_tensor(&self.end_positions(tokens).unsqueeze(1))
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    pub fn output_dim(&self) -> i64 {
        self.cfg.output_dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenize::ByteTokenizer;
    use tch::{nn::VarStore, Device};

    fn tiny(mode: TextMode) -> TextConfig {
        TextConfig {
            context_length: 8,
            vocab_size: 20,
            width: 16,
            layers: 1,
            heads: 2,
            mlp_ratio: 4.0,
            output_dim: 4,
            mode,
            pad_id: 0,
            eot_id: 2,
            activation: Activation::Gelu,
        }
    }

    fn ids(rows: &[&[i64]]) -> Tensor {
        let flat: Vec<i64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_slice(&flat).view([rows.len() as i64, -1])
    }

    #[test]
    fn names_follow_open_clip_on_the_root() {
        let vs = VarStore::new(Device::Cpu);
        TextTransformer::new(&vs.root(), &tiny(TextMode::Causal)).unwrap();
        let vars = vs.variables();
        let want: [(&str, &[i64]); 6] = [
            ("token_embedding.weight", &[20, 16]),
            ("positional_embedding", &[8, 16]),
            ("transformer.resblocks.0.attn.in_proj_weight", &[48, 16]),
            ("ln_final.weight", &[16]),
            ("ln_final.bias", &[16]),
            ("text_projection", &[16, 4]),
        ];
        for (name, shape) in want {
            assert_eq!(
                vars.get(name).map(|t| t.size()),
                Some(shape.to_vec()),
                "{name}"
            );
        }
        assert_eq!(vars.len(), 5 + 12, "{:?}", vars.keys());
    }

    /// EOT id 2 is not the largest id here, so argmax pooling would pick the wrong token.
    #[test]
    fn end_position_is_the_first_eot_not_the_argmax() {
        let vs = VarStore::new(Device::Cpu);
        let m = TextTransformer::new(&vs.root(), &tiny(TextMode::Causal)).unwrap();
        let t = ids(&[
            &[1, 15, 9, 2, 0, 0, 0, 0],
            &[1, 2, 19, 2, 0, 0, 0, 0],
            &[1, 5, 6, 7, 0, 0, 0, 0], // no EOT: last non-pad
            &[1, 5, 6, 7, 8, 9, 10, 2],
        ]);
        let got: Vec<i64> = Vec::try_from(m.end_positions(&t)).unwrap();
        assert_eq!(got, vec![3, 1, 3, 7]);
        assert_eq!(m.forward(&t).size(), vec![4, 4]);
    }

    #[test]
    fn bidirectional_ignores_padding_and_sees_later_tokens() {
        tch::manual_seed(5);
        let vs = VarStore::new(Device::Cpu);
        let m = TextTransformer::new(&vs.root(), &tiny(TextMode::Bidirectional)).unwrap();
        let a = ids(&[&[1, 5, 6, 2, 0, 0, 0, 0]]);
        let longer_pad = ids(&[&[1, 5, 6, 2, 0, 0]]);
        let diff = |x: &Tensor, y: &Tensor| (x - y).abs().max().double_value(&[]);
        assert!(diff(&m.forward(&a), &m.forward(&longer_pad)) < 1e-6);
        // A later token changes the first position's state (no causal mask).
        let b = ids(&[&[1, 5, 7, 2, 0, 0, 0, 0]]);
        let first = |t: &Tensor| m.hidden_states(t).select(1, 0);
        assert!(diff(&first(&a), &first(&b)) > 1e-4);
    }

    #[test]
    fn config_takes_tokenizer_ids_and_checks_them() {
        let tok = ByteTokenizer::new();
        let c = TextConfig::clip_b().with_tokenizer(&tok);
        assert_eq!(
            (c.vocab_size, c.pad_id, c.eot_id),
            (tok.vocab_size(), tok.pad_id(), tok.eot_id())
        );
        c.validate().unwrap();
        let mut bad = tiny(TextMode::Causal);
        bad.eot_id = 20;
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("eot_id 20"), "{e}");
        TextConfig::clip_s().validate().unwrap();
    }
}
