//! A CPU-only backend (the TCP ring) used by a worker whose tensors live on a GPU: every
//! operation copies its input to the host, runs there, and puts the result back on the
//! input's device. Used when NCCL is not an option (several workers sharing one GPU, or
//! `cluster.backend = "tcp"` on GPU machines).

use super::{Collective, Result};
use tch::{Device, Tensor};

pub struct HostStaged<C> {
    inner: C,
}

impl<C: Collective> HostStaged<C> {
    pub fn new(inner: C) -> Self {
        Self { inner }
    }

    pub fn inner(&self) -> &C {
        &self.inner
    }

    pub fn into_inner(self) -> C {
        self.inner
    }
}

fn host(t: &Tensor) -> Tensor {
    t.to_device(Device::Cpu).contiguous()
}

impl<C: Collective> Collective for HostStaged<C> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<()> {
        if tensor.device() == Device::Cpu {
            return self.inner.all_reduce_sum(tensor);
        }
        let mut cpu = host(tensor);
        self.inner.all_reduce_sum(&mut cpu)?;
        tensor.copy_(&cpu);
        Ok(())
    }

    fn all_gather(&self, local: &Tensor, counts: &[i64]) -> Result<Tensor> {
        Ok(self
            .inner
            .all_gather(&host(local), counts)?
            .to_device(local.device()))
    }

    fn reduce_scatter_sum(&self, full: &Tensor, counts: &[i64]) -> Result<Tensor> {
        Ok(self
            .inner
            .reduce_scatter_sum(&host(full), counts)?
            .to_device(full.device()))
    }

    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()> {
        if tensor.device() == Device::Cpu {
            return self.inner.broadcast(tensor, root);
        }
        let mut cpu = host(tensor);
        self.inner.broadcast(&mut cpu, root)?;
        tensor.copy_(&cpu);
        Ok(())
    }

    fn all_to_all(&self, input: &Tensor, send_counts: &[i64]) -> Result<(Tensor, Vec<i64>)> {
        let (out, counts) = self.inner.all_to_all(&host(input), send_counts)?;
        Ok((out.to_device(input.device()), counts))
    }

    fn all_to_all_known(
        &self,
        input: &Tensor,
        send_counts: &[i64],
        recv_counts: &[i64],
    ) -> Result<Tensor> {
        let out = self
            .inner
            .all_to_all_known(&host(input), send_counts, recv_counts)?;
        Ok(out.to_device(input.device()))
    }

    fn barrier(&self) -> Result<()> {
        self.inner.barrier()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::local::LocalGroup;
    use tch::Kind;

    /// On the CPU the wrapper is transparent: same results as the wrapped backend.
    #[test]
    fn staged_results_equal_the_inner_backend() {
        let group = LocalGroup::new(2);
        std::thread::scope(|s| {
            for coll in group {
                s.spawn(move || {
                    let c = HostStaged::new(coll);
                    let r = c.rank() as f32;
                    let mut t = Tensor::from_slice(&[r + 1.0, 2.0 * r]);
                    c.all_reduce_sum(&mut t).unwrap();
                    assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![3.0, 2.0]);
                    let g = c
                        .all_gather(
                            &Tensor::full([1, 2], r as f64, (Kind::Float, Device::Cpu)),
                            &[1, 1],
                        )
                        .unwrap();
                    assert_eq!(g.size(), vec![2, 2]);
                    assert_eq!(g.double_value(&[1, 0]), 1.0);
                });
            }
        });
    }
}
