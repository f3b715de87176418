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
the watching; the client reads that stream and keeps the records of its own episode. It works as
non-root where the site delegates the parent cgroup to the trainer's user (chown of the directory,
its cgroup.procs and its cgroup.subtree_control) and lets it read the socket.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .cgroups import find_v2_mount
from .errors import AgentprobeError
from .labels import LabelError, check_labels, set_cgroup_labels

DEFAULT_SOCKET = "/run/agentprobe.sock"
DEFAULT_PARENT = "agents"


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
                 socket: str = DEFAULT_SOCKET, verdict_timeout: float = 10.0) -> None:
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
        self.verdict_timeout = verdict_timeout
        self.records: list[dict] = []
        self.verdict: Verdict | None = None
        self._lock = threading.Condition()
        self._reader: threading.Thread | None = None
        self._stream_error: str | None = None
        self._stream_sock = None
        self._closed = False

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
        except FileExistsError:
            raise ClientError(f"episode cgroup {self.path} exists already") from None
        except OSError as e:
            raise ClientError(f"cannot create {self.path}: {e.strerror}") from None
        try:
            set_cgroup_labels(self.path, dict(self.labels))
        except LabelError as e:
            self._remove_cgroup()
            raise ClientError(str(e)) from None

    def _connect(self) -> None:
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

    def _read(self, sock) -> None:
        from .stream import StreamError, iter_stream

        try:
            for rec in iter_stream(sock, self.socket):
                if self._mine(rec):
                    with self._lock:
                        self.records.append(rec)
                        self._lock.notify_all()
        except (StreamError, OSError, ValueError) as e:
            self._stream_error = str(e)
        finally:
            with self._lock:
                if self._stream_error is None and not self._closed:
                    self._stream_error = "the watcher closed the stream"
                self._lock.notify_all()

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
        result = subprocess.CompletedProcess(argv, p.returncode, out, err)
        result.frozen = frozen
        return result

    @staticmethod
    def _kill_group(p: subprocess.Popen) -> None:
        import signal

        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            p.kill()

    # ---- what the watcher saw ----
    def alerts(self) -> list[dict]:
        with self._lock:
            return [r for r in self.records if r.get("type") == "alert"]

    def responses(self) -> list[dict]:
        with self._lock:
            return [r for r in self.records if r.get("type") == "response"]

    @property
    def frozen(self) -> bool:
        try:
            return "frozen 1" in (self.path / "cgroup.events").read_text()
        except OSError:
            return False

    def stream(self, timeout: float | None = None) -> Iterator[dict]:
        """The episode's records as they come, until the verdict (or `timeout` seconds of silence)."""
        i = 0
        while True:
            with self._lock:
                if i >= len(self.records):
                    self._lock.wait(timeout)
                if i >= len(self.records):
                    return
                rec = self.records[i]
            i += 1
            yield rec
            if rec.get("type") == "verdict":
                return

    def wait_alert(self, timeout: float = 10.0) -> dict | None:
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                got = [r for r in self.records if r.get("type") == "alert"]
                if got or time.monotonic() >= deadline:
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
            while not any(r.get("type") == "verdict" for r in self.records):
                if self._stream_error or time.monotonic() >= deadline:
                    break
                self._lock.wait(max(0.0, deadline - time.monotonic()))
            recs = list(self.records)
        self._closed = True
        if self._stream_sock is not None:
            self._stream_sock.close()
        verdicts = [r for r in recs if r.get("type") == "verdict"]
        if not verdicts:
            why = self._stream_error or f"no verdict within {self.verdict_timeout} s"
            raise ClientError(f"episode {self.rel}: {why}")
        self.verdict = Verdict(verdicts[-1], [r for r in recs if r.get("type") == "alert"],
                               [r for r in recs if r.get("type") == "response"])
        return self.verdict

    def _remove_cgroup(self) -> None:
        """Thaw, kill and remove the episode's cgroup tree (tool calls may have nested cgroups)."""
        from .cgroups import CgroupError, remove_cgroup_tree

        try:
            remove_cgroup_tree(self.path)
        except (CgroupError, OSError) as e:
            raise ClientError(f"cannot remove {self.path}: {e}") from None
