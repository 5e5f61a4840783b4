//! Offline schema validation of the rendered objects: the built-in kinds with
//! `kubernetes-validate --strict` (the Kubernetes OpenAPI schemas, unknown fields rejected),
//! and the JobSet against JobSet's API types (k8s/tests/validate_jobset.py).

mod common;

use common::{cases, node_opts, opts, rdma, render_case, venv_tool, workspace_root};
use contrail_k8s::{to_yaml, Crd, Manifest, KUBERNETES_VERSION};
use k8s_openapi::api::batch::v1::Job;
use std::path::{Path, PathBuf};
use std::process::Command;

fn tmp(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(name)
}

/// Runs a validator; Ok(()) when it accepts, else its report (stdout and stderr).
fn run_validator(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {what}: {e}"));
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Runs kubernetes-validate on one file.
fn kubernetes_validate(path: &Path) -> Result<(), String> {
    run_validator(
        Command::new(venv_tool("kubernetes-validate"))
            .args(["--strict", "--quiet", "-k"])
            .arg(format!("{KUBERNETES_VERSION}.0"))
            .arg(path),
        "kubernetes-validate",
    )
}

/// The built-in objects of a render; a JobSet contributes each replicated job's template as
/// the batch/v1 Job JobSet creates from it (same JobSpec, so the pod templates are checked).
fn built_in_objects(objs: &[Manifest]) -> Vec<Manifest> {
    let mut out = Vec::new();
    for m in objs {
        match m {
            Manifest::JobSet(js) => {
                for rj in &js.spec.replicated_jobs {
                    out.push(Manifest::Job(Job {
                        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                            name: Some(format!("{}-{}-0", m.name(), rj.name)),
                            ..Default::default()
                        },
                        spec: rj.template.spec.clone(),
                        ..Default::default()
                    }));
                }
            }
            other => out.push(other.clone()),
        }
    }
    out
}

#[test]
fn built_in_objects_pass_strict_kubernetes_schema_validation() {
    for (i, o) in cases().iter().enumerate() {
        let objs = built_in_objects(&render_case(o));
        let path = tmp(&format!("k8s-validate-{i}.yaml"));
        std::fs::write(&path, to_yaml(&objs).unwrap()).unwrap();
        if let Err(report) = kubernetes_validate(&path) {
            panic!("{o:?}: {} does not validate:\n{report}", path.display());
        }
    }
}

/// The per-pod replacement fields (`cluster.min_workers`, on a CPU job of one-rank pods and on
/// one pod per GPU node) validate too.
#[test]
fn per_pod_replacement_passes_strict_schema_validation() {
    for crd in [Crd::JobSet, Crd::None] {
        let mut cfg = common::job();
        cfg.train.global_batch = 48;
        cfg.train.micro_batch = 8;
        cfg.cluster.min_workers = 2;
        let objs = built_in_objects(&contrail_k8s::render(&cfg, &common::opts(crd, 3, 0)).unwrap());
        let nodes = node_opts(crd, 2, 8);
        let mut cfg = common::job_for(&nodes);
        cfg.cluster.min_workers = 8;
        let node_objs = built_in_objects(&contrail_k8s::render(&cfg, &nodes).unwrap());
        for (what, objs) in [("workers", objs), ("nodes", node_objs)] {
            let path = tmp(&format!("k8s-validate-replace-{crd:?}-{what}.yaml"));
            std::fs::write(&path, to_yaml(&objs).unwrap()).unwrap();
            if let Err(report) = kubernetes_validate(&path) {
                panic!("{crd:?}: {} does not validate:\n{report}", path.display());
            }
        }
    }
}

