#!/usr/bin/env bash
# Builds the container images of lockstep-operator, lockstep-sidecar and lockstep-replicator (linux/amd64)
# without a container engine: each is an OCI image layout written directly (tar, gzip, sha256, JSON).
#
#   scripts/images.sh [--profile release|dev|NAME] [--bin-dir DIR] [--registry HOST] [--repository PATH] OUTDIR
#
#   --profile     cargo profile to build the binaries with (default release); they are taken from the
#                 workspace's target directory
#   --bin-dir     take the binaries from DIR as they are, and build nothing
#   --registry    (default ghcr.io) and --repository (default lockstep-dev): the images are named
#                 REGISTRY/REPOSITORY/lockstep-NAME:VERSION, as the Helm chart's default values name them
#
# VERSION is the workspace's version in Cargo.toml, the one version source (the chart's appVersion must
# equal it: the script refuses otherwise). Each image is an empty base plus two layers:
#   1. base: /etc/passwd and /etc/group with the non-root user lockstep (65532), CA certificates, exactly the
#      shared libraries the binary links (ldd), copied from this machine's Debian packages, with those
#      packages' copyright files and dpkg status entries (so SBOM and vulnerability scanners see glibc)
#   2. the binary, /usr/local/bin/lockstep-NAME, the entrypoint, without its debug info (kept in
#      OUTDIR/debug/lockstep-NAME.debug)
# and the org.opencontainers.image.* labels (source, version, revision from git, ...). The three images
# share one base layer, byte for byte, when their binaries link the same libraries.
#
# Output, per image: OUTDIR/lockstep-NAME/ (OCI layout, tagged VERSION) and OUTDIR/lockstep-NAME.oci.tar
# (the same layout as an oci-archive), and one line in OUTDIR/images.tsv: reference, manifest digest, bytes
# of compressed layers. Deterministic: every timestamp is SOURCE_DATE_EPOCH (default: the commit's time),
# so the same commit, binaries and packages give the same digests.
# Needs: cargo, git, jq, tar, gzip, sha256sum, ldd, dpkg-query, objcopy (scripts/install-tools.sh installs
# jq; the others come with Debian and Rust's linker).
set -euo pipefail
shopt -s inherit_errexit
umask 022
export LC_ALL=C

usage() { sed -n '5,11p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "images.sh: $*" >&2; exit 1; }

profile=release bin_dir="" registry=ghcr.io repository=lockstep-dev out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile=${2:?}; shift 2 ;;
    --bin-dir) bin_dir=${2:?}; shift 2 ;;
    --registry) registry=${2:?}; shift 2 ;;
    --repository) repository=${2:?}; shift 2 ;;
    -h|--help) usage ;;
    -*) echo "images.sh: unknown option $1" >&2; usage ;;
    *) [ -z "$out" ] || usage; out=$1; shift ;;
  esac
done
[ -n "$out" ] || usage

root=$(cd "$(dirname "$0")/.." && pwd)
components=(lockstep-operator lockstep-sidecar lockstep-replicator)
for tool in cargo git jq tar gzip sha256sum ldd dpkg-query objcopy; do
  command -v "$tool" >/dev/null || die "$tool is missing (scripts/install-tools.sh installs what is needed)"
done

metadata=$(cargo metadata --manifest-path "$root/Cargo.toml" --no-deps --format-version 1)
package() { jq -r --arg name "$1" --arg field "$2" '.packages[] | select(.name == $name) | .[$field] // ""' <<<"$metadata"; }
version=$(package lockstep-operator version)
source_url=$(package lockstep-operator repository)
licenses=$(package lockstep-operator license)
chart_version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$root/deploy/helm/lockstep/Chart.yaml")
[ "$chart_version" = "$version" ] \
  || die "the chart's appVersion ($chart_version) is not the workspace version ($version): set appVersion (and the chart's version) in deploy/helm/lockstep/Chart.yaml"
revision=$(git -C "$root" rev-parse HEAD)
if [ -n "$(git -C "$root" status --porcelain --untracked-files=no)" ]; then
  echo "images.sh: warning: the work tree has uncommitted changes; the images are labelled with HEAD ($revision)" >&2
fi
epoch=${SOURCE_DATE_EPOCH:-$(git -C "$root" log -1 --format=%ct)}
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)

if [ -z "$bin_dir" ]; then
  packages=()
  for component in "${components[@]}"; do packages+=(-p "$component"); done
  echo "images.sh: cargo build --profile $profile ${packages[*]}" >&2
  cargo build --manifest-path "$root/Cargo.toml" --locked --profile "$profile" "${packages[@]}" --bins
  target_dir=$(jq -r .target_directory <<<"$metadata")
  case "$profile" in dev|test) bin_dir=$target_dir/debug ;; bench) bin_dir=$target_dir/release ;; *) bin_dir=$target_dir/$profile ;; esac
