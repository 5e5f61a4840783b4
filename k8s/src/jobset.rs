//! Serde types for the fields of a JobSet (`jobset.x-k8s.io/v1alpha2`, a CRD of
//! kubernetes-sigs/jobset) that contrail writes. Only those fields: unknown fields are rejected
//! on parse rather than silently dropped, so a JobSet read back is the JobSet that was written.

use k8s_openapi::api::batch::v1::JobTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

pub const API_VERSION: &str = "jobset.x-k8s.io/v1alpha2";
pub const KIND: &str = "JobSet";
pub const GROUP: &str = "jobset.x-k8s.io";
pub const VERSION: &str = "v1alpha2";
pub const PLURAL: &str = "jobsets";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobSet {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: JobSetSpec,
}

impl JobSet {
    pub fn new(metadata: ObjectMeta, spec: JobSetSpec) -> Self {
        Self {
            api_version: API_VERSION.into(),
            kind: KIND.into(),
            metadata,
            spec,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobSetSpec {
    pub replicated_jobs: Vec<ReplicatedJob>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub network: Option<Network>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub startup_policy: Option<StartupPolicy>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub failure_policy: Option<FailurePolicy>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub success_policy: Option<SuccessPolicy>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReplicatedJob {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub replicas: Option<i32>,
    pub template: JobTemplateSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Network {
    /// Pods get hostnames `<jobset>-<replicatedJob>-<jobIndex>-<podIndex>` under the
    /// headless service `<subdomain>` (default: the JobSet's name).
    #[serde(
        rename = "enableDNSHostnames",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub enable_dns_hostnames: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub subdomain: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub publish_not_ready_addresses: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StartupPolicy {
    /// "AnyOrder" or "InOrder" (each replicated job's pods ready before the next is created).
    pub startup_policy_order: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailurePolicy {
    /// Restarts of the whole set (all child Jobs recreated) before the JobSet fails.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub max_restarts: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SuccessPolicy {
    /// "All" or "Any".
    pub operator: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub target_replicated_jobs: Option<Vec<String>>,
}
