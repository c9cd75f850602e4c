#!/usr/bin/env bash
# Lockstep's test command: installs what the tests need, then runs every test of the workspace and the
# offline schema check of the generated CRDs. Run from anywhere: ./scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# The tests against a real API server need kube-apiserver and etcd, built from source once per version.
source "$(LOCKSTEP_BUILD_KUBE=1 ./scripts/install-tools.sh)"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

echo "== offline schema check of the generated CRDs (kubernetes-validate, Kubernetes 1.34, the pinned release)"
kubernetes-validate --quiet --strict -k 1.34.0 crds/*.yaml

echo "== offline schema check of the Helm chart, rendered for a hub and for a member cluster"
for values in "clusterName=east" "clusterName=west,operator.enabled=false,memberAccess.enabled=true"; do
  helm template lockstep deploy/helm/lockstep --namespace lockstep --set "$values" \
    | kubernetes-validate --quiet --strict -k 1.34.0 -
done

echo "== cargo test --workspace"
# One test at a time within each test binary: the end-to-end tests run API servers, replicators, sidecars
# and operators of their own, and on a 2-core machine several of them at once starve each other's timers.
cargo test --workspace --locked --no-fail-fast -- --test-threads=1

echo "== 10 000 volumes (5 member clusters x 20 nodes, both paths): a freeze, its release, the resync and the group's deletion"
# The freeze benchmark as a test (--check: it fails unless the trial completed and the deletion did), in a
# release build: the point is that a group this large works, and a debug build runs it several times slower.
cargo run --release --locked -p lockstep-e2e --bin lockstep-freeze-bench -- \
  --volumes 10000 --paths both --clusters 5 --nodes-per-cluster 20 --trials 1 --warmup 0 --check \
  --out "$CARGO_TARGET_DIR/freeze-bench-10k"

echo "== deterministic simulation: 10 000 seeds of the operator's, sidecars' and replicators' real cores under seeded faults"
# Release build: about 65 seeds/s on two cores. A violation prints the seed and the command that replays it.
cargo run --release --locked -p lockstep-sim -- --seeds 10000

echo "== the simulator's mutation check: each defect planted in the real cores is caught within 10 000 seeds"
cargo test --release --locked -p lockstep-sim --features mutants --test seeds -- --nocapture --test-threads=1 \
  each_planted_defect_is_caught_within_the_seed_budget

echo "== again on real kube-apiserver $(grep -m1 -o 'k8s.io/kubernetes v[0-9.]*' e2e/kube/go/kubernetes/go.mod | cut -d' ' -f2) and etcd: the operator's multi-cluster and Helm-chart tests, the fault scenarios, kubectl lockstep"
# The same test code on the other backend (lockstep_kube::backend): what passes on the test API server
# must pass on the real one. Missing binaries fail these tests: LOCKSTEP_APISERVER=kube asks for them.
# Outside CI on a machine without Go (nothing was built), this pass is skipped and said so; in CI it runs.
if [ -z "${LOCKSTEP_KUBE_BIN:-}" ] && [ -z "${CI:-}" ]; then
  echo "== skipped: no kube-apiserver was built (no Go on this machine); the tests above ran on the test API server"
else
  export LOCKSTEP_APISERVER=kube
  cargo test -p lockstep-operator --locked --no-fail-fast --test multicluster --test helm_chart -- --test-threads=1
  cargo test -p lockstep-e2e --locked --no-fail-fast --test faults -- --test-threads=1
  cargo test -p kubectl-lockstep --locked --no-fail-fast --test through_kubectl -- --test-threads=1
fi
