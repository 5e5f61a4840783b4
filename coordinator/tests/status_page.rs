//! `GET /` serves the status page: HTML, self-contained (nothing fetched from other hosts),
//! reading the JSON report from the relative `status` URL. The page's behaviour in a real
//! browser is tested in contrail-worker's `tests/status_page.rs`.

mod common;

use common::http_get;
use contrail_common::config::JobConfig;
use contrail_coordinator::page::STATUS_PAGE;
use contrail_coordinator::Coordinator;

#[tokio::test]
async fn root_serves_the_self_contained_status_page() {
    let mut cfg = JobConfig::default();
    cfg.data.url = "memory://page-test/data".into();
    cfg.cluster.world_size = 2;
    cfg.validate().expect("test config is valid");
    let shards = vec!["memory://page-test/data/shard-00.tar".to_string()];
    let coord = Coordinator::with_shards(cfg.clone(), cfg.to_toml(), shards, None).unwrap();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = http.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let access = contrail_coordinator::access::Access::default();
    let server = tokio::spawn(coord.serve(grpc, http, access, async move {
        let _ = stopped.await;
    }));

    let (code, head, page) = http_get(addr, "/").await;
    assert_eq!(code, 200, "{head}\n{page}");
    assert!(
        head.contains("content-type: text/html; charset=utf-8"),
        "{head}"
    );
    assert_eq!(page, STATUS_PAGE);
    assert!(page.contains("<title>contrail status</title>"));
    // Polls the JSON report relative to the page, so it works behind a proxy path too.
    assert!(
        page.contains("fetch(\"status\""),
        "the page does not poll status"
    );
    // No CDN or other host: nothing absolute, no external scripts, styles, fonts or images.
    for needle in [
        "http://",
        "https://",
        "//cdn",
        "<script src",
        "<link",
        "@import",
        "url(",
    ] {
        assert!(!page.contains(needle), "the page references {needle:?}");
    }
    // The JSON endpoint is still there next to it.
    let (code, _, body) = http_get(addr, "/status").await;
    assert_eq!(code, 200, "{body}");
    let report: contrail_coordinator::StatusReport = serde_json::from_str(&body).unwrap();
    assert_eq!(report.state.as_str(), "waiting_for_workers");

    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
