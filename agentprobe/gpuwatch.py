"""Agent processes that hold a GPU: found at start (their open descriptors), followed through
fork, exit and the ioctl records; the on-demand ioctl probe is attached while there are any and
detached a while after the last one exits; NVML's per-process use sampled where it is present."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from .forwarders import fd_paths
from .nvml import NvmlSampler


class GpuWatch:
    """`probes`: the loader's ProbeSet; `meta(type, fields)` makes a watcher record; `is_agent(pid)`
    says whether a process is in the watched cgroups (by its /proc cgroup line)."""

    def __init__(self, probes, meta: Callable[[str, dict], dict], idle_detach_s: float,
                 is_agent: Callable[[int], bool]) -> None:
        self.probes = probes
        self.meta = meta
        self.idle_detach_s = idle_detach_s
        self.is_agent = is_agent
        self.holders: set[int] = set()  # agent processes that opened a GPU device (or inherited it)
        self._idle_since: float | None = None
        self.nvml = NvmlSampler()

    def holds_gpu(self, pid: int) -> bool:
        """Has this running process a GPU device open (found at start or when a cgroup is added)?"""
        majors = self.probes.gpu_majors
        for path in fd_paths(pid):
            try:
                st = os.stat(path)
            except OSError:
                continue
            if (st.st_mode & 0o170000) == 0o020000 and os.major(st.st_rdev) in majors:
                return True
        return False

    def found_running(self, pid: int) -> None:
        if self.holds_gpu(pid):
            self.holders.add(pid)

    def forked(self, parent: int, child: int) -> None:
        if parent in self.holders:
            self.holders.add(child)  # the child inherits the open device

    def opened(self, pid: int) -> list[dict]:
        """An agent process's first GPU record with the device open."""
        if pid in self.holders:
            return []
        self.holders.add(pid)
        return self.switch(lambda: [])

    def exited(self, pid: int) -> None:
        self.holders.discard(pid)

    def switch(self, flush_counts: Callable[[], list[dict]]) -> list[dict]:
        """On-demand ioctl tracing: attached while some agent process holds a GPU device; before
        detaching, what the probe counted is flushed (`flush_counts`)."""
        p = self.probes
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
                out = flush_counts()
                p.detach_ioctl()
                self._idle_since = None
                return out + [self.meta("probe", {"probe": "gpu_ioctl", "change": "detached"})]
        return []

    def nvml_samples(self) -> list[dict]:
        """GPU processes as NVML lists them, those of agents only: each looked up (its /proc cgroup
        line), no walk of the watched cgroups, whose cost grows with the number of episode cgroups."""
        if not self.nvml.available:
            return []
        return self.nvml.sample(self.is_agent)

    def close(self) -> None:
        self.nvml.close()
