"""The stateful engine: alerts, dedup, counters, sequences, release of state, bounds."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from rule_samples import (
    Proc,
    connect_record,
    exec_record,
    exit_record,
    fork_record,
    gpu_counts,
    gpu_first_use,
)

from agentprobe.rules import EngineLimits, RuleEngine, load_ruleset
from agentprobe.rules.alert import trim_record

S = 10**9
RULES = """
- list: tmp_dirs
  items: [/tmp]
- rule: ssh_started
  name: SSH started
  desc: ssh started
  condition: evt.type = exec and proc.name = ssh
  output: "ssh by %proc.name pid=%proc.pid args=%proc.args sha=%proc.sha256 100%% sure"
  priority: high
  tags: [network, T1021.004, T1572]
  action: freeze
- rule: any_exec
  desc: every exec
  condition: evt.type = exec
  priority: info
  dedup: 0
- rule: many_dests
  desc: many destinations
  condition: evt.type = connect
  count: {by: process, within: 60s, threshold: 3, distinct: net.dest}
  priority: high
  tags: [T1046]
- rule: many_dests_cgroup
  desc: many destinations from a cgroup
  condition: evt.type = connect and net.port = 9
  count: {by: cgroup, within: 60s, threshold: 3, distinct: net.dest}
  priority: high
- rule: gpu_heavy
  desc: many ioctls
  condition: evt.type = gpu and gpu.kind = counts
  count: {by: process, within: 60s, threshold: 100, sum: gpu.total}
  priority: medium
- rule: connects
  desc: connections counted
  condition: evt.type = connect and net.port = 7
  count: {by: process, within: 10s, threshold: 2}
  priority: low
- rule: staged
  desc: tmp exec, gpu, then connect to 3333
  sequence:
    by: process_tree
    within: 60s
    order: strict
    steps:
      - evt.type = exec and proc.exe pmatch tmp_dirs
      - evt.type = gpu
      - evt.type = connect and net.port = 3333
  output: "staged chain ends at %proc.name"
  priority: critical
  tags: [T1496]
  action: freeze
- rule: staged_any_order
  desc: tmp exec, then gpu and connect to 4444 in any order
  sequence:
    by: process_tree
    within: 60s
    order: any
    steps:
      - evt.type = exec and proc.exe pmatch tmp_dirs
      - evt.type = gpu
      - evt.type = connect and net.port = 4444
  priority: critical
- rule: same_process
  desc: exec of /tmp/solo then its own connect to 5555
  sequence:
    by: process
    within: 60s
    steps:
      - evt.type = exec and proc.exe = /tmp/solo
      - evt.type = connect and net.port = 5555
  priority: high
- rule: cgroup_chain
  desc: /tmp/a started, then anything in the cgroup connects to 6666
  sequence:
    by: cgroup
    within: 60s
    steps:
      - evt.type = exec and proc.exe = /tmp/a
      - evt.type = connect and net.port = 6666
  priority: high
