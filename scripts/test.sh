#!/usr/bin/env bash
# Installs what the tests need (Debian packages, test user) and runs the whole suite:
# formatting, lints, unit tests, and the integration tests against a real libvirtd.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
cargo fmt --check
cargo clippy --all-targets -- -D warnings
# The integration tests each start their own proxies; one test binary shares one libvirtd.
cargo test --all-targets -- --test-threads="${VPD_TEST_THREADS:-2}"
