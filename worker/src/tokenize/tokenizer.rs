//! The [`Tokenizer`] trait and its byte-level and `tokenizer.json` implementations.

use anyhow::{bail, Context};
use std::path::Path;
use tch::Tensor;

/// Encodes captions into fixed-length id rows: `[sot] content… [eot] pad…`.
///
/// Implementors supply the content ids of one caption; the provided methods add the special
/// tokens, truncate and pad, so every tokenizer lays rows out the same way and the text
/// tower can rely on it (the first end-of-text token ends the text; only padding follows).
pub trait Tokenizer: Send + Sync {
    /// Number of embedding rows the ids need (largest id + 1).
    fn vocab_size(&self) -> i64;
    fn pad_id(&self) -> i64;
    /// End-of-text id; always present in an encoded row, even after truncation.
    fn eot_id(&self) -> i64;
    /// Start-of-text id, if this tokenizer uses one.
    fn sot_id(&self) -> Option<i64>;

    /// Ids of one caption's text, without start / end / pad tokens.
    fn encode_content(&self, text: &str) -> anyhow::Result<Vec<i64>>;

    /// Text of content ids; start, end and pad ids are skipped.
    fn decode(&self, ids: &[i64]) -> anyhow::Result<String>;

    /// How many of `content` to keep when only `max` fit. The default keeps a prefix of
    /// `max`; a tokenizer may cut shorter to keep whole characters.
    fn truncation_point(&self, content: &[i64], max: usize) -> usize {
        let _ = content;
        max
    }

    /// One row of exactly `context_length` ids.
    fn encode(&self, text: &str, context_length: usize) -> anyhow::Result<Vec<i64>> {
        let sot = self.sot_id();
        let specials = 1 + usize::from(sot.is_some());
        if context_length < specials + 1 {
            bail!(
                "context_length {context_length} leaves no room for text between the {specials} \
                 start/end tokens"
            );
        }
        let mut content = self.encode_content(text)?;
        let room = context_length - specials;
        if content.len() > room {
            let keep = self.truncation_point(&content, room).min(room);
            content.truncate(keep);
        }
        let mut row = Vec::with_capacity(context_length);
        row.extend(sot);
        row.extend_from_slice(&content);
        row.push(self.eot_id());
        row.resize(context_length, self.pad_id());
        Ok(row)
    }

    /// N × context_length int64 ids on the CPU, one row per caption.
    fn encode_batch(&self, texts: &[&str], context_length: usize) -> anyhow::Result<Tensor> {
        let mut flat = Vec::with_capacity(texts.len() * context_length);
        for (i, text) in texts.iter().enumerate() {
            let row = self.encode(text, context_length).with_context(|| {
                format!("tokenizing caption {i} of the batch ({:?})", preview(text))
            })?;
            flat.extend(row);
        }
        Ok(Tensor::from_slice(&flat).view([texts.len() as i64, context_length as i64]))
    }
}

/// The first few characters of a caption for an error message.
fn preview(text: &str) -> String {
    let mut s: String = text.chars().take(40).collect();
    if s.len() < text.len() {
        s.push('…');
    }
    s
}

/// UTF-8 bytes as ids: pad 0, byte b → b + 1, start-of-text 257, end-of-text 258.
///
/// EOT is the largest id, so even open_clip's argmax pooling finds it; pad 0 matches open_clip's
/// CLIP tokenizer. Whitespace runs collapse to one space and the ends are trimmed (open_clip's
/// `whitespace_clean`); case is kept, as lowercasing is not defined for every script.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    pub const PAD: i64 = 0;
    pub const SOT: i64 = 257;
    pub const EOT: i64 = 258;
    pub const VOCAB_SIZE: i64 = 259;

    pub fn new() -> Self {
        Self
    }
}

impl Tokenizer for ByteTokenizer {
    fn vocab_size(&self) -> i64 {
        Self::VOCAB_SIZE
    }

    fn pad_id(&self) -> i64 {
        Self::PAD
    }

    fn eot_id(&self) -> i64 {
        Self::EOT
    }

    fn sot_id(&self) -> Option<i64> {
        Some(Self::SOT)
    }

    fn encode_content(&self, text: &str) -> anyhow::Result<Vec<i64>> {
        let mut ids = Vec::with_capacity(text.len());
        for word in text.split_whitespace() {
            if !ids.is_empty() {
                ids.push(i64::from(b' ') + 1);
            }
            ids.extend(word.bytes().map(|b| i64::from(b) + 1));
        }
        Ok(ids)
    }

    fn decode(&self, ids: &[i64]) -> anyhow::Result<String> {
        let mut bytes = Vec::with_capacity(ids.len());
        for &id in ids {
            match id {
                Self::PAD | Self::SOT | Self::EOT => {}
                1..=256 => bytes.push((id - 1) as u8),
                _ => bail!("id {id} is outside the byte tokenizer's vocabulary 0..259"),
            }
        }
        String::from_utf8(bytes).context("decoded bytes are not valid UTF-8")
    }

