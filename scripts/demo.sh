#!/usr/bin/env bash
# Lockstep's demo: simulated clusters set up with the real kubectl, replicated volumes, a cut replication link
# and the freeze, printed as it happens. Run from anywhere: ./scripts/demo.sh [--help for its flags]
set -euo pipefail
cd "$(dirname "$0")/.."

source "$(./scripts/install-tools.sh)"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --quiet --locked --workspace --bins
exec cargo run --quiet --locked -p lockstep-e2e --bin lockstep-demo -- "$@"
