"""The client's side of the stream, without a kernel: bounds on what it holds, the live stream with
what a slow reader missed counted, a watcher that does not answer or goes away. The watcher's end
is a real unix socket served the way ServerSink serves it (the start record first, then records);
tests/test_rl_e2e.py runs the client against a real watcher."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from agentprobe.cgroups import find_v2_mount
from agentprobe.client import ClientError, Episode
from agentprobe.stream import encode

EP = "/agentprobe-client-test/ep-1"


class Server:
    """A stream server for one reader: `send` records to it, `close` the connection."""

    def __init__(self, path, hello=True):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(1)
        self.conn = None
        self.hello = hello
        self.accepted = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        self.conn, _ = self.sock.accept()
        if self.hello:
            self.conn.sendall(encode({"v": 1, "type": "start", "pid": 1}))
        self.accepted.set()

    def send(self, *recs):
        self.accepted.wait(5)
        self.conn.sendall(b"".join(encode(r) for r in recs))

    def close(self):
        if self.conn is not None:
            self.conn.close()
        self.sock.close()


def rec(type_, n, path=EP, **kw):
    return {"v": 1, "type": type_, "seq": n, "cgroup": {"id": 9, "path": path}, **kw}


def episode(path, **kw):
    ep = Episode("ep-1", parent=str(find_v2_mount() / "agentprobe-client-test"), socket=str(path), **kw)
    ep._connect()  # the stream only: no cgroup is made here
    return ep


def wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_what_the_client_holds_is_bounded_and_counted(tmp_path):
    srv = Server(tmp_path / "s")
    try:
        ep = episode(tmp_path / "s", max_records=10, max_kept=2)
        assert ep.watcher == {"v": 1, "type": "start", "pid": 1}
        recs = [rec("exec", i) for i in range(20)]
        recs[3] = rec("alert", 3, rule="r1")
        recs[5] = rec("response", 5, outcome="frozen")
        recs[7] = rec("alert", 7, rule="r2")
        recs[9] = rec("alert", 9, rule="r3")  # past max_kept: counted, held only while in the window
        srv.send(rec("exec", 100, path="/agentprobe-client-test/other"), *recs)  # another episode's: not held
        wait_for(lambda: sum(ep.counts.values()) == 20)
        assert ep.counts == {"exec": 16, "alert": 3, "response": 1}
        assert [r["seq"] for r in ep.records] == list(range(10, 20))  # the window: the latest 10
        assert [a["rule"] for a in ep.alerts()] == ["r1", "r2"] and [r["seq"] for r in ep.responses()] == [5]
        assert ep.dropped == 7  # 0-9 left the window; 3, 5 and 7 are still held as alert and response
        # a reader that fell behind is told how many records it missed, then gets the window
        srv.send(rec("verdict", 20, clean=False))
        wait_for(lambda: ep.counts["verdict"] == 1)
        got = list(ep.stream(timeout=5))
        assert got[0] == {"v": 1, "type": "lost", "source": "client", "total": 11, "cgroup": {"path": EP}}
        assert [r["seq"] for r in got[1:]] == list(range(11, 21)) and got[-1]["type"] == "verdict"
        assert ep.end().record["seq"] == 20 and [a["rule"] for a in ep.verdict.alerts] == ["r1", "r2"]
    finally:
        srv.close()


def test_stream_and_wait_alert_follow_records_as_they_come(tmp_path):
    srv = Server(tmp_path / "s")
    try:
        ep = episode(tmp_path / "s")
        assert ep.wait_alert(timeout=0.1) is None
        it = ep.stream(timeout=5)
        srv.send(rec("exec", 0))
        assert next(it)["seq"] == 0
        threading.Timer(0.2, srv.send, [rec("alert", 1, rule="ssh_port_forwarding")]).start()
        assert ep.wait_alert(timeout=5)["rule"] == "ssh_port_forwarding"  # wakes when it comes
        assert next(it)["rule"] == "ssh_port_forwarding"
        srv.close()  # the watcher goes away: the stream ends, end() says why
        assert list(it) == []
        with pytest.raises(ClientError, match="the watcher closed the stream"):
            ep.end()
    finally:
        srv.close()


def test_a_watcher_that_does_not_answer_is_a_clear_error(tmp_path):
    srv = Server(tmp_path / "s", hello=False)  # accepts, never sends its start record
    try:
        with pytest.raises(ClientError, match=r"did not answer: no start record within 0.3 s"):
            episode(tmp_path / "s", connect_timeout=0.3)
    finally:
        srv.close()
    with pytest.raises(ClientError, match="cannot reach the watcher at .*: No such file"):
        episode(tmp_path / "missing")
