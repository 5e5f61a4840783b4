//! Rendered objects: YAML round trip into the typed structs, and what each object holds.

mod common;

use common::{cases, job, job_for, node_opts, opts, rdma, render_case};
use contrail_common::config::{Backend, JobConfig};
use contrail_k8s::apply::{self, FIELD_MANAGER};
use contrail_k8s::jobset::JobSet;
use contrail_k8s::{
    coordinator_url, default_name, from_yaml, render, to_yaml, validate_name, Crd, Manifest,
    RenderOptions, Shape, Workload, COLLECTIVE_PORT, EXCLUSIVE_TOPOLOGY_ANNOTATION, GRPC_PORT,
    HTTP_PORT, MAX_RESTARTS,
};
use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec};
use std::collections::BTreeMap;

#[test]
fn yaml_round_trip_gives_back_the_same_objects() {
    for o in cases() {
        let objs = render_case(&o);
        let yaml = to_yaml(&objs).unwrap();
        assert_eq!(yaml.matches("\n---\n").count() + 1, objs.len(), "{yaml}");
        let back = from_yaml(&yaml).unwrap();
        assert_eq!(back, objs, "{:?}: YAML round trip changed the objects", o);
        // And nothing the typed structs do not know is lost: YAML → JSON values agree.
        for (m, doc) in objs.iter().zip(serde_norway::Deserializer::from_str(&yaml)) {
            let v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
            assert_eq!(v, serde_json::to_value(m).unwrap());
        }
    }
}

#[test]
fn parse_rejects_unknown_kinds_and_fields() {
    let err = from_yaml("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n").unwrap_err();
    assert!(
        format!("{err:#}").contains("unsupported kind \"Pod\""),
        "{err:#}"
    );
    let js = to_yaml(&render_case(&opts(Crd::JobSet, 2, 0))).unwrap();
    let bad = js.replace("startupPolicyOrder", "startupOrder");
    assert!(
        from_yaml(&bad).is_err(),
        "a misspelt JobSet field was accepted"
    );
    let bad = js.replace("jobset.x-k8s.io/v1alpha2", "jobset.x-k8s.io/v1alpha1");
    assert!(
        from_yaml(&bad).is_err(),
        "a JobSet of another apiVersion was accepted"
    );
}

fn pod_spec(t: &PodTemplateSpec) -> &PodSpec {
    t.spec.as_ref().unwrap()
}

fn env(c: &Container) -> BTreeMap<String, String> {
    c.env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect()
}

/// One resource of a container's `requests` or `limits`, as its quantity string.
fn resource(c: &Container, which: &str, name: &str) -> Option<String> {
    let r = c.resources.as_ref()?;
    let map = match which {
        "requests" => r.requests.as_ref(),
        "limits" => r.limits.as_ref(),
        other => panic!("no resource list {other}"),
    }?;
    map.get(name).map(|q| q.0.clone())
}

fn labels(t: &PodTemplateSpec) -> BTreeMap<String, String> {
    t.metadata.as_ref().unwrap().labels.clone().unwrap()
}

