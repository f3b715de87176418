"""selfwatch.py: the watcher's reports about its own observation. LossMonitor turns the kernel's
and the outputs' loss counters (read through its two callables) into `lost` records and
`unobserved` records (one per episode active within ACTIVE_WINDOW_S), every interval and at finish,
and keeps the pipeline's Summary up to date; TracerWatch reports a real process ptracing this one
as `traced`, every TICK_S."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from agentprobe import selfwatch, stage
from agentprobe.cgroups import episode_of
from agentprobe.pipeline import Summary
from agentprobe.selfwatch import ACTIVE_WINDOW_S, MAX_SUSPECTS, LossMonitor, TracerWatch

TOP = "/agents"
NAMES = {1: "exec", 2: "connect"}


def meta(type_: str, fields: dict) -> dict:
    return {"v": 1, "type": type_, **fields}


class Clock:
    """selfwatch's and its schedules' (stage.Every) `time`, at a time the test chooses."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(selfwatch, "time", c)
    monkeypatch.setattr(stage, "time", c)
    return c


class Counters:
    """The loss counters as the monitor reads them: the kernel's (ProbeSet.lost_counts) and the
    outputs' (Pipeline.dropped), with how often each was read."""

    def __init__(self) -> None:
        self.kernel: dict[int, int] = {}
        self.output: dict[str, int] = {}
        self.reads = 0

    def kernel_counts(self) -> dict[int, int]:
        self.reads += 1
        return dict(self.kernel)

    def output_dropped(self) -> dict[str, int]:
        return dict(self.output)


def monitor(interval_s: float = 1.0) -> LossMonitor:
    counters = Counters()
    m = LossMonitor(lambda p: episode_of(p, [TOP]), lambda p: {"/agents/ep1": 11, "/agents/ep2": 12}.get(p),
                    meta, NAMES, counters.kernel_counts, counters.output_dropped, interval_s, Summary())
    m.counters = counters
    return m


def check(m: LossMonitor, kernel: dict[int, int], output: dict[str, int]) -> list[dict]:
    """The counters read `kernel` and `output` (cumulative, as the kernel and the outputs keep
    them), then one check."""
    m.counters.kernel, m.counters.output = kernel, output
    return m.check()


def rec(type_: str, path: str | None) -> dict:
    return {"type": type_, "cgroup": {"id": 5, "path": path}, "proc": {"pid": 1}}


def by_type(records: list[dict], t: str) -> list[dict]:
    return [r for r in records if r["type"] == t]


# ------------------------------------------------------------------ LossMonitor
def test_a_kernel_loss_names_each_episode_active_within_the_window(clock):
    m = monitor()
    m.process(rec("exec", "/agents/ep1/sub"))
    clock.now += 1.0
    m.process(rec("connect", "/agents/ep2"))
    clock.now += ACTIVE_WINDOW_S - 0.5  # ep1 was seen 2.5 s ago, ep2 1.5 s ago
    out = check(m, {1: 4, 2: 1}, {})
    (lost,) = by_type(out, "lost")
    assert lost["source"] == "kernel" and lost["counts"] == {"exec": 4, "connect": 1} and lost["total"] == 5
    (unobs,) = by_type(out, "unobserved")
    assert unobs["cgroup"] == {"id": 12, "path": "/agents/ep2"}
    assert unobs["lost"] == {"exec": 4, "connect": 1} and unobs["total"] == 5
    assert unobs["counts_text"] == "connect 1, exec 4" and unobs["window_s"] == ACTIVE_WINDOW_S


def test_every_active_episode_gets_its_own_record_latest_first(clock):
    m = monitor()
    m.process(rec("exec", "/agents/ep1"))
    m.process(rec("exec", "/agents/ep2/a"))
    m.process(rec("exec", "/agents/ep1/b"))  # ep1 again: the latest
    out = by_type(check(m, {1: 1}, {}), "unobserved")
    assert [r["cgroup"]["path"] for r in out] == ["/agents/ep1", "/agents/ep2"]