    /// Cuts before a UTF-8 continuation byte so no character is split: a partial multi-byte
    /// sequence would give the model bytes that never occur in clean text.
    fn truncation_point(&self, content: &[i64], max: usize) -> usize {
        let is_continuation = |id: i64| ((id - 1) as u8) & 0b1100_0000 == 0b1000_0000;
        let mut cut = max;
        while cut > 0 && cut < content.len() && is_continuation(content[cut]) {
            cut -= 1;
        }
        cut
    }
}

/// Names of the special tokens in a `tokenizer.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Start-of-text token; `None` for tokenizers without one (T5, GPT-2).
    pub sot: Option<String>,
    pub eot: String,
    /// Padding token; `None` pads with the end-of-text id (the text tower pools at the first
    /// end-of-text token, so the repeats after it are never read).
    pub pad: Option<String>,
}

/// Candidates tried in order when the caller names no special tokens: CLIP, then
/// SentencePiece / RoBERTa style, then BERT style.
const SOT_NAMES: [&str; 4] = ["<|startoftext|>", "<s>", "[CLS]", "<bos>"];
const EOT_NAMES: [&str; 4] = ["<|endoftext|>", "</s>", "[SEP]", "<eos>"];
const PAD_NAMES: [&str; 3] = ["<pad>", "[PAD]", "<|pad|>"];

/// A Hugging Face `tokenizers` tokenizer loaded from a `tokenizer.json`.
///
/// The file's own truncation, padding and post-processor (e.g. BERT's `[CLS] … [SEP]`
/// template) are switched off: rows are laid out by [`Tokenizer::encode`] like every other
/// tokenizer's. Special-token ids that the text itself produces (a caption containing the
/// literal `<|endoftext|>`) are dropped from the content, so the text ends only at the EOT
/// that the row layout puts there.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    sot: Option<i64>,
    eot: i64,
    pad: i64,
    vocab_size: i64,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("sot", &self.sot)
            .field("eot", &self.eot)
            .field("pad", &self.pad)
            .finish_non_exhaustive()
    }
}

impl HfTokenizer {
    /// Parses `tokenizer.json` contents and finds the special tokens by their usual names
    /// (`<|startoftext|>`/`<|endoftext|>`, `<s>`/`</s>`/`<pad>`, `[CLS]`/`[SEP]`/`[PAD]`).
    pub fn from_bytes(json: &[u8]) -> anyhow::Result<Self> {
        let inner = parse(json)?;
        let specials = usual_specials(&inner)?;
        Self::with_specials(inner, &specials)
    }

    /// The special tokens [`HfTokenizer::from_bytes`] finds in `tokenizer.json` contents (an
    /// export names them for the library that loads the file).
    pub fn usual_special_tokens(json: &[u8]) -> anyhow::Result<SpecialTokens> {
        usual_specials(&parse(json)?)
    }

    /// Parses `tokenizer.json` contents with the special tokens named by the caller.
    pub fn from_bytes_with(json: &[u8], specials: &SpecialTokens) -> anyhow::Result<Self> {
        Self::with_specials(parse(json)?, specials)
    }

    /// Reads a local `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> anyhow::Result<Self> {
        let path = path.as_ref();
        let json = std::fs::read(path)
            .with_context(|| format!("reading tokenizer file {}", path.display()))?;
        Self::from_bytes(&json).with_context(|| format!("loading {}", path.display()))
    }

    fn with_specials(
        mut inner: tokenizers::Tokenizer,
        specials: &SpecialTokens,
    ) -> anyhow::Result<Self> {
        let id = |name: &str| -> anyhow::Result<i64> {
            inner
                .token_to_id(name)
                .map(i64::from)
                .with_context(|| format!("tokenizer.json has no token {name:?}"))
        };
        let sot = specials.sot.as_deref().map(id).transpose()?;
        let eot = id(&specials.eot)?;
        let pad = specials.pad.as_deref().map(id).transpose()?.unwrap_or(eot);
        let max_id = inner
            .get_vocab(true)
            .values()
            .copied()
            .max()
            .context("tokenizer.json has an empty vocabulary")?;
        inner
            .with_truncation(None)
            .map_err(|e| anyhow::anyhow!("switching off the file's truncation: {e}"))?;
        inner.with_padding(None);
        Ok(Self {
            inner,
            sot,
            eot,
            pad,
            vocab_size: i64::from(max_id) + 1,
        })
    }

    fn is_special(&self, id: i64) -> bool {
        id == self.eot || id == self.pad || Some(id) == self.sot
    }
}

