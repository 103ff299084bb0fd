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
# Usage: deploy/setup.sh [--test] [--no-apt]
#   --test    also install the test extras (pytest, trustme, httpx[http2], hypothesis, grpcio,
#             mypy, ruff) and test tools (redis-server, redis-cli, h2load from Debian; sslyze,
#             in its own virtualenv .venv-sslyze)
#   --no-apt  skip apt-get (for images that installed the Debian packages already)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
with_tests=0
use_apt=1
for arg in "$@"; do
  case "$arg" in
    --test) with_tests=1 ;;
    --no-apt) use_apt=0 ;;
    *) echo "setup.sh: unknown option $arg (known: --test, --no-apt)" >&2; exit 2 ;;
  esac
done

say() { printf 'setup.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

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
  say "installing Debian packages: ${missing[*]}"
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
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
fi

# The proxy checks this at start-up too; failing here names the cause at install time.
"$venv/bin/python" -m proxy.tls.keys --verify >/dev/null || die "pyOpenSSL in $venv does not use the system OpenSSL (see the message above)"
say "ready: $venv/bin/hsm-proxy"
