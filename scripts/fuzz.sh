#!/usr/bin/env bash
# Runs only Lockstep's fuzz targets (proptest harnesses, also part of `cargo test --workspace` with CI's
# case counts), with CASES cases each: a long local run. Prints each target's figure line and time.
#   ./scripts/fuzz.sh [CASES]      (default 5000)
# A failure prints the shrunk input and its seed, and saves the seed in tests/<target>.proptest-regressions
# next to the target (commit it: it is replayed first on every later run).
set -euo pipefail
cd "$(dirname "$0")/.."

export LOCKSTEP_FUZZ_CASES=${1:-5000}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
targets=(
  "lockstep-operator fuzz_control"
  "lockstep-sidecar fuzz_control"
  "lockstep-replicator fuzz_link"
  "lockstep-replicator fuzz_replicator_service"
  "lockstep-replicator fuzz_failover_service"
)
for target in "${targets[@]}"; do
  read -r package test <<<"$target"
  cargo test -p "$package" --locked --test "$test" --no-run
done
echo "== $LOCKSTEP_FUZZ_CASES cases per fuzz target"
for target in "${targets[@]}"; do
  read -r package test <<<"$target"
  started=$(date +%s)
  log=$(mktemp)
  if ! RUST_LOG=${RUST_LOG:-off} cargo test -q -p "$package" --locked --test "$test" -- --test-threads=1 --nocapture \
    >"$log" 2>&1; then
    grep -av "^ *[0-9]*: \|^ *at " "$log" | tail -n 40
    echo "== $package $test FAILED (the whole output: $log)"
    exit 1
  fi
  grep -aE "fuzz:|^test .* ok$|test result" "$log" || true
  rm -f "$log"
  echo "== $package $test: $(( $(date +%s) - started )) s"
done
