//! The `contrail-coordinator` binary: exit codes and a one-worker job run to completion.

use contrail_common::auth::{GrpcProof, JobToken, TOKEN_ENV};
use contrail_common::proto::{self, coordinator_client::CoordinatorClient};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_contrail-coordinator");

/// A fresh directory holding two tiny shards and a job file; returns (dir, job file).
fn job_dir(name: &str, extra: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("contrail-coord-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("data")).unwrap();
    for i in 0..2 {
        std::fs::write(dir.join(format!("data/s-{i}.tar")), vec![0u8; 1024]).unwrap();
    }
    let job = dir.join("job.toml");
    let text = format!(
        "[data]\nurl = \"file://{}/data\"\n[checkpoint]\nurl = \"\"\n[train]\nglobal_batch = 32\n\
         [cluster]\nworld_size = 1\nheartbeat_ms = 50\nworker_timeout_ms = 300\nlease_ttl_ms = 200\n{extra}",
        dir.display()
    );
    std::fs::write(&job, text).unwrap();
    (dir, job)
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn bad_override_names_the_key_and_exits_nonzero() {
    let (dir, job) = job_dir("badkey", "");
    let out = std::process::Command::new(BIN)
        .arg("--config")
        .arg(&job)
        .args(["--set", "cluster.heartbeat_msec=5"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("heartbeat_msec"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn refuses_to_start_without_a_job_token() {
    let (dir, job) = job_dir("notoken", "");
    let out = std::process::Command::new(BIN)
        .arg("--config")
        .arg(&job)
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .env_remove(TOKEN_ENV)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no job token") && err.contains(TOKEN_ENV),
        "{err}"
    );
    let out = std::process::Command::new(BIN)
        .arg("--config")
        .arg(&job)
        .env(TOKEN_ENV, "short")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("at least 16"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exits_zero_when_the_job_finishes() {
    let (dir, job) = job_dir("finish", "");
    let grpc = format!("127.0.0.1:{}", free_port());
    let token = JobToken::generate().unwrap();
    let child = tokio::process::Command::new(BIN)
        .arg("--config")
        .arg(&job)
        .env(TOKEN_ENV, token.expose())
        .args(["--grpc-addr", &grpc, "--http-addr", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut client = None;
    for _ in 0..100 {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{grpc}")).unwrap();
        if let Ok(c) = endpoint.connect().await {
            client = Some(CoordinatorClient::with_interceptor(
                c,
                GrpcProof::new(Some(token.clone())),
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut client = client.expect("the coordinator accepts gRPC connections");
    let reg = client
        .register(proto::RegisterRequest {
            host: "h".into(),
            collective_address: "127.0.0.1:1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let rv = client
        .rendezvous(proto::RendezvousRequest {
            worker_id: reg.worker_id,
            generation: reg.generation,
            after_generation: 0,
            suspect_rank: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rv.rank, 0);
    assert!(
        rv.job_config_toml.contains("world_size = 1"),
        "{}",
        rv.job_config_toml
    );
    client
        .leave(proto::LeaveRequest {
            worker_id: reg.worker_id,
            generation: reg.generation,
            finished: true,
            error: String::new(),
        })
        .await
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("the coordinator exits after the job finished")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("job finished"), "{stdout}");
    let _ = std::fs::remove_dir_all(dir);
}
