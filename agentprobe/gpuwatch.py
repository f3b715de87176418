"""Agent processes that hold a GPU: found at start (their open descriptors), followed through the
fork, exit and ioctl records going by; the on-demand ioctl probe is attached while there are any and
detached a while after the last one exits; the kernel's ioctl counts and NVML's per-process use
(where it is present) reported every interval."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from .events import ExitEvent, ForkEvent, GpuEvent
from .forwarders import fd_paths
from .kernelcounts import KernelCounts
from .nvml import NvmlSampler
from .stage import Every, Stage


class GpuWatch(Stage):
    """`probes()` gives the loader's ProbeSet (None until loaded); `meta(type, fields)` makes a
    watcher record; `synthetic(...)` a record about a process as the enricher does; `is_agent(pid)`
    says whether a process is in the watched cgroups (by its /proc cgroup line); `known(pid)`
    whether the enricher's process tree knows it."""

    name = "gpu"

    def __init__(self, probes: Callable[[], object], counts: KernelCounts, meta: Callable[[str, dict], dict],
                 synthetic: Callable[..., dict], is_agent: Callable[[int], bool], known: Callable[[int], bool],
                 interval_s: float, idle_detach_s: float) -> None:
        self.probes = probes
        self.counts = counts
        self.meta = meta
        self.synthetic = synthetic
        self.is_agent = is_agent
        self.known = known
        self.idle_detach_s = idle_detach_s
        self.holders: set[int] = set()  # agent processes that opened a GPU device (or inherited it)
        self._idle_since: float | None = None
        self.schedule = Every(interval_s)
        self.nvml = NvmlSampler()

    # ---- the records going by ----
    def process(self, record: dict) -> list[dict]:
        ev = record.event
        if isinstance(ev, ForkEvent):
            if ev.proc.pid in self.holders:
                self.holders.add(ev.child_pid)  # the child inherits the open device
        elif isinstance(ev, GpuEvent) and ev.opened and ev.proc.pid not in self.holders:
            self.holders.add(ev.proc.pid)
            return self.switch()
        elif isinstance(ev, ExitEvent):
            self.holders.discard(ev.proc.pid)
        return []

    def tick(self, now: float) -> list[dict]:
        if not self.schedule.due(now):
            return []
        return self.report() + self.switch()

    def finish(self) -> list[dict]:
        return self.report()

    # ---- processes found running ----
    def found_running(self, pid: int) -> None:
        """A process of the watched cgroups found at start or when a cgroup is added: a holder if it
        has a GPU device open."""
        majors = self.probes().gpu_majors
        for path in fd_paths(pid):
            try:
                st = os.stat(path)
            except OSError:
                continue
            if (st.st_mode & 0o170000) == 0o020000 and os.major(st.st_rdev) in majors:
                self.holders.add(pid)
                return

    # ---- the probe and the reports ----
    def switch(self) -> list[dict]:
        """On-demand ioctl tracing: attached while some agent process holds a GPU device; before
        detaching, what the probe counted is reported."""
        p = self.probes()
        if p.gpu_probe != "on-demand":
            return []
        if self.holders:
            self._idle_since = None
            if p.attach_ioctl():
                return [self.meta("probe", {"probe": "gpu_ioctl", "change": "attached",
                                            "holders": sorted(self.holders)[:16]})]
        elif p.ioctl_attached:
            now = time.monotonic()
            if self._idle_since is None:
                self._idle_since = now
            elif now - self._idle_since >= self.idle_detach_s:
                out = self.report()
                p.detach_ioctl()
                self._idle_since = None
                return out + [self.meta("probe", {"probe": "gpu_ioctl", "change": "detached"})]
        return []

    def report(self) -> list[dict]:
        """NVML's samples of agent processes, then the kernel's ioctl counts."""
        return self._nvml_records() + self.counts.gpu()

    def _nvml_records(self) -> list[dict]:
        """GPU processes as NVML lists them, those of agents only: each looked up (its /proc cgroup
        line), no walk of the watched cgroups, whose cost grows with the number of episode cgroups."""
        if not self.nvml.available:
            return []
        out = []
        for s in self.nvml.sample(self.is_agent):
            rec = self.synthetic("gpu", s["pid"], self.counts.gpu_pids.get(s["pid"], 0), time.monotonic_ns(), {
                "kind": "nvml", "device": s["device"], "used_memory": s["used_memory"],
                "sm_util": s["sm_util"], "mem_util": s["mem_util"]})
            if not self.known(s["pid"]):
                rec["proc"]["comm"] = ""
            out.append(rec)
        return out

    def close(self) -> None:
        self.nvml.close()
