#!/usr/bin/env bash
# Installs what the tests need (idempotent) and runs them: bash test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")"
# torch first, pinned: this resolves to the CPU wheel; an unpinned torch pulls gigabytes of CUDA packages.
python3 -m pip install -q --disable-pip-version-check "torch==2.13.0"
python3 -m pip install -q --disable-pip-version-check -e ".[test]"
# the web page's test drives Debian's Chromium (the browser builds pip packages fetch are not reachable here)
if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
# one worker process per CPU (4 at most), each taking whole test files, so a file's tests share their fixtures
python3 -m pytest -q -n auto --maxprocesses=4 --dist loadfile "$@"
