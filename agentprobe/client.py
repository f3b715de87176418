"""agentprobe for RL trainers: one sandbox cgroup per episode, tool calls run inside it, a verdict
at the end.

    from agentprobe.client import Episode

    with Episode("ep-17", labels={"episode": "17", "policy": "ckpt-2000"}) as ep:
        ep.run(["python3", "tool.py"], env={"TOOL_CALL_ID": "3"})
        for alert in ep.alerts():          # what was seen so far
            ...
    verdict = ep.verdict                   # after the with-block: the watcher's verdict record
    reward -= 10 if not verdict.clean else 0

The client never loads BPF: a running `agentprobe watch -o unix:SOCKET` on the parent cgroup does
the watching; the client reads that stream and keeps the records of its own episode. It connects
and waits for the watcher's `start` record before it creates the episode's cgroup, so it sees every
record of the episode. Or, with `nats="nats://HOST:PORT"`, it reads the records a watcher publishes
there (`-o nats://...`): it subscribes to `<prefix>.<node>.*` and waits for the server's PONG before
it makes the cgroup (records from other nodes and repeats after a reconnect are left out; records
published while the client's own connection is down are not replayed: the episode then ends with a
ClientError, and the verdict is still in the watcher's stream). It works as non-root where the
site delegates the parent cgroup to the trainer's user (chown of the directory, its cgroup.procs
and its cgroup.subtree_control) and lets it read the socket.

Memory is bounded: the client holds the last `max_records` records of its episode (the window that
`records` and `stream()` read), and the first `max_kept` alerts and `max_kept` responses (`alerts()`,
`responses()`, the Verdict's lists) whatever falls out of that window. `counts` counts every record
of the episode by type; `dropped` counts those no longer held. The watcher's verdict record counts
everything, whatever the client held.
"""

from __future__ import annotations

import os
import platform
import subprocess
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .cgroups import find_v2_mount
from .errors import AgentprobeError
from .labels import LabelError, check_labels, set_cgroup_labels

DEFAULT_SOCKET = "/run/agentprobe.sock"
DEFAULT_PARENT = "agents"
MAX_RECORDS = 4096  # the episode's latest records the client holds (records, stream())
MAX_KEPT = 1024  # alerts, and responses, held whatever falls out of that window
KEPT_TYPES = ("alert", "response")


class ClientError(AgentprobeError):
    pass


@dataclass
class Verdict:
    """The watcher's verdict on one episode (the `verdict` record, with the records seen)."""

    record: dict
    alerts: list[dict] = field(default_factory=list)
    responses: list[dict] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return bool(self.record.get("clean"))

    @property
    def frozen(self) -> bool:
        return bool(self.record.get("frozen"))

    @property
    def rules(self) -> dict[str, int]:
        return dict(self.record.get("rules") or {})

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.record.get("labels") or {})