fn is_subset(sel: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Pulls the coordinator and worker pod templates and the worker Job spec out of either flavour.
struct Parts {
    toml: String,
    coordinator: PodTemplateSpec,
    coordinator_selector: BTreeMap<String, String>,
    worker_job: k8s_openapi::api::batch::v1::JobSpec,
    jobset: Option<JobSet>,
}

fn parts(objs: &[Manifest]) -> Parts {
    let mut toml = None;
    let mut coordinator = None;
    let mut worker_job = None;
    let mut jobset = None;
    let mut coordinator_selector = None;
    for m in objs {
        match m {
            Manifest::ConfigMap(c) => toml = c.data.as_ref().unwrap().get("job.toml").cloned(),
            Manifest::Service(s) if m.name().ends_with("-coordinator") => {
                coordinator_selector = s.spec.as_ref().unwrap().selector.clone()
            }
            Manifest::Deployment(d) => {
                coordinator = Some(d.spec.as_ref().unwrap().template.clone())
            }
            Manifest::Job(j) => worker_job = j.spec.clone(),
            Manifest::JobSet(js) => {
                for rj in &js.spec.replicated_jobs {
                    let spec = rj.template.spec.clone().unwrap();
                    match rj.name.as_str() {
                        "coordinator" => coordinator = Some(spec.template),
                        "workers" => worker_job = Some(spec),
                        other => panic!("unexpected replicated job {other}"),
                    }
                }
                jobset = Some(js.clone());
            }
            _ => {}
        }
    }
    Parts {
        toml: toml.expect("no ConfigMap with job.toml"),
        coordinator: coordinator.expect("no coordinator pod"),
        coordinator_selector: coordinator_selector.expect("no coordinator Service"),
        worker_job: worker_job.expect("no worker Job"),
        jobset,
    }
}

#[test]
fn objects_carry_the_job_the_cluster_settings_and_the_failure_policy() {
    for o in cases() {
        let objs = render_case(&o);
        let p = parts(&objs);
        for m in &objs {
            assert_eq!(m.metadata().namespace.as_deref(), Some("ml"));
            assert!(m.name().starts_with("simclr-test"), "{}", m.name());
        }

        // The job file: world size = every rank of every pod, coordinator on every interface.
        let cfg = JobConfig::from_toml(&p.toml).unwrap();
        assert_eq!(
            cfg.cluster.world_size,
            o.shape.pods() * o.shape.ranks_per_pod()
        );
        assert_eq!(cfg.cluster.local_ranks, o.shape.ranks_per_pod());
        assert_eq!(cfg.cluster.grpc_addr, format!("0.0.0.0:{GRPC_PORT}"));
        assert_eq!(cfg.cluster.http_addr, format!("0.0.0.0:{HTTP_PORT}"));
        let mut expected = job_for(&o);
        expected.cluster = cfg.cluster.clone();
        assert_eq!(cfg, expected, "only cluster keys may change");

        // Coordinator: CPU only, the job file, ports, readiness on /healthz.
        let cs = pod_spec(&p.coordinator);
        let c = &cs.containers[0];
        // From the worker image by default: `contrail coordinator`.
        assert_eq!(c.image.as_ref(), Some(&o.image));
        assert_eq!(
            c.command.as_deref(),
            Some(&["contrail".to_string(), "coordinator".to_string()][..])
        );
        assert_eq!(
            c.args.as_deref(),
            Some(&["--config".to_string(), "/etc/contrail/job.toml".to_string()][..])
        );
        assert!(c.resources.is_none(), "the coordinator asks for no GPU");
        let ports: Vec<i32> = c.ports.iter().flatten().map(|p| p.container_port).collect();
        assert_eq!(ports, vec![GRPC_PORT, HTTP_PORT]);
        let probe = c
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(probe.path.as_deref(), Some("/healthz"));
        assert!(is_subset(&p.coordinator_selector, &labels(&p.coordinator)));
        assert!(!cs.host_network.unwrap_or(false));

        // Workers: an Indexed Job of one pod per node (or per one-rank worker), never retried
        // in place.
        let wj = &p.worker_job;
        assert_eq!(wj.completion_mode.as_deref(), Some("Indexed"));
        assert_eq!(wj.completions, Some(o.shape.pods() as i32));
        assert_eq!(wj.parallelism, Some(o.shape.pods() as i32));
        assert_eq!(wj.backoff_limit, Some(0));
        let ws = pod_spec(&wj.template);
        assert_eq!(ws.restart_policy.as_deref(), Some("Never"));
        let w = &ws.containers[0];
        let e = env(w);
        assert_eq!(e["CONTRAIL_COORDINATOR"], coordinator_url(&o));
        assert_eq!(
            e.get("NCCL_SOCKET_IFNAME"),
            o.nccl_socket_ifname.as_ref(),
            "NCCL_SOCKET_IFNAME only when asked for"
        );
        // The node worker: one rank per GPU of the pod, local rank i on the fixed port + i on
        // the pod network (declared), each on a free one on the node's network.
        let ranks = o.shape.ranks_per_pod();
        let port = if o.host_network { 0 } else { COLLECTIVE_PORT };
        let declared: Vec<i32> = w.ports.iter().flatten().map(|p| p.container_port).collect();
        if o.host_network {
            assert!(declared.is_empty());
        } else {
            assert_eq!(
                declared,
                (0..ranks as i32)
                    .map(|i| COLLECTIVE_PORT + i)
                    .collect::<Vec<_>>()
            );
        }
        assert_eq!(
            w.args.clone().unwrap(),
            [
                "worker".to_string(),
                "--coordinator".into(),
                coordinator_url(&o),
                "--local-ranks".into(),
                ranks.to_string(),
                "--bind".into(),
                format!("$(POD_IP):{port}"),
            ]
        );
        let gpus = o.shape.gpus_per_pod();
        assert_eq!(
            resource(w, "limits", "nvidia.com/gpu"),
            (gpus > 0).then(|| gpus.to_string())
        );
        assert_eq!(
            resource(w, "requests", "nvidia.com/gpu"),
            resource(w, "limits", "nvidia.com/gpu")
        );
        let shm = ws
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "dshm")
            .unwrap();
        assert_eq!(
            shm.empty_dir.as_ref().unwrap().medium.as_deref(),
            Some("Memory")
        );
        assert_eq!(
            shm.empty_dir
                .as_ref()
                .unwrap()
                .size_limit
                .as_ref()
                .map(|q| q.0.clone()),
            (o.shm_per_gpu_gib > 0).then(|| format!("{}Gi", ranks * o.shm_per_gpu_gib))
        );
        assert!(w
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == "dshm" && m.mount_path == "/dev/shm"));
        assert_eq!(ws.host_network.unwrap_or(false), o.host_network);
        assert_eq!(
            ws.dns_policy.as_deref(),
            o.host_network.then_some("ClusterFirstWithHostNet")
        );

        // Credentials only by reference, in every pod.
        for spec in [cs, ws] {
            assert_eq!(spec.service_account_name, o.service_account);
            let secrets: Vec<String> = spec.containers[0]
                .env_from
                .iter()
                .flatten()
                .filter_map(|f| f.secret_ref.as_ref().map(|s| s.name.clone()))
                .collect();
            assert_eq!(secrets, o.secret.iter().cloned().collect::<Vec<_>>());
        }
        let yaml = to_yaml(&objs).unwrap();
        for word in ["AWS_", "GOOGLE_", "AZURE_"] {
            assert!(!yaml.contains(word), "credentials in the manifests: {word}");
        }

        match o.crd {
            Crd::JobSet => {
                let js = p.jobset.unwrap();
                assert_eq!(js.metadata.name.as_deref(), Some("simclr-test"));
                let order: Vec<&str> = js
                    .spec
                    .replicated_jobs
                    .iter()
                    .map(|r| r.name.as_str())
                    .collect();
                assert_eq!(
                    order,
                    ["coordinator", "workers"],
                    "coordinator starts first"
                );
                assert_eq!(
                    js.spec.startup_policy.unwrap().startup_policy_order,
                    "InOrder"
                );
                assert_eq!(
                    js.spec.failure_policy.unwrap().max_restarts,
                    Some(MAX_RESTARTS)
                );
                assert_eq!(
                    pod_spec(&p.coordinator).restart_policy.as_deref(),
                    Some("Never")
                );
                // The DNS name JobSet gives the coordinator pod: <jobset>-<rjob>-0-0.<jobset>.
                assert_eq!(
                    coordinator_url(&o),
                    "http://simclr-test-coordinator-0-0.simclr-test:50051"
                );
                assert_eq!(js.spec.network.unwrap().enable_dns_hostnames, Some(true));
            }
            Crd::None => {
                let svc = objs
                    .iter()
                    .find_map(|m| match m {
                        Manifest::Service(s) if m.name() == "simclr-test-workers" => Some(s),
                        _ => None,
                    })
                    .expect("no headless worker Service");
                let spec = svc.spec.as_ref().unwrap();
                assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
                assert_eq!(ws.subdomain.as_deref(), Some("simclr-test-workers"));
                assert!(is_subset(
                    spec.selector.as_ref().unwrap(),
                    &labels(&wj.template)
                ));
                let dep = objs
                    .iter()
                    .find_map(|m| match m {
                        Manifest::Deployment(d) => Some(d),
                        _ => None,
                    })
                    .unwrap();
                let ds = dep.spec.as_ref().unwrap();
                assert_eq!(ds.replicas, Some(1));
                assert!(is_subset(
                    ds.selector.match_labels.as_ref().unwrap(),
                    &labels(&ds.template)
                ));
                // Workers dial the coordinator's Service.
                assert_eq!(coordinator_url(&o), "http://simclr-test-coordinator:50051");
            }
        }
    }
}

