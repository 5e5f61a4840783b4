//! A sample-level shuffle buffer in front of the pipeline (webdataset's `.shuffle(n)`).
//!
//! Shards are leased in a fresh order every epoch, but each is read front to back, so without
//! this the same runs of consecutive samples would share a batch, and be each other's
//! negatives, in every epoch. The buffer holds up to `capacity` samples and, once full, emits a
//! uniformly drawn one for every sample that comes in, then drains in random order at the end.
//!
//! A shard's `ShardEnd` marker is held back until every sample of that shard has left the
//! buffer, so the pipeline still reports a shard done only once all of its samples are batched
//! (what the coordinator's lease book and checkpoints rely on).

use std::collections::{HashMap, VecDeque};

use contrail_common::shards::SplitMix64;

use crate::pipeline::PipelineInput;

/// Shuffles the samples of `source` within a window of `capacity` (0 or 1: passes through).
pub struct ShuffleBuffer<I> {
    source: I,
    capacity: usize,
    rng: SplitMix64,
    held: Vec<crate::sample::Sample>,
    /// Samples of each shard still in `held`.
    pending: HashMap<String, usize>,
    /// ShardEnd markers whose shard still has samples in `held`, in arrival order.
    ends: VecDeque<PipelineInput>,
    source_done: bool,
}

impl<I: Iterator<Item = PipelineInput>> ShuffleBuffer<I> {
    /// `seed` fixes the draws (the worker derives it from the job seed, epoch and rank).
    pub fn new(source: I, capacity: usize, seed: u64) -> Self {
        Self {
            source,
            capacity,
            rng: SplitMix64::new(seed),
            held: Vec::with_capacity(capacity.min(1 << 16)),
            pending: HashMap::new(),
            ends: VecDeque::new(),
            source_done: false,
        }
    }

    /// A uniformly drawn held sample, its shard's count updated.
    fn draw(&mut self) -> Option<PipelineInput> {
        if self.held.is_empty() {
            return None;
        }
        let i = self.rng.below(self.held.len() as u64) as usize;
        let sample = self.held.swap_remove(i);
        if let Some(n) = self.pending.get_mut(&sample.shard) {
            *n -= 1;
        }
        Some(PipelineInput::Sample(sample))
    }

    /// The first held-back marker whose shard has no sample left in the buffer.
    fn ready_end(&mut self) -> Option<PipelineInput> {
        let at = self.ends.iter().position(|e| match e {
            PipelineInput::ShardEnd { shard, .. } => self.pending.get(shard).copied() == Some(0),
            PipelineInput::Sample(_) => false,
        })?;
        let end = self.ends.remove(at)?;
        if let PipelineInput::ShardEnd { shard, .. } = &end {
            self.pending.remove(shard);
        }
        Some(end)
    }
}

impl<I: Iterator<Item = PipelineInput>> Iterator for ShuffleBuffer<I> {
    type Item = PipelineInput;

    fn next(&mut self) -> Option<PipelineInput> {
        if self.capacity <= 1 {
            return self.source.next();
        }
        loop {
            if let Some(end) = self.ready_end() {
                return Some(end);
            }
            if self.source_done || self.held.len() >= self.capacity {
                if let Some(s) = self.draw() {
                    return Some(s);
                }
                // Nothing held and the source is done: any marker left has no samples.
                return self.ends.pop_front().or_else(|| self.source.next());
            }
            match self.source.next() {
                Some(PipelineInput::Sample(s)) => {
                    *self.pending.entry(s.shard.clone()).or_default() += 1;
                    self.held.push(s);
                }
                Some(end @ PipelineInput::ShardEnd { .. }) => {
                    if let PipelineInput::ShardEnd { shard, .. } = &end {
                        self.pending.entry(shard.clone()).or_default();
                    }
                    self.ends.push_back(end);
                }
                None => self.source_done = true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::Sample;
    use std::collections::BTreeMap;

    fn input(shards: usize, per_shard: usize) -> Vec<PipelineInput> {
        let mut v = Vec::new();
        for s in 0..shards {
            let shard = format!("shard-{s}");
            for k in 0..per_shard {
                v.push(PipelineInput::Sample(Sample {
                    key: format!("{s}-{k}"),
                    shard: shard.clone(),
                    members: BTreeMap::new(),
                }));
            }
            v.push(PipelineInput::ShardEnd {
                shard,
                reader_bad: Default::default(),
            });
        }
        v
    }

    #[test]
    fn every_sample_once_and_each_shard_end_after_its_last_sample() {
        let out: Vec<_> = ShuffleBuffer::new(input(5, 40).into_iter(), 64, 7).collect();
        let keys: Vec<&str> = out
            .iter()
            .filter_map(|i| match i {
                PipelineInput::Sample(s) => Some(s.key.as_str()),
                _ => None,
            })
            .collect();
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(
            (keys.len(), sorted.len()),
            (200, 200),
            "every sample exactly once"
        );
        let in_order: Vec<String> = (0..5)
            .flat_map(|s| (0..40).map(move |k| format!("{s}-{k}")))
            .collect();
        assert_ne!(keys, in_order, "the order changed");
        // Samples of several shards mix within a window.
        let first: std::collections::BTreeSet<_> = keys[..64]
            .iter()
            .map(|k| k.split('-').next().unwrap())
            .collect();
        assert!(first.len() >= 2, "{first:?}");
        for (at, item) in out.iter().enumerate() {
            if let PipelineInput::ShardEnd { shard, .. } = item {
                let prefix = format!("{}-", shard.trim_start_matches("shard-"));
                assert!(
                    out[at..].iter().all(|i| !matches!(i,
                        PipelineInput::Sample(s) if s.key.starts_with(&prefix))),
                    "{shard} ended before its last sample"
                );
            }
        }
        let ends = out
            .iter()
            .filter(|i| matches!(i, PipelineInput::ShardEnd { .. }))
            .count();
        assert_eq!(ends, 5);
    }

    #[test]
    fn same_seed_same_order_and_small_capacities_pass_through() {
        let a: Vec<_> = ShuffleBuffer::new(input(3, 10).into_iter(), 8, 1).collect();
        let b: Vec<_> = ShuffleBuffer::new(input(3, 10).into_iter(), 8, 1).collect();
        let key = |v: &[PipelineInput]| -> Vec<String> {
            v.iter()
                .map(|i| match i {
                    PipelineInput::Sample(s) => s.key.clone(),
                    PipelineInput::ShardEnd { shard, .. } => shard.clone(),
                })
                .collect()
        };
        assert_eq!(key(&a), key(&b));
        let plain: Vec<_> = ShuffleBuffer::new(input(3, 10).into_iter(), 0, 1).collect();
        assert_eq!(key(&plain), key(&input(3, 10)));
        // An empty shard's marker still comes through, before the next shard's.
        let mut with_empty = vec![PipelineInput::ShardEnd {
            shard: "empty".into(),
            reader_bad: Default::default(),
        }];
        with_empty.extend(input(1, 3));
        let out: Vec<_> = ShuffleBuffer::new(with_empty.into_iter(), 4, 2).collect();
        assert_eq!(key(&out[..1]), ["empty"]);
        assert_eq!(out.len(), 5);
    }
}
