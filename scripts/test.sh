#!/usr/bin/env bash
# Lockstep's test command: installs what the tests need, then runs every test of the workspace and the
# offline schema check of the generated CRDs. Run from anywhere: ./scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

source "$(./scripts/install-tools.sh)"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

echo "== offline schema check of the generated CRDs (kubernetes-validate, Kubernetes 1.33)"
kubernetes-validate --quiet --strict -k 1.33.0 crds/*.yaml

echo "== cargo test --workspace"
cargo test --workspace --locked --no-fail-fast