#[test]
fn render_refuses_what_cannot_run() {
    let cfg = job();
    let o = opts(Crd::JobSet, 2, 0);
    let mut bad = o.clone();
    bad.name = "Bad_Name".into();
    assert!(format!("{:#}", render(&cfg, &bad).unwrap_err()).contains("--name"));
    let mut bad = o.clone();
    bad.shape = Shape::Workers {
        workers: 0,
        gpus_per_worker: 0,
    };
    assert!(format!("{:#}", render(&cfg, &bad).unwrap_err()).contains("--workers"));
    // world_size 3 does not divide global_batch 256 by micro_batch 32 × 3.
    let mut bad = o.clone();
    bad.shape = Shape::Workers {
        workers: 3,
        gpus_per_worker: 0,
    };
    let e = format!("{:#}", render(&cfg, &bad).unwrap_err());
    assert!(e.contains("train.global_batch"), "{e}");
    // Nor does 3 nodes × 8 GPUs = 24 ranks, which the message names.
    let mut nccl = cfg.clone();
    nccl.cluster.backend = Backend::Nccl;
    let e = format!(
        "{:#}",
        render(&nccl, &node_opts(Crd::JobSet, 3, 8)).unwrap_err()
    );
    assert!(
        e.contains("world_size=24") && e.contains("--nodes 3 × --gpus-per-node 8"),
        "{e}"
    );
    // An NCCL job without GPUs.
    let mut nccl = cfg.clone();
    nccl.cluster.backend = Backend::Nccl;
    let e = format!("{:#}", render(&nccl, &o).unwrap_err());
    assert!(e.contains("--gpus-per-worker"), "{e}");
}

#[test]
fn names() {
    assert_eq!(default_name("configs/local-simclr.toml"), "local-simclr");
    assert_eq!(default_name("/x/My_Job.v2.toml"), "my-job-v2");
    assert_eq!(default_name("2024.toml"), "contrail-2024");
    validate_name(&default_name(&"a".repeat(100))).unwrap();
    for bad in ["", "-a", "a-", "A", "a_b", "1abc", &"a".repeat(41)] {
        assert!(validate_name(bad).is_err(), "{bad:?} accepted");
    }
    validate_name(&"a".repeat(40)).unwrap();
}

#[test]
fn apply_plan_uses_the_contrail_field_manager_and_the_right_endpoints() {
    let pp = apply::apply_params();
    assert_eq!(pp.field_manager.as_deref(), Some(FIELD_MANAGER));
    assert!(
        !pp.force,
        "conflicts with other managers are reported, not taken over"
    );
    for crd in [Crd::JobSet, Crd::None] {
        let objs = render_case(&opts(crd, 2, 1));
        let plan = apply::to_dynamic(&objs).unwrap();
        let got: Vec<(String, String, String)> = plan
            .iter()
            .map(|(ar, obj)| {
                assert_eq!(obj.types.as_ref().unwrap().api_version, ar.api_version);
                assert_eq!(obj.types.as_ref().unwrap().kind, ar.kind);
                (
                    ar.api_version.clone(),
                    ar.plural.clone(),
                    obj.metadata.name.clone().unwrap(),
                )
            })
            .collect();
        let want: Vec<(&str, &str, &str)> = match crd {
            Crd::JobSet => vec![
                ("v1", "secrets", "simclr-test-token"),
                ("v1", "configmaps", "simclr-test-config"),
                ("v1", "services", "simclr-test-coordinator"),
                ("jobset.x-k8s.io/v1alpha2", "jobsets", "simclr-test"),
            ],
            Crd::None => vec![
                ("v1", "secrets", "simclr-test-token"),
                ("v1", "configmaps", "simclr-test-config"),
                ("v1", "services", "simclr-test-coordinator"),
                ("apps/v1", "deployments", "simclr-test-coordinator"),
                ("v1", "services", "simclr-test-workers"),
                ("batch/v1", "jobs", "simclr-test-workers"),
            ],
        };
        let want: Vec<(String, String, String)> = want
            .into_iter()
            .map(|(a, b, c)| (a.into(), b.into(), c.into()))
            .collect();
        assert_eq!(got, want);
        // Every applied object carries the labels `delete` selects on.
        for (_, obj) in &plan {
            let l = obj.metadata.labels.as_ref().unwrap();
            let sel = apply::job_selector("simclr-test");
            for kv in sel.split(',') {
                let (k, v) = kv.split_once('=').unwrap();
                assert_eq!(l.get(k).map(String::as_str), Some(v), "{kv}");
            }
        }
    }
}

/// The client (TLS set-up included) builds from a kubeconfig, and an unreachable API server
/// gives an error naming what failed rather than a hang or a panic.
#[test]
fn apply_against_an_unreachable_server_fails_cleanly() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener); // nothing listens there now
    let url: http::Uri = format!("https://127.0.0.1:{port}").parse().unwrap();
    let mut config = kube::Config::new(url);
    config.connect_timeout = Some(std::time::Duration::from_secs(5));
    let o: RenderOptions = opts(Crd::None, 1, 0);
    let objs = render_case(&o);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt
        .block_on(async {
            let client = apply::client_from(config)?;
            apply::apply(client, "ml", &objs).await
        })
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("applying Secret simclr-test-token"),
        "{err:#}"
    );
}

