//! Where one worker's kept assignments go: the destination rank of each, the order they are
//! sent in, and the per-expert counts every destination needs to split what it receives.
//! Pure bookkeeping on host vectors, so it is tested without any collective.

use contrail_common::experts::BlockPlacement;

/// The send side of one exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchPlan {
    /// Assignment indices (into the router's expert/slot-sorted list) in send order: by
    /// destination rank, then by expert, then by slot.
    pub order: Vec<i64>,
    /// Rows sent to each rank.
    pub send_counts: Vec<i64>,
    /// For each destination p, the rows for each expert p holds (ascending global id), flat
    /// in rank order: `header_counts[p]` entries for rank p.
    pub header: Vec<i64>,
    /// Entries of `header` per destination (the number of experts it holds).
    pub header_counts: Vec<i64>,
}

/// Plans the exchange of assignments sorted by (expert, slot), `kept_per_expert[e]` of them for
/// expert e. Each expert's run is split evenly over its replicas (earlier replicas take the
/// remainder), so every replica sees the same share of each source.
pub fn plan(placement: &BlockPlacement, kept_per_expert: &[i64], world: usize) -> DispatchPlan {
    let experts = placement.experts();
    assert_eq!(kept_per_expert.len(), experts, "one count per expert");
    // rows[p][e]: the assignment index range for expert e that goes to rank p.
    let mut runs: Vec<Vec<(usize, i64, i64)>> = vec![Vec::new(); world];
    let mut start = 0i64;
    for (e, &n) in kept_per_expert.iter().enumerate() {
        let mut at = start;
        for (j, share) in placement.replica_split(e, n).into_iter().enumerate() {
            let p = placement.holders[e][j] as usize;
            runs[p].push((e, at, share));
            at += share;
        }
        start += n;
    }
    let mut order = Vec::with_capacity(start as usize);
    let mut send_counts = vec![0; world];
    let mut header = Vec::new();
    let mut header_counts = vec![0; world];
    for (p, runs) in runs.iter().enumerate() {
        // runs[p] is already in ascending expert order, the order p keeps its experts in.
        for &(_, at, share) in runs {
            order.extend(at..at + share);
            send_counts[p] += share;
            header.push(share);
        }
        header_counts[p] = runs.len() as i64;
    }
    DispatchPlan {
        order,
        send_counts,
        header,
        header_counts,
    }
}

/// The receive side: received rows are grouped by source rank and, within a source, by the
/// local experts in ascending order. `header[s * n_local + i]` is how many rows source s sent
/// for local expert i. Returns, for each local expert, the received row indices it owns.
pub fn rows_per_local_expert(header: &[i64], world: usize, n_local: usize) -> Vec<Vec<i64>> {
    assert_eq!(
        header.len(),
        world * n_local,
        "one count per source and local expert"
    );
    let mut rows = vec![Vec::new(); n_local];
    let mut at = 0i64;
    for s in 0..world {
        for (i, rows_i) in rows.iter_mut().enumerate() {
            let n = header[s * n_local + i];
            rows_i.extend(at..at + n);
            at += n;
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_experts_go_to_their_rank_in_order() {
        // 4 experts on 2 ranks: experts 0,1 on rank 0; 2,3 on rank 1.
        let p = BlockPlacement::spread(4, 2);
        let d = plan(&p, &[2, 0, 1, 3], 2);
        assert_eq!(d.order, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(d.send_counts, vec![2, 4]);
        assert_eq!(d.header, vec![2, 0, 1, 3]);
        assert_eq!(d.header_counts, vec![2, 2]);
    }

    #[test]
    fn replicas_share_an_expert_evenly() {
        // 2 experts on 4 ranks: expert 0 on ranks 0 and 2, expert 1 on ranks 1 and 3.
        let p = BlockPlacement::spread(2, 4);
        let d = plan(&p, &[3, 2], 4);
        // Expert 0's 3 rows: 2 to rank 0, 1 to rank 2; expert 1's 2 rows: 1 to rank 1, 1 to 3.
        assert_eq!(d.send_counts, vec![2, 1, 1, 1]);
        assert_eq!(d.order, vec![0, 1, 3, 2, 4]);
        assert_eq!(d.header, vec![2, 1, 1, 1]);
    }

    #[test]
    fn received_rows_are_split_by_source_then_expert() {
        // 2 sources, 2 local experts: source 0 sent 1 + 2 rows, source 1 sent 0 + 1.
        let rows = rows_per_local_expert(&[1, 2, 0, 1], 2, 2);
        assert_eq!(rows, vec![vec![0], vec![1, 2, 3]]);
    }
}
