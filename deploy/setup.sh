#!/usr/bin/env bash
# Idempotent install of hsm-proxy into ./.venv on Debian 12 (bookworm) or 13 (trixie).
#
# Why it looks like this (see docs/ARCHITECTURE.md, decision 1): the TLS key bridge only works when
# pyOpenSSL and cryptography link the system libssl.so.3, which is true of Debian's
# python3-openssl / python3-cryptography and false of the PyPI wheels. So the venv is made
# from the system Python with --system-site-packages, and pip is constrained to the exact
# distribution versions of those two packages: a dependency that wants newer ones makes the
# install fail loudly instead of silently shadowing them with a wheel.
#
# Usage: deploy/setup.sh [--test] [--no-apt] [--extra-ca FILE]
#   --test    also install the test extras (pytest, trustme, httpx[http2], hypothesis, grpcio,
#             mypy, ruff) and test tools (redis-server, redis-cli, h2load from Debian; sslyze,
#             in its own virtualenv .venv-sslyze; a Docker engine, docker-compose and
#             debootstrap from Debian for deploy/test-docker.sh, unless an engine or compose is
#             there already; kubernetes-validate in .venv-kubernetes)
#   --no-apt  skip apt-get (for images that installed the Debian packages already)
#   --extra-ca FILE
#             also trust the CA certificates in FILE (PEM) for apt's and pip's downloads, as
#             behind a TLS-inspecting proxy; FILE is read, never copied into the system's
#             trust store (deploy/Dockerfile passes a BuildKit secret this way)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
with_tests=0
use_apt=1
extra_ca=""
while [ "$#" -gt 0 ]; do
  case "$1" in
    --test) with_tests=1 ;;
    --no-apt) use_apt=0 ;;
    --extra-ca)
      [ "$#" -ge 2 ] || { echo "setup.sh: --extra-ca needs a FILE" >&2; exit 2; }
      extra_ca=$2
      shift
      ;;
    *) echo "setup.sh: unknown option $1 (known: --test, --no-apt, --extra-ca FILE)" >&2; exit 2 ;;
  esac
  shift
done

say() { printf 'setup.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

system_bundle=/etc/ssl/certs/ca-certificates.crt
ca_work=""
if [ -n "$extra_ca" ]; then
  [ -r "$extra_ca" ] || die "--extra-ca $extra_ca: cannot read the file"
  grep -q -- "-----BEGIN CERTIFICATE-----" "$extra_ca" \
    || die "--extra-ca $extra_ca: no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)"
  ca_work=$(mktemp -d)
  trap 'rm -rf "$ca_work"' EXIT
fi
# The system's trusted CAs (when ca-certificates is installed yet) plus the extra ones, in a
# temporary file: both apt's CaInfo and pip's cert replace the default trust, never add to it.
with_extra_ca() {
  local bundle="$ca_work/bundle-$1.pem"
  { [ -r "$system_bundle" ] && cat "$system_bundle"; cat "$extra_ca"; } >"$bundle"
  printf '%s' "$bundle"
}

[ -r /etc/os-release ] || die "cannot read /etc/os-release; hsm-proxy supports Debian 12 and 13 only"
# shellcheck disable=SC1091
. /etc/os-release
case "${ID:-}:${VERSION_ID:-}" in
  debian:12|debian:13) ;;
  debian:*) die "Debian ${VERSION_ID:-unknown} is not supported (supported: Debian 12 bookworm, Debian 13 trixie)" ;;
  *) die "${PRETTY_NAME:-this system} is not supported: hsm-proxy needs Debian 12 or 13, whose python3-openssl links the system OpenSSL 3 (docs/ARCHITECTURE.md, decision 1)" ;;
esac

packages=(python3 python3-venv python3-dev python3-openssl python3-cryptography python3-cffi
          softhsm2 opensc openssl ca-certificates gcc libc6-dev)
if [ "$with_tests" = 1 ]; then
  packages+=(curl)
  packages+=(systemd)  # systemd-analyze verifies deploy/hsm-proxy.service
  packages+=(redis-server redis-tools)  # a real TCP upstream and client for TCP passthrough
  packages+=(nghttp2-client)  # h2load: many concurrent HTTP/2 streams (tests and bench)
  # deploy/test-docker.sh: a Docker engine and compose from Debian, debootstrap for the base
  # image. An engine or compose installed otherwise (Docker's own packages) is left alone:
  # docker.io conflicts with docker-ce.
  packages+=(debootstrap)
  command -v dockerd >/dev/null || packages+=(docker.io)
  if ! command -v docker-compose >/dev/null && ! docker compose version >/dev/null 2>&1; then
    packages+=(docker-compose)
  fi
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  [ "$use_apt" = 1 ] || die "missing Debian packages: ${missing[*]} (run without --no-apt, or apt-get install them)"
  sudo_cmd=()
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || die "missing Debian packages ${missing[*]} and not root (install them, or run as root)"
    sudo_cmd=(sudo)
  fi
  apt_options=()
  [ -n "$extra_ca" ] && apt_options=(-o "Acquire::https::CaInfo=$(with_extra_ca apt)")
  say "installing Debian packages: ${missing[*]}"
  "${sudo_cmd[@]}" apt-get "${apt_options[@]}" update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get "${apt_options[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

