//! What rank 0 prints when a job starts from a checkpoint under `checkpoint.url`: whether the
//! checkpoint is this run's own (a restart) or an earlier run's (a job started again on the
//! same folder, which trains on from there instead of from scratch), how old it is, and the
//! job-file keys that changed since it was written.

use contrail_common::checkpoint::CheckpointMeta;
use contrail_common::JobConfig;

/// Keys listed at most; the rest are counted.
const LISTED_KEYS: usize = 8;

/// The line after "resumed from DIR (epoch E, step S)": who wrote it, when, with what changes.
pub fn resume_note(meta: &CheckpointMeta, run_id: &str, job_toml: &str, now_ms: u64) -> String {
    let age = age(now_ms.saturating_sub(meta.created_unix_ms));
    let whose = if !run_id.is_empty() && meta.run == run_id {
        format!("this run's own checkpoint, written {age} ago")
    } else {
        format!(
            "a checkpoint of an earlier run, written {age} ago: this job trains on from it \
             (point checkpoint.url at an empty folder to start from scratch)"
        )
    };
    let changed = JobConfig::changed_keys(&meta.config_toml, job_toml);
    let changes = match changed.as_slice() {
        [] => "the same job file".to_string(),
        [only] if only.is_empty() => "a job file that no longer parses".to_string(),
        keys => {
            let mut listed = keys[..keys.len().min(LISTED_KEYS)].join(", ");
            if keys.len() > LISTED_KEYS {
                listed.push_str(&format!(" and {} more", keys.len() - LISTED_KEYS));
            }
            format!("a job file that differs in {listed}")
        }
    };
    format!("  {whose}; written with {changes}")
}

fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        7200..=172_799 => format!("{} h", s / 3600),
        _ => format!("{} days", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use contrail_common::shards::ShardStateSnapshot;

    fn meta(run: &str, job: &JobConfig, written_ms: u64) -> CheckpointMeta {
        CheckpointMeta {
            step: 40,
            epoch: 1,
            world_size: 2,
            shard_state: ShardStateSnapshot::default(),
            config_toml: job.to_toml(),
            created_unix_ms: written_ms,
            run: run.into(),
        }
    }

    #[test]
    fn a_restart_and_an_earlier_run_read_differently() {
        let job = JobConfig::default();
        let now = 100_000_000;
        let own = resume_note(
            &meta("ab12", &job, now - 90_000),
            "ab12",
            &job.to_toml(),
            now,
        );
        assert_eq!(
            own,
            "  this run's own checkpoint, written 90 s ago; written with the same job file"
        );
        let mut changed = job.clone();
        changed.optim.lr = 0.3;
        let earlier = resume_note(
            &meta("ab12", &job, now - 3 * 3_600_000),
            "cd34",
            &changed.to_toml(),
            now,
        );
        assert!(
            earlier.contains("a checkpoint of an earlier run, written 3 h ago"),
            "{earlier}"
        );
        assert!(
            earlier.contains("point checkpoint.url at an empty folder"),
            "{earlier}"
        );
        assert!(
            earlier.ends_with("a job file that differs in optim.lr"),
            "{earlier}"
        );
        // Checkpoints written before runs were recorded count as an earlier run's.
        assert!(
            resume_note(&meta("", &job, now), "ab12", &job.to_toml(), now).contains("earlier run")
        );
    }
}
