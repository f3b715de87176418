"""Where the msgpack stream goes: stdout, a file, or unix/TCP sockets that
readers connect to; and the registry that opens an output by its spec
(`open_sink`, `check_output`: `nats:` outputs are in agentprobe.natssink).
No sink imports BCC; none blocks the watcher. The interface they implement,
`Sink`, is in agentprobe.sink.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import stat
import sys
import time
from collections import deque
from pathlib import Path

from .natssink import NatsSink, check_nats
from .sink import RecordSink, Sink, SinkError

CLIENT_BUFFER_LIMIT = 8 * 1024 * 1024  # bytes queued for one slow reader before it is dropped
FILE_BUFFER_LIMIT = 64 * 1024 * 1024  # bytes held while a file cannot be written (disk full)


class _Records:
    """Bytes not yet written, with the record boundaries kept: what is given up or
    still held is counted in records, and a partial write is known as such."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.lens: deque[int] = deque()  # sizes of the records in buf, oldest first
        self.head = 0  # bytes of the oldest record already written (stream outputs)

    def __len__(self) -> int:
        return len(self.buf)

    def add(self, data: bytes) -> None:
        self.buf += data
        self.lens.append(len(data))

    def whole(self, n: int) -> int:
        """Of the first `n` bytes held, how many make whole records."""
        n += self.head
        whole = 0
        for size in self.lens:
            if whole + size > n:
                break
            whole += size
        return max(0, whole - self.head)

    def consumed(self, n: int) -> None:
        """`n` bytes went out (the last record perhaps only in part)."""
        del self.buf[:n]
        n += self.head
        while self.lens and n >= self.lens[0]:
            n -= self.lens.popleft()
        self.head = n

    def clear(self) -> int:
        """Gives up what is held; returns how many records that was."""
        lost = len(self.lens)
        self.buf.clear()
        self.lens.clear()
        self.head = 0
        return lost


def _give_up(sink: Sink, queue: _Records) -> None:
    """What `queue` holds will never go out: those records count as dropped, not written."""
    lost = queue.clear()
    sink.dropped += lost
    sink.written -= lost


