//! Applying rendered objects to a cluster (server-side apply, field manager [`FIELD_MANAGER`])
//! and deleting a job's objects, through the Kubernetes API with the user's kubeconfig.

use crate::{jobset, Manifest, RenderOptions, HTTP_PORT, LABEL_INSTANCE, LABEL_MANAGED_BY};
use anyhow::{Context, Result};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, Config};

/// Server-side apply field manager: the owner of the fields contrail sets.
pub const FIELD_MANAGER: &str = "contrail";

/// Group, version, kind and plural of each kind contrail writes, in deletion order (owners
/// first, so their children are not recreated meanwhile).
pub const KINDS: [(&str, &str, &str, &str); 6] = [
    (jobset::GROUP, jobset::VERSION, jobset::KIND, jobset::PLURAL),
    ("batch", "v1", "Job", "jobs"),
    ("apps", "v1", "Deployment", "deployments"),
    ("", "v1", "Service", "services"),
    ("", "v1", "ConfigMap", "configmaps"),
    ("", "v1", "Secret", "secrets"),
];

pub fn api_resource(kind: &str) -> ApiResource {
    let (g, v, k, plural) = KINDS
        .iter()
        .find(|(_, _, k, _)| *k == kind)
        .copied()
        .unwrap_or_else(|| panic!("contrail never writes a {kind}"));
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(g, v, k), plural)
}

/// Server-side apply without `force`: a field another manager owns is reported, not taken.
pub fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER)
}

/// The label selector matching every object of the job `name`.
pub fn job_selector(name: &str) -> String {
    format!("{LABEL_INSTANCE}={name},{LABEL_MANAGED_BY}=contrail")
}

/// The objects as untyped API objects, in apply order.
pub fn to_dynamic(manifests: &[Manifest]) -> Result<Vec<(ApiResource, DynamicObject)>> {
    manifests
        .iter()
        .map(|m| {
            let obj: DynamicObject = serde_json::from_value(serde_json::to_value(m)?)
                .with_context(|| format!("converting {} {}", m.kind(), m.name()))?;
            Ok((api_resource(m.kind()), obj))
        })
        .collect()
}

/// How to reach the job's status page once it runs.
pub fn status_hint(opts: &RenderOptions) -> String {
    let svc = format!("{}-coordinator", opts.name);
    format!(
        "status page: kubectl -n {ns} port-forward svc/{svc} {HTTP_PORT}:{HTTP_PORT}, then \
         contrail status --coordinator http://127.0.0.1:{HTTP_PORT} --watch 5 \
         (in the cluster: http://{svc}.{ns}.svc:{HTTP_PORT}/status)",
        ns = opts.namespace
    )
}

/// A client from the user's kubeconfig (KUBECONFIG, ~/.kube/config) or the in-cluster
/// service account.
pub async fn default_client() -> Result<Client> {
    let config = Config::infer()
        .await
        .context("no Kubernetes config found (KUBECONFIG, ~/.kube/config or in-cluster)")?;
    client_from(config)
}

pub fn client_from(config: Config) -> Result<Client> {
    Client::try_from(config).context("building the Kubernetes client")
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// Server-side applies every object into `namespace`, in order; returns "Kind/name" of each.
pub async fn apply(client: Client, namespace: &str, manifests: &[Manifest]) -> Result<Vec<String>> {
    let pp = apply_params();
    let mut done = Vec::new();
    for (ar, obj) in to_dynamic(manifests)? {
        let name = obj.metadata.name.clone().unwrap_or_default();
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &ar);
        if let Err(e) = api.patch(&name, &pp, &Patch::Apply(&obj)).await {
            if ar.kind == jobset::KIND && is_not_found(&e) {
                anyhow::bail!(
                    "the cluster has no JobSet API ({}): install the JobSet controller \
                     (docs/kubernetes.md) or use --crd none",
                    jobset::API_VERSION
                );
            }
            return Err(e).with_context(|| format!("applying {} {name}", ar.kind));
        }
        done.push(format!("{}/{name}", ar.kind));
    }
    Ok(done)
}

/// Deletes every object labelled as the job `name` in `namespace` (Jobs with their pods);
/// returns "Kind/name" of each. A cluster without the JobSet API is fine.
pub async fn delete(client: Client, namespace: &str, name: &str) -> Result<Vec<String>> {
    let lp = ListParams::default().labels(&job_selector(name));
    let dp = DeleteParams::background();
    let mut done = Vec::new();
    for (_, _, kind, _) in KINDS {
        let ar = api_resource(kind);
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &ar);
        let list = match api.list(&lp).await {
            Ok(l) => l,
            Err(e) if kind == jobset::KIND && is_not_found(&e) => continue,
            Err(e) => return Err(e).with_context(|| format!("listing {kind}s of job {name}")),
        };
        for obj in list {
            let n = obj.metadata.name.unwrap_or_default();
            match api.delete(&n, &dp).await {
                Ok(_) => done.push(format!("{kind}/{n}")),
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(e).with_context(|| format!("deleting {kind} {n}")),
            }
        }
    }
    Ok(done)
}
