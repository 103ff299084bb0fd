#!/usr/bin/env bash
# Make a Debian base image locally, for machines that reach a Debian mirror but no image
# registry (so `FROM debian:bookworm-slim` cannot be pulled): debootstrap --variant=minbase
# into a temporary directory, then `docker import`. The image has the same apt sources as
# Debian's own images (release, updates, security) and no package lists or caches.
#
# Usage: deploy/make-base-image.sh [SUITE] [TAG]
#   SUITE  bookworm (Debian 12, default) or trixie (Debian 13)
#   TAG    default hsm-proxy-base:SUITE; build with --build-arg BASE_IMAGE=TAG
# Needs root (debootstrap) and a Docker engine. DEBIAN_MIRROR overrides the mirror
# (default http://deb.debian.org/debian; apt checks the archive's signatures, not TLS).
set -euo pipefail
suite=${1:-bookworm}
tag=${2:-hsm-proxy-base:$suite}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

say() { printf 'make-base-image.sh: %s\n' "$*" >&2; }
case "$suite" in
  bookworm|trixie) ;;
  *) say "error: unknown suite $suite (known: bookworm for Debian 12, trixie for Debian 13)"; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { say "error: needs root (debootstrap creates device nodes and chowns files)"; exit 1; }
command -v debootstrap >/dev/null || { say "error: debootstrap not found (apt-get install debootstrap)"; exit 1; }
docker info >/dev/null 2>&1 || { say "error: no Docker engine answers (docker info fails)"; exit 1; }

root=$(mktemp -d "${TMPDIR:-/var/tmp}/hsm-proxy-base.XXXXXX")
trap 'rm -rf --one-file-system "$root"' EXIT
say "debootstrap --variant=minbase $suite from $mirror"
debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$root.log" 2>&1 || {
  tail -n 20 "$root.log" >&2
  say "error: debootstrap failed (full log: $root.log)"
  exit 1
}
rm -f "$root.log"

# The sources Debian's own images have; an image is rebuilt for updates, not patched in place.
security=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
rm -f "$root/etc/apt/sources.list"
cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
# As in Debian's images: no recommends, no translations, no downloaded packages kept.
cat >"$root/etc/apt/apt.conf.d/docker-defaults" <<'EOF'
APT::Install-Recommends "false";
Acquire::Languages "none";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
EOF
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/log/*.log
: >"$root/etc/resolv.conf"  # Docker provides its own at run time
: >"$root/etc/hostname"

tar --numeric-owner --xattrs -C "$root" -c . \
  | docker import --change 'CMD ["bash"]' \
      --message "debootstrap --variant=minbase $suite $mirror" - "$tag" >/dev/null
say "made $tag"