def test_a_loss_with_no_active_episode_gives_one_record_without_one(clock):
    m = monitor()
    m.process(rec("exec", "/agents/ep1"))
    clock.now += ACTIVE_WINDOW_S + 0.1
    (unobs,) = by_type(check(m, {1: 2}, {}), "unobserved")
    assert unobs["cgroup"] == {"id": None, "path": None} and unobs["total"] == 2


def test_alerts_responses_and_verdicts_are_no_activity(clock):
    m = monitor()
    for t in ("alert", "response", "verdict"):
        m.process(rec(t, "/agents/ep1"))
    m.process(rec("exec", None))  # no cgroup path: nobody to name
    (unobs,) = by_type(check(m, {1: 1}, {}), "unobserved")
    assert unobs["cgroup"]["path"] is None


def test_suspects_are_capped(clock):
    m = monitor()
    for i in range(MAX_SUSPECTS + 5):
        m.process(rec("exec", f"/agents/e{i}"))
    out = by_type(check(m, {1: 1}, {}), "unobserved")
    assert len(out) == MAX_SUSPECTS
    assert out[0]["cgroup"]["path"] == f"/agents/e{MAX_SUSPECTS + 4}"


def test_only_growth_of_a_kernel_counter_is_a_loss(clock):
    m = monitor()
    assert check(m, {1: 0, 2: 0}, {}) == []
    first = check(m, {1: 3, 2: 0}, {})
    assert by_type(first, "lost")[0]["counts"] == {"exec": 3}
    assert check(m, {1: 1}, {}) == []  # a counter that went down (never a negative loss)
    assert dict(m.kernel) == {"exec": 3}


def test_a_loss_after_an_unchanged_read_is_reported(clock):
    """The kernel's counters are cumulative (ProbeSet.lost_counts: since load) and read every
    second: 3 lost, then no change, then 2 more must be one more `lost` record of 2."""
    m = monitor()
    check(m, {1: 3}, {})
    assert check(m, {1: 3}, {}) == []
    out = check(m, {1: 5}, {})
    assert [r["total"] for r in by_type(out, "lost")] == [2]
    assert dict(m.kernel) == {"exec": 5}
    assert m.summary.lost_kernel == {"exec": 5}


def test_output_losses_are_lost_records_of_the_new_drops(clock):
    m = monitor()
    assert check(m, {}, {"a": 0}) == []
    (lost,) = check(m, {}, {"a": 2})
    assert (lost["type"], lost["source"], lost["total"], lost["counts"]) == ("lost", "output", 2, {"a": 2})
    assert check(m, {}, {"a": 2}) == []
    (lost,) = check(m, {}, {"a": 5, "b": 1})
    assert lost["total"] == 4 and m.output == 6
    assert m.summary.lost_output == 6 and not m.summary.lost_kernel
    assert not by_type(check(m, {}, {"a": 6, "b": 1}), "unobserved")  # output losses name no episode
    assert m.summary.lost_output == 7


def test_the_summary_follows_the_kernel_losses(clock):
    m = monitor()
    check(m, {1: 2, 2: 1}, {})
    assert m.summary.lost_kernel == {"exec": 2, "connect": 1} and m.summary.lost_output == 0
    check(m, {1: 2, 2: 4}, {"a": 1})
    assert m.summary.lost_kernel == {"exec": 2, "connect": 4} and m.summary.lost_output == 1
    assert m.summary.lost_total == 7


def test_tick_checks_every_interval(clock):
    m = monitor(interval_s=1.0)  # made at 1000.0: the first check is due at 1001.0
    m.counters.kernel = {1: 3}
    assert m.tick(1000.5) == [] and m.counters.reads == 0  # not due: the counters are not read
    out = m.tick(1001.0)
    assert [r["total"] for r in by_type(out, "lost")] == [3] and m.counters.reads == 1
    m.counters.kernel = {1: 4}
    assert m.tick(1001.9) == [] and m.counters.reads == 1  # the next one is due 1 s after this one
    out = m.tick(1002.0)
    assert [r["total"] for r in by_type(out, "lost")] == [1] and m.counters.reads == 2
    assert m.tick(1003.0) == [] and m.counters.reads == 3  # read, nothing new: nothing said


