//! Shards in an S3-compatible object store (moto's server, installed into .venv by
//! scripts/setup.sh): written by `write_synth_dataset`, listed by prefix and by brace pattern,
//! and streamed back with ranged GETs through the `data.s3_endpoint` override.

use contrail_common::storage::list_shards;
use contrail_data::shard_reader::read_shard;
use contrail_data::synth::write_synth_dataset;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::ops::ControlFlow;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_moto() -> (Server, String) {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/moto_server");
    assert!(
        bin.exists(),
        "{} is missing: run `bash scripts/setup.sh` (it installs moto[server] into .venv)",
        bin.display()
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting moto_server");
    let server = Server(child);
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(&addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "moto_server did not start on {addr}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (server, addr)
}

/// S3 CreateBucket is a PUT on the bucket's path; moto accepts it unsigned.
fn create_bucket(addr: &str, bucket: &str) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "PUT /{bucket} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(
        reply.starts_with("HTTP/1.1 200"),
        "CreateBucket failed: {reply}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_round_trip_through_an_s3_compatible_store() {
    // Credentials come from the environment, as on a real cluster (this file is its own test
    // process, so setting them here touches no other test).
    std::env::set_var("AWS_ACCESS_KEY_ID", "contrail-test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "contrail-test");
    std::env::set_var("AWS_REGION", "us-east-1");
    let (_server, addr) = start_moto();
    create_bucket(&addr, "contrail-test");
    let endpoint = format!("http://{addr}");

    let summary = write_synth_dataset("s3://contrail-test/synth", &endpoint, 100, 32, 32, 3)
        .await
        .unwrap();
    assert_eq!(summary.samples, 100);
    assert_eq!(summary.shards, 4);

    let listed = list_shards("s3://contrail-test/synth", &endpoint)
        .await
        .unwrap();
    let expected: Vec<String> = (0..4)
        .map(|i| format!("s3://contrail-test/synth/synth-{i:06}.tar"))
        .collect();
    assert_eq!(listed, expected);
    let braced = list_shards(
        "s3://contrail-test/synth/synth-{000000..000003}.tar",
        &endpoint,
    )
    .await
    .unwrap();
    assert_eq!(braced, expected);

    let mut keys = BTreeSet::new();
    let mut samples = 0;
    for url in &listed {
        let stats = read_shard(url, &endpoint, 2, |s| {
            assert!(s.image().is_some(), "sample {} has no image", s.key);
            keys.insert(s.key.clone());
            async { ControlFlow::Continue(()) }
        })
        .await
        .unwrap();
        assert!(stats.bad.is_empty(), "{url}: {:?}", stats.bad);
        samples += stats.samples;
    }
    assert_eq!(samples, 100);
    assert_eq!(
        keys.len(),
        100,
        "every sample key is distinct and read once"
    );

    // A shard that does not exist is an error naming it, not a hang or an empty shard.
    let missing = "s3://contrail-test/synth/synth-000099.tar";
    let err = read_shard(missing, &endpoint, 1, |_| async {
        ControlFlow::Continue(())
    })
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("synth-000099.tar"), "{err:#}");
}
