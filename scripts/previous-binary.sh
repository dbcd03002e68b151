#!/usr/bin/env bash
# Builds the virtproxyd binary of an earlier commit once into a cache and prints its path:
# tests/restart.rs upgrades a running proxy from it to this tree's binary with SIGUSR2.
#   scripts/previous-binary.sh [REV]     REV defaults to HEAD's first parent (HEAD~1)
set -euo pipefail
cd "$(dirname "$0")/.."

rev=${1:-HEAD~1}
cache=${VPD_CACHE_DIR:-/var/cache/virtproxyd-rs}/previous
if ! sha=$(git rev-parse --verify --quiet "$rev^{commit}"); then
  # A shallow clone: fetch the parent once.
  git fetch --quiet --deepen=1 2>/dev/null || true
  sha=$(git rev-parse --verify --quiet "$rev^{commit}") || {
    echo "previous-binary: $rev is not in this clone (shallow?); the upgrade test needs it" >&2
    exit 2
  }
fi
out=$cache/$sha/virtproxyd
mkdir -p "$cache"
# One build at a time (the two backends' tests may ask at once); the second finds it made.
exec 9>"$cache/.lock"
flock 9
if [ ! -x "$out" ]; then
  src=$(mktemp -d)
  trap 'rm -rf "$src"' EXIT
  git archive "$sha" | tar -x -C "$src"
  # Its own target dir: this tree's target/debug/virtproxyd is what the tests run.
  echo "previous-binary: building virtproxyd at $sha" >&2
  CARGO_TARGET_DIR=$cache/target cargo build --quiet --manifest-path "$src/Cargo.toml" --bin virtproxyd >&2
  mkdir -p "$cache/$sha"
  cp "$cache/target/debug/virtproxyd" "$out.tmp.$$"
  mv "$out.tmp.$$" "$out"
fi
echo "$out"
