"""NATS output and input: a small synchronous client of the NATS text protocol.

Why our own client and not nats-py: the watcher is one synchronous poll loop
that must never block; nats-py is asyncio and would need its own thread, a
cross-thread queue and shutdown handshakes, for the handful of protocol verbs
we use (INFO, CONNECT, PUB/HPUB, SUB, MSG/HMSG, PING/PONG, +OK/-ERR). Here the
socket is non-blocking and serviced from the watcher loop.

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
"""

from __future__ import annotations

import errno
import json
import os
import re
import select
import socket
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

from . import __version__
from .sinks import Sink, SinkError

DEFAULT_PORT = 4222
DEFAULT_PREFIX = "agentprobe"
BUFFER_LIMIT = 16 * 1024 * 1024  # bytes of records held while the server is away or unconfirmed
PRIORITY_RESERVE = 1024 * 1024  # extra room kept for alerts, responses and loss reports
PRIORITY_TYPES = frozenset({"alert", "response", "lost", "start", "stop"})
CONNECT_TIMEOUT = 3.0
BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0
SEND_CHUNK = 256 * 1024  # bytes moved to the socket per batch (then a PING confirms them)
MAX_CONTROL_LINE = 64 * 1024
STREAM_NOT_FOUND = 10059  # JetStream API error code

_SUBJECT_UNSAFE = re.compile(r"[\s.*>]")


class NatsError(SinkError):
    pass


def subject_token(text: str) -> str:
    """One subject token: no dots, spaces or wildcards (a host name `gpu-7.dc1` -> `gpu-7_dc1`)."""
    return _SUBJECT_UNSAFE.sub("_", text) or "_"


@dataclass
class NatsAddress:
    host: str
    port: int
    user: str | None = None
    password: str | None = None
    token: str | None = None
    prefix: str = DEFAULT_PREFIX
    stream: str | None = None  # JetStream stream to publish into (created if missing)
    buffer_limit: int = BUFFER_LIMIT
    spec: str = ""

    @property
    def display(self) -> str:
        return f"nats://{self.host}:{self.port}"


def parse_url(spec: str) -> NatsAddress:
    """nats://[user:pass@|token@]HOST[:PORT][?prefix=agentprobe&stream=NAME&buffer=BYTES]"""
    u = urlsplit(spec)
    if u.scheme != "nats" or not u.hostname:
        raise NatsError(f"bad NATS address {spec}: expected nats://HOST:PORT")
    try:
        port = u.port or DEFAULT_PORT
    except ValueError:
        raise NatsError(f"bad NATS address {spec}: bad port") from None
    q = {k: v[-1] for k, v in parse_qs(u.query, keep_blank_values=True).items()}
    unknown = set(q) - {"prefix", "stream", "buffer"}
    if unknown:
        raise NatsError(f"bad NATS address {spec}: unknown parameter {', '.join(sorted(unknown))} "
                        "(known: prefix, stream, buffer)")
    prefix = q.get("prefix", DEFAULT_PREFIX)
    if not prefix or any(not t or _SUBJECT_UNSAFE.search(t) for t in prefix.split(".")):
        raise NatsError(f"bad NATS address {spec}: prefix {prefix!r} is not a subject (tokens separated by dots)")
    stream = q.get("stream") or None
    if stream is not None and not re.fullmatch(r"[A-Za-z0-9_-]+", stream):
        raise NatsError(f"bad NATS address {spec}: stream name {stream!r} (letters, digits, _ and - only)")
    try:
        limit = int(q.get("buffer", BUFFER_LIMIT))
        if limit < 64 * 1024:
            raise ValueError
    except ValueError:
        raise NatsError(f"bad NATS address {spec}: buffer must be a number of bytes >= 65536") from None
    user = unquote(u.username) if u.username else None
    password = unquote(u.password) if u.password else None
    token = None
    if user is not None and password is None:
        token, user = user, None
    return NatsAddress(u.hostname, port, user, password, token, prefix, stream, limit, spec)


# ---- the wire protocol ----

