//! Row bookkeeping shared by the backends: every collective moves whole dim-0 rows, and
//! `counts` say how many each rank contributes or receives.

use super::{CollectiveError, Result};
use tch::Tensor;

/// Validates per-rank row counts and returns their row offsets and total.
pub(super) fn row_offsets(counts: &[i64], world: usize, what: &str) -> Result<(Vec<i64>, i64)> {
    if counts.len() != world {
        return Err(CollectiveError::Usage(format!(
            "{what}: {} counts for a world of {world}",
            counts.len()
        )));
    }
    let mut offs = Vec::with_capacity(world);
    let mut total = 0i64;
    for (r, &c) in counts.iter().enumerate() {
        if c < 0 {
            return Err(CollectiveError::Usage(format!(
                "{what}: count {c} for rank {r} is negative"
            )));
        }
        offs.push(total);
        total += c;
    }
    Ok((offs, total))
}

/// Rows of `t` (its first dimension); a scalar is a usage error.
pub(super) fn dim0(t: &Tensor, what: &str) -> Result<i64> {
    t.size().first().copied().ok_or_else(|| {
        CollectiveError::Usage(format!(
            "{what}: needs a tensor with at least one dimension (rows), got a scalar"
        ))
    })
}

/// Elements per dim-0 row (the product of the other dimensions).
pub(super) fn row_elems(t: &Tensor) -> usize {
    t.size()[1..].iter().product::<i64>() as usize
}

/// Bytes per dim-0 row.
pub(super) fn row_bytes(t: &Tensor) -> usize {
    row_elems(t) * t.kind().elt_size_in_bytes()
}

/// `t`'s shape with `rows` rows.
pub(super) fn with_rows(t: &Tensor, rows: i64) -> Vec<i64> {
    let mut shape = t.size();
    shape[0] = rows;
    shape
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_validated() {
        assert_eq!(row_offsets(&[2, 0, 3], 3, "x").unwrap(), (vec![0, 2, 2], 5));
        assert!(
            matches!(row_offsets(&[1, 2], 3, "x"), Err(CollectiveError::Usage(m)) if m.contains("2 counts for a world of 3"))
        );
        assert!(
            matches!(row_offsets(&[1, -1], 2, "x"), Err(CollectiveError::Usage(m)) if m.contains("negative"))
        );
        let t = Tensor::zeros([4, 2, 3], (tch::Kind::Float, tch::Device::Cpu));
        assert_eq!(dim0(&t, "x").unwrap(), 4);
        assert_eq!(row_bytes(&t), 24);
        assert_eq!(with_rows(&t, 7), vec![7, 2, 3]);
        assert!(dim0(&Tensor::from(1.0f32), "x").is_err());
    }
}
