//! `contrail k8s render|launch|delete`: the job's Kubernetes objects (docs/kubernetes.md).

use crate::args::{K8sCommand, K8sJob};
use anyhow::Context;
use contrail_k8s::apply;
use tokio::runtime::Runtime;

impl K8sJob {
    pub fn render(
        &self,
    ) -> anyhow::Result<(contrail_k8s::RenderOptions, Vec<contrail_k8s::Manifest>)> {
        let name = self
            .name
            .clone()
            .unwrap_or_else(|| contrail_k8s::default_name(&self.config));
        let shape = contrail_k8s::Shape::from_flags(
            self.workers,
            self.gpus_per_worker,
            self.nodes,
            self.gpus_per_node,
        )?;
        let mut opts = contrail_k8s::RenderOptions::new(&name, &self.image, shape);
        opts.namespace = self.namespace.clone();
        opts.coordinator_image = self.coordinator_image.clone();
        opts.cpus_per_gpu = self.cpus_per_gpu;
        opts.memory_per_gpu_gib = self.memory_per_gpu;
        opts.shm_per_gpu_gib = self.shm_per_gpu;
        opts.rdma_resources = self.rdma_resource.clone();
        opts.exclusive_topology = self.exclusive_topology.clone();
        opts.crd = self.crd;
        opts.host_network = self.host_network;
        opts.nccl_socket_ifname = self.nccl_socket_ifname.clone();
        opts.secret = self.secret.clone();
        opts.service_account = self.service_account.clone();
        if let Some(out) = &self.embed_out {
            opts.workload = contrail_k8s::Workload::Embed {
                args: crate::commands::embed_worker_flags(
                    out,
                    self.embed_tower,
                    self.embed_checkpoint.as_deref(),
                    self.embed_random_init,
                ),
            };
        }
        let (cfg, objs) = contrail_k8s::render_file(&self.config, &self.overrides, &opts)?;
        for w in contrail_k8s::render_warnings(&cfg, &opts) {
            eprintln!("warning: {w}");
        }
        Ok((opts, objs))
    }
}

pub fn run(rt: &Runtime, command: K8sCommand) -> anyhow::Result<()> {
    match command {
        K8sCommand::Render { job, out } => {
            let yaml = contrail_k8s::to_yaml(&job.render()?.1)?;
            match out {
                Some(path) => {
                    std::fs::write(&path, yaml).with_context(|| format!("writing {path}"))
                }
                None => {
                    print!("{yaml}");
                    Ok(())
                }
            }
        }
        K8sCommand::Launch { job } => {
            let (opts, objs) = job.render()?;
            for applied in rt.block_on(async {
                apply::apply(apply::default_client().await?, &opts.namespace, &objs).await
            })? {
                println!("applied {applied}");
            }
            println!("{}", apply::status_hint(&opts));
            Ok(())
        }
        K8sCommand::Delete { name, namespace } => {
            let deleted = rt.block_on(async {
                apply::delete(apply::default_client().await?, &namespace, &name).await
            })?;
            if deleted.is_empty() {
                println!("no objects of job {name:?} in namespace {namespace:?}");
            }
            for d in deleted {
                println!("deleted {d}");
            }
            Ok(())
        }
    }
}
