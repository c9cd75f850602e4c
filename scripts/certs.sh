#!/usr/bin/env bash
# Provisioning for Lockstep's gRPC Control path, usable with GitOps (the output is plain manifests).
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
set -euo pipefail

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

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
  if [ ! -f "$dir/ca.key" ]; then
    openssl ecparam -name prime256v1 -genkey -noout -out "$dir/ca.key"
    openssl req -x509 -new -key "$dir/ca.key" -sha256 -days 3650 -subj "/CN=lockstep control CA" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
      -out "$dir/ca.crt" 2>/dev/null
    echo "made a CA in $dir (keep ca.key offline)" >&2
  fi
  local service="$release-operator" san
  san="DNS:$service,DNS:$service.$namespace,DNS:$service.$namespace.svc"
  for n in "${names[@]}"; do san="$san,DNS:$n"; done
  for i in "${ips[@]}"; do san="$san,IP:$i"; done
  openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out "$dir/tls.key"
  openssl req -new -key "$dir/tls.key" -subj "/CN=$service" -out "$dir/tls.csr" 2>/dev/null
  printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' \
    "$san" > "$dir/tls.ext"
  openssl x509 -req -in "$dir/tls.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 365 -sha256 -extfile "$dir/tls.ext" -out "$dir/tls.crt" 2>/dev/null
  rm -f "$dir/tls.csr" "$dir/tls.ext"
  secret_yaml lockstep-control-tls "$namespace" kubernetes.io/tls \
    tls.crt="$dir/tls.crt" tls.key="$dir/tls.key" ca.crt="$dir/ca.crt" > "$dir/hub-control-tls.yaml"
  secret_yaml lockstep-control-ca "$namespace" Opaque ca.crt="$dir/ca.crt" > "$dir/control-ca.yaml"
  echo "wrote $dir/hub-control-tls.yaml (hub) and $dir/control-ca.yaml (every cluster); names: $san" >&2
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
  *) usage ;;
esac