#[test]
fn local_paths_in_the_job_file_are_warned_about() {
    let mut cfg = job();
    cfg.data.url = "file://./run/data".into();
    cfg.checkpoint.url = "run/checkpoints".into();
    let w = contrail_k8s::warnings(&cfg);
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(
        w[0].starts_with("data.url") && w[1].starts_with("checkpoint.url"),
        "{w:?}"
    );
    cfg.data.url = "s3://bucket/shards".into();
    cfg.checkpoint.url = "gs://bucket/ckpt".into();
    assert!(contrail_k8s::warnings(&cfg).is_empty());
}

#[test]
fn render_file_reads_the_job_file_with_overrides() {
    let path = common::workspace_root().join("configs/local-simclr.toml");
    let o = opts(Crd::None, 8, 0);
    let (cfg, objs) = contrail_k8s::render_file(
        path.to_str().unwrap(),
        &["train.global_batch=256".to_string()],
        &o,
    )
    .unwrap();
    assert_eq!(cfg.train.global_batch, 256);
    assert_eq!(objs, render(&cfg, &o).unwrap());
    let e = contrail_k8s::render_file("/nonexistent/job.toml", &[], &o).unwrap_err();
    assert!(format!("{e:#}").contains("reading job file /nonexistent/job.toml"));
}

/// The job file is loaded with the ranks it will run with: a `min_workers` of 56 in a file
/// whose own `world_size` is 2 renders for 8 nodes × 8 GPUs, and a batch that does not divide
/// by the 64 ranks is an error that names them.
#[test]
fn render_file_checks_the_job_file_against_the_ranks() {
    let path = common::workspace_root().join("configs/local-simclr.toml");
    let path = path.to_str().unwrap();
    let file = JobConfig::from_file(path, &[]).unwrap();
    assert_eq!(file.cluster.world_size, 2, "the file's own world size");
    let o = node_opts(Crd::JobSet, 8, 8);
    let set = |kv: &[&str]| kv.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let (cfg, objs) = contrail_k8s::render_file(
        path,
        &set(&[
            "train.global_batch=2048",
            "cluster.backend=nccl",
            "cluster.min_workers=56",
        ]),
        &o,
    )
    .unwrap();
    assert_eq!((cfg.cluster.world_size, cfg.cluster.local_ranks), (64, 8));
    let rendered = JobConfig::from_toml(&parts(&objs).toml).unwrap();
    assert_eq!(
        (rendered.cluster.world_size, rendered.cluster.min_workers),
        (64, 56)
    );
    let e = contrail_k8s::render_file(
        path,
        &set(&["train.global_batch=256", "cluster.backend=nccl"]),
        &o,
    )
    .unwrap_err();
    let e = format!("{e:#}");
    assert!(
        e.contains("world_size=64") && e.contains("--nodes 8 × --gpus-per-node 8"),
        "{e}"
    );
    assert!(e.contains("train.global_batch"), "{e}");
}

#[test]
fn a_coordinator_image_runs_the_coordinator_binary() {
    let mut o = cases().remove(0);
    o.coordinator_image = Some("registry.example/contrail-coordinator:1".into());
    let objs = render_case(&o);
    let p = parts(&objs);
    let c = &pod_spec(&p.coordinator).containers[0];
    assert_eq!(c.image, o.coordinator_image);
    assert_eq!(
        c.command.as_deref(),
        Some(&["contrail-coordinator".to_string()][..])
    );
    // The workers keep the worker image.
    let w = &pod_spec(&p.worker_job.template).containers[0];
    assert_eq!(w.image.as_ref(), Some(&o.image));
}

/// An export renders the same objects, but the worker pods run `contrail embed-worker` with the
/// export's flags, and the job file trains nothing (no online evaluation, any worker count).
#[test]
fn an_embedding_export_runs_embed_workers() {
    for crd in [Crd::JobSet, Crd::None] {
        let mut o = opts(crd, 3, 0);
        o.workload = Workload::Embed {
            args: ["--out", "s3://bucket/emb", "--tower", "both"]
                .map(String::from)
                .to_vec(),
        };
        let mut cfg = job();
        cfg.eval.url = "s3://bucket/held-out".into();
        let p = parts(&render(&cfg, &o).unwrap());
        let spec = pod_spec(&p.worker_job.template);
        let args = spec.containers[0].args.clone().unwrap();
        assert_eq!(
            args,
            [
                "embed-worker",
                "--out",
                "s3://bucket/emb",
                "--tower",
                "both"
            ],
            "{crd:?}"
        );
        assert!(env(&spec.containers[0]).contains_key("CONTRAIL_COORDINATOR"));
        let rendered = JobConfig::from_toml(&p.toml).unwrap();
        assert_eq!(rendered.cluster.world_size, 3);
        assert_eq!(rendered.eval.url, "");
        assert_eq!(rendered.train.global_batch, 3 * rendered.train.micro_batch);
        // Training still runs `contrail worker`.
        let train = parts(&render(&job(), &opts(crd, 2, 0)).unwrap());
        let args = pod_spec(&train.worker_job.template).containers[0]
            .args
            .clone()
            .unwrap();
        assert_eq!(args[0], "worker");
    }
}

