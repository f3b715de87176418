"""watch.py without the kernel: a Watcher's records, its reload hooks, the move record, the rescan
that keeps the probes, the pipeline (its GPU watch) and the status file in step, the loop's ticks
and what close() reads before the stop record (a small fake ProbeSet; the whole watcher on the
kernel is tests/test_cli_watch.py)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time

import pytest

from agentprobe import abi
from agentprobe.enrich import Enricher
from agentprobe.events import MoveEvent, Process
from agentprobe.pipeline import build_pipeline, rule_engine
from agentprobe.scope import WatchedScope
from agentprobe.watch import Watcher, WatchOptions

NULL_MAJOR = os.major(os.stat("/dev/null").st_rdev)
NVIDIA = (195 << 20) | 0


class FakeProbes:
    """What Watcher.rescan, the reload hooks, the loop, close() and the pipeline's stages (counts,
    gpu, losses) call of a ProbeSet. /dev/null's major stands in for a GPU's."""

    gpu_probe = "fentry"
    gpu_majors = {NULL_MAJOR: abi.GPU_DEV_NVIDIA}

    def __init__(self) -> None:
        self.watched: list[list[str]] = []
        self.remembered: list[dict] = []
        self.ports: list[tuple] = []
        self.deny: list[tuple] = []
        self.polls: list[int] = []
        self.lost: dict[int, int] = {}
        self.gpus: list[tuple] = []
        self.closed = False

    def poll(self, ms: int) -> None:
        self.polls.append(ms)
        time.sleep(ms / 1000)

    def close(self) -> None:
        self.closed = True

    def lost_counts(self) -> dict[int, int]:
        return dict(self.lost)

    def conn_counts(self, expire_ns):
        return []

    def conn_sweeps(self, expire_ns):
        return []

    def flow_counts(self, expire_ns):
        return []

    def gpu_counts(self):
        out, self.gpus = self.gpus, []
        return out

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
    opts = WatchOptions(cgroup_globs=[glob], default_rules=False, dry_run=True, status_dir=str(tmp_path / "st"),
                        lost_interval=0.05, gpu_interval=0.05, poll_ms=5)
    seen: list[dict] = []
    w = Watcher(opts, on_record=seen.append, err=io.StringIO())
    w.scope = WatchedScope([], [glob], err=w.err)
    w.scope.take()
    w.enricher = Enricher(w.scope.name_of, w.clock_offset_ns, cgroup_dest=w.scope.describe)
    w.pipeline = build_pipeline(opts, w.scope, w.enricher, w.meta_record, w.clock_offset_ns, lambda: w._probes,
                                rule_engine(opts.rule_files, opts.default_rules, opts.on_loss), on_record=seen.append)
    w.summary = w.pipeline.summary
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
    holder = ep.popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"open\n"
        w.rescan()
    finally:
        holder.stdin.close()
        holder.wait(10)
    (rec,) = [r for r in seen if r["type"] == "cgroup"]
    assert rec["change"] == "watched" and rec["cgroup"] == {"id": ep.id, "path": ep.rel}
    assert w._probes.watched == [[ep.rel]]
    assert w._probes.remembered[-1] == {holder.pid: ep.id}  # the processes found running: the kernel's agents,
    assert w.pipeline.gpu.holders == {holder.pid}  # and the GPU watch's holders (its "GPU" open)
    assert w.enricher.tree.get(holder.pid) is not None
    status = w.pipeline.status
    assert status.watched == [{"id": ep.id, "path": ep.rel}] and status.path.exists()
    seen.clear()
    ep.remove()
    w.rescan()
    (rec,) = [r for r in seen if r["type"] == "cgroup"]
    assert rec["change"] == "gone" and rec["cgroup"]["id"] == ep.id
    assert w._probes.watched[-1] == [] and status.watched == []
    status.remove()


HOLDER = "import sys; f = open('/dev/null'); print('open', flush=True); sys.stdin.read()"


def test_the_loop_ticks_the_stages(watcher):
    """The loop polls, and the stages read the kernel's counters on their own schedule."""
    w, seen = watcher
    w._probes.lost = {abi.EV_EXEC: 2}
    w._probes.gpus = [(abi.GpuKey(4242, NVIDIA, 0x2B, 0), 3, 1_000, 2_000)]
    deadline = time.monotonic() + 10

    def done() -> bool:
        types = {r["type"] for r in seen}
        return {"lost", "gpu"} <= types or time.monotonic() > deadline

    assert w.run(until=done).reason == "done"
    (lost,) = [r for r in seen if r["type"] == "lost"]
    assert lost["source"] == "kernel" and lost["counts"] == {"exec": 2}
    (gpu,) = [r for r in seen if r["type"] == "gpu"]
    assert gpu["proc"]["pid"] == 4242 and gpu["total"] == 3
    assert w.summary.lost_kernel == {"exec": 2}
    assert w._probes.polls and set(w._probes.polls) == {5}


def test_close_reads_what_is_left_before_the_stop_record(watcher):
    w, seen = watcher
    probes = w._probes
    probes.lost = {abi.EV_EXEC: 3}
    probes.gpus = [(abi.GpuKey(4242, NVIDIA, 0x2B, 0), 1, 1_000, 2_000)]
    w.close()
    types = [r["type"] for r in seen]
    assert types[-1] == "stop" and probes.polls == [0] and probes.closed and w._probes is None
    assert types.index("gpu") < types.index("lost") < types.index("stop")  # counts, gpu, losses, then stop
    stop = seen[-1]
    assert stop["lost"] == {"exec": 3} and stop["events"]["lost"] == 1 and stop["events"]["gpu"] == 1


def test_a_move_record_names_where_the_process_went(agent_cgroup, outside_cgroup, watcher):
    w, _ = watcher
    ep = agent_cgroup.child("ep-m")
    w.scope.rescan()
    ev = MoveEvent("cgroup_move", 5, ep.id, Process(77, 77, 1, 0, 0, "mover"), moved_pid=88,
                   src_cgroup_id=ep.id, dst_cgroup_id=outside_cgroup.id)
    r = w.enricher.record(ev)
    assert r["type"] == "cgroup_move" and r["proc"]["pid"] == 88 and r["cgroup"]["id"] == ep.id
    assert r.event is ev
    assert r["to"] == {"id": outside_cgroup.id, "path": outside_cgroup.rel, "watched": False}
    assert r["mover"]["pid"] == 77 and r["mover"]["comm"] == "mover"
