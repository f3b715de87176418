"""The NATS output: `-o nats://HOST:PORT`, published from the watcher's loop without blocking it.

Delivery (`NatsSink`):
- every record is published on `<prefix>.<node>.<type>` as its msgpack bytes;
- records wait in a bounded buffer (`buffer_limit` bytes) until the server has
  them: plain NATS confirms by the PONG answering a PING sent after each batch,
  JetStream (`?stream=NAME`) by the per-message ack. What the server did not
  confirm before a disconnect is sent again after the reconnect (JetStream
  drops the repeats by `Nats-Msg-Id`; plain subscribers may see a record twice
  and can tell by `node` + `seq`);
- while the server is away the watcher goes on; the sink reconnects with
  backoff, and records that do not fit the buffer are counted in `dropped`,
  which the watcher reports as `lost` records (source `output`).

The protocol client it speaks through is agentprobe.nats.
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import sys
import time
from collections import deque

from .nats import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    BlockingConnection,
    Msg,
    NatsAddress,
    NatsError,
    NatsParser,
    connect_line,
    ensure_stream,
    parse_url,
    pub_frame,
    subject_token,
)
from .sink import RecordSink

PRIORITY_RESERVE = 1024 * 1024  # extra room kept for alerts, responses and loss reports
PRIORITY_TYPES = frozenset({"alert", "response", "lost", "start", "stop"})
SEND_CHUNK = 256 * 1024  # bytes moved to the socket per batch (then a PING confirms them)


def check_nats(spec: str) -> None:
    """At start: the address is well formed, the server answers, and the JetStream stream exists."""
    _check_server(parse_url(spec))


def _check_server(addr: NatsAddress) -> dict:
    """The server answers and the JetStream stream (if any) exists; returns the server's INFO."""
    conn = BlockingConnection(addr)
    try:
        if addr.stream:
            ensure_stream(conn, addr.stream, [f"{addr.prefix}.>"])
        return conn.info
    finally:
        conn.close()


