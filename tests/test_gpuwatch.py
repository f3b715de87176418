"""gpuwatch.py: GPU holders found from real open device descriptors (a character device of a major
the probes call a GPU's), followed through fork and exit; the on-demand ioctl probe switched on a
small fake of the loader's ProbeSet (attach/detach need BCC and the kernel)."""

from __future__ import annotations

import os
import subprocess
import sys

from agentprobe.gpuwatch import GpuWatch

NULL_MAJOR = os.major(os.stat("/dev/null").st_rdev)


class FakeProbes:
    def __init__(self, gpu_probe: str = "on-demand", majors: dict | None = None) -> None:
        self.gpu_probe = gpu_probe
        self.gpu_majors = majors if majors is not None else {195: 1}
        self.ioctl_attached = False
        self.calls: list[str] = []

    def attach_ioctl(self) -> bool:
        """True only when it attached now (as ProbeSet.attach_ioctl)."""
        self.calls.append("attach")
        if self.ioctl_attached:
            return False
        self.ioctl_attached = True
        return True

    def detach_ioctl(self) -> None:
        self.calls.append("detach")
        self.ioctl_attached = False


def meta(type_: str, fields: dict) -> dict:
    return {"type": type_, **fields}


def watch(probes: FakeProbes, idle: float = 0.0) -> GpuWatch:
    return GpuWatch(probes, meta, idle, lambda pid: False)


def test_a_process_holding_a_gpu_major_device_is_a_holder():
    """/dev/null stands in for a GPU device: its major is declared a GPU's."""
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], **pipes)
    other = subprocess.Popen([sys.executable, "-c", "import sys; print('up', flush=True); sys.stdin.read()"],
                             **pipes)
    w = watch(FakeProbes(majors={NULL_MAJOR: 1}))
    try:
        assert holder.stdout.readline() == b"open\n" and other.stdout.readline() == b"up\n"
        assert w.holds_gpu(holder.pid)
        assert not w.holds_gpu(other.pid)
        assert not watch(FakeProbes(majors={NULL_MAJOR + 1: 1})).holds_gpu(holder.pid)  # not a GPU's major
        w.found_running(other.pid)
        w.found_running(holder.pid)
        assert w.holders == {holder.pid}
    finally:
        for p in (holder, other):
            p.stdin.close()
            p.wait(10)
    assert not w.holds_gpu(holder.pid)  # gone: nothing open


HOLDER = "import sys; f = open('/dev/null'); print('open', flush=True); sys.stdin.read()"


def test_fork_and_exit_follow_holders():
    w = watch(FakeProbes())
    w.forked(10, 11)
    assert w.holders == set()  # the parent holds nothing
    w.opened(10)
    w.forked(10, 11)
    assert w.holders == {10, 11}
    w.exited(10)
    w.exited(11)
    assert w.holders == set()


def test_on_demand_probe_attached_with_the_first_holder_and_detached_when_idle():
    p = FakeProbes()
    w = watch(p, idle=0.0)
    (att,) = w.opened(42)
    assert att == {"type": "probe", "probe": "gpu_ioctl", "change": "attached", "holders": [42]}
    assert w.opened(42) == []  # already a holder
    assert w.switch(lambda: []) == []  # attached already: said once
    w.exited(42)
    assert w.switch(lambda: [{"type": "gpu", "flushed": True}]) == []  # idle starts now
    assert p.ioctl_attached
    out = w.switch(lambda: [{"type": "gpu", "flushed": True}])
    assert out == [{"type": "gpu", "flushed": True}, {"type": "probe", "probe": "gpu_ioctl", "change": "detached"}]
    assert not p.ioctl_attached and p.calls[-1] == "detach"
    assert w.switch(lambda: []) == []


def test_a_new_holder_while_idle_keeps_the_probe():
    p = FakeProbes()
    w = watch(p, idle=3600.0)
    w.opened(1)
    w.exited(1)
    w.switch(lambda: [])
    assert w.switch(lambda: []) == [] and p.ioctl_attached  # not idle long enough
    w.opened(2)
    w.exited(2)
    assert w.switch(lambda: []) == [] and p.ioctl_attached


def test_other_probe_modes_switch_nothing():
    for mode in ("fentry", "always", "off"):
        p = FakeProbes(gpu_probe=mode)
        w = watch(p)
        assert w.opened(5) == [] and p.calls == []


def test_without_nvml_no_samples():
    w = watch(FakeProbes())
    try:
        if not w.nvml.available:
            assert w.nvml_samples() == [] and w.nvml.reason
    finally:
        w.close()
