"""The watcher's status file for `agentprobe status`: what it watches, what it froze, where it
writes. Any local user may read it: it holds no event data and no credentials."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .stage import Stage

STATUS_FILE_MODE = 0o644  # `agentprobe status` works for any local user; it holds no event data, no secrets


class StatusFile(Stage):
    """/run/agentprobe/watcher-PID.json, rewritten when the watched set changes and at every freeze
    (as a stage it sees the responder's `response` records)."""

    name = "status"

    def __init__(self, status_dir: str, outputs: list[str]) -> None:
        self.dir = Path(status_dir)
        self.outputs = [without_credentials(o) for o in outputs]
        self.frozen: dict[str, dict] = {}
        self.started = 0
        self.cgroup_root = ""
        self.watched: list[dict] = []
        self.path: Path | None = None

    def process(self, record: dict) -> list[dict]:
        if record["type"] == "response" and record.get("outcome") == "frozen":
            self.frozen[record["cgroup"]["path"]] = {"rule": record.get("rule"), "ts": record.get("ts"),
                                                     "alert_seq": record.get("alert_seq")}
            self.write()
        return []

    def set_watched(self, cgroup_root: str, watched: list[dict]) -> None:
        self.cgroup_root = cgroup_root
        self.watched = watched
        self.write()

    def write(self) -> None:
        try:
            made = [d for d in (self.dir, *self.dir.parents) if not d.exists()]
            for d in reversed(made):  # `agentprobe status` for any user, whatever the umask
                d.mkdir(exist_ok=True)
                os.chmod(d, 0o755)
            path = self.dir / f"watcher-{os.getpid()}.json"
            data = json.dumps({
                "pid": os.getpid(),
                "started": self.started,
                "cgroup_root": self.cgroup_root,
                "watched": self.watched,
                "frozen": self.frozen,
                "outputs": self.outputs,
            }).encode()
            write_status_file(path, data)
            self.path = path
        except OSError:
            pass  # status is a convenience; the stream is the record

    def remove(self) -> None:
        if self.path is not None:
            try:
                self.path.unlink()
            except OSError:
                pass


def write_status_file(path: Path, data: bytes) -> None:
    """Atomically, with exactly STATUS_FILE_MODE whatever the umask: a new temporary file (never
    one that is there already, never through a symlink) renamed over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o600)
    except FileExistsError:  # left by a watcher of this pid that was killed mid-write
        os.unlink(tmp)
        fd = os.open(tmp, flags, 0o600)
    try:
        os.fchmod(fd, STATUS_FILE_MODE)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def without_credentials(spec: str) -> str:
    """nats://user:pass@host:4222 -> nats://host:4222: the status file is readable by every user."""
    return re.sub(r"^([a-z]+://)[^/?#@]*@", r"\1", spec)
