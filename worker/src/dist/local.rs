//! In-process collective for ranks running as threads (unit tests, single-machine demos).
//!
//! Each operation is two barrier phases over shared slots: every rank deposits a copy of its
//! input, waits, computes its result from all slots (sums always in rank order, so every rank
//! gets bit-identical values), and waits again before the slots may be reused. Argument checks
//! happen after the first phase on the deposited data, so a bad call fails on every rank
//! instead of leaving the others waiting. The barrier has a timeout: a rank that panicked or
//! skipped a collective turns into a `Timeout` error on its peers, not a hung test.

use super::{Collective, CollectiveError, Result};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;
use tch::Tensor;

/// What a rank put into its slot for the current operation.
enum Deposit {
    Empty,
    Tensor(Tensor),
    /// all-to-all: the rows and how many go to each peer.
    Split(Tensor, Vec<i64>),
}

struct Shared {
    world: usize,
    timeout: Duration,
    slots: Mutex<Vec<Deposit>>,
    barrier: Mutex<BarrierState>,
    turned: Condvar,
}

struct BarrierState {
    arrived: Vec<bool>,
    generation: u64,
}

/// Constructor for a group of [`LocalCollective`]s that talk to each other.
pub struct LocalGroup;

impl LocalGroup {
    /// One handle per rank (index = rank), with a 60 s collective timeout.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(world: usize) -> Vec<LocalCollective> {
        Self::with_timeout(world, Duration::from_secs(60))
    }

    pub fn with_timeout(world: usize, timeout: Duration) -> Vec<LocalCollective> {
        assert!(world > 0, "a collective group needs at least one rank");
        let shared = Arc::new(Shared {
            world,
            timeout,
            slots: Mutex::new((0..world).map(|_| Deposit::Empty).collect()),
            barrier: Mutex::new(BarrierState {
                arrived: vec![false; world],
                generation: 0,
            }),
            turned: Condvar::new(),
        });
        (0..world)
            .map(|rank| LocalCollective {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }
}

pub struct LocalCollective {
    rank: usize,
    shared: Arc<Shared>,
}

impl LocalCollective {
    fn slots(&self) -> MutexGuard<'_, Vec<Deposit>> {
        // A poisoned lock means another rank panicked mid-copy; its slot data is still whole
        // tensors, and the missing rank shows up as a barrier timeout.
        self.shared.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait(&self) -> Result<()> {
        let s = &self.shared;
        let mut state = s.barrier.lock().unwrap_or_else(|e| e.into_inner());
        let generation = state.generation;
        state.arrived[self.rank] = true;
        if state.arrived.iter().all(|a| *a) {
            state.arrived.iter_mut().for_each(|a| *a = false);
            state.generation = generation.wrapping_add(1);
            s.turned.notify_all();
            return Ok(());
        }
        let (mut state, _) = s
            .turned
            .wait_timeout_while(state, s.timeout, |st| st.generation == generation)
            .unwrap_or_else(|e| e.into_inner());
        if state.generation == generation {
            // Withdraw, so the group's count stays right if the caller retries.
            state.arrived[self.rank] = false;
            let silent = (0..s.world)
                .find(|&r| r != self.rank && !state.arrived[r])
                .unwrap_or(0);
            return Err(CollectiveError::Timeout {
                rank: silent,
                addr: "local thread".into(),
                waited_ms: s.timeout.as_millis() as u64,
            });
        }
        Ok(())
    }

    /// Phase 1: deposit and wait for everyone; returns after all slots are filled.
    fn deposit(&self, d: Deposit) -> Result<()> {
        self.slots()[self.rank] = d;
        self.wait()
    }

    /// Phase 2: wait until everyone has read the slots, then return `result`.
    fn finish<T>(&self, result: Result<T>) -> Result<T> {
        self.wait()?;
        result
    }

    fn deposited(slots: &[Deposit]) -> Result<Vec<&Tensor>> {
        slots
            .iter()
            .enumerate()
            .map(|(r, d)| match d {
                Deposit::Tensor(t) => Ok(t),
                _ => Err(usage(format!("rank {r} entered a different collective"))),
            })
            .collect()
    }

    fn sum_in_rank_order(tensors: &[&Tensor]) -> Result<Tensor> {
        let shape = tensors[0].size();
        let kind = tensors[0].kind();
        let mut acc = tensors[0].copy();
        for (r, t) in tensors.iter().enumerate().skip(1) {
            if t.size() != shape || t.kind() != kind {
                return Err(usage(format!(
                    "rank {r} passed shape {:?} {:?}, rank 0 passed {shape:?} {kind:?}",
                    t.size(),
                    t.kind()
                )));
            }
            acc += *t;
        }
        Ok(acc)
    }

    fn check_counts(&self, counts: &[i64]) -> Result<()> {
        if counts.len() != self.shared.world || counts.iter().any(|c| *c < 0) {
            return Err(usage(format!(
                "rank {}: counts {counts:?} must have one non-negative entry per rank ({})",
                self.rank, self.shared.world
            )));
        }
        Ok(())
    }
}

fn usage(msg: String) -> CollectiveError {
    CollectiveError::Usage(msg)
}

fn rows(t: &Tensor) -> i64 {
    t.size().first().copied().unwrap_or(1)
}

impl Collective for LocalCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<()> {
        self.deposit(Deposit::Tensor(tensor.copy()))?;
        let result = {
            let slots = self.slots();
            Self::deposited(&slots).and_then(|ts| Self::sum_in_rank_order(&ts))
        };
        let sum = self.finish(result)?;
        tensor.copy_(&sum);
        Ok(())
    }

    fn all_gather(&self, local: &Tensor, counts: &[i64]) -> Result<Tensor> {
        self.deposit(Deposit::Tensor(local.copy()))?;
        let result = self.check_counts(counts).and_then(|()| {
            let slots = self.slots();
            let ts = Self::deposited(&slots)?;
            for (r, t) in ts.iter().enumerate() {
                if rows(t) != counts[r] {
                    return Err(usage(format!(
                        "all_gather: rank {r} passed {} rows, counts say {}",
                        rows(t),
                        counts[r]
                    )));
                }
            }
            Tensor::f_cat(&ts, 0).map_err(|e| usage(format!("all_gather: {e}")))
        });
        self.finish(result)
    }

    fn reduce_scatter_sum(&self, full: &Tensor, counts: &[i64]) -> Result<Tensor> {
        self.deposit(Deposit::Tensor(full.copy()))?;
        let result = self.check_counts(counts).and_then(|()| {
            let slots = self.slots();
            let sum = Self::sum_in_rank_order(&Self::deposited(&slots)?)?;
            let total: i64 = counts.iter().sum();
            if rows(&sum) != total {
                return Err(usage(format!(
                    "reduce_scatter_sum: tensors have {} rows, counts sum to {total}",
                    rows(&sum)
                )));
            }
            let offset: i64 = counts[..self.rank].iter().sum();
            Ok(sum.narrow(0, offset, counts[self.rank]).copy())
        });
        self.finish(result)
    }

    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()> {
        let mine = if self.rank == root {
            Deposit::Tensor(tensor.copy())
        } else {
            Deposit::Empty
        };
        self.deposit(mine)?;
        let result = if root >= self.shared.world {
            Err(usage(format!(
                "broadcast: root {root} is not a rank of {}",
                self.shared.world
            )))
        } else {
            match &self.slots()[root] {
                Deposit::Tensor(t) if t.size() == tensor.size() => Ok(t.copy()),
                Deposit::Tensor(t) => Err(usage(format!(
                    "broadcast: root {root} has shape {:?}, rank {} expects {:?}",
                    t.size(),
                    self.rank,
                    tensor.size()
                ))),
                _ => Err(usage(format!(
                    "broadcast: root {root} entered a different collective"
                ))),
            }
        };
        let value = self.finish(result)?;
        tensor.copy_(&value);
        Ok(())
    }

    fn all_to_all(&self, input: &Tensor, send_counts: &[i64]) -> Result<(Tensor, Vec<i64>)> {
        self.deposit(Deposit::Split(input.copy(), send_counts.to_vec()))?;
        let result = self.check_counts(send_counts).and_then(|()| {
            let slots = self.slots();
            let mut parts = Vec::with_capacity(slots.len());
            let mut received = Vec::with_capacity(slots.len());
            for (p, d) in slots.iter().enumerate() {
                let Deposit::Split(t, sends) = d else {
                    return Err(usage(format!("rank {p} entered a different collective")));
                };
                if sends.len() != self.shared.world || sends.iter().sum::<i64>() != rows(t) {
                    return Err(usage(format!(
                        "all_to_all: rank {p} sends {sends:?} but has {} rows",
                        rows(t)
                    )));
                }
                let offset: i64 = sends[..self.rank].iter().sum();
                parts.push(t.narrow(0, offset, sends[self.rank]));
                received.push(sends[self.rank]);
            }
            let out = Tensor::f_cat(&parts, 0).map_err(|e| usage(format!("all_to_all: {e}")))?;
            Ok((out, received))
        });
        self.finish(result)
    }

    fn barrier(&self) -> Result<()> {
        self.wait()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// Runs `f(rank, collective)` on one thread per rank and returns the results in rank order.
    fn run<T: Send>(world: usize, f: impl Fn(usize, &LocalCollective) -> T + Sync) -> Vec<T> {
        let group = LocalGroup::new(world);
        let f = &f;
        std::thread::scope(|s| {
            let handles: Vec<_> = group
                .iter()
                .enumerate()
                .map(|(r, c)| s.spawn(move || f(r, c)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn floats(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(&t.flatten(0, -1)).unwrap()
    }

    #[test]
    fn all_reduce_sums_on_every_rank() {
        let out = run(3, |r, c| {
            let mut t = Tensor::from_slice(&[r as f32, 10.0 * r as f32 + 1.0]);
            c.all_reduce_sum(&mut t).unwrap();
            floats(&t)
        });
        for v in out {
            assert_eq!(v, vec![3.0, 33.0]);
        }
    }

    #[test]
    fn all_gather_with_uneven_and_empty_counts() {
        let counts = [2i64, 0, 1];
        let out = run(3, |r, c| {
            let local = Tensor::full([counts[r], 2], r as f64, (Kind::Float, Device::Cpu));
            let g = c.all_gather(&local, &counts).unwrap();
            (g.size(), floats(&g))
        });
        for (shape, v) in out {
            assert_eq!(shape, vec![3, 2]);
            assert_eq!(v, vec![0.0, 0.0, 0.0, 0.0, 2.0, 2.0]);
        }
    }

    #[test]
    fn all_gather_counts_helper() {
        let out = run(2, |r, c| {
            super::super::all_gather_counts(c, 5 + r as i64).unwrap()
        });
        assert_eq!(out, vec![vec![5, 6], vec![5, 6]]);
    }

    #[test]
    fn reduce_scatter_returns_own_rows_of_the_sum() {
        let counts = [1i64, 2];
        let out = run(2, |r, c| {
            // Rank r contributes row i = (r + 1) * (i + 1).
            let full = Tensor::from_slice(&[1.0f32, 2.0, 3.0]) * (r as f64 + 1.0);
            floats(&c.reduce_scatter_sum(&full.unsqueeze(1), &counts).unwrap())
        });
        assert_eq!(out, vec![vec![3.0], vec![6.0, 9.0]]);
    }

    #[test]
    fn broadcast_and_all_to_all() {
        let out = run(2, |r, c| {
            let mut t = Tensor::from_slice(&[r as i64 + 7]);
            c.broadcast(&mut t, 1).unwrap();
            // Rank 0 sends [0] to itself and [1, 2] to rank 1; rank 1 sends [10] to 0, nothing to 1.
            let (input, sends) = if r == 0 {
                (Tensor::from_slice(&[0i64, 1, 2]), vec![1, 2])
            } else {
                (Tensor::from_slice(&[10i64]), vec![1, 0])
            };
            let (got, recv) = c.all_to_all(&input, &sends).unwrap();
            (
                Vec::<i64>::try_from(&t).unwrap(),
                Vec::<i64>::try_from(&got).unwrap(),
                recv,
            )
        });
        assert_eq!(out[0], (vec![8], vec![0, 10], vec![1, 1]));
        assert_eq!(out[1], (vec![8], vec![1, 2], vec![2, 0]));
    }

    #[test]
    fn wrong_counts_fail_on_every_rank() {
        let out = run(2, |r, c| {
            let local = Tensor::zeros([r as i64 + 1, 1], (Kind::Float, Device::Cpu));
            c.all_gather(&local, &[1, 1])
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        for e in out {
            let e = e.unwrap_err();
            assert!(e.contains("rank 1 passed 2 rows, counts say 1"), "{e}");
        }
    }

    #[test]
    fn missing_peer_times_out_with_error() {
        let group = LocalGroup::with_timeout(2, Duration::from_millis(50));
        let e = group[0].barrier().unwrap_err();
        assert!(matches!(e, CollectiveError::Timeout { rank: 1, .. }), "{e}");
    }
}