@dataclass
class Msg:
    subject: str
    sid: str
    reply: str | None
    payload: bytes
    status: int | None = None  # HMSG status line code (503 = no responders)
    headers: dict = field(default_factory=dict)


class NatsParser:
    """Incremental parser of what a NATS server sends; `feed` returns whole operations:
    ('INFO', dict), ('MSG', Msg), ('PING',), ('PONG',), ('+OK',), ('-ERR', text)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._want: tuple | None = None  # (kind, args, header_len, total_len) awaiting a payload

    def feed(self, data: bytes) -> list[tuple]:
        self._buf += data
        out: list[tuple] = []
        while True:
            if self._want is not None:
                _, args, hlen, total = self._want
                if len(self._buf) < total + 2:
                    break
                body = bytes(self._buf[:total])
                del self._buf[:total + 2]
                self._want = None
                out.append(("MSG", self._msg(args, body, hlen)))
                continue
            end = self._buf.find(b"\r\n")
            if end < 0:
                if len(self._buf) > MAX_CONTROL_LINE:
                    raise NatsError("NATS server sent a control line longer than 64 KiB")
                break
            line = bytes(self._buf[:end]).decode("utf-8", "replace")
            del self._buf[:end + 2]
            op, _, rest = line.partition(" ")
            op = op.upper()
            if op in ("MSG", "HMSG"):
                args = rest.split()
                try:
                    if op == "MSG":
                        hlen, total = 0, int(args[-1])
                        args = args[:-1]
                    else:
                        hlen, total = int(args[-2]), int(args[-1])
                        args = args[:-2]
                except (IndexError, ValueError):
                    raise NatsError(f"NATS server sent a bad {op} line: {line[:200]}") from None
                if len(args) not in (2, 3):
                    raise NatsError(f"NATS server sent a bad {op} line: {line[:200]}")
                self._want = (op, args, hlen, total)
            elif op == "INFO":
                try:
                    out.append(("INFO", json.loads(rest)))
                except ValueError:
                    raise NatsError("NATS server sent a bad INFO line") from None
            elif op in ("PING", "PONG", "+OK"):
                out.append((op,))
            elif op == "-ERR":
                out.append(("-ERR", rest.strip().strip("'")))
            elif line:
                raise NatsError(f"NATS server sent an unknown operation: {line[:200]}")
        return out

    @staticmethod
    def _msg(args: list[str], body: bytes, hlen: int) -> Msg:
        subject, sid = args[0], args[1]
        reply = args[2] if len(args) == 3 else None
        status = None
        headers: dict = {}
        if hlen:
            head = body[:hlen].decode("utf-8", "replace").split("\r\n")
            first = head[0].split()
            if len(first) > 1 and first[1].isdigit():
                status = int(first[1])
            for h in head[1:]:
                k, sep, v = h.partition(":")
                if sep:
                    headers[k.strip()] = v.strip()
        return Msg(subject, sid, reply, body[hlen:], status, headers)


def connect_line(addr: NatsAddress, headers: bool) -> bytes:
    opts = {"verbose": False, "pedantic": False, "tls_required": False, "name": f"agentprobe {os.uname().nodename}",
            "lang": "python", "version": __version__, "protocol": 1, "headers": headers, "no_responders": headers}
    if addr.user is not None:
        opts["user"], opts["pass"] = addr.user, addr.password or ""
    if addr.token is not None:
        opts["auth_token"] = addr.token
    return b"CONNECT " + json.dumps(opts).encode() + b"\r\n"


def pub_frame(subject: str, payload: bytes, reply: str | None = None, msg_id: str | None = None) -> bytes:
    r = f" {reply}" if reply else ""
    if msg_id is None:
        return f"PUB {subject}{r} {len(payload)}\r\n".encode() + payload + b"\r\n"
    head = f"NATS/1.0\r\nNats-Msg-Id: {msg_id}\r\n\r\n".encode()
    return f"HPUB {subject}{r} {len(head)} {len(head) + len(payload)}\r\n".encode() + head + payload + b"\r\n"


class BlockingConnection:
    """A connected, handshaken NATS connection for set-up steps and for `collect`."""

    def __init__(self, addr: NatsAddress, timeout: float = CONNECT_TIMEOUT, headers: bool = True) -> None:
        self.addr = addr
        self.parser = NatsParser()
        self.info: dict = {}
        self._pending: deque = deque()
        try:
            self.sock = socket.create_connection((addr.host, addr.port), timeout=timeout)
        except OSError as e:
            raise NatsError(f"cannot reach NATS server {addr.display}: {e.strerror or e}") from None
        try:
            self.sock.settimeout(timeout)
            op = self._next(timeout)
            if op[0] != "INFO":
                raise NatsError(f"{addr.display} is not a NATS server (no INFO)")
            self.info = op[1]
            if self.info.get("tls_required"):
                raise NatsError(f"NATS server {addr.display} requires TLS, which agentprobe does not speak yet")
            self.sock.sendall(connect_line(addr, headers) + b"PING\r\n")
            while True:
                op = self._next(timeout)
                if op[0] == "PONG":
                    break
                if op[0] == "-ERR":
                    raise NatsError(f"NATS server {addr.display} refused the connection: {op[1]}")
                if op[0] == "PING":
                    self.sock.sendall(b"PONG\r\n")
        except NatsError:
            self.sock.close()
            raise
        except (TimeoutError, OSError) as e:
            self.sock.close()
            raise NatsError(f"cannot talk to NATS server {addr.display}: {getattr(e, 'strerror', None) or e}") from None

    def _next(self, timeout: float | None) -> tuple:
        """The next server operation; answers PINGs; None-free: raises on timeout/close."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._pending:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("timed out")
                self.sock.settimeout(left)
            else:
                self.sock.settimeout(None)
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionResetError(errno.ECONNRESET, "the server closed the connection")
            self._pending.extend(self.parser.feed(data))
        return self._pending.popleft()

    def next_op(self, timeout: float | None = None) -> tuple:
        op = self._next(timeout)
        if op[0] == "PING":
            self.sock.sendall(b"PONG\r\n")
        return op

    def request(self, subject: str, payload: bytes, timeout: float = CONNECT_TIMEOUT) -> Msg:
        inbox = f"_INBOX.{os.urandom(8).hex()}"
        self.sock.sendall(f"SUB {inbox} 99\r\nUNSUB 99 1\r\n".encode() + pub_frame(subject, payload, inbox))
        deadline = time.monotonic() + timeout
        while True:
            op = self.next_op(max(0.01, deadline - time.monotonic()))
            if op[0] == "MSG" and op[1].subject == inbox:
                return op[1]
            if op[0] == "-ERR":
                raise NatsError(f"NATS server {self.addr.display}: {op[1]}")

    def close(self) -> None:
        self.sock.close()


