"""A small synchronous client of the NATS text protocol, for the NATS output and input.

Why our own client and not nats-py: the watcher is one synchronous poll loop
that must never block; nats-py is asyncio and would need its own thread, a
cross-thread queue and shutdown handshakes, for the handful of protocol verbs
we use (INFO, CONNECT, PUB/HPUB, SUB, MSG/HMSG, PING/PONG, +OK/-ERR). Here the
output's socket is non-blocking and serviced from the watcher loop.

What is here: the address (`parse_url`), the wire protocol (`NatsParser`,
`pub_frame`), a blocking connection for set-up steps and JetStream requests,
and `subscribe`, the input of `agentprobe collect`. The watcher's output,
which speaks this protocol without blocking, is agentprobe.natssink.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

from . import __version__
from .sink import SinkError

DEFAULT_PORT = 4222
DEFAULT_PREFIX = "agentprobe"
BUFFER_LIMIT = 16 * 1024 * 1024  # bytes of records held while the server is away or unconfirmed
CONNECT_TIMEOUT = 3.0
BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0
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

    def next_msg(self) -> Msg:
        """The next message, waiting as long as it takes; other operations are passed over (PINGs
        answered), a server error raises NatsError."""
        while True:
            op = self.next_op(None)
            if op[0] == "-ERR":
                raise NatsError(op[1])
            if op[0] == "MSG":
                return op[1]

    def subscribe_confirmed(self, subject: str, timeout: float) -> list[Msg]:
        """SUB `subject`, then PING: the server's PONG says the subscription is in place, so every
        message published after this returns comes. Returns those that came before the PONG."""
        self.sock.sendall(f"SUB {subject} 1\r\nPING\r\n".encode())
        early = []
        while True:
            op = self.next_op(timeout)
            if op[0] == "PONG":
                return early
            if op[0] == "-ERR":
                raise NatsError(op[1])
            if op[0] == "MSG":
                early.append(op[1])

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
        msg = conn.next_msg()
        if msg.status is not None:
            continue  # flow-control or heartbeat status messages
        try:
            yield msg
        finally:  # acknowledged once the reader is done with it (also when it stops after this one)
            if durable and addr.stream and msg.reply:
                conn.sock.sendall(pub_frame(msg.reply, b"+ACK"))
