//! `GET /` serves the status page: HTML, self-contained (nothing fetched from other hosts),
//! reading the JSON report from the relative `status` URL. The page's behaviour in a real
//! browser is tested in contrail-worker's `tests/status_page.rs`.

use contrail_common::config::JobConfig;
use contrail_coordinator::page::STATUS_PAGE;
use contrail_coordinator::Coordinator;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A plain HTTP/1.0 GET; returns (status code, header block, body).
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .expect("HTTP response has a header");
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, head.to_ascii_lowercase(), body.to_string())
}

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
    let server = tokio::spawn(coord.serve(grpc, http, async move {
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
