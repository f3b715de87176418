#!/usr/bin/env bash
# Install everything (as root) and run the whole test suite, eBPF tests included.
# Kernel tests fail, never skip, here: AGENTPROBE_REQUIRE_KERNEL=1.
set -euo pipefail
kernels=()
REPO="$(cd "$(dirname "$0")/.." && pwd)"
"$REPO/scripts/install.sh" --test
cd "$REPO"
export AGENTPROBE_REQUIRE_KERNEL=1
.venv/bin/ruff check agentprobe tests scripts/vm-run scripts/vm-test scripts/rome-world
.venv/bin/python -m pytest -rs -q "$@" tests
# the kernel tests again, in a VM booting Debian 12's own kernel with matching headers
# (BPF-LSM on, kprobes available): AGENTPROBE_VM_KERNELS="6.1 6.12" for more, "" for none
for k in ${AGENTPROBE_VM_KERNELS-6.1}; do kernels+=(--kernel "$k"); done
if [ "${#kernels[@]}" -gt 0 ]; then
    scripts/vm-test "${kernels[@]}"
fi
