"""The NATS output against a real nats-server (loopback, temp dir): subjects, outages, a full
buffer, JetStream acks and repeats, what is held at close."""

from __future__ import annotations

import io
import socket
import time

import pytest
from natsutil import NatsServer, Subscriber, free_port, publish, record, settle, stream_records

from agentprobe.nats import pub_frame
from agentprobe.natssink import NatsSink
from agentprobe.sinks import SinkError, check_output
from agentprobe.stream import encode


def test_unreachable_server_at_start_is_one_clear_error(tmp_path):
    port = free_port()
    with pytest.raises(SinkError, match=rf"cannot reach NATS server nats://127.0.0.1:{port}: Connection refused"):
        check_output(f"nats://127.0.0.1:{port}")
    with pytest.raises(SinkError, match="cannot reach NATS server"):
        NatsSink(f"nats://127.0.0.1:{port}")


def test_jetstream_missing_at_start_is_one_clear_error(tmp_path):
    server = NatsServer(tmp_path)
    server.start()
    server.stop()
    # the same server without -js
    import subprocess

    proc = subprocess.Popen([server.binary, "-a", "127.0.0.1", "-p", str(server.port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", server.port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        with pytest.raises(SinkError, match="has no JetStream"):
            check_output(f"{server.url}?stream=AP")
        check_output(server.url)  # plain NATS works there
    finally:
        proc.kill()
        proc.wait()


def test_records_arrive_on_node_and_type_subjects(nats_server):
    sub = Subscriber(nats_server.url, "fleet.>")
    sink = NatsSink(nats_server.url + "?prefix=fleet")
    try:
        recs = [record(0, "start"), record(1, "exec"), record(2, "alert"), record(3, "connect", node="other")]
        publish(sink, recs)
        settle(sink)
        got = sub.collect(4)
    finally:
        sink.close()
        sub.close()
    assert [s for s, _ in got] == ["fleet.gpu-7_dc1.start", "fleet.gpu-7_dc1.exec", "fleet.gpu-7_dc1.alert",
                                   "fleet.other.connect"]
    assert [r for _, r in got] == recs
    assert sink.dropped == 0 and sink.confirmed == 4


def test_outage_in_the_middle_buffers_reconnects_and_delivers_the_rest(nats_server):
    err = io.StringIO()
    sub = Subscriber(nats_server.url)
    sink = NatsSink(nats_server.url, err=err)
    try:
        publish(sink, [record(i) for i in range(100)])
        settle(sink)
        assert [r["seq"] for _, r in sub.collect(100)] == list(range(100))
        sub.close()
        nats_server.stop()
        # the watcher goes on while the server is away: writes and services never block or raise
        t0 = time.monotonic()
        for i in range(100, 200):
            sink.write_record(record(i), encode(record(i)))
            sink.service()
        assert time.monotonic() - t0 < 1.0
        assert not sink.connected and sink.buffered == 100 and sink.dropped == 0
        assert "connection lost" in err.getvalue()
        nats_server.start()
        sub = Subscriber(nats_server.url)
        settle(sink)
        got = [r["seq"] for _, r in sub.collect(100)]
    finally:
        sink.close()
        sub.close()
    assert got == list(range(100, 200))
    assert sink.dropped == 0 and sink.disconnects == 1
    assert "reconnected after" in err.getvalue() and "sending 100 held records (0 dropped while away)" in err.getvalue()


def test_a_full_buffer_drops_and_counts_but_keeps_room_for_alerts(nats_server):
    err = io.StringIO()
    sink = NatsSink(nats_server.url + "?buffer=65536", err=err)
    try:
        nats_server.stop()
        big = {"v": 1, "type": "exec", "node": "n", "seq": 0, "argv": ["x" * 1000]}
        for i in range(200):  # ~200 KiB of exec records into a 64 KiB buffer
            big["seq"] = i
            sink.write_record(big, encode(big))
            sink.service()
        held_execs = sink.buffered
        assert sink.dropped == 200 - held_execs and 50 <= held_execs < 70
        alert = record(999, "alert")
        sink.write_record(alert, encode(alert))
        assert sink.buffered == held_execs + 1 and sink.dropped == 200 - held_execs  # the alert still fits
        nats_server.start()
        sub = Subscriber(nats_server.url)
        settle(sink)
        got = sub.collect(held_execs + 1)
        sub.close()
    finally:
        sink.close()
    assert [r["seq"] for _, r in got] == [*range(held_execs), 999]


def test_jetstream_keeps_every_record_once_across_an_outage(nats_server):
    url = nats_server.url + "?stream=AGENTPROBE_TEST"
    check_output(url)  # creates the stream
    sink = NatsSink(url, err=io.StringIO())
    try:
        publish(sink, [record(i) for i in range(50)])
        settle(sink)
        nats_server.stop()
        publish(sink, [record(i) for i in range(50, 120)])
        for _ in range(5):
            sink.service()
        nats_server.start()  # the same store directory: the stream survives
        settle(sink, timeout=20)
    finally:
        sink.close()
    assert sink.dropped == 0 and sink.ack_errors == 0 and sink.confirmed == 120
    assert [r["seq"] for r in stream_records(nats_server.url, "AGENTPROBE_TEST")] == list(range(120))


def test_jetstream_resends_what_was_not_acked_and_the_stream_drops_the_repeat(nats_server):
    url = nats_server.url + "?stream=AGENTPROBE_DUP"
    check_output(url)
    sink = NatsSink(url, err=io.StringIO())
    try:
        publish(sink, [record(i) for i in range(10)])
        settle(sink)
        # pretend the acks of the last 3 were lost with the connection: they are sent again
        for i in range(7, 10):
            r = record(i)
            sink._unacked[1000 + i] = pub_frame("agentprobe.gpu-7_dc1.exec", encode(r), f"{sink._inbox}.{1000 + i}",
                                                f"gpu-7_dc1-{sink._run_id}-{i}")
        sink._lost("test")
        settle(sink)
    finally:
        sink.close()
    assert [r["seq"] for r in stream_records(nats_server.url, "AGENTPROBE_DUP")] == list(range(10))


def test_what_is_still_held_at_close_is_counted(nats_server):
    sink = NatsSink(nats_server.url, err=io.StringIO())
    nats_server.stop()
    publish(sink, [record(i) for i in range(5)])
    t0 = time.monotonic()
    sink.close(timeout=0.3)
    assert time.monotonic() - t0 < 2.0
    assert sink.dropped == 5 and sink.buffered == 0
