"""The NATS client against a real nats-server (loopback, temp dir): the protocol, `subscribe` and
the `collect` input. The NATS output is tested in test_natssink.py."""

from __future__ import annotations

import io
import time

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from natsutil import free_port, publish, record, settle

from agentprobe.nats import BlockingConnection, NatsError, NatsParser, parse_url, pub_frame, subject_token, subscribe
from agentprobe.natssink import NatsSink
from agentprobe.sinks import check_output

# ---- the protocol, without a server ----

def test_parser_reads_every_operation_kind():
    p = NatsParser()
    ops = p.feed(b'INFO {"max_payload":1048576}\r\nPING\r\nPONG\r\n+OK\r\n-ERR \'Authorization Violation\'\r\n'
                 b"MSG a.b 1 _INBOX.x.3 5\r\nhello\r\n"
                 b"HMSG _INBOX.y.1 2 16 16\r\nNATS/1.0 503\r\n\r\n\r\n")
    assert [o[0] for o in ops] == ["INFO", "PING", "PONG", "+OK", "-ERR", "MSG", "MSG"]
    assert ops[0][1] == {"max_payload": 1048576}
    assert ops[4][1] == "Authorization Violation"
    m = ops[5][1]
    assert (m.subject, m.sid, m.reply, m.payload, m.status) == ("a.b", "1", "_INBOX.x.3", b"hello", None)
    assert (ops[6][1].status, ops[6][1].payload) == (503, b"")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=8), st.data())
def test_parser_gives_the_same_messages_however_the_bytes_arrive(payloads, data):
    wire = b"PING\r\n" + b"".join(f"MSG s.{i} 1 {len(p)}\r\n".encode() + p + b"\r\n" for i, p in enumerate(payloads))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    p = NatsParser()
    ops = []
    last = 0
    for c in [*cuts, len(wire)]:
        ops += p.feed(wire[last:c])
        last = c
    assert ops[0] == ("PING",)
    assert [(o[1].subject, o[1].payload) for o in ops[1:]] == [(f"s.{i}", p) for i, p in enumerate(payloads)]


def test_frames_are_what_the_protocol_says():
    assert pub_frame("a.b", b"xy") == b"PUB a.b 2\r\nxy\r\n"
    head = b"NATS/1.0\r\nNats-Msg-Id: n-1\r\n\r\n"
    assert pub_frame("a.b", b"xy", "_INBOX.1", "n-1") == \
        f"HPUB a.b _INBOX.1 {len(head)} {len(head) + 2}\r\n".encode() + head + b"xy\r\n"


def test_subject_tokens_and_addresses():
    assert subject_token("gpu-7.dc1") == "gpu-7_dc1" and subject_token("a b*>") == "a_b__"
    a = parse_url("nats://alice:s3cret@10.0.0.5:4333?prefix=fleet.ap&stream=AP&buffer=1048576")
    assert (a.host, a.port, a.user, a.password, a.prefix, a.stream, a.buffer_limit) == \
        ("10.0.0.5", 4333, "alice", "s3cret", "fleet.ap", "AP", 1048576)
    assert parse_url("nats://tok@h").token == "tok" and parse_url("nats://h").port == 4222
    for bad, why in [("nats://h?prefx=a", "unknown parameter prefx"), ("nats://h?prefix=a..b", "not a subject"),
                     ("nats://h?stream=a.b", "stream name"), ("nats://h?buffer=10", "buffer must be"),
                     ("nats://:4222", "expected nats://HOST:PORT")]:
        with pytest.raises(NatsError, match=why):
            parse_url(bad)


# ---- against a real nats-server ----

def test_a_confirmed_subscription_gets_everything_published_after_it(nats_server):
    conn = BlockingConnection(parse_url(nats_server.url))
    sink = NatsSink(nats_server.url)
    try:
        assert conn.subscribe_confirmed("agentprobe.gpu-7_dc1.*", 5) == []
        publish(sink, [record(0), record(1, node="other"), record(2)])
        settle(sink)
        assert [msgpack.unpackb(conn.next_msg().payload)["seq"] for _ in range(2)] == [0, 2]
    finally:
        sink.close()
        conn.close()


def test_a_server_error_while_reading_messages_is_a_nats_error(nats_server):
    conn = BlockingConnection(parse_url(nats_server.url))
    try:
        conn.sock.sendall(b"SUB a..b 1\r\n")  # not a subject: the server says -ERR
        with pytest.raises(NatsError, match="Invalid Subject"):
            conn.next_msg()
    finally:
        conn.close()


def test_subscribe_reconnects_after_an_outage(nats_server):
    err = io.StringIO()
    msgs = subscribe(nats_server.url, "agentprobe.>", err=err)
    sink = NatsSink(nats_server.url, err=io.StringIO())
    try:
        import threading

        got: list[int] = []

        def read():
            for m in msgs:
                got.append(msgpack.unpackb(m.payload)["seq"])
                if len(got) == 2:
                    return

        t = threading.Thread(target=read, daemon=True)
        t.start()
        deadline = time.monotonic() + 10
        while not got:
            publish(sink, [record(0)])
            settle(sink)
            time.sleep(0.2)
            assert time.monotonic() < deadline
        nats_server.stop()
        time.sleep(0.3)
        nats_server.start()
        while len(got) < 2:
            publish(sink, [record(1)])
            settle(sink)
            time.sleep(0.3)
            assert time.monotonic() < deadline + 10
        t.join(5)
    finally:
        sink.close()
    assert got[0] == 0 and got[1] == 1
    assert "connection lost" in err.getvalue() and "reconnected" in err.getvalue()


