//! Shared by the coordinator's tests.

use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[allow(dead_code)] // not every test file uses every helper
/// A plain HTTP/1.0 GET; returns (status code, header block in lower case, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
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

#[allow(dead_code)] // not every test file uses every helper
/// A plain HTTP/1.0 GET with extra header lines (each "Name: value").
pub async fn http_get_with(addr: SocketAddr, path: &str, headers: &[&str]) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n{extra}\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, body.to_string())
}

#[allow(dead_code)]
/// Connects to `addr`, writes `bytes` (ignoring a reset), reads what comes back for a moment
/// and closes: what a confused or hostile client does to a port.
pub async fn throw_bytes(addr: SocketAddr, bytes: &[u8]) {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return;
    };
    let _ = s.write_all(bytes).await;
    let mut sink = vec![0u8; 4096];
    let _ = tokio::time::timeout(std::time::Duration::from_millis(200), s.read(&mut sink)).await;
}

#[allow(dead_code)]
/// Deterministic noise (xorshift), so a failing case can be rerun.
pub fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[allow(dead_code)] // not every test file uses every helper
/// A worker's registration: a node of its own.
pub fn registration(
    host: &str,
    address: &str,
    instance: u64,
) -> contrail_common::proto::RegisterRequest {
    contrail_common::proto::RegisterRequest {
        host: host.into(),
        collective_address: address.into(),
        instance,
        ..Default::default()
    }
}
