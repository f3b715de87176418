"""Enricher: typed kernel events -> stream records with process context.

Keeps a process tree of the watched cgroups from fork/exec/exit events (so the
parent chain of a short-lived process is still known after it exited) and adds
exe path, command line, user, sha256 of the executable (cached by inode) and
the container parsed from the cgroup path. A process that is gone before it
could be looked at still yields its record with what the kernel gave.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import socket
import stat
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Callable

import psutil

from .addr import proc_net_endpoint
from .cgroups import container_of
from .events import (
    ConnectEvent,
    Event,
    ExecEvent,
    ExitEvent,
    ForkEvent,
    MoveEvent,
    PacketEvent,
    PayloadEvent,
    Process,
    Record,
)
from .kube import PodDirectory

SCHEMA_VERSION = 1
MAX_ANCESTORS = 16
MAX_TREE = 65536
HASH_LIMIT = 512 * 1024 * 1024  # bytes; larger executables are not hashed


@dataclass
class ProcInfo:
    pid: int
    ppid: int = 0
    comm: str = ""
    exe: str | None = None
    cmdline: list[str] | None = None
    uid: int | None = None
    sha256: str | None = None
    exited: bool = False
    children: set[int] = field(default_factory=set)
    labels: dict[str, str] | None = None  # from --label-env, read at exec, inherited by children
    stdio_socket: dict | None = None  # a TCP/UDP socket on stdin/stdout/stderr at exec (stdio_socket())


class ProcessTree:
    """Processes of the watched cgroups and their ancestors, bounded in size."""

    def __init__(self, max_size: int = MAX_TREE) -> None:
        self._procs: OrderedDict[int, ProcInfo] = OrderedDict()
        self.max_size = max_size
        # processes gone from the tree, for records about them that come after their exit (the
        # in-kernel counts flushed every second): bounded, a live process of the same pid wins
        self._gone: OrderedDict[int, ProcInfo] = OrderedDict()

    def get(self, pid: int) -> ProcInfo | None:
        return self._procs.get(pid)

    def get_recent(self, pid: int) -> ProcInfo | None:
        """A live process, or one that exited lately."""
        return self._procs.get(pid) or self._gone.get(pid)

    def __contains__(self, pid: int) -> bool:
        return pid in self._procs

    def __len__(self) -> int:
        return len(self._procs)

    def add(self, info: ProcInfo) -> ProcInfo:
        old = self._procs.get(info.pid)
        if old is not None:
            info.children = old.children
        self._procs[info.pid] = info
        self._procs.move_to_end(info.pid)
        parent = self._procs.get(info.ppid)
        if parent is not None:
            parent.children.add(info.pid)
        self._trim()
        return info

    def fork(self, parent: ProcInfo, child_pid: int) -> ProcInfo:
        child = ProcInfo(child_pid, parent.pid, parent.comm, parent.exe, parent.cmdline, parent.uid,
                         parent.sha256, labels=parent.labels, stdio_socket=parent.stdio_socket)
        return self.add(child)

    def exit(self, pid: int) -> None:
        """Mark exited; the entry stays while live descendants may still name it as ancestor."""
        info = self._procs.get(pid)
        if info is None:
            return
        info.exited = True
        self._release(info)

    def _release(self, info: ProcInfo) -> None:
        if info.exited and not info.children:
            self._procs.pop(info.pid, None)
            self._gone[info.pid] = info
            self._gone.move_to_end(info.pid)
            if len(self._gone) > 4096:
                self._gone.popitem(last=False)
            parent = self._procs.get(info.ppid)
            if parent is not None:
                parent.children.discard(info.pid)
                self._release(parent)

    def ancestors(self, pid: int, limit: int = MAX_ANCESTORS) -> list[ProcInfo]:
        out = []
        seen = {pid}
        info = self._procs.get(pid)
        while info is not None and len(out) < limit:
            parent = self._procs.get(info.ppid)
            if parent is None or parent.pid in seen:
                break
            out.append(parent)
            seen.add(parent.pid)
            info = parent
        return out

    def _trim(self) -> None:
        while len(self._procs) > self.max_size:
            self._procs.popitem(last=False)


class ExeHasher:
    """sha256 of executables, cached by (dev, inode, mtime, size)."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._cache: OrderedDict[tuple, str | None] = OrderedDict()
        self.max_entries = max_entries

    def of_pid(self, pid: int) -> str | None:
        # /proc/PID/exe opens the image the process runs, even if deleted or a memfd
        return self._hash_path(f"/proc/{pid}/exe")

    def of_path(self, path: str) -> str | None:
        return self._hash_path(path)

    def warm(self, paths) -> int:
        """Hash programs ahead of time (at start), so an agent's first exec of one is not
        delayed by hashing it on the way to the rules. Returns how many were hashed."""
        return sum(1 for p in paths if p and self._hash_path(p) is not None)

    def _hash_path(self, path: str) -> str | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > HASH_LIMIT:
                return None
            key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            h = hashlib.sha256()
            with os.fdopen(fd, "rb", closefd=False) as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            digest = h.hexdigest()
            self._cache[key] = digest
            if len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
            return digest
        except OSError:
            return None
        finally:
            os.close(fd)


