//! For the tests that run a local cluster as processes: scratch folders, the status
//! endpoint over plain HTTP, the cluster's stdout, and a child that dies with the test.

use contrail_common::status::StatusReport;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Child;
use std::sync::mpsc;
use std::time::Duration;

/// An empty scratch folder for the test `name` (tagged with `kind`, e.g. "e2e").
pub fn temp_dir(kind: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("contrail-{kind}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `GET path` on `addr`: the status code and the body, None if the server is not there.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n")?.1.to_string();
    Some((code, body))
}

/// The coordinator's `/status` report, None until it answers.
pub fn status(addr: &str) -> Option<StatusReport> {
    let (code, body) = http_get(addr, "/status")?;
    if code != 200 {
        return None;
    }
    serde_json::from_str(&body).ok()
}

/// Streams a child's stdout lines into a channel (echoed to stderr for a failure message).
pub fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            eprintln!("[contrail] {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A child process killed (and reaped) when the test ends, however it ends.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
