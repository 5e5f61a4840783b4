//! The [`Collective`] operations of the TCP backend, each compiled into a [`Plan`].

use tch::{Device, Tensor};

use super::plan::{ring_plan, segments, sum_elem, Plan, RecvItem, SendItem};
use super::{Failure, TcpCollective};
use crate::dist::rows::{self, row_bytes};
use crate::dist::{Collective, CollectiveError, Result};

impl TcpCollective {
    /// All-to-all of rows; the round of counts is skipped when `known_recv` gives them.
    fn all_to_all_rows(
        &self,
        input: &Tensor,
        send_counts: &[i64],
        known_recv: Option<&[i64]>,
    ) -> Result<(Tensor, Vec<i64>)> {
        check_cpu(input, "all_to_all")?;
        if self.topology == super::Topology::Ring {
            return Err(CollectiveError::Usage(
                "all_to_all needs a link between every pair of ranks, but this collective \
                 connected only ring neighbours (Topology::Ring)"
                    .into(),
            ));
        }
        let (send_offs, total) = row_offsets(send_counts, self.world, "all_to_all")?;
        let rows = dim0(input, "all_to_all")?;
        if rows != total {
            return Err(CollectiveError::Usage(format!(
                "all_to_all: input has {rows} rows but send_counts sum to {total}"
            )));
        }
        let (r, n) = (self.rank, self.world);
        let input = input.contiguous();
        let mut recv_counts = vec![0i64; n];
        recv_counts[r] = send_counts[r];
        if let Some(known) = known_recv {
            if known.len() != n || known[r] != send_counts[r] || known.iter().any(|&c| c < 0) {
                return Err(CollectiveError::Usage(format!(
                    "all_to_all_known: receive counts {known:?} do not fit rank {r} of {n} \
                     sending {send_counts:?}"
                )));
            }
            recv_counts.copy_from_slice(known);
        }
        let mut st = if n > 1 { Some(self.begin()?) } else { None };
        if let Some(st) = st.as_mut().filter(|_| known_recv.is_none()) {
            // Phase 1: every peer learns how many rows it will get from this rank.
            let mut plan = Plan::default();
            for p in self.others() {
                plan.sends.push(SendItem {
                    peer: p,
                    lane: 0,
                    ptr: &send_counts[p] as *const i64 as usize,
                    len: 8,
                    after_recv: None,
                });
            }
            for k in 1..n {
                let p = (r + n - k) % n;
                plan.recvs.push(RecvItem {
                    peer: p,
                    lane: 0,
                    ptr: &mut recv_counts[p] as *mut i64 as usize,
                    len: 8,
                    reduce: None,
                });
            }
            self.execute(st, plan)?;
            if let Some((p, c)) = recv_counts.iter().enumerate().find(|(_, c)| **c < 0) {
                let f = Failure::Usage(format!("all_to_all: rank {p} announced {c} rows"));
                let e = self.to_error(&f);
                st.poisoned = Some(f);
                return Err(e);
            }
        }
        let (recv_offs, recv_total) = row_offsets(&recv_counts, n, "all_to_all")?;
        let out = Tensor::empty(with_rows(&input, recv_total), (input.kind(), Device::Cpu));
        if send_counts[r] > 0 {
            out.narrow(0, recv_offs[r] as i64, send_counts[r])
                .copy_(&input.narrow(0, send_offs[r] as i64, send_counts[r]));
        }
        if let Some(st) = st.as_mut() {
            // Phase 2: at step k send to r+k and receive from r-k, which pairs every sender
            // with a receiver on the same step and so cannot deadlock.
            let rb = row_bytes(&input);
            let (ib, ob) = (input.data_ptr() as usize, out.data_ptr() as usize);
            let mut plan = Plan::default();
            for k in 1..n {
                let p = (r + k) % n;
                let (o, l) = (send_offs[p] * rb, send_counts[p] as usize * rb);
                for (so, sl) in segments(ib + o, l) {
                    plan.sends.push(SendItem {
                        peer: p,
                        lane: 0,
                        ptr: so,
                        len: sl,
                        after_recv: None,
                    });
                }
                let q = (r + n - k) % n;
                let (o, l) = (recv_offs[q] * rb, recv_counts[q] as usize * rb);
                for (ro, rl) in segments(ob + o, l) {
                    plan.recvs.push(RecvItem {
                        peer: q,
                        lane: 0,
                        ptr: ro,
                        len: rl,
                        reduce: None,
                    });
                }
            }
            self.execute(st, plan)?;
        }
        Ok((out, recv_counts))
    }
}

