//! Uneven row counts as the equal-sized blocks NCCL's ring collectives want, and back.

use tch::Tensor;

use crate::dist::rows::with_rows;

/// `rows` rows of which the first `t.size()[0]` are `t` and the rest zeros.
pub(super) fn pad_rows(t: &Tensor, rows: i64) -> Tensor {
    let n = t.size()[0];
    if n == rows {
        return t.shallow_clone();
    }
    let padded = Tensor::zeros(with_rows(t, rows), (t.kind(), t.device()));
    if n > 0 {
        padded.narrow(0, 0, n).copy_(t);
    }
    padded
}

/// Lays the `counts[p]` rows of each rank p (at `offs[p]` in `full`) out in blocks of `max`
/// rows, block p at row `p * max`, zeros elsewhere: the equal-sized chunks NCCL's
/// reduce-scatter wants.
pub(super) fn pad_chunks(full: &Tensor, counts: &[i64], offs: &[i64], max: i64) -> Tensor {
    let padded = Tensor::zeros(
        with_rows(full, max * counts.len() as i64),
        (full.kind(), full.device()),
    );
    for (p, (&c, &o)) in counts.iter().zip(offs).enumerate() {
        if c > 0 {
            padded
                .narrow(0, p as i64 * max, c)
                .copy_(&full.narrow(0, o, c));
        }
    }
    padded
}

/// The inverse of padding: the first `counts[p]` rows of every `max`-row block, concatenated.
pub(super) fn unpad_blocks(blocks: &Tensor, counts: &[i64], max: i64) -> Tensor {
    let parts: Vec<Tensor> = counts
        .iter()
        .enumerate()
        .map(|(p, &c)| blocks.narrow(0, p as i64 * max, c))
        .collect();
    Tensor::cat(&parts, 0)
}

/// Row counts this rank receives in an all-to-all: column `rank` of the gathered
/// `world x world` matrix of send counts (row p is what rank p sends to everyone).
pub(super) fn received_counts(matrix: &[i64], world: usize, rank: usize) -> Vec<i64> {
    (0..world).map(|p| matrix[p * world + rank]).collect()
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind};

    use super::*;
    use crate::dist::rows::row_offsets;

    /// Per-rank inputs for a simulated world: rank r's tensor has `rows[r]` rows of 3 columns.
    fn inputs(rows: &[i64], seed: i64) -> Vec<Tensor> {
        rows.iter()
            .enumerate()
            .map(|(r, &n)| {
                Tensor::arange(n * 3, (Kind::Int64, Device::Cpu)).view([n, 3]) * 100
                    + (r as i64 + 1) * seed
            })
            .collect()
    }

    /// The uneven all_gather as NCCL runs it (every rank contributes `max` padded rows, NCCL
    /// concatenates the blocks in rank order), simulated on the CPU, equals plain concatenation.
    #[test]
    fn padded_all_gather_equals_concatenation() {
        for counts in [
            vec![2i64, 0, 3],
            vec![0, 0, 1],
            vec![4, 4, 4],
            vec![0, 0, 0],
            vec![1],
        ] {
            let locals = inputs(&counts, 7);
            let max = counts.iter().copied().max().unwrap();
            let blocks = Tensor::cat(
                &locals.iter().map(|l| pad_rows(l, max)).collect::<Vec<_>>(),
                0,
            );
            assert_eq!(blocks.size(), [max * counts.len() as i64, 3]);
            let got = unpad_blocks(&blocks, &counts, max);
            assert!(got.equal(&Tensor::cat(&locals, 0)), "counts {counts:?}");
        }
    }

    /// The uneven reduce_scatter as NCCL runs it (chunk q of the elementwise sum of every rank's
    /// padded tensor goes to rank q), simulated on the CPU, gives each rank the sum of its rows.
    #[test]
    fn padded_reduce_scatter_gives_each_rank_its_rows_summed() {
        for counts in [vec![2i64, 0, 3], vec![0, 5, 0], vec![2, 2, 2], vec![3]] {
            let world = counts.len();
            let (offs, total) = row_offsets(&counts, world, "test").unwrap();
            let fulls = inputs(&vec![total; world], 13);
            let max = counts.iter().copied().max().unwrap();
            let summed_padded = fulls
                .iter()
                .map(|f| pad_chunks(f, &counts, &offs, max))
                .reduce(|a, b| a + b)
                .unwrap();
            let summed = fulls.iter().fold(
                Tensor::zeros([total, 3], (Kind::Int64, Device::Cpu)),
                |a, b| a + b,
            );
            for q in 0..world {
                let chunk = summed_padded
                    .narrow(0, q as i64 * max, max)
                    .narrow(0, 0, counts[q]);
                assert!(
                    chunk.equal(&summed.narrow(0, offs[q], counts[q])),
                    "counts {counts:?}, rank {q}"
                );
            }
        }
    }

    #[test]
    fn all_to_all_receives_the_column_of_its_rank() {
        // Row p: what rank p sends to ranks 0, 1, 2.
        let matrix = [1, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(received_counts(&matrix, 3, 0), [1, 4, 7]);
        assert_eq!(received_counts(&matrix, 3, 2), [3, 6, 9]);
        assert_eq!(received_counts(&[5], 1, 0), [5]);
    }
}
