#!/usr/bin/env bash
# The benchmark against nginx, from one command on a fresh Debian 12/13 machine:
# installs what it needs (deploy/setup.sh, then nginx, the libp11 engine and wrk from
# Debian), runs every scenario and writes bench/RESULTS.md, bench/results.json and
# bench/runs.json. Arguments go to the runner: --quick, --repetitions N, --seconds S,
# --scenarios 1,3, --output DIR, --note TEXT, --keep (see bench/README.md).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
deploy/setup.sh >&2
packages=(nginx-light libengine-pkcs11-openssl wrk gcc libc6-dev util-linux)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  sudo_cmd=()
  [ "$(id -u)" = 0 ] || sudo_cmd=(sudo)
  echo "bench: installing Debian packages: ${missing[*]}" >&2
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts the packaged nginx service on install; the bench runs its own instances.
  if command -v systemctl >/dev/null && systemctl is-active --quiet nginx 2>/dev/null; then
    "${sudo_cmd[@]}" systemctl stop nginx || true
  fi
fi
# Profiling tools live in their own virtualenv, never in the project's .venv.
for arg in "$@"; do
  if [ "$arg" = --profile ] && [ ! -x bench/.tools/bin/py-spy ]; then
    /usr/bin/python3 -m venv bench/.tools
    bench/.tools/bin/pip install -q py-spy pyinstrument
  fi
done
exec .venv/bin/python -m bench "$@"
