//! An operation as a [`Plan`]: ordered segment sends and ordered segment receives, where a
//! send may wait for a receive (that is how the ring pipelines), and the ring schedules.

use tch::Kind;

use super::tuning::segment_bytes;
use crate::dist::{CollectiveError, Result};

#[derive(Clone, Copy, Debug)]
pub(super) enum Elem {
    F32,
    F64,
    /// bfloat16: each addition in float32, rounded back to nearest even.
    Bf16,
    I32,
    I64,
}

/// One segment to send: `len` bytes at address `ptr`, after receive item `after_recv` is done.
pub(super) struct SendItem {
    pub(super) peer: usize,
    /// Which of the peer's streams carries it (set by `Plan::assign_lanes`).
    pub(super) lane: usize,
    pub(super) ptr: usize,
    pub(super) len: usize,
    pub(super) after_recv: Option<usize>,
}

/// One segment to receive into `ptr`, summed into it when `reduce` is set.
pub(super) struct RecvItem {
    pub(super) peer: usize,
    pub(super) lane: usize,
    pub(super) ptr: usize,
    pub(super) len: usize,
    pub(super) reduce: Option<Elem>,
}

#[derive(Default)]
pub(super) struct Plan {
    pub(super) sends: Vec<SendItem>,
    pub(super) recvs: Vec<RecvItem>,
}

impl Plan {
    /// Deals each peer's items round-robin over its streams. The n-th send to a peer is the
    /// n-th receive from this rank on the peer, so both ends pick the same stream.
    pub(super) fn assign_lanes(&mut self, world: usize, lanes: usize) {
        let mut n = vec![0usize; world];
        for it in &mut self.sends {
            it.lane = n[it.peer] % lanes;
            n[it.peer] += 1;
        }
        let mut n = vec![0usize; world];
        for it in &mut self.recvs {
            it.lane = n[it.peer] % lanes;
            n[it.peer] += 1;
        }
    }
}

/// Splits the byte range `[off, off+len)` into pipelining segments (none when empty).
pub(super) fn segments(off: usize, len: usize) -> impl Iterator<Item = (usize, usize)> {
    let seg = segment_bytes();
    (0..len.div_ceil(seg)).map(move |j| {
        let start = j * seg;
        (off + start, seg.min(len - start))
    })
}

/// A ring schedule over `chunks` (byte ranges of the buffer at `base`): at step t this rank
/// sends `steps[t].0` to its right neighbour and receives `steps[t].1` from its left one
/// (summing when `steps[t].2`). Every step's send chunk is the chunk received at the step before
/// it, so a send segment waits for exactly that received segment. This is also what makes the
/// shared buffer safe: a rank never receives into a chunk its sender is still reading, because
/// the data for that chunk causally follows the send.
pub(super) fn ring_plan(
    base: usize,
    chunks: &[(usize, usize)],
    rank: usize,
    world: usize,
    steps: &[(usize, usize, Option<Elem>)],
) -> Plan {
    let right = (rank + 1) % world;
    let left = (rank + world - 1) % world;
    let mut plan = Plan::default();
    let mut prev_recv_first: Option<usize> = None;
    for &(send_chunk, recv_chunk, reduce) in steps {
        let (soff, slen) = chunks[send_chunk];
        for (j, (o, l)) in segments(soff, slen).enumerate() {
            plan.sends.push(SendItem {
                peer: right,
                lane: 0,
                ptr: base + o,
                len: l,
                after_recv: prev_recv_first.map(|first| first + j),
            });
        }
        let first = plan.recvs.len();
        let (roff, rlen) = chunks[recv_chunk];
        for (o, l) in segments(roff, rlen) {
            plan.recvs.push(RecvItem {
                peer: left,
                lane: 0,
                ptr: base + o,
                len: l,
                reduce,
            });
        }
        prev_recv_first = Some(first);
    }
    plan
}