system_python=/usr/bin/python3
[ -x "$system_python" ] || die "$system_python not found (Debian's python3 package)"
venv="$here/.venv"
if [ -x "$venv/bin/python" ]; then
  # A venv from another interpreter (pyenv, a different Debian release) cannot see Debian's
  # pyOpenSSL; rebuild it rather than keep a broken one.
  base=$("$venv/bin/python" -c 'import sys; print(sys.base_prefix)' 2>/dev/null || echo broken)
  if [ "$base" != "/usr" ] || ! grep -q "include-system-site-packages = true" "$venv/pyvenv.cfg"; then
    say "rebuilding $venv: it was not made from $system_python with --system-site-packages"
    rm -rf "$venv"
  fi
fi
if [ ! -x "$venv/bin/python" ]; then
  say "creating $venv from $system_python (with system site-packages)"
  "$system_python" -m venv --system-site-packages "$venv"
fi

# Pin pyOpenSSL and cryptography to the distribution's own versions.
constraints="$venv/hsm-proxy-constraints.txt"
"$system_python" - >"$constraints" <<'PY'
from importlib.metadata import version
for name in ("pyOpenSSL", "cryptography", "cffi"):
    print(f"{name}=={version(name)}")
PY

export PIP_CONSTRAINT="$constraints" PIP_DISABLE_PIP_VERSION_CHECK=1
[ -n "$extra_ca" ] && export PIP_CERT="$(with_extra_ca pip)"
extras=""
[ "$with_tests" = 1 ] && extras="[test]"
say "installing hsm-proxy${extras} into $venv"
"$venv/bin/python" -m pip install -q -e "$here$extras"

if [ "$with_tests" = 1 ]; then
  # moto (the AWS Secrets Manager stand-in the tests start on loopback) wants a newer
  # cryptography than Debian's; it gets a virtualenv of its own, never .venv.
  moto_venv="$here/.venv-moto"
  if ! "$moto_venv/bin/python" -c "import moto.server" >/dev/null 2>&1; then
    say "installing moto[server] into $moto_venv (test tool, kept apart from .venv)"
    rm -rf "$moto_venv"
    "$system_python" -m venv "$moto_venv"
    env -u PIP_CONSTRAINT "$moto_venv/bin/python" -m pip install -q "moto[server]>=5"
  fi
  # sslyze (the TLS scanner tests/integration/test_sslyze.py runs) wants a newer cryptography than
  # Debian's: it gets a virtualenv of its own and never touches .venv.
  sslyze_venv="$here/.venv-sslyze"
  sslyze_version=6.3.1
  if ! "$sslyze_venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('sslyze') != '$sslyze_version')" 2>/dev/null; then
    say "installing sslyze $sslyze_version into $sslyze_venv (a separate venv: it needs a newer cryptography)"
    rm -rf "$sslyze_venv"
    "$system_python" -m venv "$sslyze_venv"
    env -u PIP_CONSTRAINT "$sslyze_venv/bin/python" -m pip install -q "sslyze==$sslyze_version"
  fi
  # kubernetes-validate (tests/integration/test_deploy.py checks deploy/kubernetes/ against the
  # Kubernetes API schemas it ships) wants a newer jsonschema than Debian's, which .venv sees
  # through the system site-packages: it gets a virtualenv of its own too.
  kubernetes_venv="$here/.venv-kubernetes"
  kubernetes_validate_version=1.37.0
  if ! "$kubernetes_venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('kubernetes-validate') != '$kubernetes_validate_version')" 2>/dev/null; then
    say "installing kubernetes-validate $kubernetes_validate_version into $kubernetes_venv (a separate venv: it needs a newer jsonschema)"
    rm -rf "$kubernetes_venv"
    "$system_python" -m venv "$kubernetes_venv"
    env -u PIP_CONSTRAINT "$kubernetes_venv/bin/python" -m pip install -q "kubernetes-validate==$kubernetes_validate_version"
  fi
fi

# The proxy checks this at start-up too; failing here names the cause at install time.
"$venv/bin/python" -m proxy.tls.keys --verify >/dev/null || die "pyOpenSSL in $venv does not use the system OpenSSL (see the message above)"
say "ready: $venv/bin/hsm-proxy"
