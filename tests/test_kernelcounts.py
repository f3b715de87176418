"""kernelcounts.py: the kernel's counting maps (read through a small fake of the loader's ProbeSet,
which needs BCC) turned into records, each in the cgroup its process was last seen in, learnt from
the typed events of the records going by (events.Record), and read on the stage's own schedule."""

from __future__ import annotations

import ctypes as ct
import socket
import time

from agentprobe import abi
from agentprobe.countevents import ConnectCountsEvent, ConnectSweepEvent, FlowCountsEvent, GpuCountsEvent
from agentprobe.events import (
    ConnectEvent,
    ExecEvent,
    ExitEvent,
    GpuEvent,
    PacketEvent,
    Process,
    Record,
    SocketEvent,
)
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


def proc(pid: int) -> Process:
    return Process(pid, pid, 1, 0, 0, "agent")


def record(ev) -> Record:
    """A record going by as the pipeline hands it to a stage: the stream's fields and the event."""
    return Record({"type": ev.type, "cgroup": {"id": ev.cgroup_id, "path": None}, "proc": {"pid": ev.proc.pid},
                   **ev.fields()}, ev)


def connect(pid: int, cgroup_id: int) -> Record:
    return record(ConnectEvent("connect", 1, cgroup_id, proc(pid), family="inet", address="198.51.100.7", port=80))


def gpu_open(pid: int, cgroup_id: int) -> Record:
    return record(GpuEvent("gpu", 1, cgroup_id, proc(pid), major=195, opened=True, cmd=6))


def exited(pid: int, cgroup_id: int = 0) -> Record:
    return record(ExitEvent("exit", 1, cgroup_id, proc(pid)))


def counts(p: FakeProbes, interval_s: float = 1.0) -> KernelCounts:
    return KernelCounts(lambda: p, synthetic, interval_s)


def conn_key(pid: int, addr: str):
    return (abi.ConnKey(pid, socket.AF_INET, socket.htons(8080), addr16(socket.inet_aton(addr)), 1, 1), 7, 1_000,
            5_000)


def test_connect_counts_go_to_the_cgroup_of_the_process_s_last_record():
    p = FakeProbes()
    kc = counts(p)
    assert kc.process(connect(41, 700)) == []
    kc.process(record(ExecEvent("exec", 1, 999, proc(41), filename="/bin/true")))  # not connect-like: no move
    kc.process(record(PacketEvent("packet", 1, 701, proc(42), address="192.0.2.1")))
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
    assert all(isinstance(r, Record) and isinstance(r.event, ConnectCountsEvent) for r in recs)
    assert (recs[0].event.pid, recs[0].event.fields["count"]) == (41, 7)


def test_a_record_without_an_event_teaches_nothing():
    """The fields alone (a record the watcher or a stage made, event None) never move a process."""
    p = FakeProbes()
    kc = counts(p)
    assert kc.process(Record({"type": "connect", "cgroup": {"id": 700, "path": None}, "proc": {"pid": 41}})) == []
    assert kc.process(Record({"type": "exit", "proc": {"pid": 41}})) == []
    assert kc.conn_pids == {} and kc.gpu_pids == {}


def test_a_sweep_keeps_its_own_cgroup():
    p = FakeProbes()
    kc = counts(p)
    kc.process(connect(77, 700))
    p.sweeps = [(77, abi.ConnSweep(count=300, first_ns=2_000, last_ns=9_000, cgroup_id=555, family=socket.AF_INET,
                                   port=22, addr=addr16(socket.inet_aton("10.0.0.9"))), 120)]
    (r,) = kc.connects()
    assert (r["type"], r["pid"], r["cgroup_id"], r["count"]) == ("connect_sweep", 77, 555, 120)
    assert isinstance(r.event, ConnectSweepEvent) and r.event.cgroup_id == 555