def test_collect_bad_input_is_one_line(agentprobe_cmd):
    import subprocess

    port = free_port()
    for args, line in [
        ([f"nats://127.0.0.1:{port}"], f"agentprobe: cannot reach NATS server nats://127.0.0.1:{port}: "
                                       "Connection refused"),
        (["http://x:1"], "agentprobe: bad NATS address http://x:1: expected nats://HOST:PORT"),
        ([f"nats://127.0.0.1:{port}", "--durable", "soc"],
         "agentprobe: --durable needs a JetStream stream: nats://HOST:PORT?stream=NAME"),
    ]:
        r = subprocess.run([*agentprobe_cmd, "collect", *args], capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and r.stderr.splitlines() == [line], r.stderr


def test_collect_writes_the_merged_stream_from_two_nodes(nats_server, tmp_path, agentprobe_cmd):
    import subprocess

    from agentprobe.stream import read_records

    out = tmp_path / "fleet.msgpack"
    col = subprocess.Popen([*agentprobe_cmd, "collect", nats_server.url, "-o", str(out), "--count", "4"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # subscribed
        a = NatsSink(nats_server.url)
        b = NatsSink(nats_server.url)
        publish(a, [record(0, node="gpu-1"), record(1, node="gpu-1")])
        publish(b, [record(0, node="gpu-2"), record(1, node="gpu-2")])
        settle(a)
        settle(b)
        a.close()
        b.close()
        _, err = col.communicate(timeout=20)
    finally:
        if col.poll() is None:
            col.kill()
    assert col.returncode == 0, err
    recs = list(read_records(str(out)))
    assert sorted((r["node"], r["seq"]) for r in recs) == [("gpu-1", 0), ("gpu-1", 1), ("gpu-2", 0), ("gpu-2", 1)]
    assert err.strip().endswith("collected 4 records (0 not readable)")


def test_a_durable_collector_gets_what_was_published_while_it_was_away(nats_server):
    url = nats_server.url + "?stream=AP_DURABLE"
    check_output(url)
    sink = NatsSink(url, err=io.StringIO())

    def take(n: int) -> list[int]:
        msgs = subscribe(url, "agentprobe.>", err=io.StringIO(), durable="soc")
        got = []
        for m in msgs:
            got.append(msgpack.unpackb(m.payload)["seq"])
            if len(got) == n:
                break
        msgs.close()
        return got

    try:
        publish(sink, [record(i) for i in range(3)])
        settle(sink)
        assert take(3) == [0, 1, 2]
        publish(sink, [record(i) for i in range(3, 6)])  # the collector is away
        settle(sink)
        assert take(3) == [3, 4, 5]  # acknowledged ones are not delivered again
    finally:
        sink.close()


def test_collect_live_view_shows_each_line_with_its_node(nats_server, agentprobe_cmd):
    """Two nodes publishing; `collect` without -o: one readable line per record, prefixed by the node it
    came from (the record's node name, not the subject's token), and a stranger on the subject said."""
    import subprocess

    from agentprobe import view

    def exec_rec(node: str, seq: int, pid: int, argv: list[str]) -> dict:
        return {"v": 1, "type": "exec", "ts": 1764741600_000_000_000 + seq * 10**6, "ktime": seq, "node": node,
                "seq": seq, "proc": {"pid": pid, "ppid": 1, "comm": argv[0].rsplit("/", 1)[-1], "uid": 0},
                "filename": argv[0], "argv": argv, "ret": 0, "cgroup": {"id": 7, "path": "/agents/ep-1"}}

    a = [exec_rec("gpu-7.dc1", 0, 4100, ["/usr/bin/python3", "train.py"]),
         exec_rec("gpu-7.dc1", 1, 4101, ["/usr/bin/curl", "https://example.com"])]
    b = [exec_rec("gpu-12.dc2", 0, 900, ["/bin/sh", "-c", "nvidia-smi"]),
         {"v": 1, "type": "alert", "ts": 1764741600_500_000_000, "ktime": 9, "node": "gpu-12.dc2", "seq": 1,
          "rule": "miner_binary_started", "priority": "critical", "action": "freeze", "summary": "xmrig started",
          "proc": {"pid": 901, "ppid": 900, "comm": "xmrig"}, "cgroup": {"id": 8, "path": "/agents/ep-2"}}]
    col = subprocess.Popen([*agentprobe_cmd, "collect", nats_server.url, "--count", "4"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # subscribed
        stranger = BlockingConnection(parse_url(nats_server.url))
        stranger.sock.sendall(b"PUB agentprobe.intruder.exec 5\r\nhello\r\nPING\r\n")
        while stranger.next_op(5)[0] != "PONG":
            pass
        stranger.close()
        time.sleep(0.2)  # the collector has it before the records below
        sinks = [NatsSink(nats_server.url), NatsSink(nats_server.url)]
        for sink, recs in zip(sinks, (a, b), strict=True):
            publish(sink, recs)
        for sink in sinks:
            settle(sink)
            sink.close()
        out, err = col.communicate(timeout=20)
    finally:
        if col.poll() is None:
            col.kill()
    assert col.returncode == 0, err
    lines = out.splitlines()
    assert lines[0] == f"{'NODE':<16} {view.HEADER}"
    assert len(lines) == 5
    for node, recs in (("gpu-7.dc1", a), ("gpu-12.dc2", b)):
        # every line of a node carries its name, in the order the node published
        assert [ln for ln in lines[1:] if ln.startswith(node + " ")] == [f"{node:<16} {view.line(r)}" for r in recs]
    (alert,) = [ln for ln in lines if " ALERT " in ln]
    assert alert.startswith("gpu-12.dc2 ") and "miner_binary_started" in alert and "xmrig" in alert
    assert err.splitlines() == ["agentprobe: agentprobe.intruder.exec: not an agentprobe record (ExtraData)",
                                "agentprobe: collected 4 records (1 not readable)"]