class Episode:
    """A sandbox cgroup for one episode under the watched parent cgroup, with labels."""

    def __init__(self, name: str, labels: dict[str, str] | None = None, parent: str = DEFAULT_PARENT,
                 socket: str = DEFAULT_SOCKET, verdict_timeout: float = 10.0, connect_timeout: float = 10.0,
                 max_records: int = MAX_RECORDS, max_kept: int = MAX_KEPT, nats: str | None = None,
                 node: str | None = None) -> None:
        if not name or "/" in name or name in (".", ".."):
            raise ClientError(f"bad episode name {name!r}")
        root = find_v2_mount()
        self.parent = Path(parent) if parent.startswith("/") else root / parent
        self.path = self.parent / name
        self.rel = "/" + str(self.path.relative_to(root))
        try:
            self.labels = check_labels(labels or {})
        except LabelError as e:
            raise ClientError(str(e)) from None
        self.socket = socket
        self.nats = nats  # nats://HOST:PORT[?prefix=P]: read the watcher's records from NATS instead
        self.node = node or platform.node()  # the watcher's node (NATS subjects, records' `node`)
        self.verdict_timeout = verdict_timeout
        self.connect_timeout = connect_timeout
        self.max_kept = max_kept
        self.counts: Counter = Counter()  # every record of the episode, by type
        self.dropped = 0  # records of the episode no longer held (out of the window, not kept)
        self.watcher: dict | None = None  # the watcher's start record
        self.verdict: Verdict | None = None
        self._log: deque[tuple[int, dict, bool]] = deque(maxlen=max(1, max_records))  # (n, record, kept)
        self._n = 0
        self._kept: dict[str, list[dict]] = {t: [] for t in KEPT_TYPES}
        self._verdict_rec: dict | None = None
        self._hello = threading.Event()
        self._lock = threading.Condition()
        self._reader: threading.Thread | None = None
        self._stream_error: str | None = None
        self._stream_sock = None
        self._closed = False
        self._eof = False  # the reader has stopped (the stream ended, or end() closed it)

    # ---- lifecycle ----
    def __enter__(self) -> Episode:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.end()

    def start(self) -> None:
        if not (self.parent / "cgroup.procs").exists():
            raise ClientError(f"{self.parent} is not a cgroup (is the watcher's parent cgroup created?)")
        self._connect()
        try:
            self.path.mkdir()
        except OSError as e:
            self._disconnect()
            if isinstance(e, FileExistsError):
                raise ClientError(f"episode cgroup {self.path} exists already") from None
            raise ClientError(f"cannot create {self.path}: {e.strerror}") from None
        try:
            set_cgroup_labels(self.path, dict(self.labels))
        except LabelError as e:
            self._disconnect()
            self._remove_cgroup()
            raise ClientError(str(e)) from None

    def _disconnect(self) -> None:
        with self._lock:
            self._closed = True
        if self._stream_sock is not None:
            import socket as socketlib

            try:
                self._stream_sock.shutdown(socketlib.SHUT_RDWR)  # wakes the reader (close alone does not)
            except OSError:
                pass
            self._stream_sock.close()

    def _connect(self) -> None:
        if self.nats:
            self._connect_nats()
            return
        import socket as socketlib

        s = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
        try:
            s.connect(self.socket)
        except OSError as e:
            s.close()
            raise ClientError(f"cannot reach the watcher at {self.socket}: {e.strerror} "
                              "(run: agentprobe watch -o unix:SOCKET)") from None
        self._stream_sock = s
        self._reader = threading.Thread(target=self._read, args=(s,), daemon=True)
        self._reader.start()
        # The watcher sends its start record when it accepts a reader, and every record after that:
        # only once it has come may the episode's cgroup exist, or its first records could be missed.
        if not self._hello.wait(self.connect_timeout) or self._stream_error:
            self._disconnect()
            why = self._stream_error or f"no start record within {self.connect_timeout} s"
            raise ClientError(f"the watcher at {self.socket} did not answer: {why}")

    def _read(self, sock) -> None:
        from .stream import StreamError, iter_stream

        try:
            for rec in iter_stream(sock, self.socket):
                if not self._hello.is_set():
                    self.watcher = rec if rec.get("type") == "start" else None
                    self._hello.set()
                self._take(rec)
        except (StreamError, OSError, ValueError) as e:
            if not self._closed:
                self._stream_error = str(e)
        finally:
            self._ended("the watcher closed the stream")

    def _connect_nats(self) -> None:
        """Subscribe to this node's records on NATS (`<prefix>.<node>.*`, as the watcher's `-o nats:`
        publishes them). The server's PONG after the SUB says the subscription is in place: every
        record published after it comes, so the episode's cgroup is made only then."""
        from .nats import BlockingConnection, NatsError, parse_url, subject_token

        try:
            addr = parse_url(self.nats)
            conn = BlockingConnection(addr, timeout=self.connect_timeout)
        except NatsError as e:
            raise ClientError(f"cannot read the watcher's records from NATS: {e}") from None
        self._stream_sock = conn.sock
        try:
            early = conn.subscribe_confirmed(f"{addr.prefix}.{subject_token(self.node)}.*", self.connect_timeout)
        except (NatsError, TimeoutError, OSError) as e:
            self._disconnect()
            raise ClientError(f"NATS server {addr.display} did not take the subscription: "
                              f"{getattr(e, 'strerror', None) or e}") from None
        self._hello.set()
        self._reader = threading.Thread(target=self._read_nats, args=(conn, early), daemon=True)
        self._reader.start()

    def _read_nats(self, conn, early: list) -> None:
        from .nats import NatsError
        from .stream import decode_one

        last_seq = None  # plain NATS may deliver a record twice after the watcher reconnects
        try:
            while True:
                msg = early.pop(0) if early else conn.next_msg()
                rec = decode_one(msg.payload)
                if not isinstance(rec, dict) or rec.get("node") != self.node:
                    continue
                seq = rec.get("seq")
                if rec.get("type") == "start":
                    last_seq = None  # the watcher started again: its seq starts again
                elif isinstance(seq, int):
                    if last_seq is not None and seq <= last_seq:
                        continue
                    last_seq = seq
                self._take(rec)
        except (NatsError, TimeoutError, OSError, ValueError) as e:
            if not self._closed:
                self._stream_error = f"NATS: {getattr(e, 'strerror', None) or e}"
        finally:
            self._ended("the NATS server closed the connection")

    def _take(self, rec: dict) -> None:
        if self._mine(rec):
            with self._lock:
                self._add(rec)
                self._lock.notify_all()

    def _ended(self, why: str) -> None:
        with self._lock:
            if self._stream_error is None and not self._closed:
                self._stream_error = why
            self._eof = True
            self._lock.notify_all()
        self._hello.set()

    def _add(self, rec: dict) -> None:
        """Hold one record of the episode, within the bounds (called with the lock held)."""
        t = rec.get("type")
        self.counts[t] += 1
        kept = False
        if t in self._kept and len(self._kept[t]) < self.max_kept:
            self._kept[t].append(rec)
            kept = True
        elif t == "verdict":
            self._verdict_rec = rec
            kept = True
        if len(self._log) == self._log.maxlen and not self._log[0][2]:
            self.dropped += 1
        self._log.append((self._n, rec, kept))
        self._n += 1

    def _mine(self, rec: dict) -> bool:
        path = (rec.get("cgroup") or {}).get("path") or ""
        return path == self.rel or path.startswith(self.rel + "/")

    # ---- tool calls ----
    # The call joins the episode from a tiny shell that then execs it: joining from the child before
    # its exec (preexec_fn) would leave Popen waiting forever if the episode is frozen just then.
    JOIN = 'echo $$ > "$0" && exec "$@"'

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        """Start a tool call inside the episode's cgroup (it joins, then execs argv)."""
        if not argv:
            raise ClientError("empty tool call")
        self._check_cgroup()
        return subprocess.Popen(["/bin/sh", "-c", self.JOIN, str(self.path / "cgroup.procs"), *map(str, argv)],
                                **kw)

    def run(self, argv: list[str], timeout: float | None = None, **kw) -> subprocess.CompletedProcess:
        """Run a tool call inside the episode's cgroup. If the episode is frozen while it runs, the
        call is killed and returns at once (returncode -9, `frozen` true on the result), so the
        trainer moves on; `timeout` raises subprocess.TimeoutExpired as subprocess.run does."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        if kw.pop("capture_output", False):
            kw["stdout"] = kw["stderr"] = subprocess.PIPE
        kw.setdefault("start_new_session", True)  # the call and what it forks: one group to kill
        deadline = None if timeout is None else time.monotonic() + timeout
        p = self.popen(argv, **kw)
        frozen = False
        while True:
            try:
                out, err = p.communicate(timeout=0.05)
                break
            except subprocess.TimeoutExpired:
                expired = deadline is not None and time.monotonic() > deadline
                if not expired and not self.frozen:
                    continue
                frozen = not expired
                self._kill_group(p)  # frozen tasks still die of SIGKILL (cgroup v2)
                out, err = p.communicate()
                if expired:
                    raise subprocess.TimeoutExpired(argv, timeout) from None
                break
        self._check_cgroup(f" while the tool call ran (exit status {p.returncode})")
        result = subprocess.CompletedProcess(argv, p.returncode, out, err)
        result.frozen = frozen
        return result

    def _check_cgroup(self, when: str = "") -> None:
        if not (self.path / "cgroup.procs").exists():
            raise ClientError(f"episode cgroup {self.path} was removed{when}; end() still gets its verdict")

    @staticmethod
    def _kill_group(p: subprocess.Popen) -> None:
        import signal

        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            p.kill()

    # ---- what the watcher saw ----
    @property
    def records(self) -> list[dict]:
        """The episode's records the client still holds (the latest `max_records`), oldest first."""
        with self._lock:
            return [r for _, r, _ in self._log]

    def alerts(self) -> list[dict]:
        """The episode's alerts so far (the first `max_kept`; `counts["alert"]` counts them all)."""
        with self._lock:
            return list(self._kept["alert"])

    def responses(self) -> list[dict]:
        with self._lock:
            return list(self._kept["response"])

    @property
    def frozen(self) -> bool:
        try:
            return "frozen 1" in (self.path / "cgroup.events").read_text()
        except OSError:
            return False

    def stream(self, timeout: float | None = None) -> Iterator[dict]:
        """The episode's records as they come, from its first, until the verdict, the end of the
        watcher's stream, or `timeout` seconds of silence. A reader that falls more than
        `max_records` behind gets a `lost` record (`source: client`, `total`) in place of those
        it missed."""
        nxt = 0
        while True:
            with self._lock:
                if self._n <= nxt and not self._eof:
                    self._lock.wait(timeout)
                if self._n <= nxt:
                    return
                first = self._log[0][0]
                if first > nxt:
                    missed, nxt = first - nxt, first
                    rec = {"v": 1, "type": "lost", "source": "client", "total": missed,
                           "cgroup": {"path": self.rel}}
                else:
                    rec = self._log[nxt - first][1]
                    nxt += 1
            yield rec
            if rec.get("type") == "verdict":
                return

    def wait_alert(self, timeout: float = 10.0) -> dict | None:
        """The episode's first alert, waiting up to `timeout` seconds for one (None: none came)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                got = self._kept["alert"]
                if got or time.monotonic() >= deadline or self._stream_error is not None:
                    return got[0] if got else None
                self._lock.wait(max(0.0, deadline - time.monotonic()))

    # ---- the end ----
    def end(self) -> Verdict:
        """Kill what is left of the episode, remove its cgroup and wait for the watcher's verdict."""
        if self.verdict is not None:
            return self.verdict
        self._remove_cgroup()
        deadline = time.monotonic() + self.verdict_timeout
        with self._lock:
            while self._verdict_rec is None:
                if self._stream_error or time.monotonic() >= deadline:
                    break
                self._lock.wait(max(0.0, deadline - time.monotonic()))
            rec = self._verdict_rec
            alerts, responses = list(self._kept["alert"]), list(self._kept["response"])
        self._disconnect()
        if rec is None:
            why = self._stream_error or f"no verdict within {self.verdict_timeout} s"
            raise ClientError(f"episode {self.rel}: {why}")
        self.verdict = Verdict(rec, alerts, responses)
        return self.verdict

    def _remove_cgroup(self) -> None:
        """Thaw, kill and remove the episode's cgroup tree (tool calls may have nested cgroups)."""
        from .cgroups import CgroupError, remove_cgroup_tree

        try:
            remove_cgroup_tree(self.path)
        except (CgroupError, OSError) as e:
            raise ClientError(f"cannot remove {self.path}: {e}") from None