def _read_cmdline(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    if not raw:
        return None
    return [p.decode("utf-8", "backslashreplace") for p in raw.rstrip(b"\0").split(b"\0")]


def _read_exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def read_comm(pid: int) -> str | None:
    """A running process's name (/proc/PID/comm, undecodable bytes escaped), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().rstrip(b"\n").decode("utf-8", "backslashreplace")
    except OSError:
        return None


def _read_status(pid: int) -> tuple[int, int, str] | None:
    """(ppid, uid, comm) of a running process."""
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            return p.ppid(), p.uids().real, p.name()
    except (psutil.Error, OSError):
        return None


_TCP_STATES = {1: "established", 2: "syn_sent", 3: "syn_recv", 4: "fin_wait1", 5: "fin_wait2", 6: "time_wait",
               7: "close", 8: "close_wait", 9: "last_ack", 10: "listen", 11: "closing"}


def _fd_target(pid: int, fd: int | str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None


def _socket_inode(target: str | None) -> int | None:
    return int(target[8:-1]) if target and target.startswith("socket:[") else None


def _inet_socket(pid: int, inodes: dict[int, list[int]]) -> dict | None:
    """The first of the inodes that is a TCP or UDP socket in the process's network namespace."""
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            with open(f"/proc/{pid}/net/{proto}") as f:
                next(f, None)
                for line in f:
                    cols = line.split()
                    if len(cols) < 10 or not cols[9].isdigit() or int(cols[9]) not in inodes:
                        continue
                    local, remote = proc_net_endpoint(cols[1]), proc_net_endpoint(cols[2])
                    state = int(cols[3], 16)
                    return {"fds": inodes[int(cols[9])], "proto": proto.rstrip("6"),
                            "state": _TCP_STATES.get(state, str(state)) if proto.startswith("tcp") else None,
                            "local": f"{local[0]}:{local[1]}", "peer_address": remote[0], "peer_port": remote[1]}
        except (OSError, ValueError):
            continue
    return None


def stdio_socket(pid: int, ppid: int) -> dict | None:
    """A TCP or UDP socket behind the stdin of a process that just exec'd: the signature of a reverse
    or bind shell, whatever its command line. Directly (dup2 in any language, bash's
    `exec 0<>/dev/tcp`, nc.traditional -e), or relayed by its parent through a pty whose parent's
    stdin is the socket (python's pty.spawn, script): `relayed` says which. A pipe or socketpair from
    a parent that also holds a TCP connection is not counted: that is every node.js agent running a
    command while it talks to its model's API. Cost: one readlink per exec; the socket tables only
    when stdin is a socket or a pty."""
    own = _fd_target(pid, 0)
    ino = _socket_inode(own)
    if ino is not None:
        inodes = {ino: [0]}
        for fd in (1, 2):
            if _socket_inode(_fd_target(pid, fd)) == ino:
                inodes[ino].append(fd)
        found = _inet_socket(pid, inodes)
        return {"pid": pid, "relayed": None, **found} if found is not None else None
    if own and own.startswith("/dev/pts/") and ppid > 0:
        pino = _socket_inode(_fd_target(ppid, 0))
        found = _inet_socket(ppid, {pino: [0]}) if pino is not None else None
        return {"pid": ppid, "relayed": "pty", **found} if found is not None else None
    return None


class SocketOwners:
    """Which process owns an agent socket, for the records written where the kernel has no task (the
    egress hook: first bytes, sampled packets). The connect records carry the socket's cookie and
    come before any packet of that socket, so the owner is known exactly. A connect that repeats
    one of the same process to the same place within the kernel's window has no record of its own:
    its socket's owner is the last process of that cgroup that connected there (`owner: inferred`).
    Both tables are bounded (least recently learnt dropped first)."""

    def __init__(self, max_entries: int = 65536) -> None:
        self.max_entries = max_entries
        self.by_cookie: OrderedDict[int, Process] = OrderedDict()
        self.by_dest: OrderedDict[tuple, Process] = OrderedDict()

    @staticmethod
    def _put(table: OrderedDict, key, value, cap: int) -> None:
        table[key] = value
        table.move_to_end(key)
        if len(table) > cap:
            table.popitem(last=False)

    def learn(self, ev: ConnectEvent) -> None:
        if not ev.proc.pid:
            return
        if ev.cookie:
            self._put(self.by_cookie, ev.cookie, ev.proc, self.max_entries)
        if ev.address is not None:
            self._put(self.by_dest, (ev.cgroup_id, ev.address, ev.port), ev.proc, self.max_entries // 4)

    def owner(self, cookie: int, cgroup_id: int, address: str, port: int | None) -> tuple[Process, bool] | None:
        """(owner, inferred) or None."""
        p = self.by_cookie.get(cookie) if cookie else None
        if p is not None:
            return p, False
        p = self.by_dest.get((cgroup_id, address, port))
        return (p, True) if p is not None else None


class Enricher:
    """Turns typed events into stream records (Records: the fields and the event behind them).
    `cgroup_name(id)` names a watched cgroup; `cgroup_dest(id)` describes any cgroup a process
    was moved to ({id, path, watched})."""

    def __init__(self, cgroup_name: Callable[[int], str | None], clock_offset_ns: int,
                 node: str | None = None, cgroup_labels: Callable[[int, str], dict] | None = None,
                 label_env: tuple[str, ...] = (), cgroup_dest: Callable[[int], dict] | None = None) -> None:
        self.tree = ProcessTree()
        self._cgroup_dest = cgroup_dest or (lambda cid: {"id": cid, "path": None, "watched": False})
        self._cgroup_labels = cgroup_labels
        self.label_env = tuple(label_env)
        self.hasher = ExeHasher()
        self._cgroup_name = cgroup_name
        self._clock_offset_ns = clock_offset_ns
        self.node = node or socket.gethostname()
        self._users: dict[int, str | None] = {}
        self.pods = PodDirectory()  # pod, namespace and container names on Kubernetes nodes
        self.owners = SocketOwners()

    # ---- helpers ----
    def user_name(self, uid: int | None) -> str | None:
        if uid is None:
            return None
        if uid not in self._users:
            try:
                self._users[uid] = pwd.getpwuid(uid).pw_name
            except KeyError:
                self._users[uid] = None
        return self._users[uid]

    def discover(self, pid: int) -> ProcInfo | None:
        """Add a process already running (and its ancestors) from /proc."""
        chain = []
        while pid > 0 and pid not in self.tree and len(chain) < MAX_ANCESTORS:
            status = _read_status(pid)
            if status is None:
                break
            ppid, uid, comm = status
            exe = _read_exe(pid)
            chain.append(ProcInfo(pid, ppid, comm, exe, _read_cmdline(pid), uid))
            pid = ppid
        for info in reversed(chain):
            self.tree.add(info)
        return self.tree.get(chain[0].pid) if chain else None

    def _env_labels(self, pid: int, ppid: int) -> dict[str, str] | None:
        """--label-env labels of a process that just exec'd: those it inherited (from before the exec,
        else its parent's) with its own environment's on top, per key: a child started with `env -i`
        keeps its episode."""
        if not self.label_env:
            return None
        from .labels import env_labels, merge_labels

        before = self.tree.get(pid)
        if before is None or before.exited:  # not seen before the exec, or a stale entry of a reused pid
            before = self.tree.get(ppid)
        inherited = (before.labels if before is not None else None) or {}
        own = env_labels(pid, self.label_env)
        return merge_labels(inherited, own) if own else (inherited or None)

    def labels_of(self, pid: int, cgroup_id: int, path: str | None) -> dict[str, str]:
        """The record's labels: the cgroup's (and its ancestors'), then the process's env labels,
        which win per key (and, past MAX_LABELS, are the ones kept: they name the tool call)."""
        from .labels import merge_labels

        cg = self._cgroup_labels(cgroup_id, path) if self._cgroup_labels is not None and cgroup_id and path else {}
        info = self.tree.get(pid)
        return merge_labels(cg, info.labels if info is not None and info.labels else {})

    def _proc_info(self, ev: Event) -> ProcInfo:
        p = ev.proc
        if p.pid == 0:  # a socket whose owner the kernel did not see
            return ProcInfo(0, 0, p.comm, uid=p.uid)
        info = self.tree.get(p.pid)
        if info is None:
            info = self.discover(p.pid) or self.tree.add(ProcInfo(p.pid, p.ppid, p.comm, uid=p.uid))
        if info.sha256 is None and info.exe is not None and not info.exited:
            info.sha256 = self.hasher.of_pid(p.pid)
        return info

    # ---- main entry ----
    def record(self, ev: Event) -> Record:
        if isinstance(ev, MoveEvent):
            return self._move_record(ev)
        inferred = False
        if isinstance(ev, ConnectEvent):
            self.owners.learn(ev)
        elif isinstance(ev, (PayloadEvent, PacketEvent)) and ev.proc.pid == 0:
            found = self.owners.owner(ev.cookie, ev.cgroup_id, ev.address, getattr(ev, "port", None))
            if found is not None:
                owner, inferred = found
                ev = replace(ev, proc=owner)
        p = ev.proc
        if isinstance(ev, ExecEvent) and not ev.failed:
            exe = _read_exe(p.pid)
            # /proc shows the process as it is now: if it has exec'd again since this record (its name
            # changed: `sh -c 'exec python …'`), its exe and hash there are the next program's, not this one's
            moved_on = exe is not None and p.comm and read_comm(p.pid) not in (None, p.comm)
            if (exe is None or moved_on) and ev.filename.startswith("/") and not ev.filename.startswith("/dev/fd/"):
                exe = os.path.realpath(ev.filename)  # gone or moved on: the file it ran, links resolved
            elif moved_on:
                exe = None
            sha = self.hasher.of_pid(p.pid) if exe is not None and not moved_on else None
            if sha is None and exe is not None:
                sha = self.hasher.of_path(exe)
            labels = self._env_labels(p.pid, p.ppid)
            info = self.tree.add(ProcInfo(p.pid, p.ppid, p.comm, exe, list(ev.argv), p.uid, sha, labels=labels,
                                          stdio_socket=stdio_socket(p.pid, p.ppid)))
        elif isinstance(ev, ForkEvent):
            parent = self._proc_info(ev)
            self.tree.fork(parent, ev.child_pid)
            info = parent
        else:
            info = self._proc_info(ev)
            info.comm = p.comm or info.comm

        rec = Record(self._header(ev), ev)
        rec["proc"] = self._proc_dict(ev, info)
        rec.update(ev.fields())
        if inferred:
            rec["owner"] = "inferred"
        if isinstance(ev, ExitEvent):
            self.tree.exit(p.pid)
        return rec

    def _move_record(self, ev: MoveEvent) -> Record:
        """An agent process moved to another cgroup: the record is about the moved process, in the
        agent cgroup it left (what a freeze acts on), with where it went and who moved it."""
        return Record(self.synthetic("cgroup_move", ev.moved_pid, ev.src_cgroup_id, ev.ktime_ns, {
            "to": self._cgroup_dest(ev.dst_cgroup_id),
            "mover": {"pid": ev.proc.pid, "comm": ev.proc.comm, "uid": ev.proc.uid, "cgroup_id": ev.cgroup_id},
        }), ev)

    def synthetic(self, type_: str, pid: int, cgroup_id: int, ktime_ns: int, fields: dict) -> dict:
        """A record made in user space about a known process (e.g. periodic GPU counts), also one
        that exited since."""
        info = self.tree.get_recent(pid) or ProcInfo(pid)
        p = Process(pid, pid, info.ppid, info.uid if info.uid is not None else -1, -1, info.comm)
        ev = Event(type_, ktime_ns, cgroup_id, p)
        rec = self._header(ev)
        rec["proc"] = self._proc_dict(ev, info)
        rec.update(fields)
        return rec

    def _header(self, ev: Event) -> dict:
        path = self._cgroup_name(ev.cgroup_id) if ev.cgroup_id else None
        rec = {
            "v": SCHEMA_VERSION,
            "type": ev.type,
            "ts": ev.ktime_ns + self._clock_offset_ns,
            "ktime": ev.ktime_ns,
            "node": self.node,
            "cgroup": {"id": ev.cgroup_id, "path": path},
        }
        container = container_of(path) if path else None
        if path and "kubepods" in path:
            pod = self.pods.container_info(path)
            if pod:
                container = {**(container or {}), **pod}
        if container:
            rec["container"] = container
        labels = self.labels_of(ev.proc.pid, ev.cgroup_id, path)
        if labels:
            rec["labels"] = labels
        return rec

    def _proc_dict(self, ev: Event, info: ProcInfo) -> dict:
        p = ev.proc
        return {
            "pid": p.pid,
            "tid": p.tid,
            "ppid": p.ppid or info.ppid,  # hooks without a task (socket egress) give no ppid
            "uid": p.uid,
            "gid": p.gid,
            "comm": p.comm,
            "exe": info.exe,
            "cmdline": info.cmdline,
            "user": self.user_name(p.uid),
            "sha256": info.sha256,
            **({"stdio_socket": info.stdio_socket} if info.stdio_socket else {}),
            "ancestors": [
                {"pid": a.pid, "comm": a.comm, "exe": a.exe} for a in self.tree.ancestors(p.pid)
            ],
        }

