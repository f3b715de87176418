"""Records from the kernel's counting maps (repeated connects, sweeps, ICMP/DNS flows, GPU ioctls):
read through the loader, decoded by countevents, each attributed to the cgroup its process was in
when its records were last seen."""

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
from .events import Event

MAX_CONN_PIDS = 65536
KEEP_NS = 10 * 10**9  # counts this old are reported even if the kernel may still add to them


class KernelCounts:
    """`probes` is the loader's ProbeSet; `synthetic(type, pid, cgroup_id, ktime, fields)` makes a
    record as the enricher does."""

    def __init__(self, probes, synthetic: Callable[..., dict]) -> None:
        self.probes = probes
        self.synthetic = synthetic
        self.conn_pids: dict[int, int] = {}  # pid -> cgroup id, processes with connects (kept after exit)
        self.gpu_pids: dict[int, int] = {}  # pid -> cgroup id, processes with in-kernel GPU state

    def observe(self, ev: Event) -> None:
        """Which cgroup a process's counted records belong to, from its recorded ones."""
        if ev.type == "gpu":
            self.gpu_pids[ev.proc.pid] = ev.cgroup_id
        elif ev.type in ("connect", "packet", "socket"):
            self.conn_pids[ev.proc.pid] = ev.cgroup_id  # kept after exit: counts are flushed later
            if len(self.conn_pids) > MAX_CONN_PIDS:
                del self.conn_pids[next(iter(self.conn_pids))]

    def connects(self) -> list[dict]:
        """Connects the kernel counted instead of recording (repeats of a recorded one within a
        second, sweeps past the record budget)."""
        cutoff = time.monotonic_ns() - KEEP_NS
        events = decode_conn_counts(self.probes.conn_counts(cutoff)) + decode_conn_sweeps(
            self.probes.conn_sweeps(cutoff))
        return [self._record(e, self.conn_pids) for e in events]

    def flows(self) -> list[dict]:
        """ICMP packets and DNS queries counted in the kernel (the sampled ones were records too)."""
        events = decode_flow_counts(self.probes.flow_counts(time.monotonic_ns() - KEEP_NS))
        return [self._record(e, self.conn_pids) for e in events]

    def gpu(self) -> list[dict]:
        events = decode_gpu_counts(self.probes.gpu_counts(), self.probes.gpu_majors)
        return [self._record(e, self.gpu_pids) for e in events]

    def process_exited(self, pid: int) -> list[dict]:
        """A process with GPU counts exited: what the kernel counted for it, then its state freed."""
        if pid not in self.gpu_pids:
            return []
        out = self.gpu()
        self.probes.forget_process(pid)
        del self.gpu_pids[pid]
        return out

    def _record(self, e: CountsEvent, cgroups: dict[int, int]) -> dict:
        cid = e.cgroup_id if isinstance(e, ConnectSweepEvent) else cgroups.get(e.pid, 0)
        return self.synthetic(e.record_type, e.pid, cid, e.ktime_ns, e.fields)