fi
for component in "${components[@]}"; do
  [ -x "$bin_dir/$component" ] || die "$bin_dir/$component is not an executable"
done

mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# A reproducible tar of directory $1's entries (every file and directory below it, sorted), on stdout.
tar_tree() {
  (cd "$1" && find . -mindepth 1 -printf '%P\0' | sort -z) \
    | tar --create --file=- --directory="$1" --no-recursion --null --files-from=- \
        --format=posix --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
        --mtime="@$epoch" --owner=0 --group=0 --numeric-owner
}

# Moves file $2 into layout $1's blobs; prints "sha256:HEX SIZE".
put_blob() {
  local hex size
  hex=$(sha256sum "$2" | cut -d' ' -f1)
  size=$(stat -c %s "$2")
  mkdir -p "$1/blobs/sha256"
  mv "$2" "$1/blobs/sha256/$hex"
  echo "sha256:$hex $size"
}

# Writes layer tree $2 into layout $1 as a gzip layer; prints "DIGEST SIZE DIFF_ID".
put_layer() {
  local tarball=$work/layer.tar diff_id blob
  tar_tree "$2" >"$tarball"
  diff_id=sha256:$(sha256sum "$tarball" | cut -d' ' -f1)
  gzip -n -c "$tarball" >"$tarball.gz"
  rm -f "$tarball"
  blob=$(put_blob "$1" "$tarball.gz")
  echo "$blob $diff_id"
}

