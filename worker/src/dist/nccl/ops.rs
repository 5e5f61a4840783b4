//! The [`Collective`] operations of the NCCL backend.

use std::ffi::{c_int, c_void};

use tch::{Device, Kind, Tensor};

use super::ffi::{self, DataType};
use super::library::Lib;
use super::padding::{pad_chunks, pad_rows, received_counts, unpad_blocks};
use super::{Failure, NcclCollective};
use crate::dist::rows::{dim0, row_bytes, row_elems, row_offsets, with_rows};
use crate::dist::{Collective, CollectiveError, Result};

/// The NCCL type a sum over `kind` runs in; kinds NCCL cannot add are a usage error.
fn sum_data_type(kind: Kind, what: &str) -> Result<DataType> {
    Ok(match kind {
        Kind::Float => DataType::Float32,
        Kind::Double => DataType::Float64,
        Kind::Half => DataType::Float16,
        Kind::BFloat16 => DataType::Bfloat16,
        Kind::Int => DataType::Int32,
        Kind::Int64 => DataType::Int64,
        Kind::Int8 => DataType::Int8,
        Kind::Uint8 => DataType::Uint8,
        k => {
            return Err(CollectiveError::Usage(format!(
                "{what}: NCCL sums support Float, Double, Half, BFloat16, Int, Int64, Int8 and \
                 Uint8 tensors, not {k:?}"
            )))
        }
    })
}
/// Runs `ops` between ncclGroupStart and ncclGroupEnd; the first error wins.
fn grouped(lib: &Lib, ops: impl FnOnce() -> c_int) -> c_int {
    // SAFETY: group calls take no arguments; every start is matched by an end.
    let code = unsafe { (lib.group_start)() };
    if code != ffi::SUCCESS {
        return code;
    }
    let first = ops();
    let end = unsafe { (lib.group_end)() };
    if first != ffi::SUCCESS {
        first
    } else {
        end
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<()> {
        let what = "all_reduce_sum";
        let dtype = sum_data_type(tensor.kind(), what)?;
        let (staged, copied) = self.stage(tensor, what)?;
        let in_place = !copied && staged.is_contiguous();
        let work = staged.contiguous();
        let count = work.numel();
        let mut st = self.begin()?;
        if count > 0 {
            let ptr = work.data_ptr();
            self.run(&mut st, what, |lib, comm, stream| unsafe {
                (lib.all_reduce)(ptr, ptr, count, dtype as c_int, ffi::SUM, comm, stream)
            })?;
        }
        drop(st);
        if !in_place {
            tensor.copy_(&work);
        }
        Ok(())
    }

    fn all_gather(&self, local: &Tensor, counts: &[i64]) -> Result<Tensor> {
        let what = "all_gather";
        let (_, total) = row_offsets(counts, self.world, what)?;
        let rows = dim0(local, what)?;
        if rows != counts[self.rank] {
            return Err(CollectiveError::Usage(format!(
                "{what}: rank {} passed {rows} rows but counts[{}] = {}",
                self.rank, self.rank, counts[self.rank]
            )));
        }
        let (staged, copied) = self.stage(local, what)?;
        let work = staged.contiguous();
        let row_bytes = row_bytes(&work);
        let max = counts.iter().copied().max().unwrap_or(0);
        let even = counts.iter().all(|&c| c == max);
        let mut st = self.begin()?;
        // Uneven counts: every rank sends `max` rows (its own padded with zeros).
        let send = pad_rows(&work, max);
        let blocks = Tensor::empty(
            with_rows(&work, max * self.world as i64),
            (work.kind(), self.device()),
        );
        let bytes = max as usize * row_bytes;
        if bytes > 0 {
            let (sp, rp) = (send.data_ptr(), blocks.data_ptr());
            self.run(&mut st, what, |lib, comm, stream| unsafe {
                (lib.all_gather)(sp, rp, bytes, ffi::UINT8, comm, stream)
            })?;
        }
        drop(st);
        let out = if even {
            blocks
        } else {
            unpad_blocks(&blocks, counts, max)
        };
        debug_assert_eq!(out.size()[0], total);
        Ok(if copied {
            out.to_device(Device::Cpu)
        } else {
            out
        })
    }

    fn reduce_scatter_sum(&self, full: &Tensor, counts: &[i64]) -> Result<Tensor> {
        let what = "reduce_scatter_sum";
        let dtype = sum_data_type(full.kind(), what)?;
        let (offs, total) = row_offsets(counts, self.world, what)?;
        let rows = dim0(full, what)?;
        if rows != total {
            return Err(CollectiveError::Usage(format!(
                "{what}: tensor has {rows} rows but counts sum to {total}"
            )));
        }
        let (staged, copied) = self.stage(full, what)?;
        let work = staged.contiguous();
        let max = counts.iter().copied().max().unwrap_or(0);
        let even = counts.iter().all(|&c| c == max);
        let mut st = self.begin()?;
        let send = if even {
            work.shallow_clone()
        } else {
            pad_chunks(&work, counts, &offs, max)
        };
        let mine = Tensor::empty(with_rows(&work, max), (work.kind(), self.device()));
        let count = max as usize * row_elems(&work);
        if count > 0 {
            let (sp, rp) = (send.data_ptr(), mine.data_ptr());
            self.run(&mut st, what, |lib, comm, stream| unsafe {
                (lib.reduce_scatter)(sp, rp, count, dtype as c_int, ffi::SUM, comm, stream)
            })?;
        }
        drop(st);
        let out = mine.narrow(0, 0, counts[self.rank]);
        Ok(if copied {
            out.to_device(Device::Cpu)
        } else {
            out
        })
    }

    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()> {
        let what = "broadcast";
        if root >= self.world {
            return Err(CollectiveError::Usage(format!(
                "{what}: root {root} is outside a world of {}",
                self.world
            )));
        }
        let (staged, copied) = self.stage(tensor, what)?;
        let in_place = !copied && staged.is_contiguous();
        let work = staged.contiguous();
        let bytes = work.numel() * work.kind().elt_size_in_bytes();
        let mut st = self.begin()?;
        if bytes > 0 {
            let ptr = work.data_ptr();
            self.run(&mut st, what, |lib, comm, stream| unsafe {
                (lib.broadcast)(ptr, ptr, bytes, ffi::UINT8, root as c_int, comm, stream)
            })?;
        }
        drop(st);
        if !in_place && self.rank != root {
            tensor.copy_(&work);
        }
        Ok(())
    }

    fn all_to_all(&self, input: &Tensor, send_counts: &[i64]) -> Result<(Tensor, Vec<i64>)> {
        self.all_to_all_rows(input, send_counts, None)
    }

    fn all_to_all_known(
        &self,
        input: &Tensor,
        send_counts: &[i64],
        recv_counts: &[i64],
    ) -> Result<Tensor> {
        Ok(self
            .all_to_all_rows(input, send_counts, Some(recv_counts))?
            .0)
    }

    fn barrier(&self) -> Result<()> {
        let mut st = self.begin()?;
        // A one-element sum completes on a rank only once every rank has entered it.
        let t = Tensor::zeros([1], (Kind::Float, self.device()));
        let ptr = t.data_ptr();
        self.run(&mut st, "barrier", |lib, comm, stream| unsafe {
            (lib.all_reduce)(ptr, ptr, 1, ffi::FLOAT32, ffi::SUM, comm, stream)
        })
    }
}

impl NcclCollective {
    /// All-to-all of rows. With `known_recv` (what each peer sends this rank) the round of
    /// counts, and the device-to-host copy it needs, are skipped; NCCL cannot check that the
    /// peers really send that much, so a wrong count is undefined (the caller derives it from
    /// an earlier exchange).
    fn all_to_all_rows(
        &self,
        input: &Tensor,
        send_counts: &[i64],
        known_recv: Option<&[i64]>,
    ) -> Result<(Tensor, Vec<i64>)> {
        let what = if known_recv.is_some() {
            "all_to_all_known"
        } else {
            "all_to_all"
        };
        let (send_offs, total) = row_offsets(send_counts, self.world, what)?;
        let rows = dim0(input, what)?;
        if rows != total {
            return Err(CollectiveError::Usage(format!(
                "{what}: input has {rows} rows but send_counts sum to {total}"
            )));
        }
        let (n, r) = (self.world, self.rank);
        if let Some(known) = known_recv {
            // Checked before the communicator is entered: a bad count here is this rank's own
            // mistake, not a peer's, and must not poison the communicator.
            if known.len() != n || known[r] != send_counts[r] || known.iter().any(|&c| c < 0) {
                return Err(CollectiveError::Usage(format!(
                    "{what}: receive counts {known:?} do not fit rank {r} of {n} sending \
                     {send_counts:?}"
                )));
            }
        }
        let (staged, copied) = self.stage(input, what)?;
        let work = staged.contiguous();
        let mut st = self.begin()?;
        let recv_counts = match known_recv {
            Some(known) => known.to_vec(),
            None => {
                // Phase 1: every rank's send counts, so each knows what it receives from whom.
                let mine = Tensor::from_slice(send_counts).to_device(self.device());
                let gathered = Tensor::empty([(n * n) as i64], (Kind::Int64, self.device()));
                let (sp, rp) = (mine.data_ptr(), gathered.data_ptr());
                self.run(&mut st, "all_to_all (counts)", |lib, comm, stream| unsafe {
                    (lib.all_gather)(sp, rp, n, ffi::INT64, comm, stream)
                })?;
                let matrix = Vec::<i64>::try_from(&gathered.to_device(Device::Cpu))
                    .expect("an Int64 tensor converts to Vec<i64>");
                received_counts(&matrix, n, r)
            }
        };
        let (recv_offs, recv_total) = match row_offsets(&recv_counts, n, what) {
            Ok(v) => v,
            Err(CollectiveError::Usage(m)) => {
                return Err(self.fail(&mut st, Failure::Usage(format!("peer counts: {m}"))))
            }
            Err(e) => return Err(e),
        };
        let out = Tensor::empty(with_rows(&work, recv_total), (work.kind(), self.device()));
        // Phase 2: one grouped send and receive per peer, this rank included.
        let rb = row_bytes(&work);
        let (ib, ob) = (work.data_ptr() as usize, out.data_ptr() as usize);
        let sends: Vec<(usize, usize, usize)> = (0..n)
            .map(|p| {
                (
                    p,
                    ib + send_offs[p] as usize * rb,
                    send_counts[p] as usize * rb,
                )
            })
            .filter(|s| s.2 > 0)
            .collect();
        let recvs: Vec<(usize, usize, usize)> = (0..n)
            .map(|p| {
                (
                    p,
                    ob + recv_offs[p] as usize * rb,
                    recv_counts[p] as usize * rb,
                )
            })
            .filter(|s| s.2 > 0)
            .collect();
        if !sends.is_empty() || !recvs.is_empty() {
            self.run(&mut st, what, |lib, comm, stream| {
                grouped(lib, || {
                    for &(p, ptr, len) in &sends {
                        let code = unsafe {
                            (lib.send)(
                                ptr as *const c_void,
                                len,
                                ffi::UINT8,
                                p as c_int,
                                comm,
                                stream,
                            )
                        };
                        if code != ffi::SUCCESS {
                            return code;
                        }
                    }
                    for &(p, ptr, len) in &recvs {
                        let code = unsafe {
                            (lib.recv)(
                                ptr as *mut c_void,
                                len,
                                ffi::UINT8,
                                p as c_int,
                                comm,
                                stream,
                            )
                        };
                        if code != ffi::SUCCESS {
                            return code;
                        }
                    }
                    ffi::SUCCESS
                })
            })?;
        }
        drop(st);
        let out = if copied {
            out.to_device(Device::Cpu)
        } else {
            out
        };
        Ok((out, recv_counts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_cover_float_and_integer_kinds_only() {
        assert_eq!(
            sum_data_type(Kind::BFloat16, "x").unwrap(),
            DataType::Bfloat16
        );
        assert_eq!(sum_data_type(Kind::Half, "x").unwrap(), DataType::Float16);
        assert_eq!(sum_data_type(Kind::Int64, "x").unwrap(), DataType::Int64);
        assert_eq!(sum_data_type(Kind::Int, "x").unwrap(), DataType::Int32);
        for k in [Kind::Bool, Kind::Int16, Kind::ComplexFloat] {
            match sum_data_type(k, "all_reduce_sum") {
                Err(CollectiveError::Usage(m)) => {
                    assert!(
                        m.starts_with("all_reduce_sum:") && m.contains(&format!("{k:?}")),
                        "{m}"
                    )
                }
                other => panic!("{k:?}: {other:?}"),
            }
        }
    }
}
