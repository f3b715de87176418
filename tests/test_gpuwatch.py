"""gpuwatch.py: GPU holders found from real open device descriptors (a character device of a major
the probes call a GPU's), followed through the fork, open and exit records going by (events.Record
with their typed events); the on-demand ioctl probe switched, and the kernel's counts reported, on
a small fake of the loader's ProbeSet (attach/detach need BCC and the kernel)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from agentprobe import abi
from agentprobe.events import ExitEvent, ForkEvent, GpuEvent, Process, Record
from agentprobe.gpuwatch import GpuWatch
from agentprobe.kernelcounts import KernelCounts

NULL_MAJOR = os.major(os.stat("/dev/null").st_rdev)
NVIDIA = (195 << 20) | 0


class FakeProbes:
    def __init__(self, gpu_probe: str = "on-demand", majors: dict | None = None) -> None:
        self.gpu_probe = gpu_probe
        self.gpu_majors = majors if majors is not None else {195: abi.GPU_DEV_NVIDIA}
        self.ioctl_attached = False
        self.calls: list[str] = []
        self.gpus: list[tuple] = []

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

    def gpu_counts(self):
        self.calls.append("gpu_counts")
        out, self.gpus = self.gpus, []
        return out

    def forget_process(self, pid) -> None:
        self.calls.append(f"forget {pid}")


def meta(type_: str, fields: dict) -> dict:
    return {"type": type_, **fields}


def synthetic(type_, pid, cgroup_id, ktime, fields):
    return {"type": type_, "pid": pid, "cgroup_id": cgroup_id, "proc": {"pid": pid}, **fields}


def watch(probes: FakeProbes, idle: float = 0.0, interval: float = 3600.0) -> GpuWatch:
    counts = KernelCounts(lambda: probes, synthetic, 3600.0)
    return GpuWatch(lambda: probes, counts, meta, synthetic, lambda pid: False, lambda pid: True, interval, idle)


def proc(pid: int) -> Process:
    return Process(pid, pid, 1, 0, 0, "agent")


def record(ev) -> Record:
    return Record({"type": ev.type, "proc": {"pid": ev.proc.pid}, **ev.fields()}, ev)


def forked(parent: int, child: int) -> Record:
    return record(ForkEvent("fork", 1, 7, proc(parent), child_pid=child))


def opened(pid: int) -> Record:
    return record(GpuEvent("gpu", 1, 7, proc(pid), major=195, opened=True, cmd=6))


def exited(pid: int) -> Record:
    return record(ExitEvent("exit", 1, 7, proc(pid)))


def count(pid: int, n: int) -> tuple:
    return (abi.GpuKey(pid, NVIDIA, 0x2B, 0), n, 1_000, 2_000)


def test_a_process_holding_a_gpu_major_device_is_a_holder():
    """/dev/null stands in for a GPU device: its major is declared a GPU's."""
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], **pipes)
    other = subprocess.Popen([sys.executable, "-c", "import sys; print('up', flush=True); sys.stdin.read()"],
                             **pipes)
    w = watch(FakeProbes(majors={NULL_MAJOR: 1}))
    not_gpu = watch(FakeProbes(majors={NULL_MAJOR + 1: 1}))
    try:
        assert holder.stdout.readline() == b"open\n" and other.stdout.readline() == b"up\n"
        w.found_running(other.pid)
        assert w.holders == set()
        w.found_running(holder.pid)
        assert w.holders == {holder.pid}
        not_gpu.found_running(holder.pid)
        assert not_gpu.holders == set()  # not a GPU's major
    finally:
        for p in (holder, other):
            p.stdin.close()
            p.wait(10)
    gone = watch(FakeProbes(majors={NULL_MAJOR: 1}))
    gone.found_running(holder.pid)
    assert gone.holders == set()  # gone: nothing open


HOLDER = "import sys; f = open('/dev/null'); print('open', flush=True); sys.stdin.read()"