def ensure_stream(conn: BlockingConnection, name: str, subjects: list[str]) -> None:
    """The JetStream stream exists (created with `subjects` if it does not); else NatsError."""
    where = conn.addr.display
    try:
        msg = conn.request(f"$JS.API.STREAM.INFO.{name}", b"")
    except TimeoutError:
        raise NatsError(f"NATS server {where} did not answer a JetStream request (JetStream off?)") from None
    if msg.status == 503:
        raise NatsError(f"NATS server {where} has no JetStream (start nats-server with -js)")
    reply = json.loads(msg.payload or b"{}")
    err = reply.get("error")
    if err is None:
        return
    if err.get("err_code") != STREAM_NOT_FOUND:
        raise NatsError(f"JetStream stream {name} on {where}: {err.get('description', err)}")
    config = {"name": name, "subjects": subjects, "storage": "file", "retention": "limits",
              "duplicate_window": 120 * 10**9}
    reply = json.loads(conn.request(f"$JS.API.STREAM.CREATE.{name}", json.dumps(config).encode()).payload or b"{}")
    if "error" in reply:
        raise NatsError(f"cannot create JetStream stream {name} on {where}: "
                        f"{reply['error'].get('description', reply['error'])}")


def check_nats(spec: str) -> None:
    """At start: the address is well formed, the server answers, and the JetStream stream exists."""
    addr = parse_url(spec)
    conn = BlockingConnection(addr)
    try:
        if addr.stream:
            ensure_stream(conn, addr.stream, [f"{addr.prefix}.>"])
    finally:
        conn.close()