class StdoutSink(Sink):
    """Writes to stdout. A pipe or a socket (`watch -o - | consumer`) is written without
    blocking, with at most `limit` bytes queued: a reader that stops reading costs records,
    counted in `dropped`, never the watcher's loop, which must stay free to freeze."""

    name = "-"

    def __init__(self, limit: int = CLIENT_BUFFER_LIMIT, out=None) -> None:
        super().__init__()
        self._out = out if out is not None else sys.stdout.buffer
        self._limit = limit
        self._queue = _Records()
        self._gone = False
        self._fd: int | None = None
        try:
            fd = self._out.fileno()
            mode = os.fstat(fd).st_mode
        except (AttributeError, ValueError, OSError):
            return
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            self._out.flush()
            self._fd = fd
            os.set_blocking(fd, False)

    def write(self, data: bytes) -> None:
        if self._fd is None:  # a terminal or a file: plain buffered writes
            try:
                self._out.write(data)
                self.written += 1
            except (BrokenPipeError, ValueError):
                self.dropped += 1
            return
        if self._gone or len(self._queue) + len(data) > self._limit:
            self.dropped += 1
            return
        self._queue.add(data)
        self.written += 1

    def flush(self) -> None:
        if self._fd is None:
            try:
                self._out.flush()
            except (BrokenPipeError, ValueError):
                pass
            return
        while self._queue and not self._gone:
            try:
                n = os.write(self._fd, self._queue.buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # the reader is gone (EPIPE): what is queued will never arrive
                self._gone = True
                _give_up(self, self._queue)
                return
            self._queue.consumed(n)

    def unwritten(self) -> int:
        return len(self._queue.lens)

    def drain(self, deadline: float) -> None:
        self.flush()  # a reader still reading gets the rest; a stalled one costs the time left
        while self._fd is not None and self._queue and not self._gone and time.monotonic() < deadline:
            select.select([], [self._fd], [], max(0.0, deadline - time.monotonic()))
            self.flush()

    def close(self, grace_s: float = 2.0) -> None:
        self.drain(time.monotonic() + grace_s)
        if self._fd is None:
            return
        _give_up(self, self._queue)
        try:
            os.set_blocking(self._fd, True)  # the descriptor may be shared: leave it as found
        except OSError:
            pass


class FileSink(Sink):
    """Appends to a file; records that cannot be written (disk full) are held in
    bounded memory and retried, then counted as dropped."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.name = path
        self.path = path
        self._queue = _Records()
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            # never through a symlink: whoever could plant one would choose where the stream goes
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise SinkError(f"cannot write output {path}: is a symbolic link (refused; "
                                "name the file itself)") from None
            raise SinkError(f"cannot write output {path}: {e.strerror}") from None
        try:
            self._owner_only(path)
        except BaseException:
            os.close(self._fd)
            raise

    def _owner_only(self, path: str) -> None:
        """The stream holds every agent's command lines: a file we append to is ours and 0600,
        also one that was there before with a wider mode."""
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode):
            return  # /dev/null, a FIFO: not a file that keeps the stream
        if st.st_uid != os.geteuid():
            raise SinkError(f"cannot write output {path}: owned by uid {st.st_uid}, who could read the "
                            "stream (remove it or chown it)")
        if st.st_mode & 0o077:
            os.fchmod(self._fd, 0o600)

    def write(self, data: bytes) -> None:
        if len(self._queue) + len(data) > FILE_BUFFER_LIMIT:
            self.dropped += 1
            return
        self._queue.add(data)
        self.written += 1

    def flush(self) -> None:
        while self._queue:
            try:
                n = os.write(self._fd, self._queue.buf)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
                    return  # kept and retried at the next flush
                raise
            whole = self._queue.whole(n)
            self._queue.consumed(whole)
            if whole < n:  # the disk took half a record: take it back, so the file ends on a record
                try:
                    os.ftruncate(self._fd, os.fstat(self._fd).st_size - (n - whole))
                except OSError:
                    pass
                return

    def unwritten(self) -> int:
        return len(self._queue.lens)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            _give_up(self, self._queue)  # what the disk never took
            os.close(self._fd)


class _Client:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()


MIN_CLIENT_BUFFER = 64 * 1024


def server_spec(spec: str) -> tuple[str, str | None, int]:
    """unix:PATH[?group=NAME&buffer=BYTES] or tcp:HOST:PORT[?buffer=BYTES] ->
    (PATH or HOST:PORT, group NAME or None, bytes queued per reader before it is dropped)."""
    kind = spec[:spec.index(":")]
    where, _, query = spec[len(kind) + 1:].partition("?")
    group, limit = None, CLIENT_BUFFER_LIMIT
    allowed = "?group=NAME&buffer=BYTES" if kind == "unix" else "?buffer=BYTES"
    for part in filter(None, query.split("&")):
        key, _, value = part.partition("=")
        if key == "group" and kind == "unix" and value:
            group = value
        elif key == "buffer" and value.isdigit() and int(value) >= MIN_CLIENT_BUFFER:
            limit = int(value)
        elif key == "buffer":
            raise SinkError(f"bad output {spec}: buffer= takes a number of bytes, at least {MIN_CLIENT_BUFFER}")
        else:
            raise SinkError(f"bad output {spec}: the options of {kind}: are {allowed}")
    return where, group, limit


def unix_spec(spec: str) -> tuple[str, str | None]:
    """unix:PATH[?group=NAME&buffer=BYTES] -> (PATH, NAME or None)."""
    path, group, _ = server_spec(spec)
    return path, group


def _group_id(name: str) -> int:
    import grp

    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise SinkError(f"output socket group {name!r}: no such group") from None


class ServerSink(Sink):
    """Serves the live stream to any number of readers on a unix or TCP socket.
    Each reader first gets the watcher's `start` record; a reader that falls
    more than ?buffer= bytes (CLIENT_BUFFER_LIMIT) behind is disconnected and counted
    in `readers_dropped`, one that goes away in `readers_closed`."""

    def __init__(self, spec: str, start_record: bytes | None = None) -> None:
        super().__init__()
        self.name = spec
        self._clients: list[_Client] = []
        self.start_record = start_record
        self.readers_dropped = 0  # disconnected by us: fell more than `limit` bytes behind
        self.readers_closed = 0  # went away on their own (closed, reset)
        self._unix_path: str | None = None
        where, group, self.limit = server_spec(spec)
        try:
            if spec.startswith("unix:"):
                path = where
                gid = _group_id(group) if group else None
                self._remove_stale_socket(path)
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                # bind makes the socket file with the umask's mode: owner only from the first instant
                # (a chmod after bind leaves a moment in which anyone could connect)
                old_umask = os.umask(0o177)
                try:
                    self._sock.bind(path)
                finally:
                    os.umask(old_umask)
                self._unix_path = path
                # ?group=NAME lets that group read the stream too (trainers, collectors)
                if gid is not None:
                    os.chown(path, -1, gid)
                    os.chmod(path, 0o660)
            else:
                host, _, port = where.rpartition(":")
                host = host.strip("[]")
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                self._sock = socket.socket(family, socket.SOCK_STREAM)
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                self._sock.bind((host, int(port)))
            self._sock.listen(16)
            self._sock.setblocking(False)
        except (OSError, ValueError) as e:
            raise SinkError(f"cannot serve output {spec}: {getattr(e, 'strerror', None) or e}") from None

    @staticmethod
    def _remove_stale_socket(path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise SinkError(f"cannot serve output unix:{path}: exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody listens: a leftover of a previous run
            return
        finally:
            probe.close()
        raise SinkError(f"cannot serve output unix:{path}: another process is serving it")

    @property
    def address(self):
        return self._sock.getsockname()

    def service(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            conn.setblocking(False)
            client = _Client(conn)
            if self.start_record:
                client.buf += self.start_record
            self._clients.append(client)
        self.flush()

    def write(self, data: bytes) -> None:
        self.written += 1
        for c in self._clients:
            if c.sock.fileno() < 0:
                continue  # dropped since the last flush
            if len(c.buf) + len(data) > self.limit:
                self._drop(c)
                self.dropped += 1
            else:
                c.buf += data

    def _drop(self, c: _Client) -> None:
        self.readers_dropped += 1
        c.buf.clear()
        c.sock.close()

    def flush(self) -> None:
        alive = []
        for c in self._clients:
            if c.sock.fileno() < 0:
                continue
            try:
                while c.buf:
                    n = c.sock.send(c.buf)
                    del c.buf[:n]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:  # EPIPE, ECONNRESET: the reader went away; the others carry on
                self.readers_closed += 1
                c.sock.close()
                continue
            alive.append(c)
        self._clients = alive

    def readers(self) -> dict:
        """For the stop record: readers connected now, dropped for falling behind, gone on their own."""
        return {"connected": sum(1 for c in self._clients if c.sock.fileno() >= 0),
                "dropped": self.readers_dropped, "closed": self.readers_closed}

    def close(self) -> None:
        self.flush()
        for c in self._clients:
            c.sock.close()
        self._clients = []
        self._sock.close()
        if self._unix_path:
            try:
                os.unlink(self._unix_path)
            except OSError:
                pass


class JsonLinesSink(RecordSink):
    """One JSON object per line with Elastic Common Schema field names (agentprobe/ecs.py), for
    SIEMs and log shippers; written through a file or stdout sink (same buffering and counting)."""

    def __init__(self, inner: Sink) -> None:
        super().__init__()
        self.inner = inner
        self.name = "jsonl:" + inner.name

    def write_record(self, rec: dict, data: bytes) -> None:
        from .ecs import to_json_line

        before = self.inner.dropped
        self.inner.write(to_json_line(rec))
        if self.inner.dropped == before:
            self.written += 1

    @property
    def dropped(self) -> int:  # the inner sink counts
        return self.inner.dropped

    @dropped.setter
    def dropped(self, value: int) -> None:
        pass

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()


def check_output(spec: str) -> None:
    """Fail early, before anything is loaded, for an output that cannot work."""
    if spec.startswith("nats:"):
        check_nats(spec)
        return
    if spec.startswith("jsonl:"):
        if spec[6:] != "-":
            check_output(spec[6:])
        return
    if spec == "-" or spec.startswith(("unix:", "tcp:")):
        if spec.startswith("tcp:"):
            host, _, port = server_spec(spec)[0].rpartition(":")
            if not host or not port.isdigit():
                raise SinkError(f"bad output {spec}: expected tcp:HOST:PORT")
        if spec.startswith("unix:"):
            path, group = unix_spec(spec)
            if group:
                _group_id(group)
            parent = Path(path).parent
            if not parent.is_dir() or not os.access(parent, os.W_OK):
                raise SinkError(f"cannot serve output {spec}: {parent} is not a writable directory")
        return
    p = Path(spec)
    if p.is_symlink():
        raise SinkError(f"cannot write output {spec}: is a symbolic link (refused; name the file itself)")
    if p.is_dir():
        raise SinkError(f"cannot write output {spec}: is a directory")
    if p.exists():
        if not os.access(p, os.W_OK):
            raise SinkError(f"cannot write output {spec}: permission denied")
        st = p.stat()
        if stat.S_ISREG(st.st_mode) and st.st_uid != os.geteuid():
            raise SinkError(f"cannot write output {spec}: owned by uid {st.st_uid}, who could read the "
                            "stream (remove it or chown it)")
        return
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK) or not parent.is_dir():
        raise SinkError(f"cannot write output {spec}: {parent} is not writable")


def open_sink(spec: str) -> Sink:
    if spec.startswith("nats:"):
        return NatsSink(spec)
    if spec.startswith("jsonl:"):
        inner = spec[6:]
        if not inner:
            raise SinkError("bad output jsonl: expected jsonl:FILE or jsonl:-")
        return JsonLinesSink(StdoutSink() if inner == "-" else FileSink(inner))
    if spec == "-":
        return StdoutSink()
    if spec.startswith(("unix:", "tcp:")):
        return ServerSink(spec)
    return FileSink(spec)
