"""watch.py without the kernel: a Watcher's records, its reload hooks, the move record and the
rescan that keeps the probes, the pipeline and the status file in step (a small fake ProbeSet;
the whole watcher on the kernel is tests/test_watch_cli.py)."""

from __future__ import annotations

import io
import time

import pytest

from agentprobe.enrich import Enricher
from agentprobe.events import MoveEvent, Process
from agentprobe.pipeline import build_pipeline
from agentprobe.scope import WatchedScope
from agentprobe.watch import Watcher, WatchOptions


class FakeProbes:
    """What Watcher.rescan and the reload hooks call of a ProbeSet."""

    def __init__(self) -> None:
        self.watched: list[list[str]] = []
        self.remembered: list[dict] = []
        self.ports: list[tuple] = []
        self.deny: list[tuple] = []

    def set_watched(self, cgroups) -> None:
        self.watched.append(sorted(c.path for c in cgroups))

    def remember_agents(self, found) -> None:
        self.remembered.append(dict(found))

    def set_recorded_ports(self, ports) -> None:
        self.ports.append(tuple(ports))

    def set_deny(self, ports, allow, deny, on) -> None:
        self.deny.append((tuple(ports), tuple(allow), tuple(deny), on))


def test_meta_record_fields():
    w = Watcher(WatchOptions())
    before = time.monotonic_ns()
    r = w.meta_record("reload", {"ok": True})
    assert r["type"] == "reload" and r["v"] == 1 and r["ok"] is True and r["node"]
    assert before <= r["ktime"] <= time.monotonic_ns()
    assert r["ts"] - r["ktime"] == w.clock_offset_ns


def test_reload_hooks_reach_the_probes():
    w = Watcher(WatchOptions())
    w.update_recorded_ports([22, 53])  # no probes yet: kept in the options
    assert w.options.recorded_ports == (22, 53)
    p = FakeProbes()
    w._probes = p
    w.update_recorded_ports([53])
    w.update_deny({"ports": [7], "allow": ["10.0.0.0/8"], "deny": []})
    w.update_deny(None)
    assert p.ports == [(53,)]
    assert p.deny == [((7,), ("10.0.0.0/8",), (), True), ((), (), (), False)]
    assert w.options.deny is None


@pytest.fixture
def watcher(agent_cgroup, tmp_path):
    glob = agent_cgroup.rel.lstrip("/") + "/ep-*"
    opts = WatchOptions(cgroup_globs=[glob], default_rules=False, dry_run=True, status_dir=str(tmp_path / "st"))
    seen: list[dict] = []
    w = Watcher(opts, on_record=seen.append, err=io.StringIO())
    w.scope = WatchedScope([], [glob], err=w.err)
    w.scope.take()
    w.enricher = Enricher(w.scope.name_of, w.clock_offset_ns)
    w.pipeline = build_pipeline(opts, w.scope, w.enricher, w.meta_record, w.clock_offset_ns, on_record=seen.append)
    w._probes = FakeProbes()
    try:
        yield w, seen
    finally:
        w.scope.close()


def test_rescan_tells_the_probes_the_pipeline_and_the_status(agent_cgroup, watcher):
    w, seen = watcher
    w.rescan()
    assert seen == [] and w._probes.watched == []
    ep = agent_cgroup.child("ep-1")
    w._discover_running = lambda: None  # its process discovery needs the GPU watch of a started watcher
    w.rescan()
    (rec,) = [r for r in seen if r["type"] == "cgroup"]
    assert rec["change"] == "watched" and rec["cgroup"] == {"id": ep.id, "path": ep.rel}
    assert w._probes.watched == [[ep.rel]]
    status = w.pipeline.status
    assert status.watched == [{"id": ep.id, "path": ep.rel}] and status.path.exists()
    seen.clear()
    ep.remove()
    w.rescan()
    (rec,) = [r for r in seen if r["type"] == "cgroup"]
    assert rec["change"] == "gone" and rec["cgroup"]["id"] == ep.id
    assert w._probes.watched[-1] == [] and status.watched == []
    status.remove()


def test_a_move_record_names_where_the_process_went(agent_cgroup, outside_cgroup, watcher):
    w, _ = watcher
    ep = agent_cgroup.child("ep-m")
    w.scope.rescan()
    ev = MoveEvent("cgroup_move", 5, ep.id, Process(77, 77, 1, 0, 0, "mover"), moved_pid=88,
                   src_cgroup_id=ep.id, dst_cgroup_id=outside_cgroup.id)
    r = w._move_record(ev)
    assert r["type"] == "cgroup_move" and r["proc"]["pid"] == 88 and r["cgroup"]["id"] == ep.id
    assert r["to"] == {"id": outside_cgroup.id, "path": outside_cgroup.rel, "watched": False}
    assert r["mover"]["pid"] == 77 and r["mover"]["comm"] == "mover"