/// The special tokens by their usual names (see [`SOT_NAMES`] and the others).
fn usual_specials(inner: &tokenizers::Tokenizer) -> anyhow::Result<SpecialTokens> {
    let find = |names: &[&'static str]| -> Option<&'static str> {
        names
            .iter()
            .copied()
            .find(|n| inner.token_to_id(n).is_some())
    };
    let Some(eot) = find(&EOT_NAMES) else {
        bail!(
            "tokenizer.json has none of the end-of-text tokens {EOT_NAMES:?}; name it with \
             HfTokenizer::from_bytes_with"
        );
    };
    Ok(SpecialTokens {
        sot: find(&SOT_NAMES).map(|s| s.to_string()),
        eot: eot.to_string(),
        pad: find(&PAD_NAMES).map(|s| s.to_string()),
    })
}

fn parse(json: &[u8]) -> anyhow::Result<tokenizers::Tokenizer> {
    tokenizers::Tokenizer::from_bytes(json)
        .map_err(|e| anyhow::anyhow!("parsing tokenizer.json: {e}"))
}

impl Tokenizer for HfTokenizer {
    fn vocab_size(&self) -> i64 {
        self.vocab_size
    }

    fn pad_id(&self) -> i64 {
        self.pad
    }

    fn eot_id(&self) -> i64 {
        self.eot
    }

    fn sot_id(&self) -> Option<i64> {
        self.sot
    }

    fn encode_content(&self, text: &str) -> anyhow::Result<Vec<i64>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizer.json encode failed: {e}"))?;
        Ok(encoding
            .get_ids()
            .iter()
            .map(|&id| i64::from(id))
            .filter(|&id| !self.is_special(id))
            .collect())
    }

    fn decode(&self, ids: &[i64]) -> anyhow::Result<String> {
        let kept = ids
            .iter()
            .filter(|&&id| !self.is_special(id))
            .map(|&id| u32::try_from(id).with_context(|| format!("token id {id} is negative")))
            .collect::<anyhow::Result<Vec<u32>>>()?;
        self.inner
            .decode(&kept, true)
            .map_err(|e| anyhow::anyhow!("tokenizer.json decode failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTX: usize = 16;

    fn row(t: &Tensor, i: i64) -> Vec<i64> {
        Vec::try_from(t.get(i)).unwrap()
    }

    #[test]
    fn byte_ascii_layout() {
        let tok = ByteTokenizer::new();
        let ids = tok
            .encode_batch(&["a cat", "  two\t spaces  "], CTX)
            .unwrap();
        assert_eq!(ids.size(), vec![2, CTX as i64]);
        assert_eq!(ids.kind(), tch::Kind::Int64);
        let mut want = vec![257, 98, 33, 100, 98, 117, 258];
        want.resize(CTX, 0);
        assert_eq!(row(&ids, 0), want);
        // Whitespace runs become one space, ends trimmed.
        assert_eq!(tok.decode(&row(&ids, 1)).unwrap(), "two spaces");
        assert_eq!(
            (tok.vocab_size(), tok.pad_id(), tok.eot_id()),
            (259, 0, 258)
        );
    }

    #[test]
    fn byte_multilingual_round_trip() {
        let tok = ByteTokenizer::new();
        for text in [
            "一只猫坐在垫子上",
            "emoji 🐱‍👤 ok",
            "Ünïcödé ñ",
            "日本語とEnglish",
        ] {
            let r = tok.encode(text, 64).unwrap();
            assert_eq!(r[0], ByteTokenizer::SOT);
            let end = r.iter().position(|&i| i == ByteTokenizer::EOT).unwrap();
            assert_eq!(end, 1 + text.len(), "{text}: one id per UTF-8 byte");
            assert!(r[end + 1..].iter().all(|&i| i == 0), "{text}: padding");
            assert_eq!(tok.decode(&r).unwrap(), text);
        }
        // 猫 is three bytes: e7 8c ab → ids + 1.
        assert_eq!(tok.encode_content("猫").unwrap(), vec![0xe8, 0x8d, 0xac]);
    }

    #[test]
    fn byte_truncation_keeps_eot_and_whole_characters() {
        let tok = ByteTokenizer::new();
        let long = "x".repeat(100);
        let r = tok.encode(&long, CTX).unwrap();
        assert_eq!(r.len(), CTX);
        assert_eq!(r[CTX - 1], ByteTokenizer::EOT);
        assert_eq!(r[1..CTX - 1], vec![i64::from(b'x') + 1; CTX - 2][..]);
        // 14 content slots: four 3-byte characters fit (12 bytes); the fifth would be split,
        // so it is dropped whole and the row pads instead.
        let zh = "一只猫坐在垫子上";
        let r = tok.encode(zh, CTX).unwrap();
        let end = r.iter().position(|&i| i == ByteTokenizer::EOT).unwrap();
        assert_eq!(end, 13);
        assert_eq!(tok.decode(&r).unwrap(), "一只猫坐");
        assert_eq!(r[CTX - 2..], [0, 0]);
    }

    #[test]
    fn byte_edge_cases() {
        let tok = ByteTokenizer::new();
        assert_eq!(tok.encode("", 4).unwrap(), vec![257, 258, 0, 0]);
        let e = tok.encode("a", 2).unwrap_err().to_string();
        assert!(e.contains("context_length 2"), "{e}");
        let empty = tok.encode_batch(&[], CTX).unwrap();
        assert_eq!(empty.size(), vec![0, CTX as i64]);
        assert!(tok.decode(&[300]).is_err());
    }

    fn tiny_bpe() -> HfTokenizer {
        let json = include_bytes!("../../../tests/fixtures/text/tiny_bpe_tokenizer.json");
        HfTokenizer::from_bytes(json).unwrap()
    }

    /// The fixture is a byte-level BPE shaped like CLIP's (ids: 0 `<|startoftext|>`, 1
    /// `<|endoftext|>`, 2 h, 3 e, 4 l, 5 o, 6 Ġ, 7 w, 8 r, 9 d, 10 he, 11 ll, 12 llo,
    /// 13 hello, 14 Ġw, 15 or, 16 Ġwor, 17 Ġworl, 18 Ġworld) with a RoBERTa post-processor
    /// that must not add a second pair of special tokens.
    #[test]
    fn tokenizer_json_encodes_with_merges_and_specials() {
        let tok = tiny_bpe();
        assert_eq!(tok.sot_id(), Some(0));
        assert_eq!(tok.eot_id(), 1);
        assert_eq!(tok.pad_id(), 1, "no pad token: pads with EOT");
        assert_eq!(tok.vocab_size(), 19);
        assert_eq!(tok.encode_content("hello world").unwrap(), vec![13, 18]);
        // Lowercasing normaliser; no merge applies to "hold".
        assert_eq!(tok.encode_content("HOLD").unwrap(), vec![2, 5, 4, 9]);
        let ids = tok.encode_batch(&["Hello world", "hello"], 6).unwrap();
        assert_eq!(row(&ids, 0), vec![0, 13, 18, 1, 1, 1]);
        assert_eq!(row(&ids, 1), vec![0, 13, 1, 1, 1, 1]);
        assert_eq!(tok.decode(&row(&ids, 0)).unwrap(), "hello world");
        // Truncation keeps EOT.
        let r = tok.encode("hello world hello world", 4).unwrap();
        assert_eq!(r, vec![0, 13, 18, 1]);
        // A literal special token in the caption does not become a second EOT.
        assert_eq!(tok.encode_content("hello<|endoftext|>").unwrap(), vec![13]);
    }

    #[test]
    fn tokenizer_json_named_specials_and_errors() {
        let json = include_bytes!("../../../tests/fixtures/text/tiny_bpe_tokenizer.json");
        let specials = SpecialTokens {
            sot: None,
            eot: "<|endoftext|>".into(),
            pad: Some("<|startoftext|>".into()),
        };
        let tok = HfTokenizer::from_bytes_with(json, &specials).unwrap();
        assert_eq!(tok.encode("hello", 4).unwrap(), vec![13, 1, 0, 0]);
        let missing = SpecialTokens {
            eot: "</s>".into(),
            ..specials
        };
        let e = HfTokenizer::from_bytes_with(json, &missing).unwrap_err();
        assert!(format!("{e:#}").contains("\"</s>\""), "{e:#}");
        let e = HfTokenizer::from_bytes(b"{not json").unwrap_err();
        assert!(format!("{e:#}").contains("parsing tokenizer.json"), "{e:#}");
        let e = HfTokenizer::from_file("/nonexistent/tokenizer.json").unwrap_err();
        assert!(
            format!("{e:#}").contains("/nonexistent/tokenizer.json"),
            "{e:#}"
        );
    }

    #[test]
    fn tokenizer_json_from_file_matches_bytes() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/text/tiny_bpe_tokenizer.json");
        let tok = HfTokenizer::from_file(&path).unwrap();
        assert_eq!(
            tok.encode("hello world", 8).unwrap(),
            tiny_bpe().encode("hello world", 8).unwrap()
        );
    }

    #[test]
    fn tokenizers_are_usable_as_trait_objects_across_threads() {
        let toks: Vec<Box<dyn Tokenizer>> =
            vec![Box::new(ByteTokenizer::new()), Box::new(tiny_bpe())];
        std::thread::scope(|s| {
            for tok in &toks {
                s.spawn(move || {
                    let ids = tok.encode_batch(&["hello world"; 3], 8).unwrap();
                    assert_eq!(ids.size(), vec![3, 8]);
                });
            }
        });
    }
}