"""

BASH = Proc(pid=100, exe="/usr/bin/bash", user="agent")


@pytest.fixture
def engine(tmp_path: Path) -> RuleEngine:
    path = tmp_path / "rules.yaml"
    path.write_text(textwrap.dedent(RULES))
    return RuleEngine(load_ruleset([path], defaults=False), dedup_window_s=30)


def fired(engine: RuleEngine, rec: dict, rule: str | None = None) -> list[str]:
    return [a["rule"] for a in engine.process(rec) if rule is None or a["rule"] == rule]


# ------------------------------------------------------------------ alerts
def test_alert_record(engine):
    ssh = BASH.child(200, "/usr/bin/ssh")
    ssh.sha256 = None
    rec = exec_record(ssh, ["ssh", "-p", "22", "h\x1b[2J"], ktime=5 * S, seq=77)
    rec["container"] = {"runtime": "containerd", "id": "abc", "pod_uid": "p-1"}
    alerts = [a for a in engine.process(rec) if a["rule"] == "ssh_started"]
    assert alerts == [{
        "v": 1,
        "type": "alert",
        "ts": rec["ts"],
        "ktime": 5 * S,
        "node": "node-1",
        "cgroup": {"id": 4242, "path": "/agents/ep1"},
        "proc": rec["proc"],
        "rule": "ssh_started",
        "name": "SSH started",
        "priority": "high",
        "tags": ["network", "T1021.004", "T1572"],
        "mitre": ["T1021.004", "T1572"],
        "action": "freeze",
        "summary": "ssh by ssh pid=200 args=-p 22 h\\x1b[2J sha=<NA> 100% sure",
        "evidence": [trim_record(rec)],
        "chain": [{"pid": 200, "comm": "ssh", "exe": "/usr/bin/ssh"},
                  {"pid": 100, "comm": "bash", "exe": "/usr/bin/bash"}],
        "container": {"runtime": "containerd", "id": "abc", "pod_uid": "p-1"},
    }]
    assert "seq" not in alerts[0]


def test_evidence_is_trimmed():
    p = Proc(pid=5, exe="/usr/bin/x", ancestors=[BASH])
    rec = exec_record(p, ["x"] + [f"a{i}" * 200 for i in range(40)], seq=9, ktime=S)
    ev = trim_record(rec)
    assert ev["type"] == "exec" and ev["seq"] == 9 and ev["ktime"] == S and ev["ts"] == rec["ts"]
    assert ev["proc"] == {"pid": 5, "ppid": 100, "uid": 1000, "comm": "x", "exe": "/usr/bin/x",
                          "sha256": None, "cmdline": [a[:256] for a in rec["argv"][:32]]}
    assert ev["argv"] == [a[:256] for a in rec["argv"][:32]]
    assert (ev["filename"], ev["argc"], ev["failed"]) == ("/usr/bin/x", 41, False)
    assert "ancestors" not in ev["proc"] and "truncated" not in ev


def test_default_output_and_missing_values(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("- rule: r\n  desc: d\n  priority: low\n  condition: evt.type = connect\n")
    engine = RuleEngine(load_ruleset([path], defaults=False))
    rec = connect_record(Proc(pid=9, exe=None, comm="curl", cmdline=None), "127.0.0.1", 80)
    assert engine.process(rec)[0]["summary"] == "r: curl (pid 9) "


# ------------------------------------------------------------------ dedup
def test_dedup_same_rule_same_process(engine):
    ssh = BASH.child(200, "/usr/bin/ssh")
    assert fired(engine, exec_record(ssh, ["ssh", "a"], ktime=1 * S), "ssh_started") == ["ssh_started"]
    assert fired(engine, exec_record(ssh, ["ssh", "b"], ktime=20 * S), "ssh_started") == []
    # another process: fires
    other = BASH.child(201, "/usr/bin/ssh")
    assert fired(engine, exec_record(other, ["ssh", "c"], ktime=21 * S), "ssh_started") == ["ssh_started"]
    # after the window (30 s from the first alert): fires again
    assert fired(engine, exec_record(ssh, ["ssh", "d"], ktime=31 * S), "ssh_started") == ["ssh_started"]
    assert engine.stats()["suppressed"] == 1


def test_dedup_does_not_hide_other_rules(engine):
    ssh = BASH.child(200, "/usr/bin/ssh")
    assert fired(engine, exec_record(ssh, ["ssh"], ktime=S)) == ["ssh_started", "any_exec"]
    # ssh_started is deduplicated, any_exec has dedup: 0
    assert fired(engine, exec_record(ssh, ["ssh"], ktime=2 * S)) == ["any_exec"]


def test_dedup_released_when_the_process_exits(engine):
    ssh = BASH.child(200, "/usr/bin/ssh")
    assert fired(engine, exec_record(ssh, ["ssh"], ktime=S), "ssh_started") == ["ssh_started"]
    engine.process(exit_record(ssh, ktime=2 * S))
    assert fired(engine, exec_record(ssh, ["ssh"], ktime=3 * S), "ssh_started") == ["ssh_started"]


# ------------------------------------------------------------------ counters
def test_distinct_counter(engine):
    p = BASH.child(300, "/usr/bin/python3.11")
    recs = [connect_record(p, "10.0.0.1", 80, ktime=1 * S), connect_record(p, "10.0.0.1", 80, ktime=2 * S),
            connect_record(p, "10.0.0.2", 80, ktime=3 * S), connect_record(p, "10.0.0.1", 81, ktime=4 * S)]
    out = [fired(engine, r, "many_dests") for r in recs]
    assert out == [[], [], [], ["many_dests"]]
    alert = [a for a in engine.process(connect_record(p, "10.0.0.9", 80, ktime=5 * S))]
    assert alert == []  # the window started afresh after the alert (and dedup holds anyway)


def test_distinct_counter_evidence_oldest_first(engine):
    p = BASH.child(300, "/usr/bin/python3.11")
    a = connect_record(p, "10.0.0.1", 80, ktime=1 * S)
    b = connect_record(p, "10.0.0.2", 80, ktime=2 * S)
    a2 = connect_record(p, "10.0.0.1", 80, ktime=3 * S)   # seen again: moves to the end
    c = connect_record(p, "10.0.0.3", 80, ktime=4 * S)
    for r in (a, b, a2):
        engine.process(r)
    alerts = [x for x in engine.process(c) if x["rule"] == "many_dests"]
    assert [x["evidence"] for x in alerts] == [[trim_record(b), trim_record(a2), trim_record(c)]]


def test_distinct_counter_window_slides(engine):
    p = BASH.child(300, "/usr/bin/python3.11")
    assert fired(engine, connect_record(p, "10.0.0.1", 80, ktime=1 * S), "many_dests") == []
    assert fired(engine, connect_record(p, "10.0.0.2", 80, ktime=2 * S), "many_dests") == []
    # 62 s later the first two are out of the 60 s window
    assert fired(engine, connect_record(p, "10.0.0.3", 80, ktime=62 * S), "many_dests") == []
    assert fired(engine, connect_record(p, "10.0.0.4", 80, ktime=63 * S), "many_dests") == []
    assert fired(engine, connect_record(p, "10.0.0.5", 80, ktime=64 * S), "many_dests") == ["many_dests"]


def test_counter_per_process_vs_per_cgroup(engine):
    procs = [BASH.child(400 + i, "/usr/bin/nc") for i in range(3)]
    out = [fired(engine, connect_record(p, f"10.0.0.{i}", 9, ktime=(i + 1) * S))
           for i, p in enumerate(procs)]
    # three processes, one destination each: only the cgroup-wide counter reaches 3
    assert out == [[], [], ["many_dests_cgroup"]]
    # another cgroup is counted apart
    other = {"id": 7, "path": "/agents/ep2"}
    assert fired(engine, connect_record(procs[0], "10.0.0.8", 9, ktime=5 * S, cgroup=other)) == []


def test_sum_counter(engine):
    p = BASH.child(500, "/tmp/miner")
    recs = [gpu_counts(p, [(0x2A, 0, 40)], ktime=2 * S), gpu_counts(p, [(0x2A, 0, 0)], ktime=4 * S),
            gpu_counts(p, [(0x2B, 0xC6C0, 30), (0x4E, 0, 29)], ktime=6 * S),
            gpu_counts(p, [(0x2A, 0, 1)], ktime=8 * S)]
    out = [engine.process(r) for r in recs]
    assert [[a["rule"] for a in o] for o in out] == [[], [], [], ["gpu_heavy"]]
    # the record with total 0 adds nothing and is no evidence
    assert out[3][0]["evidence"] == [trim_record(recs[0]), trim_record(recs[2]), trim_record(recs[3])]


def test_plain_count(engine):
    p = BASH.child(600, "/usr/bin/curl")
    assert fired(engine, connect_record(p, "10.0.0.1", 7, ktime=1 * S), "connects") == []
    assert fired(engine, connect_record(p, "10.0.0.1", 7, ktime=12 * S), "connects") == []  # 11 s apart
    assert fired(engine, connect_record(p, "10.0.0.1", 7, ktime=13 * S), "connects") == ["connects"]


def test_counter_released_on_exit(engine):
    p = BASH.child(300, "/usr/bin/python3.11")
    engine.process(connect_record(p, "10.0.0.1", 80, ktime=1 * S))
    engine.process(connect_record(p, "10.0.0.2", 80, ktime=2 * S))
    assert engine.stats()["counters"] == 1
    engine.process(exit_record(p, ktime=3 * S))
    assert engine.stats()["counters"] == 0
    assert fired(engine, connect_record(p, "10.0.0.3", 80, ktime=4 * S), "many_dests") == []


# ------------------------------------------------------------------ sequences
def staged_records(root: Proc) -> tuple[Proc, list[dict]]:
    """/tmp/x (child of root) forks a worker that uses the GPU and connects to a pool."""
    x = root.child(700, "/tmp/x")
    worker = x.child(701, "/tmp/x")
    return worker, [
        exec_record(x, ["/tmp/x"], ktime=10 * S, seq=1),
        fork_record(x, 701, ktime=11 * S, seq=2),
        gpu_first_use(worker, 0x2B, 0x41, first_device=True, ktime=12 * S, seq=3),
        connect_record(worker, "203.0.113.7", 3333, ktime=13 * S, seq=4),
    ]


def test_sequence_by_process_tree(engine):
    worker, recs = staged_records(BASH)
    outs = [engine.process(r) for r in recs]
    assert [[a["rule"] for a in o] for o in outs[:3]] == [["any_exec"], [], []]
    (alert,) = [a for a in outs[3] if a["rule"] == "staged"]
    assert alert["evidence"] == [trim_record(recs[0]), trim_record(recs[2]), trim_record(recs[3])]
    assert alert["proc"]["pid"] == 701 and alert["ktime"] == 13 * S
    assert alert["summary"] == "staged chain ends at x"
    assert [c["pid"] for c in alert["chain"]] == [701, 700, 100]
    assert engine.stats()["sequences"] == 1  # the completed one is gone; staged_any_order still waits


def test_sequence_strict_order(engine):
    worker, recs = staged_records(BASH)
    # connect before the GPU use: strict order does not complete
    for r in (recs[0], recs[1], recs[3], recs[2]):
        assert fired(engine, r, "staged") == []


def test_sequence_any_order(engine):
    x = BASH.child(700, "/tmp/x")
    w = x.child(701)
    recs = [exec_record(x, ["/tmp/x"], ktime=10 * S), connect_record(w, "203.0.113.7", 4444, ktime=11 * S),
            gpu_first_use(w, 0x2B, 0x41, ktime=12 * S)]
    out = [fired(engine, r, "staged_any_order") for r in recs]
    assert out == [[], [], ["staged_any_order"]]


def test_sequence_window(engine):
    worker, recs = staged_records(BASH)
    recs[3]["ktime"] = 71 * S  # 61 s after the exec
    assert [fired(engine, r, "staged") for r in recs] == [[], [], [], []]


def test_sequence_needs_the_same_tree(engine):
    worker, recs = staged_records(BASH)
    stranger = BASH.child(900, "/usr/bin/python3.11")
    engine.process(recs[0])
    engine.process(gpu_first_use(stranger, 0x2B, 0x41, ktime=12 * S))
    assert fired(engine, connect_record(stranger, "203.0.113.7", 3333, ktime=13 * S), "staged") == []
    # the anchor's own steps still complete it
    engine.process(recs[2])
    assert fired(engine, recs[3], "staged") == ["staged"]


def test_sequence_survives_the_anchor_exit_for_descendants(engine):
    worker, recs = staged_records(BASH)
    x = BASH.child(700, "/tmp/x")
    engine.process(recs[0])
    engine.process(recs[1])
    engine.process(exit_record(x, ktime=11 * S + 1))   # the launcher exits, the worker goes on
    engine.process(recs[2])
    assert fired(engine, recs[3], "staged") == ["staged"]


def test_sequence_pid_reuse_after_exit(engine):
    worker, recs = staged_records(BASH)
    x = BASH.child(700, "/tmp/x")
    engine.process(recs[0])
    engine.process(exit_record(x, ktime=11 * S))
    # pid 700 comes back as an unrelated process (fork seen), then does the rest itself
    engine.process(fork_record(BASH, 700, ktime=12 * S))
    again = BASH.child(700, "/usr/bin/python3.11")
    engine.process(gpu_first_use(again, 0x2B, 0x41, ktime=13 * S))
    assert fired(engine, connect_record(again, "203.0.113.7", 3333, ktime=14 * S), "staged") == []
    assert engine.stats()["sequences"] == 0


def test_sequence_by_process(engine):
    solo = BASH.child(800, "/tmp/solo")
    child = solo.child(801, "/usr/bin/curl")
    engine.process(exec_record(solo, ["solo"], ktime=S))
    assert fired(engine, connect_record(child, "203.0.113.1", 5555, ktime=2 * S), "same_process") == []
    assert fired(engine, connect_record(solo, "203.0.113.1", 5555, ktime=3 * S), "same_process") == \
        ["same_process"]
    # by process: the state goes with the process, a later process with the same pid starts clean
    engine.process(exec_record(solo, ["solo"], ktime=4 * S))
    engine.process(exit_record(solo, ktime=5 * S))
    again = BASH.child(800, "/usr/bin/curl")
    assert fired(engine, connect_record(again, "203.0.113.1", 5555, ktime=6 * S), "same_process") == []


def test_sequence_by_cgroup(engine):
    a = BASH.child(810, "/tmp/a")
    unrelated = Proc(pid=999, exe="/usr/bin/python3.11")
    engine.process(exec_record(a, ["a"], ktime=S))
    other_cg = {"id": 5, "path": "/agents/other"}
    assert fired(engine, connect_record(unrelated, "203.0.113.1", 6666, ktime=2 * S, cgroup=other_cg),
                 "cgroup_chain") == []
    assert fired(engine, connect_record(unrelated, "203.0.113.1", 6666, ktime=3 * S), "cgroup_chain") == \
        ["cgroup_chain"]


def test_sequence_restart_keeps_the_latest_first_step(engine):
    x = BASH.child(700, "/tmp/x")
    engine.process(exec_record(x, ["/tmp/x"], ktime=1 * S))
    engine.process(exec_record(x, ["/tmp/x"], ktime=50 * S))   # exec again: the window restarts
    engine.process(gpu_first_use(x, 0x2B, 0x41, ktime=70 * S))
    assert fired(engine, connect_record(x, "203.0.113.7", 3333, ktime=80 * S), "staged") == ["staged"]


# ------------------------------------------------------------------ release and bounds
def test_forget_cgroup_and_cgroup_gone_record(engine):
    p = BASH.child(300, "/usr/bin/python3.11")
    engine.process(connect_record(p, "10.0.0.1", 80, ktime=S))
    engine.process(exec_record(BASH.child(700, "/tmp/x"), ["/tmp/x"], ktime=S))
    assert engine.stats()["counters"] == 1 and engine.stats()["sequences"] == 2  # staged + staged_any_order
    engine.forget_cgroup(4242)
    assert (engine.stats()["counters"], engine.stats()["sequences"], engine.stats()["dedup"]) == (0, 0, 0)
    engine.process(connect_record(p, "10.0.0.1", 80, ktime=2 * S))
    engine.process({"v": 1, "type": "cgroup", "change": "gone", "cgroup": {"id": 4242, "path": "/agents/ep1"}})
    assert engine.stats()["counters"] == 0


def test_start_and_stop_reset_state(engine):
    p = BASH.child(300, "/usr/bin/python3.11")
    engine.process(connect_record(p, "10.0.0.1", 80, ktime=S))
    assert engine.process({"v": 1, "type": "stop", "ts": 1, "ktime": 2 * S, "node": "n"}) == []
    assert engine.stats()["counters"] == 0


def test_other_records_are_ignored(engine):
    for rec in ({"v": 1, "type": "lost", "counts": {"exec": 3}, "total": 3, "ktime": S},
                {"v": 1, "type": "alert", "rule": "x", "ktime": S}, {"type": "start"}, {}):
        assert engine.process(rec) == []


def test_state_is_bounded(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(RULES))
    engine = RuleEngine(load_ruleset([path], defaults=False),
                        limits=EngineLimits(max_counters=10, max_sequences=5, max_dedup=10))
    for i in range(100):
        p = BASH.child(10_000 + i, "/tmp/x")
        engine.process(connect_record(p, "10.0.0.1", 80, ktime=S + i))
        engine.process(exec_record(p, ["x"], ktime=S + i))
        engine.process(exec_record(BASH.child(20_000 + i, "/usr/bin/ssh"), ["ssh"], ktime=S + i))
    stats = engine.stats()
    assert (stats["counters"], stats["sequences"], stats["dedup"]) == (10, 5, 10)
    assert stats["evicted"] == 90 + 195 + 90
    assert stats["alerts"] == 100 + 200  # every ssh_started (distinct processes) and any_exec


def test_expired_state_is_swept(engine):
    for i in range(5):
        p = BASH.child(10_000 + i, "/tmp/x")
        engine.process(connect_record(p, "10.0.0.1", 80, ktime=S))
        engine.process(exec_record(p, ["x"], ktime=S))
    assert engine.stats()["counters"] == 5 and engine.stats()["sequences"] == 10
    engine.process(connect_record(BASH, "127.0.0.1", 1, ktime=200 * S))   # time passes; a sweep runs
    assert (engine.stats()["counters"], engine.stats()["sequences"]) == (1, 0)


def test_malformed_records_do_not_stop_the_engine(engine):
    bad = [{"type": "exec", "proc": None, "argv": None, "ktime": "x"},
           {"type": "connect", "proc": {"pid": "p"}, "address": "nonsense", "port": "22"},
           {"type": "gpu", "kind": "counts", "counts": "x", "total": "many"},
           {"type": "exec", "proc": {"exe": 5, "ancestors": "x"}, "argv": [1, None]}]
    for rec in bad:
        engine.process(rec)
    p = BASH.child(200, "/usr/bin/ssh")
    assert "ssh_started" in fired(engine, exec_record(p, ["ssh"], ktime=S))


# ------------------------------------------------------------------ robustness
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.text(max_size=20),
                     st.sampled_from(["127.0.0.1", "10.0.0.1", "::1", "/tmp/x", "ssh", "-R", "first_use",
                                      "counts", "nvidia", "inet", "stream", "icmp", "udp", "tls", "http",
                                      "http-connect", "stratum", "198.51.100.2:22", "x:99999", "[::1]:22",
                                      "POST /index.html?crap=1 HTTP/1.1"]))
_subkeys = st.one_of(st.text(max_size=8), st.sampled_from(["qname", "qtype", "pid", "comm", "exe", "path", "id"]))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(_subkeys, inner, max_size=4)),
                       max_leaves=10)
_keys = st.sampled_from(["proc", "argv", "address", "port", "family", "kind", "device", "counts", "total",
                         "nr", "detail", "cgroup", "ktime", "filename", "child_pid", "interval_ns", "sock_type",
                         "first_device", "truncated", "failed", "cmdline", "exe", "pid", "ancestors",
                         # covert-channel records: packet, payload, socket, bind, tunnel, flow_counts
                         "protocol", "len", "dns", "echo_request", "icmp_type", "app", "text", "target", "banner",
                         "method", "transport", "carried", "to", "client", "packets", "bytes", "max_len"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rtype=st.sampled_from(["exec", "connect", "gpu", "fork", "exit", "lost", "cgroup", "packet", "payload",
                              "socket", "bind", "tunnel", "flow_counts"]),
       fields=st.dictionaries(_keys, _values, max_size=10),
       proc=st.dictionaries(_keys, _values, max_size=8))
def test_default_rules_never_raise_on_odd_records(rtype, fields, proc):
    engine = _DEFAULT_ENGINE
    rec = {"type": rtype, **fields}
    if proc:
        rec["proc"] = proc
    out = engine.process(rec)
    assert isinstance(out, list)
    for alert in out:
        assert alert["type"] == "alert" and isinstance(alert["summary"], str)


_DEFAULT_ENGINE = RuleEngine(load_ruleset(), dedup_window_s=0)
