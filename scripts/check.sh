#!/usr/bin/env bash
# The checks that come before the tests (CI runs this first, through scripts/test.sh):
#   1. cargo fmt --check: the whole workspace is rustfmt-formatted;
#   2. cargo clippy on every target (tests, examples, benches) with warnings as errors; the
#      lints are set in the root Cargo.toml's [workspace.lints], each allowed one with its why;
#   3. the container images' Dockerfiles (scripts/check_dockerfiles.sh).
# Needs scripts/setup.sh (libtorch for clippy) and scripts/setup-test.sh (hadolint).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "check: cargo fmt --check"
cargo fmt --all --check
echo "check: cargo clippy --workspace --all-targets -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "check: Dockerfiles"
bash scripts/check_dockerfiles.sh
echo "check: all passed"
