"""A real nats-server on a free loopback port, in a temporary directory, for tests; and the helpers
that publish through a NatsSink and read back what the server got."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import msgpack

from agentprobe.nats import BlockingConnection, parse_url
from agentprobe.natssink import NatsSink
from agentprobe.stream import encode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsServer:
    """Started with JetStream (store under `workdir`); `stop()` and `start()` again keep port and store."""

    def __init__(self, workdir: Path, port: int | None = None, extra: list[str] | None = None) -> None:
        binary = shutil.which("nats-server")
        if binary is None:
            raise RuntimeError("nats-server is not installed (scripts/install.sh --test installs it)")
        self.binary = binary
        self.workdir = workdir
        self.port = port or free_port()
        self.extra = extra or []
        self.proc: subprocess.Popen | None = None
        self.log = workdir / "nats-server.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> NatsServer:
        self.proc = subprocess.Popen(
            [self.binary, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.workdir / "js"),
             "-l", str(self.log), *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited: {self.log.read_text() if self.log.exists() else ''}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    if s.recv(5) == b"INFO ":
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("nats-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


def jetstream_messages(url: str, stream: str) -> list[tuple[str, dict]]:
    """(subject, record) of everything a JetStream stream holds, read back message by message."""
    import base64
    import json

    conn = BlockingConnection(parse_url(url))
    try:
        info = json.loads(conn.request(f"$JS.API.STREAM.INFO.{stream}", b"").payload)
        out = []
        for seq in range(info["state"]["first_seq"], info["state"]["last_seq"] + 1):
            reply = json.loads(conn.request(f"$JS.API.STREAM.MSG.GET.{stream}",
                                            json.dumps({"seq": seq}).encode()).payload)
            msg = reply["message"]
            out.append((msg["subject"], msgpack.unpackb(base64.b64decode(msg["data"]))))
        return out
    finally:
        conn.close()


def record(seq: int, type_: str = "exec", node: str = "gpu-7.dc1") -> dict:
    return {"v": 1, "type": type_, "ts": 1, "ktime": 1, "node": node, "seq": seq}


def publish(sink: NatsSink, recs: list[dict]) -> None:
    for r in recs:
        sink.write_record(r, encode(r))


def settle(sink: NatsSink, timeout: float = 10.0) -> None:
    """Service the sink as the watcher loop would until the server confirmed everything held."""
    deadline = time.monotonic() + timeout
    while sink.buffered or not sink.connected:
        assert time.monotonic() < deadline, f"not settled: {sink.buffered} held, state {sink._state}"
        sink.service()
        time.sleep(0.01)


class Subscriber:
    """A plain NATS subscriber collecting (subject, record) pairs."""

    def __init__(self, url: str, subject: str = "agentprobe.>") -> None:
        self.conn = BlockingConnection(parse_url(url))
        self.conn.sock.sendall(f"SUB {subject} 1\r\nPING\r\n".encode())
        while self.conn.next_op(5)[0] != "PONG":
            pass
        self.got: list[tuple[str, dict]] = []

    def collect(self, n: int, timeout: float = 10.0) -> list[tuple[str, dict]]:
        deadline = time.monotonic() + timeout
        while len(self.got) < n:
            op = self.conn.next_op(max(0.01, deadline - time.monotonic()))
            if op[0] == "MSG":
                self.got.append((op[1].subject, msgpack.unpackb(op[1].payload)))
        return self.got

    def close(self) -> None:
        self.conn.close()


def stream_records(url: str, stream: str) -> list[dict]:
    """Everything the JetStream stream holds, read back message by message."""
    return [rec for _, rec in jetstream_messages(url, stream)]
