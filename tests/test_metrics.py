"""Prometheus metrics: the exposition text from records, and the real HTTP endpoint."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import pytest

from agentprobe.metrics import Histogram, MetricsError, MetricsServer, TimedStage, WatchMetrics, parse_address
from agentprobe.sinks import Sink


def feed(m: WatchMetrics, *recs: dict) -> None:
    for r in recs:
        m.write_record(r, b"")


def samples(text: str) -> dict[str, str]:
    return dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))


def test_histogram_buckets_are_cumulative():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    assert h.lines("x") == ['x_bucket{le="0.1"} 2', 'x_bucket{le="1.0"} 3', 'x_bucket{le="+Inf"} 4',
                            "x_sum 3.65", "x_count 4"]


def test_records_become_series(tmp_path):
    cg = tmp_path / "agents" / "ep-1"
    cg.mkdir(parents=True)
    (cg / "cgroup.events").write_text("populated 1\nfrozen 1\n")
    m = WatchMetrics()
    feed(m,
         {"type": "start", "ts": 1_700_000_000 * 10**9, "cgroup_root": str(tmp_path),
          "cgroups": [{"id": 7, "path": "/agents"}]},
         {"type": "exec"}, {"type": "exec"},
         {"type": "lost", "source": "kernel", "counts": {"exec": 3, "connect": 2}, "total": 5},
         {"type": "lost", "source": "output", "counts": {"nats://x": 4}, "total": 4},
         {"type": "alert", "rule": 'odd"rule\\x', "priority": "critical", "action": "freeze"},
         {"type": "response", "action": "freeze", "outcome": "frozen", "latency_ms": 3.0,
          "cgroup": {"path": "/agents/ep-1"}},
         {"type": "response", "action": "freeze", "outcome": "failed", "cgroup": {"path": "/agents/ep-2"}},
         {"type": "cgroup", "change": "watched", "cgroup": {"id": 8, "path": "/more"}},
         {"type": "reload", "ok": False})
    m.observe_rules(0.00002)
    s = samples(m.render())
    assert s['agentprobe_records_total{type="exec"}'] == "2"
    assert s['agentprobe_lost_records_total{source="kernel"}'] == "5"
    assert s['agentprobe_lost_records_total{source="output"}'] == "4"
    assert s['agentprobe_kernel_lost_records_total{type="connect"}'] == "2"
    assert s['agentprobe_alerts_total{rule="odd\\"rule\\\\x",priority="critical",action="freeze"}'] == "1"
    assert s['agentprobe_responses_total{action="freeze",outcome="frozen"}'] == "1"
    assert s['agentprobe_responses_total{action="freeze",outcome="failed"}'] == "1"
    assert s['agentprobe_freeze_latency_seconds_bucket{le="0.0025"}'] == "0"
    assert s['agentprobe_freeze_latency_seconds_bucket{le="0.005"}'] == "1"
    assert s['agentprobe_rule_evaluation_seconds_bucket{le="2.5e-05"}'] == "1"
    assert s["agentprobe_watched_cgroups"] == "2" and s["agentprobe_frozen_cgroups"] == "1"
    assert s['agentprobe_config_reloads_total{result="failed"}'] == "1"
    assert s["agentprobe_start_time_seconds"] == "1700000000.0"
    # thawed since: no longer counted as frozen
    (cg / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    assert samples(m.render())["agentprobe_frozen_cgroups"] == "0"


def test_every_family_has_help_and_type_before_its_samples():
    m = WatchMetrics(lambda: [Sink()])
    text = m.render()
    seen_type = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            seen_type.add(line.split()[2])
        elif not line.startswith("#"):
            name = line.split("{")[0].split(" ")[0]
            base = name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
            assert name in seen_type or base in seen_type, line
    assert text.endswith("\n")


def test_timed_stage_times_and_passes_through():
    from agentprobe.stage import Stage

    class Engine(Stage):
        def __init__(self):
            self.forgotten = []
            self.adopted = None

        def process(self, rec):
            return [{"type": "alert"}]

        def tick(self, now):
            return [{"type": "tick", "now": now}]

        def finish(self):
            return [{"type": "verdict"}]

        def forget_cgroup(self, cid):
            self.forgotten.append(cid)

        def adopt_state(self, old):
            self.adopted = old
            return 5

    m = WatchMetrics()
    inner, old_inner = Engine(), Engine()
    st = TimedStage(inner, m)
    assert st.process({"type": "exec"}) == [{"type": "alert"}]
    assert st.tick(1.5) == [{"type": "tick", "now": 1.5}] and st.finish() == [{"type": "verdict"}]
    st.forget_cgroup(3)
    assert inner.forgotten == [3]
    assert st.adopt_state(TimedStage(old_inner, m)) == 5 and inner.adopted is old_inner  # unwrapped
    assert m.rule_seconds.count == 1  # only process() is timed


def test_endpoint_serves_the_text_and_404s_the_rest():
    m = WatchMetrics()
    feed(m, {"type": "exec"})
    server = MetricsServer("127.0.0.1:0", m)
    try:
        port = server.address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            assert 'agentprobe_records_total{type="exec"} 1' in r.read().decode()
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
        assert e.value.code == 404
        # a client that hangs up mid-request is not a crash
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"GET /metr")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert r.status == 200
        assert m.scrapes == 2
    finally:
        server.close()


def test_bad_and_taken_addresses():
    for bad in ("9477", "host:", "h:99999"):
        with pytest.raises(MetricsError, match="expected HOST:PORT"):
            parse_address(bad)
    assert parse_address(":9477") == ("0.0.0.0", 9477)
    assert parse_address("[::1]:9477") == ("::1", 9477)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(MetricsError, match=f"cannot serve metrics on 127.0.0.1:{port}: Address already in use"):
            MetricsServer(f"127.0.0.1:{port}", WatchMetrics())
