//! `[log]`: where a job's training curves go besides `/status` and `/metrics`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Folder URL (any storage) the coordinator writes TensorBoard event files to (loss,
    /// learning rate, samples/s, expert load, online evaluation; `common::tensorboard`), which
    /// TensorBoard, W&B and MLflow read; "" writes none.
    pub tensorboard: String,
}
