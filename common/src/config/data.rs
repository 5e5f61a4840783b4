//! `[data]` and `[data.augment]`: where the shards are, how they are read, and the SimCLR
//! augmentations.

use super::{err, ConfigError};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Shard list: a URL prefix (every `.tar` under it) or a brace pattern such as
    /// `s3://bucket/data-{000000..000099}.tar`. Plain paths mean `file://`.
    pub url: String,
    /// Samples that `contrail local` writes with the synthetic generator when `url` holds no
    /// shards yet; 0 never writes them (an empty `url` is then an error).
    pub synth_samples: u64,
    /// Samples per synthetic shard.
    pub synth_shard_size: u64,
    /// Side of the square crops fed to the encoder.
    pub image_size: u32,
    /// Decode/augment threads per worker.
    pub decode_threads: usize,
    /// Ready batches buffered ahead of the training step.
    pub prefetch_batches: usize,
    /// Samples held in the shuffle buffer that mixes consecutive samples of a worker's shards
    /// (webdataset's `.shuffle(n)`); 0 (the default) keeps the shards' own order. A worker
    /// leases about `shuffle_buffer / shard size` shards ahead to fill it.
    pub shuffle_buffer: usize,
    /// Images whose header claims more pixels than this are skipped as decompression bombs.
    pub max_image_pixels: u64,
    /// Endpoint override for S3-compatible servers (MinIO, Ceph, R2); empty for AWS.
    pub s3_endpoint: String,
    /// Attempts for a failing shard read before the shard is marked failed.
    pub read_retries: u32,
    #[serde(default)]
    pub augment: AugmentConfig,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            url: "file://./run/data/synth".into(),
            synth_samples: 4096,
            synth_shard_size: 256,
            image_size: 32,
            decode_threads: 1,
            prefetch_batches: 4,
            shuffle_buffer: 0,
            max_image_pixels: 64 * 1024 * 1024,
            s3_endpoint: String::new(),
            read_retries: 5,
            augment: AugmentConfig::default(),
        }
    }
}

/// SimCLR augmentation parameters (defaults follow the SimCLR paper / torchvision recipe).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    pub crop_scale_min: f32,
    pub crop_scale_max: f32,
    pub flip_p: f32,
    pub jitter_p: f32,
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub hue: f32,
    pub grayscale_p: f32,
    pub blur_p: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl AugmentConfig {
    /// OpenCLIP's training transform (`image_transform(is_train=True)`): a random resized crop
    /// of 90-100 % of the area, no flip, no colour changes, CLIP's mean and std. What a CLIP
    /// job's `[data.augment]` defaults to.
    pub fn open_clip() -> Self {
        Self {
            crop_scale_min: 0.9,
            crop_scale_max: 1.0,
            flip_p: 0.0,
            jitter_p: 0.0,
            grayscale_p: 0.0,
            blur_p: 0.0,
            mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
            ..Self::default()
        }
    }
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            crop_scale_min: 0.08,
            crop_scale_max: 1.0,
            flip_p: 0.5,
            jitter_p: 0.8,
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.4,
            hue: 0.1,
            grayscale_p: 0.2,
            blur_p: 0.5,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }
}

impl DataConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.url.trim().is_empty() {
            return Err(err("data.url", "must name the shard location"));
        }
        if !(8..=4096).contains(&self.image_size) {
            return Err(err(
                "data.image_size",
                format!("({}) must be between 8 and 4096", self.image_size),
            ));
        }
        if self.decode_threads == 0 {
            return Err(err("data.decode_threads", "must be at least 1"));
        }
        if self.prefetch_batches == 0 {
            return Err(err("data.prefetch_batches", "must be at least 1"));
        }
        if self.synth_shard_size == 0 {
            return Err(err("data.synth_shard_size", "must be at least 1"));
        }
        self.augment.validate()
    }
}

impl AugmentConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let a = self;
        if !(0.0 < a.crop_scale_min
            && a.crop_scale_min <= a.crop_scale_max
            && a.crop_scale_max <= 1.0)
        {
            return Err(err(
                "data.augment.crop_scale_min",
                "and crop_scale_max must satisfy 0 < min <= max <= 1",
            ));
        }
        for (name, p) in [
            ("flip_p", a.flip_p),
            ("jitter_p", a.jitter_p),
            ("grayscale_p", a.grayscale_p),
            ("blur_p", a.blur_p),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(err(
                    &format!("data.augment.{name}"),
                    format!("({p}) is a probability and must be in [0, 1]"),
                ));
            }
        }
        if !(0.0..=0.5).contains(&a.hue) {
            return Err(err(
                "data.augment.hue",
                format!("({}) must be in [0, 0.5]", a.hue),
            ));
        }
        if a.std.iter().any(|s| *s <= 0.0) {
            return Err(err("data.augment.std", "entries must be positive"));
        }
        Ok(())
    }
}
