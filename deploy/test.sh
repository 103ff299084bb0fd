#!/usr/bin/env bash
# Install everything (Debian packages, .venv with test extras) and run the whole test suite:
# lint (ruff), types (mypy), then pytest. Extra arguments go to pytest.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
deploy/setup.sh --test
.venv/bin/ruff check proxy tests bench examples
.venv/bin/ruff format --check proxy tests bench examples
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
