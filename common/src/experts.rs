//! Where the experts of an MoE job live: for every MoE block, which worker ranks hold a
//! replica of each expert. Workers route by it, the coordinator plans it (and re-plans it
//! when the load stays imbalanced), checkpoints are independent of it (experts are stored by
//! global id).
//!
//! A source worker splits its tokens for expert e evenly over e's replicas (contiguous runs,
//! earlier replicas take the remainder), so a replica's expected load is load(e) / replicas(e).

use crate::config::MoeConfig;
use crate::proto;
use serde::{Deserialize, Serialize};

/// One MoE block: `holders[e]` are the ranks holding expert e, ascending and non-empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockPlacement {
    pub holders: Vec<Vec<u32>>,
}

/// Every MoE block's placement, in the model's block order, with a version that grows with
/// each re-plan (all workers compare versions to agree which placement is in force).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ExpertPlacement {
    pub version: u64,
    pub blocks: Vec<BlockPlacement>,
}

/// Whether the default spread fits `experts` on `world` workers: one is a multiple of the
/// other, so every worker holds the same number of experts.
pub fn spread_fits(experts: u32, world: u32) -> bool {
    experts > 0 && world > 0 && (experts.is_multiple_of(world) || world.is_multiple_of(experts))
}

impl BlockPlacement {
    /// The default: with E ≥ W, rank r holds the contiguous experts [r·E/W, (r+1)·E/W); with
    /// E < W, expert e is replicated on the ranks r with r mod E = e. Needs E | W or W | E.
    pub fn spread(experts: u32, world: u32) -> Self {
        assert!(
            spread_fits(experts, world),
            "{experts} experts cannot be spread evenly over {world} workers"
        );
        let holders = (0..experts)
            .map(|e| {
                if experts >= world {
                    vec![e / (experts / world)]
                } else {
                    (0..world).filter(|r| r % experts == e).collect()
                }
            })
            .collect();
        Self { holders }
    }

    pub fn experts(&self) -> usize {
        self.holders.len()
    }