class NatsSink(RecordSink):
    """Publishes records to NATS; never blocks the watcher (see the module docstring)."""

    def __init__(self, spec: str, err=None) -> None:
        super().__init__()
        self.addr = parse_url(spec)
        self.name = spec
        self.err = err or sys.stderr
        self.jetstream = self.addr.stream is not None
        self.max_payload = 1024 * 1024
        self._inbox = f"_INBOX.{os.urandom(8).hex()}"
        self._run_id = os.urandom(4).hex()  # with node and seq: a Nats-Msg-Id unique to this run
        self._pending: deque[tuple[int, bytes]] = deque()  # (key, frame) not yet handed to the socket
        self._inflight: deque[tuple[int, bytes]] = deque()  # plain NATS: sent, awaiting a PONG
        self._ping_marks: deque[int] = deque()  # frames each outstanding PING confirms
        self._unacked: dict[int, bytes] = {}  # JetStream: key -> frame awaiting its ack
        self._held = 0  # bytes in pending + inflight + unacked
        self._wbuf = bytearray()
        self._key = 0
        self._sock: socket.socket | None = None
        self._parser = NatsParser()
        self._state = "down"  # down -> connecting -> handshake -> up
        self._next_try = 0.0
        self._backoff = BACKOFF_MIN
        self._down_since: float | None = None
        self._dropped_at_down = 0
        self.disconnects = 0
        self.ack_errors = 0
        self.confirmed = 0
        self._last_ack_error = ""
        # at start the server must be there: a clear error now rather than a silent buffer
        # (check_nats already ran; the stream may be new)
        info = _check_server(self.addr)
        self.max_payload = int(info.get("max_payload", self.max_payload))
        self._open()

    # -- records in --
    def write_record(self, rec: dict, data: bytes) -> None:
        subject = f"{self.addr.prefix}.{subject_token(str(rec.get('node') or 'unknown'))}." \
                  f"{subject_token(str(rec.get('type', 'unknown')))}"
        if len(data) > self.max_payload:
            self.dropped += 1
            return
        key = self._key
        self._key += 1
        if self.jetstream:
            frame = pub_frame(subject, data, f"{self._inbox}.{key}",
                              f"{subject_token(str(rec.get('node')))}-{self._run_id}-{rec.get('seq', key)}")
        else:
            frame = pub_frame(subject, data)
        limit = self.addr.buffer_limit + (PRIORITY_RESERVE if rec.get("type") in PRIORITY_TYPES else 0)
        if self._held + len(frame) > limit:
            self.dropped += 1
            return
        self._pending.append((key, frame))
        self._held += len(frame)
        self.written += 1

    @property
    def connected(self) -> bool:
        return self._state == "up"

    @property
    def buffered(self) -> int:
        return len(self._pending) + len(self._inflight) + len(self._unacked)

    # -- the connection --
    def _open(self) -> None:
        self._sock = socket.socket(socket.AF_INET6 if ":" in self.addr.host else socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setblocking(False)
        self._parser = NatsParser()
        self._wbuf.clear()
        rc = self._sock.connect_ex((self.addr.host, self.addr.port))
        if rc not in (0, errno.EINPROGRESS, errno.EAGAIN):
            self._lost(os.strerror(rc))
            return
        self._state = "connecting"

    def _handshake(self) -> None:
        self._wbuf += connect_line(self.addr, self.jetstream)
        if self.jetstream:
            self._wbuf += f"SUB {self._inbox}.* 1\r\n".encode()
        self._wbuf += b"PING\r\n"
        self._ping_marks.append(0)
        self._state = "handshake"

    def _lost(self, why: str) -> None:
        """The connection is gone: what the server did not confirm goes back to the front."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        was_up = self._state in ("up", "handshake")
        self._state = "down"
        self._wbuf.clear()
        self._ping_marks.clear()
        back = list(self._inflight) + sorted(self._unacked.items())
        self._inflight.clear()
        self._unacked.clear()
        self._pending.extendleft(reversed(back))
        now = time.monotonic()
        self._next_try = now + self._backoff
        self._backoff = min(BACKOFF_MAX, self._backoff * 2)
        if self._down_since is None:
            self._down_since = now
            self._dropped_at_down = self.dropped
            self.disconnects += 1
            print(f"agentprobe: output {self.addr.display}: connection lost ({why}); holding up to "
                  f"{self.addr.buffer_limit >> 20} MiB of records and reconnecting", file=self.err, flush=True)
        elif was_up:
            self.disconnects += 1

    def _up(self) -> None:
        self._state = "up"
        self._backoff = BACKOFF_MIN
        if self._down_since is not None:
            away = time.monotonic() - self._down_since
            print(f"agentprobe: output {self.addr.display}: reconnected after {away:.1f} s; sending "
                  f"{len(self._pending)} held records ({self.dropped - self._dropped_at_down} dropped while away)",
                  file=self.err, flush=True)
            self._down_since = None

    def service(self) -> None:
        """Connect, read what the server sent, move held records to the socket: never blocks."""
        if self._state == "down":
            if time.monotonic() >= self._next_try:
                self._open()
            if self._state == "down":
                return
        if self._state == "connecting":
            _, w, _ = select.select([], [self._sock], [], 0)
            if not w:
                return
            rc = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if rc:
                self._lost(os.strerror(rc))
                return
            self._handshake()
        self._read()
        if self._state == "up":
            self._fill()
        self._send()

    def _read(self) -> None:
        while self._sock is not None:
            try:
                data = self._sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._lost(e.strerror or str(e))
                return
            if not data:
                self._lost("closed by the server")
                return
            try:
                ops = self._parser.feed(data)
            except NatsError as e:
                self._lost(str(e))
                return
            for op in ops:
                self._handle(op)

    def _handle(self, op: tuple) -> None:
        kind = op[0]
        if kind == "PING":
            self._wbuf += b"PONG\r\n"
        elif kind == "PONG":
            n = self._ping_marks.popleft() if self._ping_marks else 0
            for _ in range(min(n, len(self._inflight))):
                _, frame = self._inflight.popleft()
                self._held -= len(frame)
                self.confirmed += 1
            if self._state == "handshake":
                self._up()
        elif kind == "MSG":
            self._ack(op[1])
        elif kind == "INFO":
            self.max_payload = int(op[1].get("max_payload", self.max_payload))
        elif kind == "-ERR":
            # the server closes the connection after most errors; a permissions error it does not
            print(f"agentprobe: output {self.addr.display}: server error: {op[1]}", file=self.err, flush=True)

    def _ack(self, msg: Msg) -> None:
        try:
            key = int(msg.subject.rsplit(".", 1)[1])
        except (IndexError, ValueError):
            return
        frame = self._unacked.pop(key, None)
        if frame is None:
            return
        self._held -= len(frame)
        reply: dict = {}
        if msg.status is None:
            try:
                reply = json.loads(msg.payload or b"{}")
            except ValueError:
                reply = {"error": {"description": "unreadable ack"}}
        if msg.status is not None or "error" in reply:
            self.ack_errors += 1
            self.dropped += 1
            why = "no stream takes these subjects" if msg.status == 503 else \
                str(reply.get("error", {}).get("description", reply.get("error")))
            if why != self._last_ack_error:
                self._last_ack_error = why
                print(f"agentprobe: output {self.addr.display}: JetStream refused a record: {why}",
                      file=self.err, flush=True)
        else:
            self.confirmed += 1

    def _fill(self) -> None:
        """Move held records into the write buffer, a batch at a time, with a PING after plain ones."""
        if len(self._wbuf) >= SEND_CHUNK or not self._pending:
            return
        moved = 0
        while self._pending and len(self._wbuf) < SEND_CHUNK:
            key, frame = self._pending.popleft()
            self._wbuf += frame
            if self.jetstream:
                self._unacked[key] = frame
            else:
                self._inflight.append((key, frame))
            moved += 1
        if not self.jetstream:
            self._wbuf += b"PING\r\n"
            self._ping_marks.append(moved)

    def _send(self) -> None:
        while self._sock is not None and self._wbuf:
            try:
                n = self._sock.send(self._wbuf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._lost(e.strerror or str(e))
                return
            del self._wbuf[:n]
            if not self._wbuf and self._state == "up":
                self._fill()

    def flush(self) -> None:
        self.service()

    def close(self, timeout: float = 2.0) -> None:
        """Try for `timeout` seconds to have the server confirm what is held; count the rest as dropped."""
        deadline = time.monotonic() + timeout
        while self.buffered and time.monotonic() < deadline:
            self.service()
            if self._sock is not None:
                want_w = [self._sock] if self._wbuf or self._state == "connecting" else []
                select.select([self._sock], want_w, [], 0.05)
            else:
                time.sleep(0.05)
        self.dropped += self.buffered
        self._pending.clear()
        self._inflight.clear()
        self._unacked.clear()
        self._held = 0
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._state = "closed"
