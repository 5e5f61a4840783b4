//! One WebDataset sample: the tar members that share a key.

use bytes::Bytes;
use std::collections::BTreeMap;

/// Members of one sample, grouped by key (everything before the first dot of the member's
/// file name). Extensions are stored lower-case without the leading dot ("jpg", "txt", ...).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    pub key: String,
    /// Shard URL the sample came from (for error messages).
    pub shard: String,
    /// Every member, by extension, with its raw bytes.
    pub members: BTreeMap<String, Bytes>,
}

/// Extensions that hold an image, in order of preference.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

impl Sample {
    /// The image member's bytes and extension, if the sample has one.
    pub fn image(&self) -> Option<(&str, &Bytes)> {
        IMAGE_EXTENSIONS
            .iter()
            .find_map(|ext| self.members.get_key_value(*ext))
            .map(|(k, v)| (k.as_str(), v))
    }

    /// The caption (`.txt`), if present: `Err` when it is not valid UTF-8.
    pub fn caption(&self) -> Option<Result<&str, std::str::Utf8Error>> {
        self.members.get("txt").map(|b| std::str::from_utf8(b))
    }

    /// The class id (`.cls`, decimal text), if present and parseable.
    pub fn class_id(&self) -> Option<i64> {
        self.members
            .get("cls")
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|s| s.trim().parse().ok())
    }
}

/// Why a sample was skipped; the string form is the key reported in `/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BadSampleReason {
    /// The tar ended inside a member or a header was corrupt; the partial sample is dropped.
    TruncatedTar,
    /// The image bytes could not be decoded.
    CorruptImage,
    /// The image header claims more pixels than `data.max_image_pixels`.
    DecompressionBomb,
    /// The sample has no `.jpg/.jpeg/.png/.webp` member.
    MissingImage,
    /// The `.txt` caption is not valid UTF-8.
    InvalidCaption,
}

impl BadSampleReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::TruncatedTar => "truncated_tar",
            Self::CorruptImage => "corrupt_image",
            Self::DecompressionBomb => "decompression_bomb",
            Self::MissingImage => "missing_image",
            Self::InvalidCaption => "invalid_caption",
        }
    }
}

/// Counts of skipped samples by reason.
pub type BadSampleCounts = BTreeMap<String, u64>;

pub fn count_bad(counts: &mut BadSampleCounts, reason: BadSampleReason) {
    *counts.entry(reason.as_str().to_string()).or_insert(0) += 1;
}