/// The job token reaches the coordinator and every worker from the rendered Secret, never
/// from the ConfigMap; each render without a fixed token makes a new one.
#[test]
fn the_job_token_lives_in_a_secret_that_every_pod_reads() {
    for o in cases() {
        let objs = render_case(&o);
        let secret = objs
            .iter()
            .find_map(|m| match m {
                Manifest::Secret(s) => Some(s.clone()),
                _ => None,
            })
            .expect("a Secret");
        assert_eq!(secret.metadata.name.as_deref(), Some("simclr-test-token"));
        assert_eq!(
            secret.string_data.as_ref().unwrap()["token"],
            common::TEST_TOKEN
        );
        let p = parts(&objs);
        assert!(!p.toml.contains(common::TEST_TOKEN));
        let pods = [&p.coordinator, &p.worker_job.template];
        for pod in pods {
            let c = &pod_spec(pod).containers[0];
            let from = c
                .env
                .as_ref()
                .unwrap()
                .iter()
                .find(|e| e.name == "CONTRAIL_JOB_TOKEN")
                .and_then(|e| e.value_from.as_ref())
                .and_then(|v| v.secret_key_ref.as_ref())
                .unwrap_or_else(|| panic!("{} has no CONTRAIL_JOB_TOKEN from a Secret", c.name));
            assert_eq!(
                (from.name.as_str(), from.key.as_str()),
                ("simclr-test-token", "token")
            );
        }
    }
    let mut o = opts(Crd::JobSet, 2, 0);
    o.job_token = None;
    let token = |objs: Vec<Manifest>| match &objs[0] {
        Manifest::Secret(s) => s.string_data.as_ref().unwrap()["token"].clone(),
        other => panic!("the first object is a {}", other.kind()),
    };
    let (a, b) = (token(render_case(&o)), token(render_case(&o)));
    assert_ne!(a, b);
    assert_eq!(a.len(), 64);
    o.job_token = Some("short".into());
    assert!(format!("{:#}", render(&job(), &o).unwrap_err()).contains("at least 16"));
}

/// `cluster.min_workers > 0` (MoE too: its survivors keep the experts' replicas
/// or roll back, and a replacement joins with a replica): a failed worker pod is replaced on
/// its own (per-index retries, a new pod only once the old one terminated) instead of failing
/// the worker Job, on CPUs and GPUs (NCCL) alike; without it one failure fails the Job as
/// before. Both pass the strict schema check in `schema.rs` through `cases()`.
#[test]
fn min_workers_replaces_failed_worker_pods_one_by_one() {
    for crd in [Crd::JobSet, Crd::None] {
        let o = opts(crd, 3, 0);
        let mut cfg = job();
        cfg.train.global_batch = 48;
        cfg.train.micro_batch = 8;
        cfg.cluster.min_workers = 2;
        let spec = parts(&render(&cfg, &o).unwrap()).worker_job;
        assert_eq!(spec.backoff_limit_per_index, Some(3), "{crd:?}");
        assert_eq!(spec.pod_replacement_policy.as_deref(), Some("Failed"));
        assert_eq!(spec.backoff_limit, None);

        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/local-moe.toml"),
        )
        .unwrap();
        let mut moe = JobConfig::from_toml(&text).unwrap();
        assert!(moe.moe.experts > 0);
        moe.cluster.min_workers = 1;
        let spec = parts(&render(&moe, &opts(crd, 2, 0)).unwrap()).worker_job;
        assert_eq!(spec.backoff_limit_per_index, Some(3), "MoE {crd:?}");

        cfg.cluster.min_workers = 0;
        let spec = parts(&render(&cfg, &o).unwrap()).worker_job;
        assert_eq!(
            (spec.backoff_limit, spec.backoff_limit_per_index),
            (Some(0), None)
        );

        // NCCL jobs regroup too (a fresh communicator per generation).
        let o = opts(crd, 3, 1);
        cfg.cluster.min_workers = 2;
        cfg.cluster.backend = Backend::Nccl;
        let spec = parts(&render(&cfg, &o).unwrap()).worker_job;
        assert_eq!(
            (spec.backoff_limit, spec.backoff_limit_per_index),
            (None, Some(3)),
            "NCCL {crd:?}"
        );
    }
}

/// With a journal (`checkpoint.url` set, or `cluster.journal_url`), the JobSet's coordinator
/// pod is replaced when it crashes (it takes the job over from the journal), but a coordinator
/// that exits 1 because the job failed fails the Job at once; without one, as before, any
/// coordinator failure fails the Job.
#[test]
fn a_journaled_coordinator_pod_is_replaced_after_a_crash_only() {
    let coordinator_job = |cfg: &contrail_common::JobConfig| {
        let objs = render(cfg, &opts(Crd::JobSet, 2, 0)).unwrap();
        let js = parts(&objs).jobset.expect("a JobSet");
        js.spec
            .replicated_jobs
            .iter()
            .find(|rj| rj.name == "coordinator")
            .and_then(|rj| rj.template.spec.clone())
            .unwrap()
    };
    let mut cfg = job();
    cfg.checkpoint.url = "s3://bucket/run".into();
    let spec = coordinator_job(&cfg);
    assert_eq!(spec.backoff_limit, Some(3));
    let rule = &spec.pod_failure_policy.expect("a pod failure policy").rules[0];
    assert_eq!(rule.action, "FailJob");
    let codes = rule.on_exit_codes.as_ref().unwrap();
    assert_eq!(
        (codes.operator.as_str(), codes.values.as_slice()),
        ("In", &[1][..])
    );

    cfg.cluster.journal_url = "off".into();
    let spec = coordinator_job(&cfg);
    assert_eq!(spec.backoff_limit, Some(0));
    assert!(spec.pod_failure_policy.is_none());
}

/// The worker pod of a render (either flavour).
fn worker_pod_of(o: &RenderOptions) -> PodSpec {
    pod_spec(&parts(&render_case(o)).worker_job.template).clone()
}

fn arg_after(c: &Container, flag: &str) -> String {
    let args = c.args.clone().unwrap();
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    args[i + 1].clone()
}

fn shm_size(spec: &PodSpec) -> Option<String> {
    let v = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "dshm")
        .expect("a dshm volume");
    let e = v.empty_dir.as_ref().expect("dshm is an emptyDir");
    assert_eq!(e.medium.as_deref(), Some("Memory"));
    e.size_limit.as_ref().map(|q| q.0.clone())
}