/// dst[i] += src[i] over `len` bytes of elements of type `elem`.
///
/// # Safety
/// Both ranges must be valid, aligned for `elem` and not overlap.
pub(super) unsafe fn reduce_into(elem: Elem, dst: usize, src: *const u8, len: usize) {
    unsafe fn sum<T: Copy + std::ops::Add<Output = T>>(dst: usize, src: *const u8, len: usize) {
        let n = len / std::mem::size_of::<T>();
        let d = std::slice::from_raw_parts_mut(dst as *mut T, n);
        let s = std::slice::from_raw_parts(src as *const T, n);
        for (a, b) in d.iter_mut().zip(s) {
            *a = *a + *b;
        }
    }
    unsafe fn wrapping<T: Copy>(dst: usize, src: *const u8, len: usize, add: fn(T, T) -> T) {
        let n = len / std::mem::size_of::<T>();
        let d = std::slice::from_raw_parts_mut(dst as *mut T, n);
        let s = std::slice::from_raw_parts(src as *const T, n);
        for (a, b) in d.iter_mut().zip(s) {
            *a = add(*a, *b);
        }
    }
    match elem {
        Elem::F32 => sum::<f32>(dst, src, len),
        Elem::F64 => sum::<f64>(dst, src, len),
        Elem::I32 => wrapping::<i32>(dst, src, len, i32::wrapping_add),
        Elem::I64 => wrapping::<i64>(dst, src, len, i64::wrapping_add),
        Elem::Bf16 => wrapping::<u16>(dst, src, len, bf16_add),
    }
}

/// The sum of two bfloat16 values (as bits), added in float32 and rounded to nearest even as
/// PyTorch rounds a float32 to bfloat16; a NaN stays a NaN.
pub(super) fn bf16_add(a: u16, b: u16) -> u16 {
    let sum = f32::from_bits(u32::from(a) << 16) + f32::from_bits(u32::from(b) << 16);
    if sum.is_nan() {
        return 0x7fc0;
    }
    let bits = sum.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1));
    (rounded >> 16) as u16
}

pub(super) fn sum_elem(kind: Kind, what: &str) -> Result<Elem> {
    match kind {
        Kind::Float => Ok(Elem::F32),
        Kind::Double => Ok(Elem::F64),
        Kind::Int => Ok(Elem::I32),
        Kind::Int64 => Ok(Elem::I64),
        Kind::BFloat16 => Ok(Elem::Bf16),
        k => Err(CollectiveError::Usage(format!(
            "{what}: sums support Float, Double, BFloat16, Int and Int64 tensors, not {k:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::bf16_add;
    use tch::{Device, Kind, Tensor};

    /// bf16_add against libtorch's own bfloat16 addition, on values that exercise rounding
    /// (ties included), signs, zeros, tiny and huge magnitudes, infinities and NaN.
    #[test]
    fn bf16_sums_round_as_libtorch_does() {
        let mut xs: Vec<f32> = vec![0.0, -0.0, 1.0, -1.0, 3.0e38, -3.0e38, 1e-38, f32::INFINITY];
        for i in 0..200 {
            xs.push(((i as f32) * 0.731).sin() * 10f32.powi(i % 9 - 4));
        }
        let a = Tensor::from_slice(&xs).to_kind(Kind::BFloat16);
        let b = a.roll([7], [0]) * 1.0009765625;
        let expected = (&a + &b).view_dtype(Kind::Int16);
        let bits = |t: &Tensor| -> Vec<u16> {
            Vec::<i16>::try_from(&t.view_dtype(Kind::Int16).to_device(Device::Cpu))
                .unwrap()
                .into_iter()
                .map(|v| v as u16)
                .collect()
        };
        let (ab, bb) = (bits(&a), bits(&b));
        let ours: Vec<u16> = ab.iter().zip(&bb).map(|(&x, &y)| bf16_add(x, y)).collect();
        let theirs: Vec<u16> = bits(&expected);
        assert_eq!(ours, theirs);
        let nan = bf16_add(0x7fc0, 0x3f80);
        assert!(f32::from_bits(u32::from(nan) << 16).is_nan());
    }
}
