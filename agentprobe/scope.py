"""What the watcher watches: the agent cgroups (paths, globs, Kubernetes pods), a lock on each,
and the processes in them. Plain cgroupfs and /proc reads; the kernel side is told by the watcher."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .cgroups import (
    DEFAULT_AGENT_CGROUP,
    CgroupError,
    CgroupLock,
    CgroupSet,
    WatchedCgroup,
    episode_of,
    find_v2_mount,
    innermost_top,
    path_inside,
    path_of_id,
)
from .errors import EXIT_BUSY, AgentprobeError


@dataclass
class ScopeChange:
    added: dict[int, WatchedCgroup] = field(default_factory=dict)
    gone: dict[int, WatchedCgroup] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.gone)


class WatchedScope:
    """The watched cgroups by id, found from `cgroups` (paths), `globs` and `pods` (a
    kubeapi.PodSelection or None), each held with a CgroupLock so that two watchers never act on one
    cgroup."""

    def __init__(self, cgroups: list[str], globs: list[str], pods=None, create_default: bool = True,
                 err=None) -> None:
        self.err = err or sys.stderr
        self.root: Path = find_v2_mount()
        self.pods = pods
        self.created_default: Path | None = None
        paths = list(cgroups)
        if not paths and not globs and pods is None:
            default = self.root / DEFAULT_AGENT_CGROUP
            if not default.exists() and create_default:
                default.mkdir()
                self.created_default = default
            paths = [str(default)]
        self.cgroup_set = CgroupSet(self.root, paths, list(globs))
        self.watched: dict[int, WatchedCgroup] = {}
        self._locks: dict[int, CgroupLock] = {}

    def check(self) -> None:
        """The watched paths and globs are usable (before anything is attached)."""
        self.cgroup_set.check()

    def take(self) -> list[dict]:
        """Find what is watched now and lock it; the first pod list's `kube` fields (KubeError: one
        line, exit 1)."""
        kube = self.pods.start() if self.pods is not None else []
        self.watched = self._scan()
        for cg in self.watched.values():
            self._lock(cg, explicit=True)
        return kube

    # ---- questions about paths ----
    def paths(self) -> list[str]:
        return [c.path for c in self.watched.values()]

    def listing(self) -> list[dict]:
        return [{"id": c.id, "path": c.path} for c in self.watched.values()]

    def inside(self, path: str | None) -> bool:
        """Is this v2 cgroup path a watched cgroup or below one?"""
        return path is not None and any(path_inside(path, w.path) for w in self.watched.values())

    def episode_of(self, path: str) -> str:
        """The episode a cgroup path belongs to: the child of the (innermost) watched cgroup that holds
        it, or the watched cgroup itself (what the responder acts on)."""
        return episode_of(path, self.paths())

    def top_of(self, path: str) -> str | None:
        return innermost_top(path, self.paths())

    def exists(self, path: str) -> bool:
        return (self.root / path.lstrip("/")).is_dir()

    def id_of(self, path: str) -> int | None:
        try:
            return os.stat(self.root / path.lstrip("/")).st_ino
        except OSError:
            return None

    def name_of(self, cid: int) -> str | None:
        return self.cgroup_set.name_of(cid, self.watched)

    def path_of(self, cid: int) -> str | None:
        """The path of any cgroup by id (a move's destination may be outside the watched ones)."""
        return self.name_of(cid) or path_of_id(self.root, cid)

    def describe(self, cid: int) -> dict:
        """Any cgroup by id, for a record that names it: {id, path, watched}."""
        path = self.path_of(cid)
        return {"id": cid, "path": path, "watched": self.inside(path)}

    def matches_glob(self, path: str) -> bool:
        return self.cgroup_set.matches_glob(path)

    # ---- processes ----
    def agent_cgroups(self) -> dict[int, int]:
        """Live processes of the watched cgroups -> the id of the cgroup each is in. One read of
        cgroup.procs and one directory listing per cgroup (no pathlib glob: it lists every file)."""
        pids: dict[int, int] = {}  # (a watched cgroup may lie below another)
        stack = [str(self.root / cg.path.lstrip("/")) for cg in self.watched.values()]
        while stack:
            d = stack.pop()
            try:
                fd = os.open(f"{d}/cgroup.procs", os.O_RDONLY)
                try:
                    chunks = []
                    while chunk := os.read(fd, 1 << 16):
                        chunks.append(chunk)
                finally:
                    os.close(fd)
                data = b"".join(chunks)
                if data:
                    cid = os.stat(d).st_ino
                    pids.update((int(p), cid) for p in data.split())
                with os.scandir(d) as it:
                    stack.extend(e.path for e in it if e.is_dir(follow_symlinks=False))
            except OSError:
                continue  # removed meanwhile
        return pids

    def agent_pids(self) -> list[int]:
        return sorted(self.agent_cgroups())

    def agent_family(self) -> tuple[list[int], dict[int, list[int]]]:
        """Live agent pids, and their children by parent."""
        agents = self.agent_pids()
        children: dict[int, list[int]] = {}
        for pid in agents:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(pid)
        return agents, children

    # ---- changes ----
    def rescan(self) -> ScopeChange:
        """Find the watched set again; new cgroups are locked (one held by another watcher is
        skipped, said once), the locks of gone ones released."""
        found = self._scan()
        for cid in set(found) - set(self.watched):
            if not self._lock(found[cid], explicit=False):
                del found[cid]
        change = ScopeChange(added={c: found[c] for c in set(found) - set(self.watched)},
                             gone={c: self.watched[c] for c in set(self.watched) - set(found)})
        for cid in change.gone:
            lock = self._locks.pop(cid, None)
            if lock:
                lock.close()
        self.watched = found
        return change

    def _scan(self) -> dict[int, WatchedCgroup]:
        found = self.cgroup_set.scan()
        if self.pods is not None:
            for cid, cg in self.pods.cgroups(self.root).items():
                found.setdefault(cid, cg)
        return found

    def _lock(self, cg: WatchedCgroup, explicit: bool) -> bool:
        if cg.id in self._locks:
            return True
        try:
            self._locks[cg.id] = CgroupLock(self.root / cg.path.lstrip("/"))
            return True
        except CgroupError as e:
            if explicit:
                raise AgentprobeError(str(e), EXIT_BUSY) from None
            print(f"agentprobe: skipping {cg.path}: {e}", file=self.err)
            return False
        except OSError:
            return False

    def close(self) -> None:
        for lock in self._locks.values():
            lock.close()
        self._locks = {}
        if self.pods is not None:
            self.pods.close()  # the pod lister thread


def v2_cgroup_of(pid: int) -> str | None:
    """A process's cgroup v2 path (relative to the v2 mount), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/cgroup", "rb") as f:
            for line in f:
                if line.startswith(b"0::"):
                    return os.fsdecode(line[3:].rstrip(b"\n"))
    except OSError:
        pass
    return None
