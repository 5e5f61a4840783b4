# contrail coordinator image: membership, rendezvous, shard leases, status and /metrics.
# No libtorch. Build from the repository root (BuildKit, the default builder since Docker 23):
#   docker build -f k8s/docker/coordinator.Dockerfile -t contrail-coordinator .
# See docs/images.md. Pins are by tag; add @sha256:<digest> after a tag to pin the exact bytes.

# --- builder: Rust toolchain + protoc (tonic code generation) ---
FROM rust:1.95.0-bookworm AS builder

# Unpinned Debian versions on purpose: the base tag fixes the Debian release, and pinned
# package versions disappear from the archive at each point release, which breaks the build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY common common
COPY coordinator coordinator
COPY data data
COPY worker worker
COPY k8s k8s
COPY cli cli
COPY build-support build-support

# The worker, k8s and cli crates are copied only because Cargo loads every workspace member's
# manifest; they are not compiled, so no libtorch is needed. Cache mounts keep downloads and the target folder.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p contrail-coordinator --bin contrail-coordinator \
    && install -D -m 0755 target/release/contrail-coordinator /out/contrail-coordinator

# --- runtime: Debian 12 slim, the same glibc as the builder; the binary needs only libc,
# libm and libgcc_s, all in the base image. ---
FROM debian:12.13-slim

# CA roots for HTTPS object stores (rustls reads the system store); copied rather than
# installed, so the runtime stage runs no package manager.
COPY --from=builder /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=builder /out/contrail-coordinator /usr/local/bin/contrail-coordinator

# A fixed numeric UID, so that Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/contrail --create-home \
        --shell /usr/sbin/nologin contrail
USER 10001:10001
WORKDIR /var/lib/contrail

# 50051: gRPC (workers); 8080: HTTP status and Prometheus /metrics.
EXPOSE 50051 8080
ENTRYPOINT ["contrail-coordinator"]
