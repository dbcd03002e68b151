#!/usr/bin/env bash
# Installs what the tests need (Debian packages, test user) and runs the whole suite:
# formatting, lints, unit tests, and the integration tests against a real libvirtd.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
# tests/clients.rs runs against libvirt's modular daemons: built once per machine into a cache.
bash scripts/modular-testbed.sh build >/dev/null
# tests/restart.rs upgrades a running proxy from the previous commit's binary: built once per
# commit into a cache.
bash scripts/previous-binary.sh >/dev/null
cargo fmt --check
cargo clippy --all-targets -- -D warnings
# The fuzz targets (run with cargo-fuzz) must keep compiling against the library.
cargo check --quiet --manifest-path fuzz/Cargo.toml --bins
# The integration tests each start their own proxies; one test binary shares one libvirtd.
cargo test --all-targets -- --test-threads="${VPD_TEST_THREADS:-2}"

# Kernel TLS: this host has no CONFIG_TLS, so the same kTLS test binary also runs inside VMs
# booting Debian's 6.1 and 6.12 kernels (scripts/ktls-vm.sh), where kTLS must engage.
ktls_bin=$(cargo test --test ktls --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    j = json.loads(line)
    if j.get("reason") == "compiler-artifact" and j.get("executable") and j["target"]["name"] == "ktls":
        print(j["executable"])')
[ -x "$ktls_bin" ] || { echo "kTLS test binary not found" >&2; exit 1; }
bash scripts/ktls-vm.sh prepare --kernel all
# A guest kernel under TCG occasionally oopses while booting (seen once with 6.12: int3 in
# sched_clock_cpu), before the test program starts. Only that case is retried, once; a test
# that ran and failed, or a timeout, fails the suite as before.
vm_err=$(mktemp)
trap 'rm -f "$vm_err"' EXIT
for kernel in 6.1 6.12; do
  for attempt in 1 2; do
    echo "== kTLS test in a VM with Debian's $kernel kernel (attempt $attempt)"
    rc=0
    bash scripts/ktls-vm.sh run --kernel "$kernel" --timeout 900 --env VPD_EXPECT_KTLS=1 -- \
      "$ktls_bin" --test-threads=1 --nocapture 2>"$vm_err" || rc=$?
    cat "$vm_err" >&2
    if [ "$rc" = 125 ] && [ "$attempt" = 1 ] && grep -q 'did not boot to the program' "$vm_err"; then
      echo "== the $kernel guest did not boot to the test program; booting it again"
      continue
    fi
    [ "$rc" = 0 ] || exit "$rc"
    break
  done
done
