//! The coordinator's TensorBoard event files (`log.tensorboard`): the scalars of rank 0's step
//! reports and of each online evaluation, collected by the books ([`crate::job::JobBook`]) and
//! written here, every [`FLUSH_MS`] and when the coordinator stops, by one task.
//!
//! Object stores replace objects whole, so the current file is rewritten whole on each flush
//! and a new file starts once it passes [`ROLL_BYTES`] (TensorBoard reads every event file of
//! the folder in name order). A failed write loses nothing: the next flush writes the same
//! file with the newer scalars added. A restarted coordinator starts a file of its own.

use anyhow::{Context, Result};
use contrail_common::checkpoint::{join_url, write_bytes};
use contrail_common::proto;
use contrail_common::tensorboard::{self as tb, Scalars};

/// How often the pending scalars are written.
pub const FLUSH_MS: u64 = 2_000;
/// Size past which the next flush starts a new event file.
pub const ROLL_BYTES: usize = 1 << 20;

/// Steps whose scalars wait for the TensorBoard writer at most (about a minute of steps at
/// 100 a second); older ones are dropped while the storage does not take writes.
pub(crate) const MAX_PENDING_SCALARS: usize = 10_000;

/// Rank 0's step report as TensorBoard scalars.
pub(crate) fn step_scalars(req: &proto::StepReport) -> Vec<(String, f64)> {
    let mut values = vec![
        ("train/learning_rate".to_string(), req.learning_rate),
        ("train/epoch".to_string(), f64::from(req.epoch)),
    ];
    if let Some(loss) = req.loss {
        values.push(("train/loss".into(), loss));
    }
    if req.step_seconds > 0.0 {
        values.push(("train/step_seconds".into(), req.step_seconds));
        values.push((
            "train/samples_per_second".into(),
            req.global_samples as f64 / req.step_seconds,
        ));
    }
    values
}

/// One MoE block's routing in a step as scalars: each expert's share of the assignments, the
/// busiest expert's load over the mean (1 is perfectly even) and the dropped fraction.
pub(crate) fn expert_scalars(load: &proto::ExpertLoad) -> Vec<(String, f64)> {
    let total: u64 = load.routed.iter().sum();
    if total == 0 {
        return Vec::new();
    }
    let b = load.block;
    let mean = total as f64 / load.routed.len() as f64;
    let busiest = load.routed.iter().copied().max().unwrap_or(0) as f64;
    let mut values: Vec<(String, f64)> = load
        .routed
        .iter()
        .enumerate()
        .map(|(e, &n)| {
            (
                format!("moe/block{b}/expert{e}_share"),
                n as f64 / total as f64,
            )
        })
        .collect();
    values.push((format!("moe/block{b}/max_over_mean"), busiest / mean));
    values.push((
        format!("moe/block{b}/dropped_fraction"),
        load.dropped as f64 / total as f64,
    ));
    values
}

/// The event files of one coordinator in `dir`.
pub struct EventWriter {
    dir: String,
    s3_endpoint: String,
    host: String,
    /// Files started so far.
    files: u32,
    /// The current file's name and whole content.
    name: String,
    bytes: Vec<u8>,
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl EventWriter {
    pub fn new(dir: &str, s3_endpoint: &str) -> Self {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().replace(['/', '.'], "-"))
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "coordinator".into());
        let mut w = Self {
            dir: dir.to_string(),
            s3_endpoint: s3_endpoint.to_string(),
            host,
            files: 0,
            name: String::new(),
            bytes: Vec::new(),
        };
        w.start_file();
        w
    }

    fn start_file(&mut self) {
        let now = unix_now();
        self.name = tb::file_name(now as u64, &self.host, self.files);
        self.files += 1;
        self.bytes = tb::header(now);
    }

    /// The current file's URL.
    pub fn url(&self) -> String {
        join_url(&self.dir, &self.name)
    }

    /// Appends `scalars` to the current file and writes it whole.
    pub async fn append(&mut self, scalars: &[Scalars]) -> Result<()> {
        for s in scalars {
            self.bytes.extend(tb::scalars(s));
        }
        let url = self.url();
        write_bytes(&url, &self.s3_endpoint, self.bytes.clone())
            .await
            .with_context(|| format!("writing the TensorBoard event file {url}"))?;
        if self.bytes.len() >= ROLL_BYTES {
            self.start_file();
        }
        Ok(())
    }
}
