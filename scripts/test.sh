#!/usr/bin/env bash
# Install everything (as root) and run the whole test suite, eBPF tests included.
# Kernel tests fail, never skip, here: AGENTPROBE_REQUIRE_KERNEL=1.
set -euo pipefail
kernels=()
REPO="$(cd "$(dirname "$0")/.." && pwd)"
"$REPO/scripts/install.sh" --test
cd "$REPO"
export AGENTPROBE_REQUIRE_KERNEL=1
.venv/bin/ruff check agentprobe tests examples scripts/vm-run scripts/vm-test scripts/rome-world scripts/bench scripts/soak scripts/precision.py
.venv/bin/python -m pytest -rs -q "$@" tests
# the benchmark harness works and writes well-formed results (a smoke run: not the targets)
bench_out="$(mktemp -d)"
.venv/bin/python scripts/bench --smoke --json "$bench_out/b.json" --md "$bench_out/b.md" >/dev/null
.venv/bin/python - "$bench_out/b.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
assert set(r) >= {"cost", "freeze", "throughput", "footprint", "machine", "kernel"}, r.keys()
assert all(r["cost"][c]["getppid"] > 0 for c in ("none", "outside", "inside")), r["cost"]
assert all(f["frozen"] == f["trials"] for f in r["freeze"].values()), r["freeze"]
assert r["throughput"]["held_per_s"] > 0 and r["footprint"]["startup_s"] > 0
modes = ("throughput", "throughput_distinct", "throughput_udp", "throughput_udp_distinct")
assert all(r[t]["generator_ceiling_per_s"] > 0 and r[t]["held_per_s"] > 0 for t in modes), [r[t] for t in modes]
# every connect came back, as a record or counted in the kernel, and the count says which
assert all(x["seen"] == x["connects"] and 0 < x["records"] <= x["seen"] for t in modes for x in r[t]["curve"])
assert r["footprint"]["idle_episode_cgroups"] > 0 and r["footprint"]["idle_cpu_percent_with_episodes"] >= 0
assert all("detect" in f and "freeze" in f for f in r["freeze"].values()), r["freeze"]
print("bench smoke: ok")
PY
rm -rf "$bench_out"
# a short soak: mixed agent work with periodic attacks against a real watcher; fails on a missed
# attack, a benign alert, a lost record or memory growth (scripts/soak --duration 3600 for the long one)
.venv/bin/python scripts/soak --duration 40 --attack-every 3
# the kernel tests again (less `tools` and `userland`: see scripts/vm-test), in VMs booting Debian 12's
# own kernels with matching headers (BPF-LSM on, kprobes available): 6.1 and 6.12, one after the other
# (on 2 cores, side by side they would slow each other and the tests' timing under emulation), each
# under scripts/vm-test's timeout. AGENTPROBE_VM_KERNELS="6.1" for one, "" for none.
for k in ${AGENTPROBE_VM_KERNELS-6.1 6.12}; do kernels+=(--kernel "$k"); done
if [ "${#kernels[@]}" -gt 0 ]; then
    scripts/vm-test "${kernels[@]}"
fi
