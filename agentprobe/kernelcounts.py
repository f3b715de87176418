"""Records from the kernel's counting maps (repeated connects, sweeps, ICMP/DNS flows, GPU ioctls):
read through the loader, decoded by countevents, each attributed to the cgroup its process was in
when its records were last seen. A stage: it learns the attribution from the records going by, and
reads the maps on its own schedule."""

from __future__ import annotations

import time
from collections.abc import Callable

from .countevents import (
    ConnectSweepEvent,
    CountsEvent,
    decode_conn_counts,
    decode_conn_sweeps,
    decode_flow_counts,
    decode_gpu_counts,
)
from .events import ConnectEvent, ExitEvent, GpuEvent, PacketEvent, Record, SocketEvent
from .stage import Every, Stage

MAX_CONN_PIDS = 65536
KEEP_NS = 10 * 10**9  # counts this old are reported even if the kernel may still add to them


class KernelCounts(Stage):
    """`probes()` gives the loader's ProbeSet (None until it is loaded); `synthetic(type, pid,
    cgroup_id, ktime, fields)` makes a record as the enricher does; connect and flow counts are
    read every `interval_s`."""

    name = "counts"

    def __init__(self, probes: Callable[[], object], synthetic: Callable[..., dict], interval_s: float) -> None:
        self.probes = probes
        self.synthetic = synthetic
        self.conn_pids: dict[int, int] = {}  # pid -> cgroup id, processes with connects (kept after exit)
        self.gpu_pids: dict[int, int] = {}  # pid -> cgroup id, processes with in-kernel GPU state
        self.schedule = Every(interval_s)

    def process(self, record: dict) -> list[dict]:
        """Which cgroup a process's counted records belong to, from its recorded ones; a process
        with GPU counts that exits gets them reported, then its kernel state freed."""
        ev = record.event
        if isinstance(ev, GpuEvent):
            self.gpu_pids[ev.proc.pid] = ev.cgroup_id
        elif isinstance(ev, (ConnectEvent, PacketEvent, SocketEvent)):
            self.conn_pids[ev.proc.pid] = ev.cgroup_id  # kept after exit: counts are flushed later
            if len(self.conn_pids) > MAX_CONN_PIDS:
                del self.conn_pids[next(iter(self.conn_pids))]
        elif isinstance(ev, ExitEvent) and ev.proc.pid in self.gpu_pids:
            out = self.gpu()
            self.probes().forget_process(ev.proc.pid)
            del self.gpu_pids[ev.proc.pid]
            return out
        return []

    def tick(self, now: float) -> list[dict]:
        if not self.schedule.due(now):
            return []
        return self.connects() + self.flows()

    def finish(self) -> list[dict]:
        return self.connects() + self.flows()

    def connects(self) -> list[dict]:
        """Connects the kernel counted instead of recording (repeats of a recorded one within a
        second, sweeps past the record budget)."""
        p = self.probes()
        cutoff = time.monotonic_ns() - KEEP_NS
        events = decode_conn_counts(p.conn_counts(cutoff)) + decode_conn_sweeps(p.conn_sweeps(cutoff))
        return [self._record(e, self.conn_pids) for e in events]

    def flows(self) -> list[dict]:
        """ICMP packets and DNS queries counted in the kernel (the sampled ones were records too)."""
        events = decode_flow_counts(self.probes().flow_counts(time.monotonic_ns() - KEEP_NS))
        return [self._record(e, self.conn_pids) for e in events]

    def gpu(self) -> list[dict]:
        p = self.probes()
        return [self._record(e, self.gpu_pids) for e in decode_gpu_counts(p.gpu_counts(), p.gpu_majors)]

    def _record(self, e: CountsEvent, cgroups: dict[int, int]) -> Record:
        cid = e.cgroup_id if isinstance(e, ConnectSweepEvent) else cgroups.get(e.pid, 0)
        return Record(self.synthetic(e.record_type, e.pid, cid, e.ktime_ns, e.fields), e)
