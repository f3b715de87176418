#!/usr/bin/env bash
# Install everything (as root) and run the whole test suite, eBPF tests included.
# Kernel tests fail, never skip, here: AGENTPROBE_REQUIRE_KERNEL=1.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
"$REPO/scripts/install.sh" --test
cd "$REPO"
export AGENTPROBE_REQUIRE_KERNEL=1
.venv/bin/ruff check agentprobe tests scripts
exec .venv/bin/python -m pytest -rs -q "$@" tests
