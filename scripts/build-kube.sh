#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager and etcd from source, from the committed wrapper modules
# e2e/kube/go/{kubernetes,etcd} (pinned by scripts/pin-kube.sh), for the tests against a real cluster.
# Everything lands outside the clone, keyed by version, so CI and other clones reuse it:
#   ${LOCKSTEP_KUBE_CACHE:-~/.cache/lockstep/kube}/v1.34.N/bin/{kube-apiserver,kube-controller-manager,etcd}
#   .../gomod and .../gocache   (GOMODCACHE and GOCACHE of these builds)
# Idempotent: when the binaries there were built from the same wrapper files, it builds nothing.
# Needs Go (1.26) and the Go module proxy. Prints the bin directory as stdout's last line.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
wrappers=$root/e2e/kube/go
cache=${LOCKSTEP_KUBE_CACHE:-$HOME/.cache/lockstep/kube}
say() { echo "build-kube: $*" >&2; }

required() { # the version a go.mod requires of a module (in a require block or on a single require line)
  awk -v module="$1" '{ m = $1; v = $2 } $1 == "require" { m = $2; v = $3 } m == module && v ~ /^v/ { print v; exit }' "$2"
}
kube_version=$(required k8s.io/kubernetes "$wrappers/kubernetes/go.mod")
etcd_version=$(required go.etcd.io/etcd/server/v3 "$wrappers/etcd/go.mod")
[ -n "$kube_version" ] && [ -n "$etcd_version" ] || { say "cannot read the pinned versions from $wrappers"; exit 1; }
bin=$cache/$kube_version/bin
# What the binaries were built from: a change to a wrapper module rebuilds them.
source_hash=$(cd "$wrappers" && find . -type f \( -name go.mod -o -name go.sum -o -name '*.go' \) | LC_ALL=C sort \
  | xargs sha256sum | sha256sum | cut -d' ' -f1)
stamp="kubernetes $kube_version etcd $etcd_version wrappers $source_hash"

built() {
  [ -x "$bin/kube-apiserver" ] && [ -x "$bin/kube-controller-manager" ] && [ -x "$bin/etcd" ] \
    && [ "$(cat "$bin/.built-from" 2>/dev/null)" = "$stamp" ]
}

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9 # one build at a time per cache (several clones or CI jobs may share it)
if ! built; then
  command -v go >/dev/null || { say "Go is needed to build Kubernetes $kube_version from source; install Go 1.26"; exit 1; }
  say "building kube-apiserver, kube-controller-manager $kube_version and etcd $etcd_version into $bin (cold: tens of minutes)"
  started=$(date +%s)
  export GOMODCACHE=$cache/gomod GOCACHE=$cache/gocache GOTOOLCHAIN=local CGO_ENABLED=0
  export GOFLAGS="-mod=readonly -trimpath -buildvcs=false -p=${LOCKSTEP_KUBE_BUILD_JOBS:-$(nproc)}"
  major=${kube_version#v}; major=${major%%.*}
  minor=${kube_version#v*.}; minor=${minor%%.*}
  ldflags="-s -w"
  for package in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $package.gitVersion=$kube_version -X $package.gitMajor=$major -X $package.gitMinor=$minor"
    ldflags+=" -X $package.gitTreeState=clean"
  done
  staging=$(mktemp -d "$cache/build.XXXXXX")
  trap 'rm -rf "$staging"' EXIT
  (cd "$wrappers/kubernetes" && nice -n 19 go build -ldflags "$ldflags" -o "$staging/" ./kube-apiserver ./kube-controller-manager)
  (cd "$wrappers/etcd" && nice -n 19 go build -ldflags "-s -w" -o "$staging/etcd" .)
  echo "$stamp" > "$staging/.built-from"
  chmod 0755 "$staging"
  rm -rf "$bin"
  mkdir -p "$(dirname "$bin")"
  mv "$staging" "$bin"
  trap - EXIT
  say "built in $(( $(date +%s) - started ))s: $("$bin/kube-apiserver" --version), etcd $("$bin/etcd" --version | head -1)"
fi
echo "$bin"