fn resource_names(c: &Container, which: &str) -> Vec<String> {
    let r = c.resources.as_ref().unwrap();
    let map = if which == "requests" {
        r.requests.as_ref()
    } else {
        r.limits.as_ref()
    };
    map.unwrap().keys().cloned().collect()
}

/// `--nodes 8 --gpus-per-node 8`: 8 pods, one per node, each with 8 GPUs running 8 ranks
/// (`--local-ranks 8`), CPU and memory sized per GPU, /dev/shm for 8 ranks; the job file's
/// world size is 64 ranks.
#[test]
fn one_pod_per_node_runs_one_rank_per_gpu() {
    for crd in [Crd::JobSet, Crd::None] {
        let o = node_opts(crd, 8, 8);
        let p = parts(&render_case(&o));
        let cfg = JobConfig::from_toml(&p.toml).unwrap();
        assert_eq!(cfg.cluster.world_size, 64, "{crd:?}");
        assert_eq!(cfg.cluster.local_ranks, 8, "8 nodes of 8 ranks");
        assert_eq!(
            (p.worker_job.completions, p.worker_job.parallelism),
            (Some(8), Some(8))
        );
        let ws = pod_spec(&p.worker_job.template);
        assert_eq!(ws.containers.len(), 1, "one container runs every rank");
        let w = &ws.containers[0];
        assert_eq!(arg_after(w, "--local-ranks"), "8");
        assert_eq!(arg_after(w, "--coordinator"), coordinator_url(&o));
        // Local rank i listens on 29500 + i, each port declared under its own name.
        assert_eq!(
            arg_after(w, "--bind"),
            format!("$(POD_IP):{COLLECTIVE_PORT}")
        );
        let ports: Vec<(String, i32)> = w
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.clone().unwrap(), p.container_port))
            .collect();
        assert_eq!(ports.len(), 8);
        assert_eq!(ports[0], ("collective-0".to_string(), COLLECTIVE_PORT));
        assert_eq!(ports[7], ("collective-7".to_string(), COLLECTIVE_PORT + 7));

        assert_eq!(
            resource(w, "limits", "nvidia.com/gpu").as_deref(),
            Some("8")
        );
        assert_eq!(
            resource(w, "requests", "nvidia.com/gpu").as_deref(),
            Some("8")
        );
        assert_eq!(resource(w, "requests", "cpu").as_deref(), Some("64"));
        assert_eq!(resource(w, "limits", "cpu"), None, "no CPU limit");
        // 8 × (64 GiB + 8 GiB of /dev/shm, which is charged to the pod).
        assert_eq!(resource(w, "requests", "memory").as_deref(), Some("576Gi"));
        assert_eq!(resource(w, "limits", "memory").as_deref(), Some("576Gi"));
        assert_eq!(shm_size(ws).as_deref(), Some("64Gi"));
        // No RDMA device and no extra capability unless asked for.
        assert_eq!(
            resource_names(w, "requests"),
            ["cpu", "memory", "nvidia.com/gpu"]
        );
        assert_eq!(resource_names(w, "limits"), ["memory", "nvidia.com/gpu"]);
        assert!(w.security_context.is_none());

        // One pod per node: no two worker pods of this job on one hostname.
        let anti = ws
            .affinity
            .as_ref()
            .and_then(|a| a.pod_anti_affinity.as_ref())
            .and_then(|a| {
                a.required_during_scheduling_ignored_during_execution
                    .as_ref()
            })
            .expect("a required pod anti-affinity");
        assert_eq!(anti.len(), 1);
        assert_eq!(anti[0].topology_key, "kubernetes.io/hostname");
        let sel = anti[0]
            .label_selector
            .as_ref()
            .unwrap()
            .match_labels
            .clone()
            .unwrap();
        assert!(is_subset(&sel, &labels(&p.worker_job.template)));
        assert_eq!(sel["app.kubernetes.io/instance"], "simclr-test");
        assert_eq!(sel["app.kubernetes.io/component"], "worker");
        assert!(
            !is_subset(&sel, &labels(&p.coordinator)),
            "the coordinator may share a node with a worker"
        );
    }

    // `--workers 8 --gpus-per-worker 1`: one rank per pod on the fixed port, sized for one GPU,
    // and no anti-affinity (several may share a node).
    let ws = worker_pod_of(&opts(Crd::JobSet, 8, 1));
    let w = &ws.containers[0];
    assert_eq!(arg_after(w, "--local-ranks"), "1");
    assert_eq!(
        arg_after(w, "--bind"),
        format!("$(POD_IP):{COLLECTIVE_PORT}")
    );
    assert_eq!(
        resource(w, "limits", "nvidia.com/gpu").as_deref(),
        Some("1")
    );
    assert_eq!(resource(w, "requests", "cpu").as_deref(), Some("8"));
    assert_eq!(resource(w, "limits", "memory").as_deref(), Some("72Gi"));
    assert_eq!(shm_size(&ws).as_deref(), Some("8Gi"));
    assert!(ws.affinity.is_none());

    // A CPU pod asks for nothing (it fits any node) but still gets one rank's /dev/shm.
    let ws = worker_pod_of(&opts(Crd::JobSet, 2, 0));
    assert!(ws.containers[0].resources.is_none());
    assert_eq!(arg_after(&ws.containers[0], "--local-ranks"), "1");
    assert_eq!(shm_size(&ws).as_deref(), Some("8Gi"));
    assert!(ws.affinity.is_none());
}

