#!/usr/bin/env bash
# The test command (README, CI): installs what the tests need, starts the local SLURM cluster, runs
# ruff and pytest. As root it installs the apt packages and starts the cluster; otherwise the SLURM
# tests are skipped unless a cluster is already up (CI sets ANVIL_REQUIRE_SLURM=1: then they fail).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then
    if ! command -v shellcheck >/dev/null || ! command -v g++ >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck g++ >/dev/null  # g++: torch.compile on CPU
    fi
    scripts/local_slurm.sh install
    scripts/local_slurm.sh start
else
    echo "test.sh: not root, so no apt packages or SLURM cluster are set up here" >&2
fi
# PYTHON: the interpreter to install into and test with (default: `python`, e.g. of the activated virtual
# environment). torch pinned exactly: on these machines 2.13.0 (CPU) installs from a local wheel.
PYTHON=${PYTHON:-python}
"$PYTHON" -m pip install -q torch==2.13.0 -e '.[dev]'
"$PYTHON" -m ruff check .
# Two workers (pytest-xdist; ANVIL_TEST_WORKERS to change, 0 for none): the tests on the local SLURM cluster run in
# turn on one of them (conftest groups them), the rest on both.
"$PYTHON" -m pytest -q -n "${ANVIL_TEST_WORKERS:-2}" --dist loadgroup "$@"