# The base tree of binary $2 in directory $1: user, CA certificates, libraries and their packages' notes.
base_tree() {
  local tree=$1 binary=$2 linked libraries library real owner
  mkdir -p "$tree/etc/ssl/certs" "$tree/tmp" "$tree/usr/share/doc" "$tree/var/lib/dpkg/status.d"
  chmod 1777 "$tree/tmp"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nlockstep:x:65532:65532:lockstep:/nonexistent:/sbin/nologin\n' >"$tree/etc/passwd"
  printf 'root:x:0:\nlockstep:x:65532:\n' >"$tree/etc/group"
  printf 'hosts: files dns\n' >"$tree/etc/nsswitch.conf"
  [ -s /etc/ssl/certs/ca-certificates.crt ] || die "/etc/ssl/certs/ca-certificates.crt is missing (apt-get install ca-certificates)"
  install -m 0644 /etc/ssl/certs/ca-certificates.crt "$tree/etc/ssl/certs/ca-certificates.crt"
  # Scanners read the distribution from os-release and the packages from status.d (as in distroless).
  # shellcheck disable=SC1091
  (. /etc/os-release && printf 'PRETTY_NAME="Lockstep (libraries from %s)"\nNAME="%s"\nID=%s\nVERSION_ID="%s"\nVERSION_CODENAME=%s\nHOME_URL="%s"\n' \
    "$PRETTY_NAME" "$NAME" "$ID" "$VERSION_ID" "${VERSION_CODENAME:-}" "$source_url") >"$tree/etc/os-release"
  # Every library the binary links, at the path the loader names, copied from the file it points to.
  linked=$(ldd "$binary") || die "ldd $binary failed: is it a dynamically linked linux/amd64 executable?"
  if grep -q 'not found' <<<"$linked"; then die "$binary links a library this machine lacks: $linked"; fi
  libraries=$(awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$linked" | sort -u)
  [ -n "$libraries" ] || die "ldd names no libraries of $binary: $linked"
  printf '%s\n' "$libraries" >"$work/libraries"
  for library in $libraries; do
    real=$(readlink -f "$library")
    mkdir -p "$tree$(dirname "$library")"
    install -m "$(stat -c %a "$real")" "$real" "$tree$library"
    owner=$(dpkg-query -S "$library" 2>/dev/null || dpkg-query -S "$real" 2>/dev/null || true)
    owner=${owner%%:*}
    [ -n "$owner" ] || die "$library belongs to no Debian package"
    echo "$owner" >>"$work/owners"
  done
  for owner in $(sort -u "$work/owners") ca-certificates; do
    dpkg-query -s "$owner" | grep -E '^(Package|Status|Priority|Section|Installed-Size|Maintainer|Architecture|Multi-Arch|Source|Version|Homepage):' \
      >"$tree/var/lib/dpkg/status.d/$owner"
    if [ -f "/usr/share/doc/$owner/copyright" ]; then
      mkdir -p "$tree/usr/share/doc/$owner"
      install -m 0644 "/usr/share/doc/$owner/copyright" "$tree/usr/share/doc/$owner/copyright"
    fi
  done
  rm -f "$work/owners"
}

: >"$work/images.tsv"
for component in "${components[@]}"; do
  binary=$bin_dir/$component
  name=$registry/$repository/$component
  layout=$out/$component
  rm -rf "$layout" "$out/$component.oci.tar"
  mkdir -p "$layout"

  rm -rf "$work/base" "$work/app"
  base_tree "$work/base" "$binary"
  # The image's binary keeps its symbol table (a backtrace names functions) but not its debug info, which
  # is kept beside the images as OUTDIR/debug/NAME.debug, named by the binary's .gnu_debuglink (gdb finds it).
  mkdir -p "$work/app/usr/local/bin" "$out/debug"
  objcopy --only-keep-debug "$binary" "$out/debug/$component.debug"
  objcopy --strip-debug --add-gnu-debuglink="$out/debug/$component.debug" "$binary" "$work/app/usr/local/bin/$component"
  chmod 0755 "$work/app/usr/local/bin/$component"
  # (Each through a variable, so that a failure stops the script.)
  layer=$(put_layer "$layout" "$work/base")
  read -r base_digest base_size base_diff_id <<<"$layer"
  layer=$(put_layer "$layout" "$work/app")
  read -r app_digest app_size app_diff_id <<<"$layer"
  libraries=$(paste -sd' ' "$work/libraries")

  description=$(package "$component" description)
  labels=$(jq -cn --arg source "$source_url" --arg version "$version" --arg revision "$revision" \
    --arg created "$created" --arg title "$component" --arg description "$description" --arg licenses "$licenses" \
    '{"org.opencontainers.image.source": $source, "org.opencontainers.image.url": $source,
      "org.opencontainers.image.version": $version, "org.opencontainers.image.revision": $revision,
      "org.opencontainers.image.created": $created, "org.opencontainers.image.title": $title,
      "org.opencontainers.image.description": $description, "org.opencontainers.image.licenses": $licenses}')
  jq -cjn --arg created "$created" --arg entrypoint "/usr/local/bin/$component" --argjson labels "$labels" \
    --arg base "$base_diff_id" --arg app "$app_diff_id" --arg libraries "$libraries" --arg component "$component" \
    '{created: $created, architecture: "amd64", os: "linux",
      config: {User: "65532:65532", Entrypoint: [$entrypoint], WorkingDir: "/",
               Env: ["PATH=/usr/local/bin:/usr/bin:/bin", "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"],
               Labels: $labels},
      rootfs: {type: "layers", diff_ids: [$base, $app]},
      history: [{created: $created, created_by: ("scripts/images.sh: base: user lockstep (65532), CA certificates, " + $libraries)},
                {created: $created, created_by: ("scripts/images.sh: /usr/local/bin/" + $component)}]}' >"$work/config.json"
  blob=$(put_blob "$layout" "$work/config.json")
  read -r config_digest config_size <<<"$blob"
  jq -cjn --arg config "$config_digest" --argjson config_size "$config_size" \
    --arg base "$base_digest" --argjson base_size "$base_size" --arg app "$app_digest" --argjson app_size "$app_size" \
    --argjson labels "$labels" \
    '{schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json",
      config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $config, size: $config_size},
      layers: [{mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: $base, size: $base_size},
               {mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: $app, size: $app_size}],
      annotations: $labels}' >"$work/manifest.json"
  blob=$(put_blob "$layout" "$work/manifest.json")
  read -r manifest_digest manifest_size <<<"$blob"
  # ref.name is the tag (skopeo's oci:DIR:TAG); io.containerd.image.name the full name `ctr images import`
  # and `kind load image-archive` give the image.
  jq -cjn --arg digest "$manifest_digest" --argjson size "$manifest_size" --arg tag "$version" --arg name "$name:$version" \
    '{schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json",
      manifests: [{mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $digest, size: $size,
                   platform: {architecture: "amd64", os: "linux"},
                   annotations: {"org.opencontainers.image.ref.name": $tag, "io.containerd.image.name": $name}}]}' \
    >"$layout/index.json"
  printf '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"
  tar_tree "$layout" >"$out/$component.oci.tar"

  printf '%s:%s\t%s\t%s\n' "$name" "$version" "$manifest_digest" "$((base_size + app_size))" >>"$work/images.tsv"
  printf 'images.sh: %s:%s %s, layers %s MB compressed (base %s, binary %s), %s MB unpacked\n' \
    "$name" "$version" "$manifest_digest" "$(awk "BEGIN { printf \"%.1f\", ($base_size + $app_size) / 1e6 }")" \
    "$base_size" "$app_size" "$(du -sb "$work/base" "$work/app" | awk '{ s += $1 } END { printf "%.1f", s / 1e6 }')" >&2
done
mv "$work/images.tsv" "$out/images.tsv"
cat "$out/images.tsv"
