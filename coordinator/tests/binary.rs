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

/// `contrail local` binds the coordinator's sockets itself and hands them over: the
/// coordinator serves on them (the test holds them too, so a fresh bind of those ports would
/// fail) and ends the job as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_on_listening_sockets_it_inherits() {
    use contrail_coordinator::listeners::hand_listeners_to;
    let (dir, job) = job_dir("inherit", "");
    let grpc = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
    let token = JobToken::generate().unwrap();
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.arg("--config")
        .arg(&job)
        .env(TOKEN_ENV, token.expose())
        .args(["--grpc-addr", &grpc_addr.to_string()])
        .args(["--http-addr", &http_addr.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    hand_listeners_to(cmd.as_std_mut(), &grpc, &http);
    let child = cmd.spawn().unwrap();

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = CoordinatorClient::with_interceptor(channel, GrpcProof::new(Some(token)));
    // The listen queue holds the connection until the coordinator accepts it: the first
    // RPC is answered however early it was sent.
    let reg = tokio::time::timeout(
        Duration::from_secs(30),
        client.register(proto::RegisterRequest {
            host: "h".into(),
            collective_address: "127.0.0.1:1".into(),
            ..Default::default()
        }),
    )
    .await
    .expect("the coordinator answers on the inherited gRPC socket")
    .unwrap()
    .into_inner();
    // The HTTP status server answers on the other inherited socket.
    let mut conn = tokio::net::TcpStream::connect(http_addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(b"GET /healthz HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).await.unwrap();
    assert!(
        reply.starts_with("HTTP/1.0 200") || reply.starts_with("HTTP/1.1 200"),
        "{reply}"
    );

    client
        .leave(proto::LeaveRequest {
            worker_id: reg.worker_id,
            generation: reg.generation,
            finished: false,
            error: "stop".into(),
        })
        .await
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("the coordinator exits after the job failed")
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// An inherited socket on another address than the config names is refused, naming both.
#[test]
fn refuses_an_inherited_socket_on_another_address() {
    use contrail_coordinator::listeners::hand_listeners_to;
    let (dir, job) = job_dir("inherit-wrong", "");
    let grpc = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cmd = std::process::Command::new(BIN);
    cmd.arg("--config")
        .arg(&job)
        .env(TOKEN_ENV, JobToken::generate().unwrap().expose())
        .args(["--grpc-addr", &other.local_addr().unwrap().to_string()])
        .args(["--http-addr", &http.local_addr().unwrap().to_string()]);
    hand_listeners_to(&mut cmd, &grpc, &http);
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "the inherited gRPC socket listens on {}",
            grpc.local_addr().unwrap()
        )) && err.contains("cluster.grpc_addr"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