/// `--cpus-per-gpu`, `--memory-per-gpu` and `--shm-per-gpu` scale with the pod's GPUs; 0
/// leaves the request (or the size limit) out.
#[test]
fn sizing_flags_scale_with_the_gpus_of_the_pod() {
    let mut o = node_opts(Crd::JobSet, 2, 4);
    o.cpus_per_gpu = 12;
    o.memory_per_gpu_gib = 120;
    o.shm_per_gpu_gib = 16;
    let ws = worker_pod_of(&o);
    let w = &ws.containers[0];
    assert_eq!(resource(w, "requests", "cpu").as_deref(), Some("48"));
    assert_eq!(resource(w, "requests", "memory").as_deref(), Some("544Gi"));
    assert_eq!(resource(w, "limits", "memory").as_deref(), Some("544Gi"));
    assert_eq!(shm_size(&ws).as_deref(), Some("64Gi"));
    assert_eq!(arg_after(w, "--local-ranks"), "4");

    o.cpus_per_gpu = 0;
    o.memory_per_gpu_gib = 0;
    o.shm_per_gpu_gib = 0;
    let ws = worker_pod_of(&o);
    let w = &ws.containers[0];
    assert_eq!(resource_names(w, "requests"), ["nvidia.com/gpu"]);
    assert_eq!(resource_names(w, "limits"), ["nvidia.com/gpu"]);
    assert_eq!(shm_size(&ws), None);
}

/// `--rdma-resource NAME=COUNT` puts the device in the worker pods' requests and limits and
/// gives the container IPC_LOCK; without it neither is there. The coordinator never gets them.
#[test]
fn rdma_resources_add_the_devices_and_ipc_lock_when_asked() {
    for crd in [Crd::JobSet, Crd::None] {
        let mut o = node_opts(crd, 2, 8);
        o.rdma_resources = vec![
            "rdma/rdma_shared_device_a=1".parse().unwrap(),
            "nvidia.com/hostdev=8".parse().unwrap(),
        ];
        let p = parts(&render_case(&o));
        let w = &pod_spec(&p.worker_job.template).containers[0];
        for which in ["requests", "limits"] {
            assert_eq!(
                resource(w, which, "rdma/rdma_shared_device_a").as_deref(),
                Some("1"),
                "{which}"
            );
            assert_eq!(
                resource(w, which, "nvidia.com/hostdev").as_deref(),
                Some("8"),
                "{which}"
            );
            assert_eq!(resource(w, which, "nvidia.com/gpu").as_deref(), Some("8"));
        }
        let caps = w
            .security_context
            .as_ref()
            .and_then(|s| s.capabilities.as_ref())
            .expect("capabilities");
        assert_eq!(caps.add.as_deref(), Some(&["IPC_LOCK".to_string()][..]));
        assert!(caps.drop.is_none());
        let c = &pod_spec(&p.coordinator).containers[0];
        assert!(c.security_context.is_none() && c.resources.is_none());

        o.rdma_resources.clear();
        let w = &worker_pod_of(&o).containers[0];
        assert!(w.security_context.is_none());
        assert_eq!(resource(w, "limits", "rdma/rdma_shared_device_a"), None);
        assert!(!to_yaml(&render_case(&o)).unwrap().contains("IPC_LOCK"));
    }

    // What is refused: a CPU job, the same device twice, and names that are no device.
    let mut o = opts(Crd::JobSet, 2, 0);
    o.rdma_resources = vec![rdma("rdma/rdma_shared_device_a", 1)];
    let e = format!("{:#}", render(&job(), &o).unwrap_err());
    assert!(e.contains("--rdma-resource") && e.contains("CPU"), "{e}");
    let mut o = node_opts(Crd::JobSet, 2, 8);
    o.rdma_resources = vec![rdma("nvidia.com/hostdev", 8), rdma("nvidia.com/hostdev", 4)];
    let e = format!("{:#}", render(&job_for(&o), &o).unwrap_err());
    assert!(e.contains("given twice"), "{e}");
    assert_eq!(
        "rdma/rdma_shared_device_a=1"
            .parse::<contrail_k8s::RdmaResource>()
            .unwrap(),
        rdma("rdma/rdma_shared_device_a", 1)
    );
    for bad in [
        "rdma/rdma_shared_device_a",
        "rdma_shared_device_a=1",
        "rdma/x=0",
        "rdma/x=-1",
        "rdma/x=two",
        "nvidia.com/gpu=8",
        "kubernetes.io/x=1",
        "RDMA/x=1",
        "rdma/=1",
    ] {
        assert!(
            bad.parse::<contrail_k8s::RdmaResource>().is_err(),
            "{bad:?} accepted"
        );
    }
}

/// `--exclusive-topology LABEL` annotates the `workers` ReplicatedJob's template only (JobSet
/// then keeps all worker pods in one domain of LABEL, which no other JobSet job shares); the
/// JobSet and the coordinator's Job stay unannotated. Without the flag there is no annotation.
#[test]
fn exclusive_placement_annotates_the_workers_replicated_job_only() {
    let label = "topology.example.com/block";
    let mut o = node_opts(Crd::JobSet, 8, 8);
    o.exclusive_topology = Some(label.into());
    let objs = render_case(&o);
    let js = parts(&objs).jobset.unwrap();
    let annotations = |name: &str| {
        js.spec
            .replicated_jobs
            .iter()
            .find(|rj| rj.name == name)
            .unwrap()
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.clone())
    };
    assert_eq!(
        annotations("workers"),
        Some(BTreeMap::from([(
            EXCLUSIVE_TOPOLOGY_ANNOTATION.to_string(),
            label.to_string()
        )]))
    );
    assert_eq!(
        EXCLUSIVE_TOPOLOGY_ANNOTATION,
        "alpha.jobset.sigs.k8s.io/exclusive-topology"
    );
    assert_eq!(annotations("coordinator"), None);
    assert!(js.metadata.annotations.is_none());
    let yaml = to_yaml(&objs).unwrap();
    assert_eq!(yaml.matches("exclusive-topology").count(), 1, "{yaml}");

    o.exclusive_topology = None;
    let yaml = to_yaml(&render_case(&o)).unwrap();
    assert!(!yaml.contains("exclusive-topology"));

    // What is refused: the built-in kinds have no exclusive placement; the hostname label
    // would put every worker pod on one node; a key that is no label key.
    let mut bad = node_opts(Crd::None, 8, 8);
    bad.exclusive_topology = Some(label.into());
    let e = format!("{:#}", render(&job_for(&bad), &bad).unwrap_err());
    assert!(e.contains("--crd jobset"), "{e}");
    let mut bad = node_opts(Crd::JobSet, 8, 8);
    bad.exclusive_topology = Some("kubernetes.io/hostname".into());
    let e = format!("{:#}", render(&job_for(&bad), &bad).unwrap_err());
    assert!(e.contains("on one node"), "{e}");
    let mut one = node_opts(Crd::JobSet, 1, 8);
    one.exclusive_topology = Some("kubernetes.io/hostname".into());
    render(&job_for(&one), &one).unwrap();
    for key in ["", "rack label", "a/b/c", "Bad.Domain/rack", "rack-"] {
        bad.exclusive_topology = Some(key.into());
        assert!(
            render(&job_for(&bad), &bad).is_err(),
            "label key {key:?} accepted"
        );
    }
}