def test_fork_and_exit_follow_holders():
    w = watch(FakeProbes())
    assert w.process(forked(10, 11)) == []
    assert w.holders == set()  # the parent holds nothing
    w.process(opened(10))
    assert w.process(forked(10, 11)) == []
    assert w.holders == {10, 11}  # the fork record's child inherits the device
    w.process(forked(11, 12))
    assert w.holders == {10, 11, 12}
    w.process(exited(10))
    w.process(exited(11))
    w.process(exited(12))
    assert w.holders == set()


def test_only_an_open_record_makes_a_holder_and_only_the_typed_event_counts():
    w = watch(FakeProbes())
    ioctl = GpuEvent("gpu", 1, 7, proc(5), major=195, cmd=0x2B, nr=0x2B)  # a first use, not an open
    assert w.process(record(ioctl)) == [] and w.holders == set()
    # the same fields without a typed event behind them (a record a stage made): nothing followed
    assert w.process(Record(dict(opened(6)))) == [] and w.holders == set()
    assert w.process(Record({"type": "fork", "proc": {"pid": 6}, "child_pid": 7})) == []
    assert w.holders == set()


def test_on_demand_probe_attached_with_the_first_holder_and_detached_when_idle():
    p = FakeProbes()
    w = watch(p, idle=0.0)
    (att,) = w.process(opened(42))
    assert att == {"type": "probe", "probe": "gpu_ioctl", "change": "attached", "holders": [42]}
    assert w.process(opened(42)) == []  # already a holder
    assert w.switch() == []  # attached already: said once
    w.process(exited(42))
    p.gpus = [count(42, 9)]
    assert w.switch() == []  # idle starts now
    assert p.ioctl_attached and p.gpus  # nothing read yet
    out = w.switch()
    assert [(r["type"], r.get("pid"), r.get("total")) for r in out[:-1]] == [("gpu", 42, 9)]  # flushed first
    assert out[-1] == {"type": "probe", "probe": "gpu_ioctl", "change": "detached"}
    assert not p.ioctl_attached and p.calls[-2:] == ["gpu_counts", "detach"]
    assert w.switch() == []


def test_a_new_holder_while_idle_keeps_the_probe():
    p = FakeProbes()
    w = watch(p, idle=3600.0)
    w.process(opened(1))
    w.process(exited(1))
    w.switch()
    assert w.switch() == [] and p.ioctl_attached  # not idle long enough
    w.process(opened(2))
    w.process(exited(2))
    assert w.switch() == [] and p.ioctl_attached


def test_other_probe_modes_switch_nothing():
    for mode in ("fentry", "always", "off"):
        p = FakeProbes(gpu_probe=mode)
        w = watch(p)
        assert w.process(opened(5)) == [] and p.calls == []
        assert w.switch() == [] and p.calls == []


def test_tick_reports_the_counts_and_switches_every_interval():
    p = FakeProbes()
    w = watch(p, idle=0.0, interval=5.0)
    t0 = time.monotonic()  # after the stage was made: its first report is due by t0 + 5
    w.process(opened(42))
    p.gpus = [count(42, 3)]
    assert w.tick(t0 + 4.0) == [] and p.gpus  # not due: nothing read
    (r,) = w.tick(t0 + 5.0)  # the counts; the probe attached already
    assert (r["type"], r["pid"], r["total"]) == ("gpu", 42, 3)
    w.process(exited(42))
    assert w.tick(t0 + 9.9) == []
    assert w.tick(t0 + 10.0) == [] and p.ioctl_attached  # report (nothing counted), idle starts
    p.gpus = [count(42, 1)]
    out = w.tick(t0 + 15.0)  # report, then the switch detaches (its own report finds nothing new)
    assert [r["type"] for r in out] == ["gpu", "probe"] and out[-1]["change"] == "detached"
    assert not p.ioctl_attached


def test_finish_reports_the_counts():
    p = FakeProbes()
    w = watch(p)
    p.gpus = [count(8, 2)]
    (r,) = w.finish()
    assert (r["type"], r["pid"], r["total"]) == ("gpu", 8, 2)
    assert p.calls == ["gpu_counts"]  # no attach or detach at finish


def test_without_nvml_no_samples():
    w = watch(FakeProbes())
    try:
        if not w.nvml.available:
            assert w._nvml_records() == [] and w.nvml.reason
            assert w.report() == []
    finally:
        w.close()
