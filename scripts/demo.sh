#!/usr/bin/env bash
# Lockstep's demo: simulated clusters set up with the real kubectl, replicated volumes, a cut replication link
# and the freeze, printed as it happens. Run from anywhere: ./scripts/demo.sh [--help for its flags]
set -euo pipefail
cd "$(dirname "$0")/.."

# `--apiserver kube` runs the demo on real kube-apiservers: build them from source first (once per version).
build_kube=0
previous=""
for arg in "$@"; do
  if [[ "$arg" == "--apiserver=kube" || ( "$previous" == "--apiserver" && "$arg" == "kube" ) ]]; then
    build_kube=1
  fi
  previous="$arg"
done
source "$(LOCKSTEP_BUILD_KUBE=$build_kube ./scripts/install-tools.sh)"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --quiet --locked --workspace --bins
exec cargo run --quiet --locked -p lockstep-e2e --bin lockstep-demo -- "$@"
