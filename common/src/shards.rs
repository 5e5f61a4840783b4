//! Shard order and shard bookkeeping shared by the coordinator and checkpoints.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// SplitMix64: tiny, fast, and stable across versions, so a (seed, epoch) pair always
/// produces the same shard order, on every machine and in every release.
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0); the modulo bias is below 2^-40 for any realistic shard count.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// The order in which shards are handed out in `epoch`: a Fisher–Yates shuffle seeded from
/// (seed, epoch). Returns indices into the listed shard vector.
pub fn epoch_order(num_shards: usize, seed: u64, epoch: u32) -> Vec<usize> {
    let mut rng = SplitMix64::new(seed ^ (u64::from(epoch).wrapping_mul(0xA24B_AED4_963E_E407)));
    let mut order: Vec<usize> = (0..num_shards).collect();
    for i in (1..num_shards).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

/// Shard bookkeeping at a step boundary, stored in checkpoints. Shards that were leased but
/// not finished are not listed: on resume they go back to the pool and are read again.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ShardStateSnapshot {
    pub epoch: u32,
    /// Shards finished in `epoch`, with their sample counts.
    pub done: BTreeMap<String, u64>,
    /// Shards that failed to read in `epoch` (with the error).
    pub failed: BTreeMap<String, String>,
    /// Samples skipped as bad input since the job started, by reason.
    pub bad_samples: BTreeMap<String, u64>,
    pub samples_seen: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_a_permutation_that_depends_on_seed_and_epoch() {
        let a = epoch_order(100, 1, 0);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(100, 1, 0));
        assert_ne!(a, epoch_order(100, 1, 1));
        assert_ne!(a, epoch_order(100, 2, 0));
    }
}