def test_finish_checks_whatever_the_schedule(clock):
    m = monitor(interval_s=3600.0)
    m.counters.kernel, m.counters.output = {2: 2}, {"a": 1}
    out = m.finish()
    assert sorted((r["type"], r.get("source")) for r in out) == [
        ("lost", "kernel"), ("lost", "output"), ("unobserved", None)]
    assert m.summary.lost_kernel == {"connect": 2} and m.summary.lost_output == 1
    assert m.finish() == []  # said once


# ------------------------------------------------------------------ TracerWatch
TRACER = r"""
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.ptrace(0x4206, int(sys.argv[1]), None, None) == -1:  # PTRACE_SEIZE: the tracee runs on
    sys.exit("seize failed: errno %d" % ctypes.get_errno())
print("seized", flush=True)
sys.stdin.read()  # until the test closes stdin (or dies)
"""


def start_tracer(cgroup=None) -> subprocess.Popen:
    argv = [sys.executable, "-c", TRACER, str(os.getpid())]
    kw = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
    p = cgroup.popen(argv, **kw) if cgroup is not None else subprocess.Popen(argv, **kw)
    assert p.stdout.readline().strip() == "seized"
    return p


def stop_tracer(p: subprocess.Popen) -> None:
    p.stdin.close()
    p.wait(10)


def test_the_tracer_is_read_every_tick_s(clock, monkeypatch):
    reads = []
    monkeypatch.setattr(selfwatch, "traced_by", lambda pid: reads.append(pid) or 0)
    w = TracerWatch(lambda p: True, lambda p: p, meta)  # made at 1000.0
    assert w.tick(1000.0 + TracerWatch.TICK_S / 2) == [] and reads == []
    assert w.tick(1000.0 + TracerWatch.TICK_S) == [] and reads == [os.getpid()]
    assert w.tick(1000.0 + TracerWatch.TICK_S * 1.9) == [] and len(reads) == 1
    w.tick(1000.0 + TracerWatch.TICK_S * 2)
    assert len(reads) == 2


def poll_records(watch: TracerWatch, timeout: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while not (out := watch.check()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return out


def wait_untraced(timeout: float = 10.0) -> None:
    from agentprobe.hardening import traced_by

    deadline = time.monotonic() + timeout
    while traced_by(os.getpid()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert traced_by(os.getpid()) == 0



def test_an_agent_tracer_is_one_traced_record(agent_cgroup, scope):
    ep = agent_cgroup.child("ep-tracer")
    w = TracerWatch(scope.inside, scope.episode_of, meta)
    assert w.check() == []
    tracer = start_tracer(ep)
    try:
        out = poll_records(w)
        assert w.check() == []  # the same tracer: said once
    finally:
        stop_tracer(tracer)
    (r,) = out
    assert r["type"] == "traced" and r["watcher_pid"] == os.getpid() and r["agent"] is True
    assert r["proc"]["pid"] == tracer.pid and r["proc"]["comm"].startswith("python")
    assert r["cgroup"] == {"id": None, "path": ep.rel}
    wait_untraced()
    assert w.check() == []  # the tracer went: nothing to say


def test_each_new_tracer_is_reported_and_a_host_tracer_is_not_an_agent(agent_cgroup, scope):
    w = TracerWatch(scope.inside, scope.episode_of, meta)
    first = start_tracer(agent_cgroup)
    try:
        (a,) = poll_records(w)
    finally:
        stop_tracer(first)
    wait_untraced()
    assert w.check() == []
    second = start_tracer()  # outside the watched cgroups
    try:
        (b,) = poll_records(w)
    finally:
        stop_tracer(second)
    assert (a["proc"]["pid"], a["agent"], a["cgroup"]["path"]) == (first.pid, True, agent_cgroup.rel)
    host_path = open(f"/proc/{os.getpid()}/cgroup").read().split("0::", 1)[1].split("\n")[0]
    assert (b["proc"]["pid"], b["agent"], b["cgroup"]["path"]) == (second.pid, False, host_path)
