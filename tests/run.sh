#!/usr/bin/env bash
# The project's test command (README, .ci/run): set up a fresh machine, lint, run every test.
# In CI (CI=true) a missing real component (Orthanc, DCMTK, dciodvfy, dcmqi) fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash config/setup.sh
.venv/bin/ruff check node tests benchmarks
.venv/bin/mypy node
.venv/bin/python -m pytest "$@"
