"""Helpers for tests that load the real eBPF programs."""

from __future__ import annotations

import time
from collections.abc import Callable

from agentprobe.events import Event, decode
from agentprobe.loader import LoaderOptions, ProbeSet


class Capture:
    """A loaded ProbeSet whose records are decoded into a list."""

    def __init__(self, **options) -> None:
        self.raw: list[bytes] = []
        from agentprobe.cgroups import find_v2_mount

        self.probes = ProbeSet(LoaderOptions(**options), self.raw.append, cgroup_root=find_v2_mount())
        self.probes.set_watched([])

    def watch(self, *cgroups) -> None:
        from agentprobe.cgroups import WatchedCgroup

        self.probes.set_watched([WatchedCgroup(c.id, c.rel, c.rel.count("/")) for c in cgroups])
        self.probes.poll(0)  # drop what an earlier test left in the buffer
        self.raw.clear()

    def events(self) -> list[Event]:
        self.probes.poll(50)
        return [decode(r) for r in self.raw]

    def wait(self, pred: Callable[[Event], bool], timeout: float = 5.0) -> list[Event]:
        """Poll until some event satisfies pred; return all events seen."""
        deadline = time.monotonic() + timeout
        while True:
            evs = self.events()
            if any(pred(e) for e in evs) or time.monotonic() > deadline:
                return evs
            time.sleep(0.02)

    def settle(self, seconds: float = 0.3) -> list[Event]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.probes.poll(50)
        return self.events()

    def close(self) -> None:
        self.probes.close()
