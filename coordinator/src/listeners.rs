//! The coordinator's two listening sockets (gRPC and HTTP status): bound from the config, or
//! inherited from the process that started the coordinator.
//!
//! `contrail local` binds both sockets itself and keeps them for the whole run: a port that
//! was only found free and let go could be taken by any other process (an outgoing
//! connection's ephemeral port included) before the coordinator binds it, and a coordinator
//! restarted after a crash gets the very same sockets, so workers reconnect to it without a
//! window in which the address belongs to nobody.

use anyhow::{bail, Context, Result};
use contrail_common::config::JobConfig;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

/// Names the inherited sockets' file descriptors, `"GRPC_FD,HTTP_FD"`; set by
/// [`hand_listeners_to`].
pub const INHERITED_LISTENERS_ENV: &str = "CONTRAIL_COORDINATOR_LISTEN_FDS";

/// The coordinator's gRPC and HTTP listeners: the inherited ones when
/// [`INHERITED_LISTENERS_ENV`] is set (each must be bound to the configured address), else
/// freshly bound to `cluster.grpc_addr` and `cluster.http_addr`.
pub(crate) async fn listeners(
    cfg: &JobConfig,
) -> Result<(tokio::net::TcpListener, tokio::net::TcpListener)> {
    let grpc_what = ("gRPC", "cluster.grpc_addr", cfg.cluster.grpc_addr.as_str());
    let http_what = ("HTTP", "cluster.http_addr", cfg.cluster.http_addr.as_str());
    match std::env::var(INHERITED_LISTENERS_ENV) {
        Ok(fds) => {
            let Some((grpc, http)) = fds.split_once(',') else {
                bail!(
                    "{INHERITED_LISTENERS_ENV}={fds:?}: expected two descriptors, GRPC_FD,HTTP_FD"
                );
            };
            Ok((inherited(grpc, grpc_what)?, inherited(http, http_what)?))
        }
        Err(_) => Ok((bound(grpc_what).await?, bound(http_what).await?)),
    }
}

async fn bound((what, key, addr): (&str, &str, &str)) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} address {addr} ({key})"))
}

fn inherited(fd: &str, (what, key, addr): (&str, &str, &str)) -> Result<tokio::net::TcpListener> {
    let fd: RawFd = fd.trim().parse().with_context(|| {
        format!("{INHERITED_LISTENERS_ENV}: the {what} descriptor {fd:?} is not a number")
    })?;
    // A descriptor that is not open (or not a socket) must not be adopted: fstat first.
    // SAFETY: fstat(2) only reads the descriptor's metadata into `st`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 || st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        bail!("{INHERITED_LISTENERS_ENV}: descriptor {fd} ({what}) is not an open socket");
    }
    // SAFETY: the parent handed this descriptor to this process for this use alone (see
    // `hand_listeners_to`), and nothing else here owns it.
    let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    let local = listener
        .local_addr()
        .with_context(|| format!("reading the inherited {what} socket's address"))?;
    if local.to_string() != addr {
        bail!("the inherited {what} socket listens on {local}, but {key} is {addr}");
    }
    listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(listener)
        .with_context(|| format!("adopting the inherited {what} socket"))
}

/// Lets the coordinator that `cmd` starts inherit `grpc` and `http` (listening sockets this
/// process keeps open): their descriptors survive the exec, and [`INHERITED_LISTENERS_ENV`]
/// names them. The caller's config must name the same addresses.
pub fn hand_listeners_to(
    cmd: &mut std::process::Command,
    grpc: &std::net::TcpListener,
    http: &std::net::TcpListener,
) {
    use std::os::unix::process::CommandExt;
    let fds = [grpc.as_raw_fd(), http.as_raw_fd()];
    cmd.env(INHERITED_LISTENERS_ENV, format!("{},{}", fds[0], fds[1]));
    // SAFETY: runs in the forked child before exec; fcntl(2) is async-signal-safe. Rust opens
    // every descriptor close-on-exec; clearing the flag in the child alone keeps the sockets
    // out of every other process this one starts.
    unsafe {
        cmd.pre_exec(move || {
            for fd in fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}
