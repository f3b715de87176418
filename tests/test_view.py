"""The terminal view (agentprobe/view.py): one line per record in fixed columns under a header, as
execsnoop and tcpconnect print them, and nothing from a watched process reaching the terminal raw."""

from __future__ import annotations

import time

import pytest

from agentprobe import view

TS = 1_700_000_000_123_456_789  # 2023-11-14 22:13:20.123457 UTC


@pytest.fixture
def utc(monkeypatch):
    """The TIME column is local time: pinned to UTC so the expected lines are exact."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        yield
    finally:
        monkeypatch.undo()
        time.tzset()


def test_header_names_the_columns_at_fixed_widths():
    assert view.HEADER == "TIME         TYPE         PID    PPID COMM             DETAIL"
    assert view.VERDICT_HEADER == ("EPISODE                          VERDICT    ALERTS FIRST RULE"
                                   "                           LABELS")


def test_an_exec_line_is_exact_and_its_columns_sit_under_the_header(utc):
    rec = {"type": "exec", "ts": TS, "proc": {"pid": 4242, "ppid": 1, "comm": "python3"},
           "argv": ["sh", "-c", "echo hi; rm -rf /tmp/x"], "filename": "/bin/sh"}
    got = view.line(rec)
    assert got == "22:13:20.123 EXEC        4242       1 python3          sh -c 'echo hi; rm -rf /tmp/x'"
    assert got.index("sh -c") == view.HEADER.index("DETAIL")
    assert got.index("4242") + 4 == view.HEADER.index("PID") + 3  # numbers right-aligned under their names
    assert got.index("python3") == view.HEADER.index("COMM")


def test_a_long_comm_and_pid_are_cut_so_the_detail_column_stays_in_place(utc):
    rec = {"type": "connect", "ts": TS, "proc": {"pid": 123, "ppid": 45, "comm": "a-very-long-command-name"},
           "family": "inet", "sock_type": "stream", "address": "127.0.0.1", "port": 8080, "result": "ok"}
    got = view.line(rec)
    assert got == "22:13:20.123 CONNECT      123      45 a-very-long-c... tcp 127.0.0.1:8080 ok"
    assert got.index("tcp ") == view.HEADER.index("DETAIL")


@pytest.mark.parametrize("rec, expected", [
    ({"type": "fork", "child_pid": 7}, "-            FORK           -       - -                child 7"),
    ({"type": "fork", "ts": 0, "child_pid": 7}, "-            FORK           -       - -                child 7"),
    ({"type": "fork", "ts": 1.7e18, "child_pid": 7}, "-            FORK           -       - -                child 7"),
    ({"ts": TS, "proc": {"pid": 1}},
     "22:13:20.123 ?              1       - -                {'ts': 1700000000123456789, 'proc': {'pid': 1}}"),
])
def test_what_is_missing_shows_as_a_dash(utc, rec, expected):
    assert view.line(rec) == expected


def test_a_comm_with_escape_sequences_is_shown_escaped_in_its_column(utc):
    rec = {"type": "fork", "ts": TS, "proc": {"pid": 9, "ppid": 8, "comm": "\x1b[2Jx"}, "child_pid": 10}
    assert view.line(rec) == "22:13:20.123 FORK           9       8 \\x1b[2Jx         child 10"


@pytest.mark.parametrize("rec, expected", [
    # exec: argv quoted as a shell would need it; the filename when there is no argv
    ({"type": "exec", "argv": ["sh", "-c", "a b"]}, "sh -c 'a b'"),
    ({"type": "exec", "argv": [], "filename": "/usr/bin/id"}, "/usr/bin/id"),
    ({"type": "exec", "argv": ["xargs", "-n1"], "truncated": {"args": True}, "argc": 5000},
     "xargs -n1 ...[5000 args]"),
    ({"type": "exec", "argv": ["/nope"], "failed": True, "error": "ENOENT", "retval": -2},
     "/nope  [failed: ENOENT]"),
    ({"type": "exec", "argv": ["/nope"], "failed": True, "retval": -13}, "/nope  [failed: -13]"),
    ({"type": "exec", "argv": ["printf", "\x1b[31mred"]}, "printf '\\x1b[31mred'"),
    # connect: tcp/udp, IPv6 in brackets, v4-mapped said so, unix paths, other families by number
    ({"type": "connect", "family": "inet", "sock_type": "stream", "address": "198.51.100.2", "port": 22,
      "result": "ok"}, "tcp 198.51.100.2:22 ok"),
    ({"type": "connect", "family": "inet6", "sock_type": "dgram", "address": "2001:db8::1", "port": 53,
      "result": "ok"}, "udp [2001:db8::1]:53 ok"),
    ({"type": "connect", "family": "inet6", "v4mapped": True, "sock_type": "stream", "address": "198.51.100.2",
      "port": 443, "result": "error", "error": "ECONNREFUSED"}, "tcp 198.51.100.2:443 (v4-mapped) ECONNREFUSED"),
    ({"type": "connect", "family": "inet", "sock_type": "stream", "address": "10.0.0.1", "port": 1,
      "result": "error"}, "tcp 10.0.0.1:1 error"),
    ({"type": "connect", "family": "unix", "sock_type": "stream", "path": "/run/docker.sock", "result": "ok"},
     "unix /run/docker.sock ok"),
    ({"type": "connect", "family": "netlink", "family_num": 16, "sock_type": "raw", "result": "ok"},
     "raw family=16 ok"),
    # gpu: counts, opens, and one ioctl named from the NVIDIA tables
    ({"type": "gpu", "kind": "counts", "device": {"kind": "nvidia", "major": 195, "minor": 0}, "total": 1200,
      "interval_ns": 2_500_000_000}, "nvidia 195:0 1200 ioctls in 2.5s"),
    ({"type": "gpu", "kind": "open", "device": {"kind": "nvidia", "major": 195, "minor": 255},
      "access": ["read", "write"]}, "nvidia 195:255 opened (read+write)"),
    ({"type": "gpu", "kind": "ioctl", "device": {"kind": "nvidia", "major": 195, "minor": 0}, "nr": 0x2B,
      "detail": 0xC6C0, "first_device": True}, "nvidia 195:0 RM_ALLOC(AMPERE_COMPUTE_A) first use of device"),
    ({"type": "gpu", "kind": "ioctl", "device": {"kind": "nvidia", "major": 195, "minor": 0}, "nr": 0x99},
     "nvidia 195:0 0x99"),
    # payload: the first 48 characters of what was sent
    ({"type": "payload", "family": "inet", "address": "198.51.100.2", "port": 3333, "transport": "tcp",
      "app": "stratum", "len": 87, "text": '{"id":1,"method":"mining.subscribe","params":["cpuminer/2.5"]}'},
     'tcp 198.51.100.2:3333 stratum 87B "{"id":1,"method":"mining.subscribe","params":["c"'),
    ({"type": "payload", "family": "inet6", "address": "::1", "port": 53, "transport": "udp", "len": 3,
      "text": "a\rb"}, 'udp [::1]:53 ? 3B "a\\x0db"'),
    ({"type": "fork", "child_pid": 4243}, "child 4243"),
    ({"type": "exit", "signal": 9, "code": 0}, "signal 9"),
    ({"type": "exit", "signal": 0}, "signal 0"),
    ({"type": "exit", "code": 3}, "code 3"),
    ({"type": "lost", "total": 12, "source": "ring", "counts": {"exec": 10, "connect": 2}},
     "12 records lost (ring): connect=2 exec=10"),
    ({"type": "alert", "priority": "CRITICAL", "rule": "stratum_connect", "summary": "mining pool",
      "action": "freeze"}, "[CRITICAL] stratum_connect: mining pool -> freeze"),
    ({"type": "response", "action": "freeze", "cgroup": {"path": "/agents/ep-17"}, "outcome": "frozen",
      "latency_ms": 1.46, "rule": "stratum_connect"}, "freeze /agents/ep-17 frozen in 1.5 ms (rule stratum_connect)"),
    ({"type": "response", "action": "kill", "cgroup": {"path": "/agents/ep-2"}, "outcome": "failed",
      "latency_ms": None, "rule": "r"}, "kill /agents/ep-2 failed (rule r)"),
    ({"type": "start", "version": "0.9.0", "cgroups": [{"path": "/agents"}, {"path": "/b"}],
      "buffer": "ringbuf 256 pages"}, "agentprobe 0.9.0 watching /agents, /b (ringbuf 256 pages)"),
    ({"type": "start", "version": "0.9.0", "cgroups": [], "buffer": "perf"},
     "agentprobe 0.9.0 watching (none yet) (perf)"),
    ({"type": "stop", "events_total": 100, "lost_total": 0}, "stopped: 100 events, 0 lost"),
    ({"type": "connect_counts", "family": "inet", "address": "10.0.0.1", "port": 80, "count": 40,
      "interval_ns": 1_000_000_000, "refused": True}, "10.0.0.1:80 40 more connects refused in 1.0s"),
    ({"type": "connect_counts", "family": "inet6", "address": "2001:db8::53", "port": 53, "count": 7,
      "interval_ns": 500_000_000, "sendmsg": True}, "[2001:db8::53]:53 7 more UDP sends in 0.5s"),
    ({"type": "connect_sweep", "count": 300, "min_port": 1, "max_port": 1024, "address": "10.213.0.2",
      "port": 1024, "budget_per_s": 50},
     "300 more connects to new destinations (ports 1-1024, last 10.213.0.2:1024), past 50/s recorded"),
    ({"type": "verdict", "cgroup": {"path": "/agents/ep-3"}, "frozen": True, "alerts": 2, "rules": {"b": 1, "a": 1},
      "reason": "end"}, "/agents/ep-3 frozen: 2 alerts [('a', 1), ('b', 1)] (end)"),
    ({"type": "verdict", "cgroup": {"path": "/agents/ep-4"}, "clean": True, "alerts": 0, "rules": {},
      "reason": "removed"}, "/agents/ep-4 clean: 0 alerts [] (removed)"),
    ({"type": "probe", "probe": "gpu", "change": "detached"}, "gpu probe detached"),
    ({"type": "cgroup", "change": "watched", "cgroup": {"path": "/agents/ep-4"}}, "watched /agents/ep-4"),
    # a type the view does not know: its fields, without the stream's version and node
    ({"type": "mystery", "v": 1, "node": "n1", "x": "\x07"}, "{'type': 'mystery', 'x': '\\x07'}"),
], ids=lambda v: v.get("type") if isinstance(v, dict) else None)
def test_detail_of_each_record_type(rec, expected):
    assert view.detail(rec) == expected


def test_verdict_lines_sit_under_their_header():
    rec = {"cgroup": {"path": "/agents/ep-17"}, "frozen": True, "alerts": 3, "first_alert": {"rule": "stratum_connect"},
           "labels": {"policy": "ckpt-2000", "episode": "17"}}
    got = view.verdict_line(rec)
    assert got == ("/agents/ep-17                    frozen          3 stratum_connect                     "
                   " episode=17 policy=ckpt-2000")
    for col in ("VERDICT", "FIRST RULE", "LABELS"):
        word = {"VERDICT": "frozen", "FIRST RULE": "stratum_connect", "LABELS": "episode="}[col]
        assert got.index(word) == view.VERDICT_HEADER.index(col)
    assert view.verdict_line({"clean": True}) == f"{'?':<32} {'clean':<10} {0:>6} {'-':<36} "
    assert view.verdict_line({"alerts": 1, "first_alert": None}) == f"{'?':<32} {'alerted':<10} {1:>6} {'-':<36} "


@pytest.mark.parametrize("text, expected", [
    ("plain ascii", "plain ascii"),
    ("\u00e9t\u00e9 \u65e5\u672c", "\u00e9t\u00e9 \u65e5\u672c"),  # printable non-ASCII passes as it is
    ("a\x1bb\x07\x7f\x9b\n\t", "a\\x1bb\\x07\\x7f\\x9b\\x0a\\x09"),
    ("evil\u202etxt.exe", "evil\\x202etxt.exe"),  # a bidi override would reorder what follows
    ("\u2028\u200e\u2066", "\\x2028\\x200e\\x2066"),
    ("name\udcff\udc80", "name\\xff\\x80"),  # bytes that were not UTF-8 shown as the bytes they were
    ("\ud800", "\\xd800"),
    (12345, "12345"),
])
def test_clean_escapes_what_a_terminal_would_act_on(text, expected):
    assert view.clean(text) == expected


def test_clean_cuts_long_text_to_its_limit_and_says_so():
    assert view.clean("x" * 400) == "x" * 400
    assert view.clean("x" * 401) == "x" * 397 + "..."
    assert len(view.clean("y" * 10_000)) == 400
    assert view.clean("abcdefghij", limit=8) == "abcde..."
    assert view.clean("\x00" * 3, limit=12) == "\\x00\\x00\\x00"  # the escaped form is what is measured
