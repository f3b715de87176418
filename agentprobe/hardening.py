"""The watcher's own standing on the node: the privileges it needs, and what it does so that agents
can neither starve it of CPU nor read or change it (no core dumps, no same-uid ptrace, last to be
killed for memory, a short time slice, SCHED_FIFO while waiting for records)."""

from __future__ import annotations

import os
import platform

from . import btf
from .errors import EXIT_KERNEL, EXIT_PERMISSION, AgentprobeError


class PermissionProblem(AgentprobeError):
    exit_code = EXIT_PERMISSION


def check_privileges() -> None:
    if os.geteuid() == 0:
        return
    try:
        with open("/proc/self/status") as f:
            cap_eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        cap_eff = 0
    need = {"CAP_SYS_ADMIN": 21, "CAP_BPF": 39, "CAP_PERFMON": 38}
    if cap_eff & (1 << 21):
        return
    missing = [n for n, bit in need.items() if not cap_eff & (1 << bit)]
    if missing:
        raise PermissionProblem(f"agentprobe watch needs root (missing {', '.join(missing)}): run it with sudo")


def harden_self() -> dict:
    """The watcher is what an agent would attack first: no core dumps or ptrace by same-uid
    processes (PR_SET_DUMPABLE 0), last to go when memory runs out (oom_score_adj -900), and ahead
    of CPU hogs in agent cgroups (nice -5). Returns what took effect, for the start record."""
    import ctypes

    done = {}
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        done["dumpable"] = libc.prctl(4, 0, 0, 0, 0) != 0  # PR_SET_DUMPABLE 0; true if it failed
    except OSError:
        done["dumpable"] = True
    try:
        fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
        try:
            os.write(fd, b"-900")  # needs CAP_SYS_RESOURCE
        finally:
            os.close(fd)
        done["oom_score_adj"] = -900
    except OSError:
        done["oom_score_adj"] = None
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -5)
        done["nice"] = -5
    except OSError:
        done["nice"] = os.getpriority(os.PRIO_PROCESS, 0)
    done["slice_us"] = set_short_slice(done["nice"])
    return done


SCHED_SLICE_NS = 100_000  # the shortest the kernel takes (0.1 ms)


def set_short_slice(nice: int) -> int | None:
    """Ask the scheduler (EEVDF, Linux 6.12+) for a short time slice: a task with a shorter slice
    preempts the running one when it wakes, so the watcher reads a record within microseconds
    instead of waiting up to a tick for a busy agent's slice to end. The CPU share is unchanged
    (that is nice's job). Returns the slice in µs, or None where the kernel has no custom slices."""
    import ctypes
    import struct

    if platform.machine() != "x86_64":
        return None
    nr_sched_setattr, nr_sched_getattr = 314, 315
    libc = ctypes.CDLL(None, use_errno=True)
    # struct sched_attr (VER1, 56 bytes): size, policy, flags, nice, priority, runtime, deadline, period,
    # util_min, util_max; SCHED_OTHER
    attr = ctypes.create_string_buffer(struct.pack("<IIQiIQQQII", 56, 0, 0, nice, 0, SCHED_SLICE_NS, 0, 0, 0, 0), 56)
    if libc.syscall(nr_sched_setattr, 0, attr, 0) != 0:
        return None
    back = ctypes.create_string_buffer(56)
    if libc.syscall(nr_sched_getattr, 0, back, 56, 0) != 0:
        return None
    runtime = struct.unpack_from("<IIQiIQ", back.raw)[5]
    return runtime // 1000 if runtime == SCHED_SLICE_NS else None


def set_realtime(priority: int) -> bool:
    """The calling thread SCHED_FIFO at `priority` (children made normal: SCHED_RESET_ON_FORK), or
    back to a normal task at 0 (its nice value kept, the short slice asked again). False if refused
    (no CAP_SYS_NICE, or RT time not granted to this cgroup)."""
    try:
        if priority:
            os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(priority))
        else:
            os.sched_setscheduler(0, os.SCHED_OTHER | os.SCHED_RESET_ON_FORK, os.sched_param(0))
            set_short_slice(os.getpriority(os.PRIO_PROCESS, 0))
        return True
    except (OSError, AttributeError):
        return False


def check_btf() -> None:
    if not btf.VMLINUX_BTF.exists():
        raise AgentprobeError(f"the kernel has no BTF ({btf.VMLINUX_BTF}): a kernel built with "
                              "CONFIG_DEBUG_INFO_BTF=y is required", EXIT_KERNEL)


def traced_by(pid: int) -> int:
    """The pid ptracing `pid` (TracerPid in /proc/PID/status), 0 if none."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"TracerPid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0
