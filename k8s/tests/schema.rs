//! Offline schema validation of the rendered objects: the built-in kinds with
//! `kubernetes-validate --strict` (the Kubernetes OpenAPI schemas, unknown fields rejected),
//! and the JobSet against the JobSet CRD's openAPIV3Schema.

mod common;

use common::{cases, opts, render_case, venv_tool, workspace_root};
use contrail_k8s::{to_yaml, Crd, Manifest, KUBERNETES_VERSION};
use k8s_openapi::api::batch::v1::Job;
use std::path::{Path, PathBuf};
use std::process::Command;

fn tmp(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(name)
}

/// Runs kubernetes-validate on one file; Ok(()) or its report.
fn kubernetes_validate(path: &Path) -> Result<(), String> {
    let out = Command::new(venv_tool("kubernetes-validate"))
        .args(["--strict", "--quiet", "-k"])
        .arg(format!("{KUBERNETES_VERSION}.0"))
        .arg(path)
        .output()
        .expect("running kubernetes-validate");
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

/// The validator does reject what the API server would: a misspelt field and a wrong type.
#[test]
fn kubernetes_validate_rejects_broken_objects() {
    let yaml = to_yaml(&render_case(&opts(Crd::None, 2, 1))).unwrap();
    for (what, broken) in [
        (
            "unknown field",
            yaml.replace("backoffLimit:", "backofLimit:"),
        ),
        (
            "wrong type",
            yaml.replace("parallelism: 2", "parallelism: two"),
        ),
    ] {
        assert_ne!(broken, yaml, "{what}: the replacement did not apply");
        let path = tmp(&format!("k8s-broken-{}.yaml", what.replace(' ', "-")));
        std::fs::write(&path, broken).unwrap();
        let report = kubernetes_validate(&path).expect_err(what);
        assert!(
            report.contains("job/simclr-test-workers"),
            "{what}: {report}"
        );
    }
}

/// Where the JobSet CRD is expected; see k8s/schemas/README.md.
fn jobset_crd() -> PathBuf {
    workspace_root().join("k8s/schemas/jobset.x-k8s.io_jobsets.yaml")
}

fn validate_jobset(path: &Path) -> Result<(), String> {
    let crd = jobset_crd();
    assert!(
        crd.exists(),
        "{} is missing: see k8s/schemas/README.md for the pinned JobSet release to take it from",
        crd.display()
    );
    let out = Command::new(venv_tool("python"))
        .arg(workspace_root().join("k8s/tests/validate_crd.py"))
        .arg(&crd)
        .arg(path)
        .output()
        .expect("running k8s/tests/validate_crd.py");
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

#[test]
#[ignore = "needs the JobSet CRD in k8s/schemas/ (not committed yet: see k8s/schemas/README.md)"]
fn jobset_passes_the_jobset_crd_schema() {
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
    // And a misspelt field is caught.
    let yaml = to_yaml(&render_case(&opts(Crd::JobSet, 2, 0))[2..]).unwrap();
    let path = tmp("jobset-broken.yaml");
    std::fs::write(&path, yaml.replace("maxRestarts", "maxRestart")).unwrap();
    validate_jobset(&path).expect_err("a misspelt JobSet field passed");
}
