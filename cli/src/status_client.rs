//! `contrail status`: reads a job's `/status` from the coordinator's HTTP server and prints it
//! for people (a progress bar, ETA, workers, shards, experts).

use anyhow::{Context, Result};
use contrail_common::status::{render_status_text, StatusReport};
use contrail_coordinator::access::STATUS_TOKEN_ENV;
use std::time::Duration;
use tokio::runtime::Runtime;

/// Fetches `/status` from the coordinator's HTTP server at `base` (`http://host:port`),
/// with `CONTRAIL_STATUS_TOKEN` as the bearer token when it is set.
pub async fn fetch_status(base: &str) -> Result<StatusReport> {
    let url = format!("{}/status", base.trim_end_matches('/'));
    let mut request = reqwest::Client::new().get(&url);
    if let Ok(token) = std::env::var(STATUS_TOKEN_ENV) {
        if !token.is_empty() {
            request = request.bearer_auth(token);
        }
    }
    let resp = request
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .with_context(|| format!("requesting {url}"))?
        .error_for_status()
        .with_context(|| format!("requesting {url}"))?;
    resp.json::<StatusReport>()
        .await
        .with_context(|| format!("parsing the JSON from {url}"))
}

/// Prints the status once, or (`watch_secs` > 0) redraws it every `watch_secs` seconds until
/// the job ends.
pub fn status(rt: &Runtime, base: &str, watch_secs: u64) -> Result<()> {
    let base = if base.contains("://") {
        base.to_string()
    } else {
        format!("http://{base}")
    };
    loop {
        let report = rt.block_on(fetch_status(&base))?;
        if watch_secs > 0 {
            // Clear the screen so the report redraws in place.
            print!("\x1b[2J\x1b[H");
        }
        println!("{}", render_status_text(&report));
        if watch_secs == 0 || report.state.is_terminal() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(watch_secs));
    }
}
