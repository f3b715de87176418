"""hardening.py on this kernel: privileges, the watcher's self-protection, SCHED_FIFO and the short
time slice. What changes the calling process runs in a child Python, so the test run is untouched."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import pytest

from agentprobe import btf, hardening
from agentprobe.errors import EXIT_KERNEL, EXIT_PERMISSION, AgentprobeError
from agentprobe.hardening import check_btf, check_privileges, traced_by

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def child(code: str, user: int | None = None) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (as `user` if given); its last stdout line is JSON."""
    kw = {"user": user, "group": user, "extra_groups": []} if user is not None else {}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": os.getcwd()}, **kw)
    return r


def result(code: str) -> dict:
    r = child(code)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


@needs_root
def test_root_has_the_privileges():
    check_privileges()


@needs_root
def test_a_user_without_capabilities_is_told_to_use_sudo():
    r = child("from agentprobe.hardening import check_privileges, PermissionProblem\n"
              "try:\n    check_privileges()\nexcept PermissionProblem as e:\n"
              "    print(e.exit_code, e, sep='|')\n", user=65534)
    assert r.returncode == 0, r.stderr
    code, msg = r.stdout.strip().split("|")
    assert int(code) == EXIT_PERMISSION
    assert "needs root" in msg and "CAP_BPF" in msg and "CAP_PERFMON" in msg and "CAP_SYS_ADMIN" in msg


def test_check_btf(monkeypatch, tmp_path):
    if btf.VMLINUX_BTF.exists():
        check_btf()
    monkeypatch.setattr(btf, "VMLINUX_BTF", tmp_path / "no-vmlinux")
    with pytest.raises(AgentprobeError) as e:
        check_btf()
    assert e.value.exit_code == EXIT_KERNEL and "CONFIG_DEBUG_INFO_BTF" in str(e.value)


def test_traced_by():
    assert traced_by(os.getpid()) == 0
    assert traced_by(2**22 + 1) == 0  # above pid_max's limit: no such process
    tracer = subprocess.Popen([sys.executable, "-c", TRACER, str(os.getpid())], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert tracer.stdout.readline().strip() == "seized"
        assert traced_by(os.getpid()) == tracer.pid
    finally:
        tracer.stdin.close()
        tracer.wait(10)
    deadline = time.monotonic() + 10
    while traced_by(os.getpid()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert traced_by(os.getpid()) == 0


TRACER = r"""
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.ptrace(0x4206, int(sys.argv[1]), None, None) == -1:  # PTRACE_SEIZE
    sys.exit("seize failed: errno %d" % ctypes.get_errno())
print("seized", flush=True)
sys.stdin.read()
"""

SCHED = r"""
import json, os
from agentprobe.hardening import set_realtime
out = {"rt": set_realtime(10), "policy": os.sched_getscheduler(0), "prio": os.sched_getparam(0).sched_priority}
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(w, str(os.sched_getscheduler(0)).encode()); os._exit(0)
os.waitpid(pid, 0)
out["child_policy"] = int(os.read(r, 16))
os.setpriority(os.PRIO_PROCESS, 0, -3)
out["back"] = set_realtime(0)
out["policy_after"] = os.sched_getscheduler(0)
out["nice_after"] = os.getpriority(os.PRIO_PROCESS, 0)
print(json.dumps(out))
"""


@needs_root
def test_set_realtime_fifo_then_back_and_children_normal():
    r = result(SCHED)
    assert r["rt"] is True, "SCHED_FIFO refused (RT time not granted to this cgroup?)"
    assert r["policy"] == os.SCHED_FIFO | os.SCHED_RESET_ON_FORK and r["prio"] == 10
    assert r["child_policy"] == os.SCHED_OTHER
    # back to normal, its nice value kept (the short slice asked again may drop RESET_ON_FORK: a normal
    # task's children are normal anyway)
    assert r["back"] is True and r["policy_after"] & ~os.SCHED_RESET_ON_FORK == os.SCHED_OTHER
    assert r["nice_after"] == -3


def test_set_realtime_refused_without_privilege():
    if os.geteuid() != 0:
        assert hardening.set_realtime(10) is False
        return
    r = child("from agentprobe.hardening import set_realtime; print(set_realtime(10))", user=65534)
    assert r.stdout.strip() == "False", r.stderr


def kernel_at_least(major: int, minor: int) -> bool:
    v = tuple(int(x) for x in platform.release().split("-")[0].split(".")[:2])
    return v >= (major, minor)


SLICE = r"""
import ctypes, json, struct
from agentprobe.hardening import set_short_slice
got = set_short_slice(0)
back = ctypes.create_string_buffer(56)
ctypes.CDLL(None).syscall(315, 0, back, 56, 0)
print(json.dumps({"got": got, "runtime": struct.unpack_from("<IIQiIQ", back.raw)[5]}))
"""


def test_set_short_slice_on_this_kernel():
    r = result(SLICE)
    if platform.machine() == "x86_64" and kernel_at_least(6, 12):
        assert r == {"got": hardening.SCHED_SLICE_NS // 1000, "runtime": hardening.SCHED_SLICE_NS}
    else:
        assert r["got"] is None


HARDEN = r"""
import ctypes, json, os
from agentprobe.hardening import harden_self
done = harden_self()
libc = ctypes.CDLL(None)
print(json.dumps({"done": done, "dumpable": libc.prctl(3, 0, 0, 0, 0),
                  "oom": open("/proc/self/oom_score_adj").read().strip(),
                  "nice": os.getpriority(os.PRIO_PROCESS, 0)}))
"""


def has_capability(bit: int) -> bool:
    with open("/proc/self/status") as f:
        cap_eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    return bool(cap_eff & (1 << bit))


@needs_root
def test_harden_self_takes_effect():
    r = result(HARDEN)
    d = r["done"]
    assert d["dumpable"] is False and r["dumpable"] == 0
    if has_capability(24):  # CAP_SYS_RESOURCE: may lower oom_score_adj
        assert d["oom_score_adj"] == -900 and r["oom"] == "-900"
    else:  # said as not done, not claimed
        assert d["oom_score_adj"] is None and int(r["oom"]) > -900
    assert d["nice"] == -5 and r["nice"] == -5
    if platform.machine() == "x86_64" and kernel_at_least(6, 12):
        assert d["slice_us"] == hardening.SCHED_SLICE_NS // 1000
