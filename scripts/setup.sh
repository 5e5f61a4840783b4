#!/usr/bin/env bash
# Installs what building and running contrail needs on a fresh Debian machine, idempotently:
#   - protoc (Debian package protobuf-compiler) for the gRPC code generation,
#   - PyTorch 2.11.0 from PyPI into ./.venv (tch 0.24 needs exactly this libtorch),
#   - ./libtorch -> the torch package inside .venv (.cargo/config.toml points LIBTORCH here).
# The demo needs nothing more; the test tools come from scripts/setup-test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0

if ! command -v protoc >/dev/null 2>&1; then
  echo "setup: installing protobuf-compiler (apt-get)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq protobuf-compiler >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch,sys; sys.exit(0 if torch.__version__.split('+')[0]=='$TORCH_VERSION' else 1)" 2>/dev/null; then
  # The wheels with their CUDA libraries unpack to about 5 GB; pip's cache would hold a
  # second copy, so it is bypassed. Say plainly when the disk cannot hold them.
  need_kb=$((6 * 1024 * 1024))
  free_kb=$(df -Pk . | awk 'NR==2 {print $4}')
  if [ "${free_kb:-0}" -lt "$need_kb" ]; then
    echo "setup: warning: PyTorch $TORCH_VERSION needs about 6 GB free in $(pwd); only $((free_kb / 1024)) MB are free" >&2
  fi
  echo "setup: installing torch==$TORCH_VERSION from PyPI into .venv (about 3 GB to download, a few minutes)"
  if ! .venv/bin/pip install --quiet --no-cache-dir --disable-pip-version-check "torch==$TORCH_VERSION"; then
    echo "setup: error: installing torch==$TORCH_VERSION failed; free space here:" >&2
    df -h . "${TMPDIR:-/tmp}" >&2
    exit 1
  fi
fi
TORCH_DIR=$(.venv/bin/python -c "import torch,os;print(os.path.dirname(torch.__file__))")
ln -sfn "$TORCH_DIR" libtorch
echo "setup: libtorch -> $TORCH_DIR"
