#!/usr/bin/env bash
# Provisioning for Lockstep's gRPC Control path, usable with GitOps (the output is plain manifests), and
# for the replication link's per-site certificates.
#
#   scripts/certs.sh init DIR [--namespace lockstep] [--release lockstep] [--name HOST]... [--ip ADDR]...
#       Makes a CA (DIR/ca.key, DIR/ca.crt; keep ca.key offline) and the operator's serving certificate
#       for the Service's names plus every --name / --ip sidecars dial, and writes:
#         DIR/hub-control-tls.yaml   the hub's Secret lockstep-control-tls (tls.crt, tls.key)
#         DIR/control-ca.yaml        Secret lockstep-control-ca (ca.crt), for every cluster with sidecars
#       Run again with an existing DIR: the CA is kept and a new serving certificate is issued (rotation;
#       the operator reads the updated Secret without a restart).
#   scripts/certs.sh member-keys CLUSTER [--context CTX]
#       Prints a MemberCluster patch carrying CLUSTER's ServiceAccount signing keys
#       (kubectl get --raw /openid/v1/jwks in that cluster), to apply in the hub.
#   scripts/certs.sh link DIR SITE --identity NAME [--name HOST]... [--ip ADDR]...
#       The replication link's CA of site SITE (DIR/SITE-link-ca.crt and .key, made once; keep the key
#       offline) and a certificate of that site signed by it, DIR/NAME.crt and DIR/NAME.key, for
#       lockstep-replicator --link-cert/--link-key (usable as client and server certificate). Its first DNS
#       name is NAME, the identity secondaries bind volumes to (a primary's node name); add the --name /
#       --ip a secondary is dialled at. Give the other site's replicators DIR/SITE-link-ca.crt (--link-ca).
set -euo pipefail

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

make_ca() { # key certificate common-name: makes a CA unless the key exists
  [ -f "$1" ] && return 0
  openssl ecparam -name prime256v1 -genkey -noout -out "$1"
  openssl req -x509 -new -key "$1" -sha256 -days 3650 -subj "/CN=$3" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$2" 2>/dev/null
  echo "made a CA $2 (keep $1 offline)" >&2
}

issue() { # ca-basename out-basename common-name subject-alt-names extended-key-usage
  openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out "$2.key"
  openssl req -new -key "$2.key" -subj "/CN=$3" -out "$2.csr" 2>/dev/null
  printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=%s\n' \
    "$4" "$5" > "$2.ext"
  openssl x509 -req -in "$2.csr" -CA "$1.crt" -CAkey "$1.key" -CAcreateserial \
    -days 365 -sha256 -extfile "$2.ext" -out "$2.crt" 2>/dev/null
  rm -f "$2.csr" "$2.ext"
}

secret_yaml() { # name namespace type key=file...
  local name=$1 namespace=$2 type=$3; shift 3
  printf 'apiVersion: v1\nkind: Secret\nmetadata:\n  name: %s\n  namespace: %s\ntype: %s\ndata:\n' \
    "$name" "$namespace" "$type"
  for pair in "$@"; do
    printf '  %s: %s\n' "${pair%%=*}" "$(base64 -w0 < "${pair#*=}")"
  done
}

init() {
  local dir=${1:-}; [ -n "$dir" ] || usage; shift
  local namespace=lockstep release=lockstep names=() ips=()
  while [ $# -gt 0 ]; do
    case $1 in
      --namespace) namespace=$2; shift 2 ;;
      --release) release=$2; shift 2 ;;
      --name) names+=("$2"); shift 2 ;;
      --ip) ips+=("$2"); shift 2 ;;
      *) usage ;;
    esac
  done
  command -v openssl >/dev/null || { echo "certs.sh needs openssl" >&2; exit 1; }
  mkdir -p "$dir"; umask 077
  make_ca "$dir/ca.key" "$dir/ca.crt" "lockstep control CA"
  local service="$release-operator" san
  san="DNS:$service,DNS:$service.$namespace,DNS:$service.$namespace.svc"
  for n in "${names[@]}"; do san="$san,DNS:$n"; done
  for i in "${ips[@]}"; do san="$san,IP:$i"; done
  issue "$dir/ca" "$dir/tls" "$service" "$san" serverAuth
  secret_yaml lockstep-control-tls "$namespace" kubernetes.io/tls \
    tls.crt="$dir/tls.crt" tls.key="$dir/tls.key" ca.crt="$dir/ca.crt" > "$dir/hub-control-tls.yaml"
  secret_yaml lockstep-control-ca "$namespace" Opaque ca.crt="$dir/ca.crt" > "$dir/control-ca.yaml"
  echo "wrote $dir/hub-control-tls.yaml (hub) and $dir/control-ca.yaml (every cluster); names: $san" >&2
}

link() {
  local dir=${1:-} site=${2:-}; [ -n "$dir" ] && [ -n "$site" ] || usage; shift 2
  local identity="" names=() ips=()
  while [ $# -gt 0 ]; do
    case $1 in
      --identity) identity=$2; shift 2 ;;
      --name) names+=("$2"); shift 2 ;;
      --ip) ips+=("$2"); shift 2 ;;
      *) usage ;;
    esac
  done
  [ -n "$identity" ] || usage
  command -v openssl >/dev/null || { echo "certs.sh needs openssl" >&2; exit 1; }
  mkdir -p "$dir"; umask 077
  make_ca "$dir/$site-link-ca.key" "$dir/$site-link-ca.crt" "lockstep replication link CA $site"
  local san="DNS:$identity"
  for n in "${names[@]}"; do san="$san,DNS:$n"; done
  for i in "${ips[@]}"; do san="$san,IP:$i"; done
  issue "$dir/$site-link-ca" "$dir/$identity" "$identity" "$san" serverAuth,clientAuth
  echo "wrote $dir/$identity.crt and .key (identity $identity; names: $san), signed by $dir/$site-link-ca.crt" >&2
}

member_keys() {
  local cluster=${1:-}; [ -n "$cluster" ] || usage; shift
  local context=()
  [ "${1:-}" = --context ] && context=(--context "$2")
  local jwks
  jwks=$(kubectl "${context[@]}" get --raw /openid/v1/jwks)
  printf 'apiVersion: lockstep.dev/v1alpha1\nkind: MemberCluster\nmetadata:\n  name: %s\nspec:\n  serviceAccountKeys: %s\n' \
    "$cluster" "$(printf '%s' "$jwks" | sed "s/'/''/g; s/^/'/; s/\$/'/")"
}

case ${1:-} in
  init) shift; init "$@" ;;
  member-keys) shift; member_keys "$@" ;;
  link) shift; link "$@" ;;
  *) usage ;;
esac