def test_flows_and_gpu_counts():
    p = FakeProbes()
    kc = counts(p)
    kc.process(record(SocketEvent("socket", 1, 800, proc(50))))
    kc.process(gpu_open(60, 900))
    p.flows = [(abi.FlowKey(50, 17, 0, 53, addr16(socket.inet_aton("192.0.2.53"))),
                {"packets": 4, "bytes": 400, "sampled": 1, "max_len": 120}, 100, 600)]
    (f,) = kc.flows()
    assert (f["type"], f["pid"], f["cgroup_id"], f["port"], f["packets"]) == ("flow_counts", 50, 800, 53, 4)
    assert isinstance(f.event, FlowCountsEvent)
    p.gpus = [(abi.GpuKey(60, NVIDIA, 0x2B, 0), 5, 1_000, 2_000)]
    (g,) = kc.gpu()
    assert (g["type"], g["pid"], g["cgroup_id"], g["total"], g["device"]["kind"]) == ("gpu", 60, 900, 5, "nvidia")
    assert isinstance(g.event, GpuCountsEvent)


def test_an_exited_gpu_process_is_flushed_then_forgotten():
    p = FakeProbes()
    kc = counts(p)
    assert kc.process(exited(60)) == [] and p.forgotten == []  # never held a GPU: nothing read
    kc.process(gpu_open(60, 900))
    p.gpus = [(abi.GpuKey(60, NVIDIA, 0x2B, 0), 3, 1, 2)]
    (g,) = kc.process(exited(60, 900))
    assert g["pid"] == 60 and g["cgroup_id"] == 900 and g["total"] == 3
    assert p.forgotten == [60] and 60 not in kc.gpu_pids
    assert kc.process(exited(60, 900)) == [] and p.forgotten == [60]


def test_an_exited_process_keeps_its_connect_cgroup():
    """Connect counts are read later than the exit: the cgroup stays known."""
    p = FakeProbes()
    kc = counts(p)
    kc.process(connect(41, 700))
    assert kc.process(exited(41, 700)) == [] and p.forgotten == []
    p.conn = [conn_key(41, "198.51.100.7")]
    (r,) = kc.connects()
    assert r["cgroup_id"] == 700


def test_conn_pids_are_bounded_oldest_first():
    kc = counts(FakeProbes())
    for pid in range(1, MAX_CONN_PIDS + 3):
        kc.process(connect(pid, pid))
    assert len(kc.conn_pids) == MAX_CONN_PIDS
    assert 1 not in kc.conn_pids and 2 not in kc.conn_pids and MAX_CONN_PIDS + 2 in kc.conn_pids


def test_tick_reads_connects_and_flows_every_interval():
    p = FakeProbes()
    kc = counts(p, interval_s=5.0)
    t0 = time.monotonic()  # after the stage was made: its first read is due by t0 + 5
    kc.process(connect(41, 700))
    p.conn = [conn_key(41, "198.51.100.7")]
    assert kc.tick(t0) == [] and kc.tick(t0 + 4.0) == []
    assert p.expire == []  # not due: the maps were not read
    out = kc.tick(t0 + 5.0)
    assert [(r["type"], r["pid"], r["cgroup_id"]) for r in out] == [("connect_counts", 41, 700)]
    assert len(p.expire) == 2  # connects and flows, both read
    p.conn = [conn_key(41, "198.51.100.8")]
    assert kc.tick(t0 + 9.9) == [] and len(p.expire) == 2  # the next read is 5 s after the last
    (r,) = kc.tick(t0 + 10.0)
    assert r["address"] == "198.51.100.8" and len(p.expire) == 4


def test_finish_reads_connects_and_flows_whatever_the_schedule():
    p = FakeProbes()
    kc = counts(p, interval_s=3600.0)
    kc.process(record(SocketEvent("socket", 1, 800, proc(50))))
    p.conn = [conn_key(50, "198.51.100.7")]
    p.flows = [(abi.FlowKey(50, 17, 0, 53, addr16(socket.inet_aton("192.0.2.53"))),
                {"packets": 1, "bytes": 60, "sampled": 1, "max_len": 60}, 100, 600)]
    p.gpus = [(abi.GpuKey(50, NVIDIA, 0x2B, 0), 5, 1_000, 2_000)]
    out = kc.finish()
    assert [(r["type"], r["cgroup_id"]) for r in out] == [("connect_counts", 800), ("flow_counts", 800)]
    assert p.gpus  # the GPU counts are the GPU stage's to report