# ---- the output ----

class NatsSink(Sink):
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
        conn = BlockingConnection(self.addr)  # (check_nats already ran; the stream may be new)
        try:
            self.max_payload = int(conn.info.get("max_payload", self.max_payload))
            if self.jetstream:
                ensure_stream(conn, self.addr.stream, [f"{self.addr.prefix}.>"])
        finally:
            conn.close()
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

    def write(self, data: bytes) -> None:
        from .stream import decode_one

        self.write_record(decode_one(data), data)

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


# ---- the input: `agentprobe collect` ----

def subscribe(spec: str, subject: str, err=None, durable: str | None = None) -> Iterator[Msg]:
    """Messages on `subject` from the server at `spec`, for ever: reconnects with backoff (saying so
    on `err`). With `durable` and `?stream=NAME` in the address, reads through a durable JetStream
    consumer instead, acknowledging each message, so nothing published while away is missed."""
    addr = parse_url(spec)
    conn = BlockingConnection(addr)  # the first connection must work: a clear error now, not at first next()
    return _messages(conn, addr, subject, durable, err or sys.stderr)


def _messages(conn: BlockingConnection, addr: NatsAddress, subject: str, durable: str | None,
              err) -> Iterator[Msg]:
    backoff = BACKOFF_MIN
    try:
        while True:
            try:
                yield from _read_subscription(conn, addr, subject, durable)
            except (TimeoutError, OSError, NatsError) as e:
                print(f"agentprobe: {addr.display}: connection lost ({getattr(e, 'strerror', None) or e}); "
                      "reconnecting", file=err, flush=True)
            conn.close()
            while True:
                time.sleep(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)
                try:
                    conn = BlockingConnection(addr)
                except NatsError:
                    continue
                print(f"agentprobe: {addr.display}: reconnected", file=err, flush=True)
                backoff = BACKOFF_MIN
                break
    finally:  # the reader stopped (closed the generator)
        conn.close()


def _read_subscription(conn: BlockingConnection, addr: NatsAddress, subject: str,
                       durable: str | None) -> Iterator[Msg]:
    # a durable consumer keeps its delivery subject across reconnects
    inbox = f"_INBOX.agentprobe.{durable}" if durable else f"_INBOX.{os.urandom(8).hex()}"
    if durable and addr.stream:
        ensure_stream(conn, addr.stream, [f"{addr.prefix}.>"])
        config = {"stream_name": addr.stream, "config": {
            "durable_name": durable, "deliver_subject": inbox, "deliver_policy": "all", "ack_policy": "explicit",
            "filter_subject": subject, "max_ack_pending": 10000}}
        reply = json.loads(conn.request(f"$JS.API.CONSUMER.DURABLE.CREATE.{addr.stream}.{durable}",
                                        json.dumps(config).encode()).payload or b"{}")
        err = reply.get("error")
        if err and "already" not in str(err.get("description", "")):
            raise NatsError(f"cannot create JetStream consumer {durable} on {addr.stream}: "
                            f"{err.get('description', err)}")
        conn.sock.sendall(f"SUB {inbox} 1\r\n".encode())
    else:
        conn.sock.sendall(f"SUB {subject} 1\r\n".encode())
    while True:
        op = conn.next_op(None)
        if op[0] == "-ERR":
            raise NatsError(op[1])
        if op[0] != "MSG":
            continue
        msg = op[1]
        if msg.status is not None:
            continue  # flow-control or heartbeat status messages
        try:
            yield msg
        finally:  # acknowledged once the reader is done with it (also when it stops after this one)
            if durable and addr.stream and msg.reply:
                conn.sock.sendall(pub_frame(msg.reply, b"+ACK"))
