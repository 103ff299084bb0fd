#!/usr/bin/env bash
# Run the README's test command (deploy/test.sh) on another Debian release, in a chroot made
# with debootstrap: how we check Debian 13 (OpenSSL 3.5, pyOpenSSL 25, Python 3.13) from a
# Debian 12 machine and back. Needs root and network access to a Debian mirror and PyPI.
#
# Usage: deploy/test-in-debian-chroot.sh [SUITE] [ROOT_DIR]   (default: trixie ./.chroot-SUITE)
# The chroot is kept between runs (delete ROOT_DIR to start afresh); the repository is copied
# in from the current working tree (committed or not), without the virtualenvs.
set -euo pipefail
suite=${1:-trixie}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
root=${2:-$here/.chroot-$suite}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

[ "$(id -u)" = 0 ] || { echo "test-in-debian-chroot.sh: needs root (debootstrap, chroot, mounts)" >&2; exit 1; }
command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null
if [ ! -x "$root/usr/bin/apt-get" ]; then
  debootstrap --variant=minbase --include=ca-certificates "$suite" "$root" "$mirror"
fi

cleanup() { for m in dev/pts dev sys proc; do umount "$root/$m" 2>/dev/null || true; done; }
trap cleanup EXIT
mount -t proc proc "$root/proc"
mount --bind /sys "$root/sys"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
cp /etc/resolv.conf "$root/etc/resolv.conf"
# Trust what this machine trusts (a TLS-inspecting egress proxy's CA, for example).
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates >/dev/null 2>&1 || true
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$root/etc/pip.conf"
fi

rm -rf "$root/root/hsm-proxy"
mkdir -p "$root/root/hsm-proxy"
tar -C "$here" --exclude='.venv*' --exclude=.hypothesis --exclude='.chroot-*' --exclude=.git -cf - . | tar -C "$root/root/hsm-proxy" -xf -
chroot "$root" /bin/bash -c "cd /root/hsm-proxy && ./deploy/test.sh -p no:cacheprovider"
