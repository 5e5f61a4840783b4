# contrail worker image: the `contrail` binary, libtorch 2.11.0 and the CUDA 13 libraries that
# the PyPI torch wheel brings (cuBLAS, cuDNN, NCCL, ...), on NVIDIA's CUDA base image, plus the
# verbs libraries NCCL's InfiniBand/RoCE transport loads.
#
# Build from the repository root (BuildKit, the default builder since Docker 23):
#   docker build -f k8s/docker/worker.Dockerfile -t contrail-worker .
# See docs/images.md. Pins are by tag; add @sha256:<digest> after a tag to pin the exact bytes.

# --- builder: Rust toolchain + protoc + torch 2.11.0 (tch 0.24 needs exactly this libtorch) ---
FROM rust:1.95.0-bookworm AS builder

ARG TORCH_VERSION=2.11.0

# Unpinned Debian versions on purpose: the base tag fixes the Debian release, and pinned
# package versions disappear from the archive at each point release, which breaks the build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends protobuf-compiler python3-venv \
    && rm -rf /var/lib/apt/lists/*

# The torch wheel (CPU + CUDA 13) and its nvidia-* dependency wheels; --no-cache-dir keeps
# pip from storing a second copy of the ~3 GB download in the layer.
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check "torch==${TORCH_VERSION}"

# Gather the shared libraries the binary needs at run time, keeping the wheels' relative layout
# (torch/lib next to nvidia/<pkg>/lib), which the RPATH $ORIGIN/../../nvidia/... of torch's own
# libraries expects. Static archives, headers and Python code are left behind.
RUN site="$(/opt/venv/bin/python -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')" \
    && mkdir -p /opt/torch/torch /opt/torch/nvidia \
    && cp -a "$site/torch/lib" /opt/torch/torch/ \
    && for d in "$site"/nvidia/*/lib; do \
         pkg="$(basename "$(dirname "$d")")"; \
         mkdir -p "/opt/torch/nvidia/$pkg" && cp -a "$d" "/opt/torch/nvidia/$pkg/"; \
       done \
    && find /opt/torch -name '*.a' -delete \
    && ls /opt/torch/torch/lib/libtorch_cuda.so /opt/torch/nvidia/nccl/lib/libnccl.so.2

WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY common common
COPY coordinator coordinator
COPY data data
COPY worker worker
COPY k8s k8s
COPY cli cli
COPY build-support build-support

# LIBTORCH from the environment wins over .cargo/config.toml (not copied here anyway).
# Cache mounts keep the crate downloads and the target folder between builds, so the binary is
# copied out of the target folder in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    LIBTORCH="$(/opt/venv/bin/python -c 'import os, torch; print(os.path.dirname(torch.__file__))')" \
    cargo build --release --locked -p contrail-cli --bin contrail \
    && install -D -m 0755 target/release/contrail /out/contrail

# --- runtime: CUDA 13.0 base (driver hooks, NVIDIA_* variables); every CUDA library the worker
# uses comes from the torch wheels copied below, so the larger -runtime variant is not needed. ---
FROM nvidia/cuda:13.0.2-base-ubuntu24.04

# NCCL's InfiniBand/RoCE transport (NET/IB) dlopens libibverbs.so.1, which loads the NIC's
# provider (libmlx5, ...) from ibverbs-providers; without them NCCL falls back to TCP sockets
# (NET/Socket). ibverbs-utils brings ibv_devinfo, to check the devices from inside a pod.
# Unpinned versions on purpose, as in the builder: the base tag fixes the Ubuntu release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libibverbs1 ibverbs-providers ibverbs-utils \
    && rm -rf /var/lib/apt/lists/*

# CA roots for HTTPS object stores (rustls reads the system store); copied from the builder.
COPY --from=builder /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=builder /opt/torch /opt/torch
COPY --from=builder /out/contrail /usr/local/bin/contrail

# torch/lib first; the nvidia folders are also reached through torch's RPATH, but the worker's
# NCCL binding looks libnccl.so.2 up among the loaded libraries by name. /usr/local/nvidia/*
# is where NVIDIA's image expects driver libraries mounted by older container runtimes.
ENV LD_LIBRARY_PATH=/opt/torch/torch/lib:/opt/torch/nvidia/cu13/lib:/opt/torch/nvidia/cudnn/lib:/opt/torch/nvidia/nccl/lib:/opt/torch/nvidia/cusparselt/lib:/opt/torch/nvidia/nvshmem/lib:/usr/local/nvidia/lib:/usr/local/nvidia/lib64

# A fixed numeric UID, so that Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/contrail --create-home \
        --shell /usr/sbin/nologin contrail
USER 10001:10001
WORKDIR /var/lib/contrail

ENTRYPOINT ["contrail"]