/// The validator does reject what the API server would: a misspelt field and a wrong type,
/// also in what a pod per node adds (the shm size, the capability, the anti-affinity).
#[test]
fn kubernetes_validate_rejects_broken_objects() {
    let yaml = to_yaml(&render_case(&opts(Crd::None, 2, 1))).unwrap();
    let mut node = node_opts(Crd::None, 2, 8);
    node.rdma_resources = vec![rdma("rdma/rdma_shared_device_a", 1)];
    let node_yaml = to_yaml(&render_case(&node)).unwrap();
    for (what, broken) in [
        (
            "unknown field",
            yaml.replace("backoffLimit:", "backofLimit:"),
        ),
        (
            "wrong type",
            yaml.replace("parallelism: 2", "parallelism: two"),
        ),
        (
            "misspelt sizeLimit",
            node_yaml.replace("sizeLimit:", "sizeLimitt:"),
        ),
        (
            "capabilities not a list",
            node_yaml.replace("add:\n            - IPC_LOCK", "add: IPC_LOCK"),
        ),
        (
            "misspelt topologyKey",
            node_yaml.replace("topologyKey:", "topologyKeys:"),
        ),
    ] {
        assert!(
            broken != yaml && broken != node_yaml,
            "{what}: the replacement did not apply"
        );
        let path = tmp(&format!("k8s-broken-{}.yaml", what.replace(' ', "-")));
        std::fs::write(&path, broken).unwrap();
        let report = kubernetes_validate(&path).expect_err(what);
        assert!(
            report.contains("job/simclr-test-workers"),
            "{what}: {report}"
        );
    }
}

/// Runs k8s/tests/validate_jobset.py (JobSet's API types, unknown fields rejected).
fn validate_jobset(path: &Path) -> Result<(), String> {
    run_validator(
        Command::new(venv_tool("python"))
            .arg(workspace_root().join("k8s/tests/validate_jobset.py"))
            .arg(path),
        "k8s/tests/validate_jobset.py",
    )
}

#[test]
fn jobset_passes_the_jobset_api_schema() {
    for (i, o) in cases().iter().enumerate() {
        if o.crd != Crd::JobSet {
            continue;
        }
        let js: Vec<Manifest> = render_case(o)
            .into_iter()
            .filter(|m| matches!(m, Manifest::JobSet(_)))
            .collect();
        let path = tmp(&format!("jobset-{i}.yaml"));
        std::fs::write(&path, to_yaml(&js).unwrap()).unwrap();
        if let Err(report) = validate_jobset(&path) {
            panic!("{o:?}: the JobSet does not validate:\n{report}");
        }
    }
}

/// The JobSet validator rejects what the API server would: misspelt fields at the top and
/// deep in a pod template, and a value of the wrong type.
#[test]
fn jobset_validation_rejects_broken_objects() {
    let js: Vec<Manifest> = render_case(&opts(Crd::JobSet, 2, 1))
        .into_iter()
        .filter(|m| matches!(m, Manifest::JobSet(_)))
        .collect();
    let yaml = to_yaml(&js).unwrap();
    let mut node = node_opts(Crd::JobSet, 2, 8);
    node.rdma_resources = vec![rdma("rdma/rdma_shared_device_a", 1)];
    node.exclusive_topology = Some("topology.example.com/block".into());
    let node_js: Vec<Manifest> = render_case(&node)
        .into_iter()
        .filter(|m| matches!(m, Manifest::JobSet(_)))
        .collect();
    let node_yaml = to_yaml(&node_js).unwrap();
    for (what, broken, expect) in [
        (
            "misspelt JobSet field",
            yaml.replace("maxRestarts:", "maxRestart:"),
            "failurePolicy.maxRestart: unknown field",
        ),
        (
            "misspelt pod field",
            yaml.replace("restartPolicy:", "restartPolicyy:"),
            "restartPolicyy: unknown field",
        ),
        (
            "wrong type",
            yaml.replace("completions: 2", "completions: two"),
            "completions",
        ),
        (
            "misspelt anti-affinity field",
            node_yaml.replace("topologyKey:", "topologyKeys:"),
            "topologyKeys: unknown field",
        ),
        (
            "misspelt capability field",
            node_yaml.replace("capabilities:", "capabilites:"),
            "capabilites: unknown field",
        ),
    ] {
        assert!(
            broken != yaml && broken != node_yaml,
            "{what}: the replacement did not apply"
        );
        let path = tmp(&format!("jobset-broken-{}.yaml", what.replace(' ', "-")));
        std::fs::write(&path, broken).unwrap();
        let report = validate_jobset(&path).expect_err(what);
        assert!(report.contains(expect), "{what}: {report}");
    }
}
