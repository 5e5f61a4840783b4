//! Captions → token ids for the CLIP text tower.
//!
//! [`Tokenizer`] turns a batch of captions into an N × context_length int64 tensor with start
//! and end-of-text tokens, padding and end-preserving truncation. Two implementations:
//!
//! - [`ByteTokenizer`] (the default): UTF-8 bytes plus three special ids, vocabulary 259. It
//!   needs no vocabulary file, so a job runs with nothing to download, and every language
//!   round-trips; the cost is longer sequences than a learned BPE.
//! - [`HfTokenizer`]: any Hugging Face `tokenizer.json` (CLIP BPE, SentencePiece exports,
//!   WordPiece, ...), given as bytes (fetched by the caller, e.g. through object_store) or a
//!   local path.

pub mod tokenizer;

pub use tokenizer::{ByteTokenizer, HfTokenizer, SpecialTokens, Tokenizer};
