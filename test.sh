#!/usr/bin/env bash
# Installs what the tests need (idempotent) and runs them: bash test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")"
# torch first, pinned: this resolves to the CPU wheel; an unpinned torch pulls gigabytes of CUDA packages.
python3 -m pip install -q --disable-pip-version-check "torch==2.13.0"
python3 -m pip install -q --disable-pip-version-check -e ".[test]"
python3 -m pytest -q "$@"
