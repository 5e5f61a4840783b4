//! `apply` and `delete` against a fake Kubernetes API server on loopback that records every
//! request and keeps the applied objects, so the HTTP conversation `contrail k8s launch` and
//! `contrail k8s delete` hold with a cluster is checked without one: paths, verbs, server-side
//! apply parameters, bodies, label selectors, and the errors a cluster without JobSet gives.

mod common;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use common::{opts, render_case};
use contrail_k8s::{apply, Crd, Manifest};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// One request as the fake server saw it.
#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    path: String,
    query: BTreeMap<String, String>,
    content_type: String,
    body: Option<Value>,
}

#[derive(Default)]
struct Server {
    seen: Vec<Seen>,
    /// Applied objects by their collection path (`/apis/batch/v1/namespaces/ml/jobs`), then name.
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    /// Answer 404 for paths under this prefix, as a cluster without that API does.
    missing_api: Option<String>,
}

type Shared = Arc<Mutex<Server>>;

fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": if code < 300 { "Success" } else { "Failure" },
        "reason": reason, "message": message, "code": code,
    });
    (StatusCode::from_u16(code).unwrap(), axum::Json(body)).into_response()
}

fn parse_query(uri: &Uri) -> BTreeMap<String, String> {
    url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

async fn handle(
    State(state): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut s = state.lock().unwrap();
    s.seen.push(Seen {
        method: method.clone(),
        path: path.clone(),
        query: parse_query(&uri),
        content_type,
        body: serde_json::from_slice(&body).ok(),
    });
    if s.missing_api
        .as_deref()
        .is_some_and(|p| path.starts_with(p))
    {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
    }
    let (collection, name) = match path.rsplit_once('/') {
        // contrail only lists, never reads one object, so every GET is of a collection.
        Some(_) if method == Method::GET => (path.clone(), String::new()),
        Some((c, n)) => (c.to_string(), n.to_string()),
        None => return status(400, "BadRequest", "no path"),
    };
    match method {
        Method::PATCH => {
            let obj: Value = serde_json::from_slice(&body).unwrap();
            s.objects
                .entry(collection)
                .or_default()
                .insert(name, obj.clone());
            (StatusCode::OK, axum::Json(obj)).into_response()
        }
        Method::GET => {
            let items: Vec<Value> = s
                .objects
                .get(&collection)
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default();
            let list = json!({
                "apiVersion": "v1", "kind": "List",
                "metadata": {"resourceVersion": "1"}, "items": items,
            });
            (StatusCode::OK, axum::Json(list)).into_response()
        }
        Method::DELETE => match s.objects.get_mut(&collection).and_then(|m| m.remove(&name)) {
            Some(_) => status(200, "", "deleted"),
            None => status(404, "NotFound", "not found"),
        },
        _ => status(405, "MethodNotAllowed", "unexpected verb"),
    }
}

/// Starts the fake API server; returns its state and a client pointed at it.
async fn fake_cluster(missing_api: Option<&str>) -> (Shared, kube::Client) {
    let state: Shared = Arc::new(Mutex::new(Server {
        missing_api: missing_api.map(str::to_string),
        ..Default::default()
    }));
    let app = axum::Router::new()
        .fallback(handle)
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let url: http::Uri = format!("http://{addr}").parse().unwrap();
    let client = apply::client_from(kube::Config::new(url)).unwrap();
    (state, client)
}

/// The collection path of a kind in namespace `ml`.
fn collection(kind: &str) -> String {
    let ar = apply::api_resource(kind);
    let base = if ar.group.is_empty() {
        format!("/api/{}", ar.version)
    } else {
        format!("/apis/{}/{}", ar.group, ar.version)
    };
    format!("{base}/namespaces/ml/{}", ar.plural)
}

#[tokio::test]
async fn launch_server_side_applies_every_object_in_order() {
    for crd in [Crd::JobSet, Crd::None] {
        let objs = render_case(&opts(crd, 2, 1));
        let (state, client) = fake_cluster(None).await;
        let applied = apply::apply(client, "ml", &objs).await.unwrap();
        let want: Vec<String> = objs
            .iter()
            .map(|m| format!("{}/{}", m.kind(), m.name()))
            .collect();
        assert_eq!(applied, want);

        let s = state.lock().unwrap();
        assert_eq!(s.seen.len(), objs.len(), "{:?}", s.seen);
        for (req, m) in s.seen.iter().zip(&objs) {
            assert_eq!(req.method, Method::PATCH, "{req:?}");
            assert_eq!(
                req.path,
                format!("{}/{}", collection(m.kind()), m.name()),
                "{req:?}"
            );
            // Server-side apply as field manager "contrail", never forcing another
            // manager's fields.
            assert_eq!(req.content_type, "application/apply-patch+yaml");
            assert_eq!(
                req.query.get("fieldManager").map(String::as_str),
                Some(apply::FIELD_MANAGER)
            );
            assert!(!req.query.contains_key("force"), "{req:?}");
            // The body is the rendered object itself.
            let body = req.body.clone().expect("a JSON body");
            assert_eq!(Manifest::from_value(body).unwrap(), *m);
        }
    }
}

#[tokio::test]
async fn delete_removes_every_object_of_the_job_and_nothing_else() {
    let objs = render_case(&opts(Crd::None, 2, 0));
    let (state, client) = fake_cluster(None).await;
    apply::apply(client.clone(), "ml", &objs).await.unwrap();
    state.lock().unwrap().seen.clear();

    let mut deleted = apply::delete(client, "ml", "simclr-test").await.unwrap();
    let mut want: Vec<String> = objs
        .iter()
        .map(|m| format!("{}/{}", m.kind(), m.name()))
        .collect();
    deleted.sort();
    want.sort();
    assert_eq!(deleted, want);

    let s = state.lock().unwrap();
    assert!(
        s.objects.values().all(BTreeMap::is_empty),
        "left behind: {:?}",
        s.objects
    );
    // Every kind contrail writes is listed by the job's labels; deletes propagate in the
    // background so a Job's pods go with it.
    for (_, _, kind, _) in apply::KINDS {
        let list = s
            .seen
            .iter()
            .find(|r| r.method == Method::GET && r.path == collection(kind))
            .unwrap_or_else(|| panic!("{kind}s were never listed: {:?}", s.seen));
        assert_eq!(
            list.query.get("labelSelector"),
            Some(&apply::job_selector("simclr-test"))
        );
    }
    for req in s.seen.iter().filter(|r| r.method == Method::DELETE) {
        let policy = req
            .body
            .as_ref()
            .and_then(|b| b["propagationPolicy"].as_str());
        assert_eq!(policy, Some("Background"), "{req:?}");
    }
}

/// A cluster without the JobSet controller: launching a JobSet says what to install (after
/// the objects before it were applied), and delete still removes the rest.
#[tokio::test]
async fn a_cluster_without_jobset_gets_a_clear_error() {
    let jobsets = "/apis/jobset.x-k8s.io/";
    let objs = render_case(&opts(Crd::JobSet, 2, 1));
    let (state, client) = fake_cluster(Some(jobsets)).await;
    let err = apply::apply(client.clone(), "ml", &objs).await.unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("no JobSet API") && msg.contains("--crd none"),
        "{msg}"
    );

    let deleted = apply::delete(client, "ml", "simclr-test").await.unwrap();
    assert!(
        deleted.iter().all(|d| !d.starts_with("JobSet/")) && !deleted.is_empty(),
        "{deleted:?}"
    );
    let s = state.lock().unwrap();
    assert!(
        s.objects.values().all(BTreeMap::is_empty),
        "{:?}",
        s.objects
    );
}