    /// The block after a membership change: `survivors` are the old ranks still alive, in
    /// order, and the i-th becomes rank i. Every expert keeps its surviving replicas (so no
    /// weight moves); Err(e) names the first expert that lost every replica.
    pub fn keep_ranks(&self, survivors: &[u32]) -> Result<Self, usize> {
        let holders = self
            .holders
            .iter()
            .enumerate()
            .map(|(e, h)| {
                let kept: Vec<u32> = survivors
                    .iter()
                    .enumerate()
                    .filter(|(_, old)| h.contains(old))
                    .map(|(new, _)| new as u32)
                    .collect();
                if kept.is_empty() {
                    Err(e)
                } else {
                    Ok(kept)
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { holders })
    }

    /// Global ids of the experts `rank` holds, ascending.
    pub fn local_experts(&self, rank: u32) -> Vec<u32> {
        (0..self.holders.len() as u32)
            .filter(|&e| self.holders[e as usize].contains(&rank))
            .collect()
    }

    /// Checks that every expert has at least one holder, holders are valid distinct ranks in
    /// ascending order, and every rank holds at least one expert.
    pub fn validate(&self, world: u32) -> Result<(), String> {
        for (e, h) in self.holders.iter().enumerate() {
            if h.is_empty() {
                return Err(format!("expert {e} has no holder"));
            }
            if h.windows(2).any(|w| w[0] >= w[1]) || h.iter().any(|&r| r >= world) {
                return Err(format!(
                    "expert {e}: holders {h:?} must be distinct ascending ranks below {world}"
                ));
            }
        }
        if let Some(r) = (0..world).find(|&r| self.local_experts(r).is_empty()) {
            return Err(format!("rank {r} holds no expert"));
        }
        Ok(())
    }

    /// How many of `tokens` (a source's assignments to expert e) go to each replica of e, in
    /// `holders[e]` order: even split, the first replicas take the remainder.
    pub fn replica_split(&self, expert: usize, tokens: i64) -> Vec<i64> {
        let n = self.holders[expert].len() as i64;
        (0..n)
            .map(|j| tokens / n + i64::from(j < tokens % n))
            .collect()
    }

    /// Expected tokens per worker when expert e receives `load[e]` tokens in all.
    pub fn worker_loads(&self, load: &[f64], world: u32) -> Vec<f64> {
        let mut w = vec![0.0; world as usize];
        for (e, h) in self.holders.iter().enumerate() {
            for &r in h {
                w[r as usize] += load[e] / h.len() as f64;
            }
        }
        w
    }
}

/// max / mean of `loads` (1.0 when all are equal or all zero).
pub fn max_mean_ratio(loads: &[f64]) -> f64 {
    let mean = loads.iter().sum::<f64>() / loads.len().max(1) as f64;
    if mean <= 0.0 {
        return 1.0;
    }
    loads.iter().cloned().fold(0.0, f64::max) / mean
}

/// Names of the MoE blocks in model order, which is the order of `ExpertPlacement::blocks` and
/// of `ExpertLoad.block`: the ViT's MoE blocks by ascending layer, then the text tower's
/// ("vit 3", "text 0"). Empty when MoE is off.
pub fn block_labels(moe: &MoeConfig) -> Vec<String> {
    if !moe.enabled() {
        return Vec::new();
    }
    let sorted = |b: &[u32]| {
        let mut b = b.to_vec();
        b.sort_unstable();
        b
    };
    let vit = sorted(&moe.vit_blocks)
        .into_iter()
        .map(|l| format!("vit {l}"));
    let head = moe.projector.then(|| "projector".to_string());
    let text = sorted(&moe.text_blocks)
        .into_iter()
        .map(|l| format!("text {l}"));
    vit.chain(head).chain(text).collect()
}

impl From<&ExpertPlacement> for proto::Placement {
    fn from(p: &ExpertPlacement) -> Self {
        proto::Placement {
            version: p.version,
            blocks: p
                .blocks
                .iter()
                .map(|b| proto::BlockHolders {
                    experts: b
                        .holders
                        .iter()
                        .map(|h| proto::ExpertHolders { ranks: h.clone() })
                        .collect(),
                })
                .collect(),
        }
    }
}

/// The wire form back; check the result with [`BlockPlacement::validate`] before routing by it.
impl From<&proto::Placement> for ExpertPlacement {
    fn from(p: &proto::Placement) -> Self {
        ExpertPlacement {
            version: p.version,
            blocks: p
                .blocks
                .iter()
                .map(|b| BlockPlacement {
                    holders: b.experts.iter().map(|h| h.ranks.clone()).collect(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_places_contiguous_experts_or_replicas() {
        let p = BlockPlacement::spread(8, 2);
        assert_eq!(p.local_experts(0), vec![0, 1, 2, 3]);
        assert_eq!(p.local_experts(1), vec![4, 5, 6, 7]);
        p.validate(2).unwrap();
        let p = BlockPlacement::spread(2, 4);
        assert_eq!(p.holders, vec![vec![0, 2], vec![1, 3]]);
        assert_eq!(p.local_experts(3), vec![1]);
        p.validate(4).unwrap();
    }

    #[test]
    fn survivors_keep_their_replicas_under_their_new_ranks() {
        // 2 experts on 4 ranks: e0 on {0, 2}, e1 on {1, 3}. Rank 1 dies: 0, 2, 3 become 0, 1, 2.
        let p = BlockPlacement::spread(2, 4);
        let kept = p.keep_ranks(&[0, 2, 3]).unwrap();
        assert_eq!(kept.holders, vec![vec![0, 1], vec![2]]);
        kept.validate(3).unwrap();
        // Ranks 1 and 3 die: e1 has no replica left.
        assert_eq!(p.keep_ranks(&[0, 2]), Err(1));
    }

    #[test]
    fn validate_rejects_orphans_and_idle_ranks() {
        let p = BlockPlacement {
            holders: vec![vec![0], vec![]],
        };
        assert!(p.validate(1).unwrap_err().contains("expert 1"));
        let p = BlockPlacement {
            holders: vec![vec![0], vec![0]],
        };
        assert!(p.validate(2).unwrap_err().contains("rank 1"));
        let p = BlockPlacement {
            holders: vec![vec![1, 0]],
        };
        assert!(p.validate(2).is_err());
    }

    #[test]
    fn replica_split_is_even_and_complete() {
        let p = BlockPlacement::spread(1, 3);
        assert_eq!(p.replica_split(0, 7), vec![3, 2, 2]);
        assert_eq!(p.replica_split(0, 0), vec![0, 0, 0]);
    }

    #[test]
    fn worker_load_and_ratio() {
        let p = BlockPlacement::spread(4, 2);
        let w = p.worker_loads(&[10.0, 10.0, 1.0, 1.0], 2);
        assert_eq!(w, vec![20.0, 2.0]);
        assert!((max_mean_ratio(&w) - 20.0 / 11.0).abs() < 1e-12);
        assert_eq!(max_mean_ratio(&[0.0, 0.0]), 1.0);
    }

    #[test]
    fn placement_round_trips_through_the_wire_form() {
        let p = ExpertPlacement {
            version: 3,
            blocks: vec![
                BlockPlacement::spread(2, 4),
                BlockPlacement {
                    holders: vec![vec![0, 1], vec![2], vec![3], vec![1]],
                },
            ],
        };
        let wire = proto::Placement::from(&p);
        assert_eq!(wire.blocks[0].experts[1].ranks, vec![1, 3]);
        assert_eq!(ExpertPlacement::from(&wire), p);
    }

    #[test]
    fn block_labels_follow_model_order() {
        let moe = MoeConfig {
            experts: 4,
            vit_blocks: vec![5, 1],
            text_blocks: vec![0],
            ..Default::default()
        };
        assert_eq!(block_labels(&moe), vec!["vit 1", "vit 5", "text 0"]);
        let with_head = MoeConfig {
            projector: true,
            ..moe
        };
        assert_eq!(
            block_labels(&with_head),
            vec!["vit 1", "vit 5", "projector", "text 0"]
        );
        assert!(block_labels(&MoeConfig::default()).is_empty());
    }
}
