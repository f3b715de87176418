"""What the watcher reports about its own observation: records the kernel or an output lost, and
a process ptracing the watcher. These are records (`lost`, `unobserved`, `traced`); the rules
`events_lost`, `events_lost_unattributed`, `monitor_traced` and `monitor_traced_by_host` judge them.
"""

from __future__ import annotations

import os
import time
from collections import Counter, OrderedDict
from collections.abc import Callable

from .enrich import read_comm
from .hardening import traced_by
from .scope import v2_cgroup_of
from .stage import Every, Stage

ACTIVE_WINDOW_S = 2.0  # an episode that produced records this recently is a suspect of a loss
MAX_SUSPECTS = 16
MAX_ACTIVE = 1024
NOT_ACTIVITY = ("alert", "response", "verdict")


class LossMonitor(Stage):
    """As a stage it notes which episodes produced records lately; every `interval_s` it turns the
    kernel's (`kernel_counts()`: record type -> lost so far) and the outputs' (`output_dropped()`:
    output name -> dropped so far) loss counters into `lost` records, and, for kernel losses, one
    `unobserved` record per episode active meanwhile (or one without an episode when none was)."""

    name = "losses"

    def __init__(self, episode_of: Callable[[str], str], id_of: Callable[[str], int | None],
                 meta: Callable[[str, dict], dict], record_names: dict[int, str],
                 kernel_counts: Callable[[], dict[int, int]], output_dropped: Callable[[], dict[str, int]],
                 interval_s: float, summary) -> None:
        self.episode_of = episode_of
        self.id_of = id_of
        self.meta = meta
        self.record_names = record_names
        self.kernel_counts = kernel_counts
        self.output_dropped = output_dropped
        self.summary = summary  # pipeline.Summary: lost_kernel and lost_output kept up to date
        self.schedule = Every(interval_s)
        self.kernel = Counter()  # lost in the kernel, by record type name
        self.output = 0  # records the outputs could not take
        self._kernel_seen: Counter = Counter()  # by record type number, as last read (counters only grow)
        self._active: OrderedDict[str, float] = OrderedDict()  # episode -> when last seen

    def process(self, record: dict) -> list[dict]:
        path = (record.get("cgroup") or {}).get("path")
        if path and record["type"] not in NOT_ACTIVITY:
            ep = self.episode_of(path)
            self._active[ep] = time.monotonic()
            self._active.move_to_end(ep)
            if len(self._active) > MAX_ACTIVE:
                self._active.popitem(last=False)
        return []

    def tick(self, now: float) -> list[dict]:
        if not self.schedule.due(now):
            return []
        return self.check()

    def finish(self) -> list[dict]:
        return self.check()

    def check(self) -> list[dict]:
        kernel_counts, output_dropped = self.kernel_counts(), self.output_dropped()
        out = []
        delta = {self.record_names.get(t, str(t)): n - self._kernel_seen[t] for t, n in kernel_counts.items()
                 if n > self._kernel_seen[t]}
        for t, n in kernel_counts.items():
            self._kernel_seen[t] = n
        if delta:
            self.kernel.update(delta)
            self.summary.lost_kernel.update(delta)
            out.append(self.meta("lost", {"source": "kernel", "counts": delta, "total": sum(delta.values())}))
            out.extend(self._unobserved(delta))
        dropped = sum(output_dropped.values())
        if dropped > self.output:
            n, self.output = dropped - self.output, dropped
            self.summary.lost_output = dropped
            out.append(self.meta("lost", {"source": "output", "counts": dict(output_dropped), "total": n}))
        return out

    def _unobserved(self, delta: dict[str, int]) -> list[dict]:
        now = time.monotonic()
        suspects = [ep for ep, t in reversed(self._active.items()) if now - t <= ACTIVE_WINDOW_S][:MAX_SUSPECTS]
        total = sum(delta.values())
        counts = ", ".join(f"{k} {v}" for k, v in sorted(delta.items()))
        return [self.meta("unobserved", {
            "cgroup": {"id": self.id_of(ep) if ep else None, "path": ep}, "proc": {},
            "lost": dict(delta), "total": total, "counts_text": counts, "window_s": ACTIVE_WINDOW_S,
        }) for ep in suspects or [None]]


class TracerWatch(Stage):
    """Root can ptrace the watcher whatever PR_SET_DUMPABLE says, and then read and change it: a
    `traced` record when the tracer changes (TracerPid read every TICK_S)."""

    name = "tracer"
    TICK_S = 0.5

    def __init__(self, inside: Callable[[str | None], bool], episode_of: Callable[[str], str],
                 meta: Callable[[str, dict], dict]) -> None:
        self.inside = inside
        self.episode_of = episode_of
        self.meta = meta
        self._tracer = 0  # the pid ptracing the watcher, as last seen
        self.schedule = Every(self.TICK_S)

    def tick(self, now: float) -> list[dict]:
        if not self.schedule.due(now):
            return []
        return self.check()

    def check(self) -> list[dict]:
        tracer = traced_by(os.getpid())
        if tracer == self._tracer:
            return []
        self._tracer = tracer
        if not tracer:
            return []
        path = v2_cgroup_of(tracer)
        agent = self.inside(path)
        return [self.meta("traced", {
            "watcher_pid": os.getpid(), "agent": agent,
            "cgroup": {"id": None, "path": self.episode_of(path) if agent else path},
            "proc": {"pid": tracer, "comm": read_comm(tracer) or ""}})]