fn check_cpu(t: &Tensor, what: &str) -> Result<()> {
    match t.device() {
        Device::Cpu => Ok(()),
        d => Err(CollectiveError::Usage(format!(
            "{what}: the TCP collective takes CPU tensors, got one on {d:?}"
        ))),
    }
}

/// [`rows::row_offsets`] as byte-addressing `usize`s.
fn row_offsets(counts: &[i64], world: usize, what: &str) -> Result<(Vec<usize>, usize)> {
    let (offs, total) = rows::row_offsets(counts, world, what)?;
    Ok((
        offs.into_iter().map(|o| o as usize).collect(),
        total as usize,
    ))
}

fn dim0(t: &Tensor, what: &str) -> Result<usize> {
    rows::dim0(t, what).map(|n| n as usize)
}

fn with_rows(t: &Tensor, rows: usize) -> Vec<i64> {
    rows::with_rows(t, rows as i64)
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<()> {
        check_cpu(tensor, "all_reduce_sum")?;
        let elem = sum_elem(tensor.kind(), "all_reduce_sum")?;
        if self.world == 1 {
            return Ok(());
        }
        let mut st = self.begin()?;
        let contiguous = tensor.is_contiguous();
        let work = if contiguous {
            tensor.shallow_clone()
        } else {
            tensor.contiguous()
        };
        let esz = work.kind().elt_size_in_bytes();
        let numel = work.numel();
        let n = self.world;
        // Balanced element ranges, so sizes not divisible by the world size are fine.
        let chunks: Vec<(usize, usize)> = (0..n)
            .map(|c| {
                let (a, b) = (c * numel / n, (c + 1) * numel / n);
                (a * esz, (b - a) * esz)
            })
            .collect();
        let r = self.rank;
        let m = |x: usize| x % n;
        // Reduce-scatter leaves rank r owning chunk r, then all-gather circulates the owners.
        let mut steps = Vec::with_capacity(2 * (n - 1));
        for s in 0..n - 1 {
            steps.push((m(r + 2 * n - s - 1), m(r + 2 * n - s - 2), Some(elem)));
        }
        for s in 0..n - 1 {
            steps.push((m(r + n - s), m(r + 2 * n - s - 1), None));
        }
        let plan = ring_plan(work.data_ptr() as usize, &chunks, r, n, &steps);
        self.execute(&mut st, plan)?;
        if !contiguous {
            tensor.copy_(&work);
        }
        Ok(())
    }

    fn all_gather(&self, local: &Tensor, counts: &[i64]) -> Result<Tensor> {
        check_cpu(local, "all_gather")?;
        let (offs, total) = row_offsets(counts, self.world, "all_gather")?;
        let rows = dim0(local, "all_gather")?;
        if rows as i64 != counts[self.rank] {
            return Err(CollectiveError::Usage(format!(
                "all_gather: rank {} passed {rows} rows but counts[{}] = {}",
                self.rank, self.rank, counts[self.rank]
            )));
        }
        let out = Tensor::empty(with_rows(local, total), (local.kind(), Device::Cpu));
        if rows > 0 {
            out.narrow(0, offs[self.rank] as i64, rows as i64)
                .copy_(local);
        }
        if self.world == 1 {
            return Ok(out);
        }
        let mut st = self.begin()?;
        let rb = row_bytes(local);
        let chunks: Vec<(usize, usize)> = (0..self.world)
            .map(|c| (offs[c] * rb, counts[c] as usize * rb))
            .collect();
        let (n, r) = (self.world, self.rank);
        let steps: Vec<_> = (0..n - 1)
            .map(|s| ((r + n - s) % n, (r + 2 * n - s - 1) % n, None))
            .collect();
        let plan = ring_plan(out.data_ptr() as usize, &chunks, r, n, &steps);
        self.execute(&mut st, plan)?;
        Ok(out)
    }

    fn reduce_scatter_sum(&self, full: &Tensor, counts: &[i64]) -> Result<Tensor> {
        check_cpu(full, "reduce_scatter_sum")?;
        let elem = sum_elem(full.kind(), "reduce_scatter_sum")?;
        let (offs, total) = row_offsets(counts, self.world, "reduce_scatter_sum")?;
        let rows = dim0(full, "reduce_scatter_sum")?;
        if rows != total {
            return Err(CollectiveError::Usage(format!(
                "reduce_scatter_sum: tensor has {rows} rows but counts sum to {total}"
            )));
        }
        let (r, n) = (self.rank, self.world);
        let mine = |work: &Tensor| {
            let mut out = Tensor::empty(
                with_rows(full, counts[r] as usize),
                (full.kind(), Device::Cpu),
            );
            if counts[r] > 0 {
                out.copy_(&work.narrow(0, offs[r] as i64, counts[r]));
            }
            out
        };
        if n == 1 {
            return Ok(mine(full));
        }
        let mut st = self.begin()?;
        // The ring sums partial chunks in place, so work on a private contiguous copy.
        let mut work = Tensor::empty(full.size(), (full.kind(), Device::Cpu));
        work.copy_(full);
        let rb = row_bytes(full);
        let chunks: Vec<(usize, usize)> = (0..n)
            .map(|c| (offs[c] * rb, counts[c] as usize * rb))
            .collect();
        let steps: Vec<_> = (0..n - 1)
            .map(|s| ((r + 2 * n - s - 1) % n, (r + 2 * n - s - 2) % n, Some(elem)))
            .collect();
        let plan = ring_plan(work.data_ptr() as usize, &chunks, r, n, &steps);
        self.execute(&mut st, plan)?;
        Ok(mine(&work))
    }

    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()> {
        check_cpu(tensor, "broadcast")?;
        if root >= self.world {
            return Err(CollectiveError::Usage(format!(
                "broadcast: root {root} is outside a world of {}",
                self.world
            )));
        }
        if self.world == 1 {
            return Ok(());
        }
        let mut st = self.begin()?;
        let contiguous = tensor.is_contiguous();
        let work = if contiguous {
            tensor.shallow_clone()
        } else {
            tensor.contiguous()
        };
        let (r, n) = (self.rank, self.world);
        let len = work.numel() * work.kind().elt_size_in_bytes();
        let base = work.data_ptr() as usize;
        // A pipelined chain root → root+1 → ...: each rank forwards a segment once it has it.
        let mut plan = Plan::default();
        if r != root {
            for (o, l) in segments(0, len) {
                plan.recvs.push(RecvItem {
                    peer: (r + n - 1) % n,
                    lane: 0,
                    ptr: base + o,
                    len: l,
                    reduce: None,
                });
            }
        }
        if (r + 1) % n != root {
            for (j, (o, l)) in segments(0, len).enumerate() {
                plan.sends.push(SendItem {
                    peer: (r + 1) % n,
                    lane: 0,
                    ptr: base + o,
                    len: l,
                    after_recv: (r != root).then_some(j),
                });
            }
        }
        if len == 0 {
            // Zero bytes still synchronise, so a mismatch in shapes is caught by the header.
            if r != root {
                plan.recvs.push(RecvItem {
                    peer: (r + n - 1) % n,
                    lane: 0,
                    ptr: base,
                    len: 0,
                    reduce: None,
                });
            }
            if (r + 1) % n != root {
                plan.sends.push(SendItem {
                    peer: (r + 1) % n,
                    lane: 0,
                    ptr: base,
                    len: 0,
                    after_recv: (r != root).then_some(0),
                });
            }
        }
        self.execute(&mut st, plan)?;
        if !contiguous && r != root {
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
        if self.world == 1 {
            return Ok(());
        }
        let mut st = self.begin()?;
        let (r, n) = (self.rank, self.world);
        // Dissemination barrier: after round i every rank has heard, transitively, from 2^(i+1)
        // ranks; ceil(log2 n) rounds of empty frames. On a ring-only collective the distance
        // stays 1: n − 1 rounds around the ring.
        let ring = self.topology == super::Topology::Ring;
        let rounds = if ring {
            n - 1
        } else {
            n.next_power_of_two().trailing_zeros() as usize
        };
        let mut plan = Plan::default();
        for round in 0..rounds {
            let k = if ring { 1 } else { 1 << round };
            plan.sends.push(SendItem {
                peer: (r + k) % n,
                lane: 0,
                ptr: 0,
                len: 0,
                after_recv: round.checked_sub(1),
            });
            plan.recvs.push(RecvItem {
                peer: (r + n - k) % n,
                lane: 0,
                ptr: 0,
                len: 0,
                reduce: None,
            });
        }
        self.execute(&mut st, plan)
    }
}
