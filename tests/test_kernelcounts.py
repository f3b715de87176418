"""kernelcounts.py: the kernel's counting maps (read through a small fake of the loader's ProbeSet,
which needs BCC) turned into records, each in the cgroup its process was last seen in."""

from __future__ import annotations

import ctypes as ct
import socket
import time

from agentprobe import abi
from agentprobe.events import Event, Process
from agentprobe.kernelcounts import KEEP_NS, MAX_CONN_PIDS, KernelCounts


def addr16(raw: bytes):
    return (ct.c_uint8 * 16)(*raw.ljust(16, b"\0"))


NVIDIA = (195 << 20) | 0


class FakeProbes:
    """What KernelCounts calls of a ProbeSet: the count maps' moved entries, and forget_process."""

    gpu_majors = {195: abi.GPU_DEV_NVIDIA}

    def __init__(self) -> None:
        self.conn, self.sweeps, self.flows, self.gpus = [], [], [], []
        self.expire: list[int] = []
        self.forgotten: list[int] = []

    def conn_counts(self, expire_ns):
        self.expire.append(expire_ns)
        out, self.conn = self.conn, []
        return out

    def conn_sweeps(self, expire_ns):
        out, self.sweeps = self.sweeps, []
        return out

    def flow_counts(self, expire_ns):
        self.expire.append(expire_ns)
        out, self.flows = self.flows, []
        return out

    def gpu_counts(self):
        out, self.gpus = self.gpus, []
        return out

    def forget_process(self, pid):
        self.forgotten.append(pid)


def synthetic(type_, pid, cgroup_id, ktime, fields):
    return {"type": type_, "pid": pid, "cgroup_id": cgroup_id, "ktime": ktime, **fields}


def event(type_: str, pid: int, cgroup_id: int) -> Event:
    return Event(type_, 1, cgroup_id, Process(pid, pid, 1, 0, 0, "agent"))


def test_connect_counts_go_to_the_cgroup_of_the_process_s_last_record():
    p = FakeProbes()
    kc = KernelCounts(p, synthetic)
    kc.observe(event("connect", 41, 700))
    kc.observe(event("exec", 41, 999))  # not a connect-like record: does not move it
    kc.observe(event("packet", 42, 701))
    p.conn = [(abi.ConnKey(41, socket.AF_INET, socket.htons(8080), addr16(socket.inet_aton("198.51.100.7")), 1, 1),
               7, 1_000, 5_000),
              (abi.ConnKey(43, socket.AF_INET, socket.htons(80), addr16(socket.inet_aton("198.51.100.8")), 1, 0),
               2, 1_000, 2_000)]
    before = time.monotonic_ns()
    recs = kc.connects()
    assert [(r["type"], r["pid"], r["cgroup_id"], r["ktime"]) for r in recs] == [
        ("connect_counts", 41, 700, 5_000), ("connect_counts", 43, 0, 2_000)]  # 43 never seen: no cgroup
    assert recs[0]["count"] == 7 and recs[0]["address"] == "198.51.100.7"
    assert before - KEEP_NS <= p.expire[0] <= time.monotonic_ns() - KEEP_NS


def test_a_sweep_keeps_its_own_cgroup():
    p = FakeProbes()
    kc = KernelCounts(p, synthetic)
    kc.observe(event("connect", 77, 700))
    p.sweeps = [(77, abi.ConnSweep(count=300, first_ns=2_000, last_ns=9_000, cgroup_id=555, family=socket.AF_INET,
                                   port=22, addr=addr16(socket.inet_aton("10.0.0.9"))), 120)]
    (r,) = kc.connects()
    assert (r["type"], r["pid"], r["cgroup_id"], r["count"]) == ("connect_sweep", 77, 555, 120)


def test_flows_and_gpu_counts():
    p = FakeProbes()
    kc = KernelCounts(p, synthetic)
    kc.observe(event("socket", 50, 800))
    kc.observe(event("gpu", 60, 900))
    p.flows = [(abi.FlowKey(50, 17, 0, 53, addr16(socket.inet_aton("192.0.2.53"))),
                {"packets": 4, "bytes": 400, "sampled": 1, "max_len": 120}, 100, 600)]
    (f,) = kc.flows()
    assert (f["type"], f["pid"], f["cgroup_id"], f["port"], f["packets"]) == ("flow_counts", 50, 800, 53, 4)
    p.gpus = [(abi.GpuKey(60, NVIDIA, 0x2B, 0), 5, 1_000, 2_000)]
    (g,) = kc.gpu()
    assert (g["type"], g["pid"], g["cgroup_id"], g["total"], g["device"]["kind"]) == ("gpu", 60, 900, 5, "nvidia")


def test_an_exited_gpu_process_is_flushed_then_forgotten():
    p = FakeProbes()
    kc = KernelCounts(p, synthetic)
    assert kc.process_exited(60) == [] and p.forgotten == []  # never held a GPU: nothing read
    kc.observe(event("gpu", 60, 900))
    p.gpus = [(abi.GpuKey(60, NVIDIA, 0x2B, 0), 3, 1, 2)]
    (g,) = kc.process_exited(60)
    assert g["pid"] == 60 and g["cgroup_id"] == 900 and g["total"] == 3
    assert p.forgotten == [60] and 60 not in kc.gpu_pids
    assert kc.process_exited(60) == [] and p.forgotten == [60]


def test_conn_pids_are_bounded_oldest_first():
    kc = KernelCounts(FakeProbes(), synthetic)
    for pid in range(1, MAX_CONN_PIDS + 3):
        kc.observe(event("connect", pid, pid))
    assert len(kc.conn_pids) == MAX_CONN_PIDS
    assert 1 not in kc.conn_pids and 2 not in kc.conn_pids and MAX_CONN_PIDS + 2 in kc.conn_pids