/// The shape flags: `--nodes` with `--gpus-per-node`, or `--workers` with `--gpus-per-worker
/// 0|1`, never both, and errors that say what to use instead.
#[test]
fn the_job_shape_comes_from_exactly_one_pair_of_flags() {
    let shape = Shape::from_flags;
    assert_eq!(
        shape(None, None, Some(8), Some(8)).unwrap(),
        Shape::Nodes {
            nodes: 8,
            gpus_per_node: 8
        }
    );
    assert_eq!(
        shape(Some(4), None, None, None).unwrap(),
        Shape::Workers {
            workers: 4,
            gpus_per_worker: 0
        }
    );
    assert_eq!(
        shape(Some(4), Some(1), None, None).unwrap(),
        Shape::Workers {
            workers: 4,
            gpus_per_worker: 1
        }
    );
    let s = Shape::Nodes {
        nodes: 8,
        gpus_per_node: 8,
    };
    assert_eq!(
        (
            s.pods(),
            s.gpus_per_pod(),
            s.ranks_per_pod(),
            s.world_size()
        ),
        (8, 8, 8, 64)
    );
    assert!(s.one_pod_per_node());
    let s = Shape::Workers {
        workers: 8,
        gpus_per_worker: 1,
    };
    assert_eq!(
        (
            s.pods(),
            s.gpus_per_pod(),
            s.ranks_per_pod(),
            s.world_size()
        ),
        (8, 1, 1, 8)
    );
    assert!(!s.one_pod_per_node());

    for (flags, expect) in [
        ((Some(8), None, Some(8), Some(8)), "mutually exclusive"),
        ((None, None, None, None), "--nodes M --gpus-per-node G"),
        ((None, None, Some(8), None), "--nodes needs --gpus-per-node"),
        ((None, None, Some(8), Some(0)), "use --workers N"),
        ((None, None, Some(0), Some(8)), "--nodes must be at least 1"),
        ((Some(0), None, None, None), "--workers must be at least 1"),
        (
            (Some(2), Some(8), None, None),
            "--nodes M --gpus-per-node 8",
        ),
        (
            (Some(2), None, None, Some(8)),
            "--gpus-per-node goes with --nodes",
        ),
        (
            (None, Some(1), Some(2), Some(8)),
            "--gpus-per-worker goes with --workers",
        ),
        ((None, None, Some(u32::MAX), Some(8)), "world_size"),
        ((None, None, Some(2), Some(257)), "at most 256"),
    ] {
        let (w, gw, n, gn) = flags;
        let e = format!("{:#}", shape(w, gw, n, gn).unwrap_err());
        assert!(e.contains(expect), "{flags:?}: {e}");
    }
}

/// `cluster.min_workers` keeps counting ranks with one pod per node: it is checked against
/// nodes × GPUs, the worker pods are still replaced one by one, and a value a single lost pod
/// would break is warned about.
#[test]
fn min_workers_counts_ranks_with_one_pod_per_node() {
    for crd in [Crd::JobSet, Crd::None] {
        let o = node_opts(crd, 2, 8);
        let mut cfg = job_for(&o);
        cfg.data.url = "s3://bucket/shards".into();
        cfg.checkpoint.url = "s3://bucket/run".into();
        cfg.cluster.min_workers = 8;
        let p = parts(&render(&cfg, &o).unwrap());
        let rendered = JobConfig::from_toml(&p.toml).unwrap();
        assert_eq!(
            (rendered.cluster.world_size, rendered.cluster.min_workers),
            (16, 8)
        );
        assert_eq!(p.worker_job.backoff_limit_per_index, Some(3), "{crd:?}");
        assert_eq!(
            p.worker_job.pod_replacement_policy.as_deref(),
            Some("Failed")
        );
        assert!(contrail_k8s::render_warnings(&cfg, &o).is_empty());

        // 16 ranks: 9 survivors are more than one lost pod leaves (8).
        cfg.cluster.min_workers = 9;
        render(&cfg, &o).unwrap();
        let w = contrail_k8s::render_warnings(&cfg, &o);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("counts ranks") && w[0].contains("≤ 8"),
            "{w:?}"
        );

        // More than the 16 ranks there are: refused.
        cfg.cluster.min_workers = 17;
        let e = format!("{:#}", render(&cfg, &o).unwrap_err());
        assert!(e.contains("cluster.min_workers"), "{e}");
        // 16 ≤ 16 ranks is fine (it would not be against 2 pods).
        cfg.cluster.min_workers = 16;
        render(&cfg, &o).unwrap();
    }
}

/// An export runs one `embed-worker` per pod, so it is refused one pod per node of 8 GPUs.
#[test]
fn an_embedding_export_is_refused_several_ranks_per_pod() {
    let mut o = node_opts(Crd::JobSet, 2, 8);
    o.workload = Workload::Embed {
        args: vec!["--out".into(), "s3://bucket/emb".into()],
    };
    let e = format!("{:#}", render(&job_for(&o), &o).unwrap_err());
    assert!(e.contains("--workers N"), "{e}");
}
