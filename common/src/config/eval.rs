//! `[eval]`: the job evaluating itself while it trains (held-out weighted kNN on the encoder's
//! features, as solo-learn's and lightly's online kNN monitors do; for CLIP jobs also
//! zero-shot classification and image↔text retrieval, as OpenCLIP evaluates during training).

use super::choice::choice;
use super::{err, ConfigError};
use serde::{Deserialize, Serialize};

choice! {
    /// How the kNN measures neighbours (see `contrail eval knn --metric`).
    pub enum KnnMetric default Cosine {
        /// Inner product of L2-normalised features; votes weigh exp(sim / T) (lightly).
        Cosine = "cosine",
        /// Euclidean distance; votes weigh 1 / (d + 1e-5) (solo-learn).
        Euclidean = "euclidean",
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Held-out shards (any storage URL) whose samples are classified; "" turns online
    /// evaluation off.
    pub url: String,
    /// Labelled shards the kNN bank is embedded from; "" means `data.url` (the training data,
    /// seen through the evaluation view, not augmented).
    pub bank_url: String,
    /// Bank samples, spread evenly over the workers (each reads its own shards in order).
    pub bank_samples: u64,
    /// Held-out samples classified; 0 means every sample of `url`.
    pub test_samples: u64,
    /// Evaluate every this many steps (0: only when training ends).
    pub every_steps: u64,
    /// Also evaluate before the first step, so the log and `/status` show what training
    /// bought over the initial (randomly initialised, or resumed) model.
    pub at_start: bool,
    /// Neighbours that vote.
    pub k: u32,
    /// Temperature of the cosine vote.
    pub temperature: f64,
    pub metric: KnnMetric,
    /// Images per forward pass while embedding.
    pub batch: u32,
    /// `contrail local` writes a synthetic held-out set of this many samples at `url` when it
    /// holds no shards (0: never; the set uses a different seed from the training data).
    pub synth_samples: u64,
    /// CLIP jobs: class names in label order; each round also classifies the held-out images
    /// zero-shot against these names put into `templates` (empty: no zero-shot).
    pub classes: Vec<String>,
    /// Zero-shot prompt templates, `{}` standing for the class name; "openai" and "simple"
    /// stand for open_clip's sets of 80 and 7.
    pub templates: Vec<String>,
    /// CLIP jobs: each round also measures image↔text retrieval over the held-out set's
    /// image–caption pairs.
    pub retrieval: bool,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            bank_url: String::new(),
            bank_samples: 10_000,
            test_samples: 0,
            every_steps: 0,
            at_start: true,
            k: 200,
            temperature: 0.1,
            metric: KnnMetric::Cosine,
            batch: 256,
            synth_samples: 0,
            classes: Vec::new(),
            templates: vec!["a photo of a {}.".into()],
            retrieval: true,
        }
    }
}

impl EvalConfig {
    /// Whether the job evaluates itself at all.
    pub fn enabled(&self) -> bool {
        !self.url.trim().is_empty()
    }

    /// The bank's shards: `bank_url`, or the training data.
    pub fn bank_url<'a>(&'a self, data_url: &'a str) -> &'a str {
        if self.bank_url.trim().is_empty() {
            data_url
        } else {
            &self.bank_url
        }
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled() {
            return Ok(());
        }
        if self.bank_samples == 0 {
            return Err(err("eval.bank_samples", "must be at least 1"));
        }
        if self.k == 0 {
            return Err(err("eval.k", "must be at least 1"));
        }
        if u64::from(self.k) > self.bank_samples {
            return Err(err(
                "eval.k",
                format!(
                    "({}) must not exceed eval.bank_samples ({})",
                    self.k, self.bank_samples
                ),
            ));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(err(
                "eval.temperature",
                format!("({}) must be positive", self.temperature),
            ));
        }
        if self.batch == 0 {
            return Err(err("eval.batch", "must be at least 1"));
        }
        if let Some(i) = self.classes.iter().position(|c| c.trim().is_empty()) {
            return Err(err("eval.classes", format!("entry {i} is empty")));
        }
        if !self.classes.is_empty() {
            if self.templates.is_empty() {
                return Err(err("eval.templates", "must hold a template for zero-shot"));
            }
            // "openai" and "simple" name open_clip's template sets.
            if let Some(t) = self
                .templates
                .iter()
                .find(|t| !t.contains("{}") && !matches!(t.as_str(), "openai" | "simple"))
            {
                return Err(err(
                    "eval.templates",
                    format!("{t:?} has no {{}} for the class name"),
                ));
            }
        }
        Ok(())
    }

    /// Whether rounds of a job with (`clip`) or without a text tower measure zero-shot and
    /// retrieval besides kNN.
    pub fn zeroshot(&self, clip: bool) -> bool {
        clip && !self.classes.is_empty()
    }

    pub fn measures_retrieval(&self, clip: bool) -> bool {
        clip && self.retrieval
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled() -> EvalConfig {
        EvalConfig {
            url: "file:///held-out".into(),
            ..Default::default()
        }
    }

    #[test]
    fn off_by_default_and_every_bad_value_named() {
        assert!(!EvalConfig::default().enabled());
        assert!(enabled().validate().is_ok());
        let bad = [
            (EvalConfig { k: 0, ..enabled() }, "eval.k"),
            (
                EvalConfig {
                    k: 20_001,
                    bank_samples: 20_000,
                    ..enabled()
                },
                "eval.k",
            ),
            (
                EvalConfig {
                    temperature: 0.0,
                    ..enabled()
                },
                "eval.temperature",
            ),
            (
                EvalConfig {
                    bank_samples: 0,
                    ..enabled()
                },
                "eval.bank_samples",
            ),
            (
                EvalConfig {
                    batch: 0,
                    ..enabled()
                },
                "eval.batch",
            ),
            (
                EvalConfig {
                    classes: vec!["cat".into(), " ".into()],
                    ..enabled()
                },
                "eval.classes",
            ),
            (
                EvalConfig {
                    classes: vec!["cat".into()],
                    templates: vec!["a photo".into()],
                    ..enabled()
                },
                "eval.templates",
            ),
        ];
        for (cfg, path) in bad {
            assert_eq!(cfg.validate().unwrap_err().path, path);
            // Switched off, nothing is checked.
            let off = EvalConfig {
                url: String::new(),
                ..cfg
            };
            assert!(off.validate().is_ok());
        }
        let named = EvalConfig {
            classes: vec!["cat".into()],
            templates: vec!["openai".into(), "a {} drawing".into()],
            ..enabled()
        };
        assert!(named.validate().is_ok());
    }

    #[test]
    fn bank_defaults_to_the_training_data() {
        assert_eq!(enabled().bank_url("file:///train"), "file:///train");
        let own = EvalConfig {
            bank_url: "file:///bank".into(),
            ..enabled()
        };
        assert_eq!(own.bank_url("file:///train"), "file:///bank");
    }
}
