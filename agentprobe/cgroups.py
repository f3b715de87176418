"""cgroup v2 layout, the set of watched agent cgroups, and per-cgroup locks."""

from __future__ import annotations

import errno
import fcntl
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AgentprobeError

DEFAULT_AGENT_CGROUP = "agents"


class CgroupError(AgentprobeError):
    pass


def path_inside(path: str, top: str) -> bool:
    """Is cgroup path `path` the cgroup `top` or below it (paths relative to the v2 mount)?"""
    return path == top or path.startswith(top.rstrip("/") + "/")


def innermost_top(path: str, tops: Iterable[str]) -> str | None:
    """The innermost of `tops` that holds `path`, or None."""
    return max((t for t in tops if path_inside(path, t)), key=len, default=None)


def episode_of(path: str, tops: Iterable[str]) -> str:
    """The agent unit a cgroup path belongs to: the child of the innermost of `tops` that holds it
    (an episode's cgroup), or that cgroup itself, or the path when none holds it."""
    top = innermost_top(path, tops)
    if top is None or path == top:
        return path
    return top.rstrip("/") + "/" + path[len(top.rstrip("/")) + 1:].split("/")[0]


def find_v2_mount(mounts: str = "/proc/self/mounts") -> Path:
    """Mount point of the cgroup v2 hierarchy: /sys/fs/cgroup (pure v2) or
    /sys/fs/cgroup/unified (hybrid), or wherever the mount table says."""
    found = []
    try:
        with open(mounts) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == "cgroup2":
                    found.append(parts[1].replace("\\040", " "))
    except OSError as e:
        raise CgroupError(f"cannot read {mounts}: {e.strerror}") from None
    if not found:
        raise CgroupError("no cgroup v2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup)")
    for preferred in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if preferred in found:
            return Path(preferred)
    return Path(found[0])


def find_v1_freezer(mounts: str = "/proc/self/mounts") -> Path | None:
    """Mount point of the cgroup v1 freezer controller, if there is one."""
    try:
        with open(mounts) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 4 and parts[2] == "cgroup" and "freezer" in parts[3].split(","):
                    return Path(parts[1])
    except OSError:
        pass
    return None


def cgroup_id(path: Path) -> int:
    """The id bpf_get_current_cgroup_id() returns: the directory's inode number."""
    return os.stat(path).st_ino


# container ids in the cgroup path, for the containerd, CRI-O and docker layouts
_CONTAINER_PATTERNS = [
    ("cri-containerd", re.compile(r"cri-containerd-([0-9a-f]{64})\.scope")),
    ("crio", re.compile(r"crio-([0-9a-f]{64})\.scope")),
    ("docker", re.compile(r"docker-([0-9a-f]{64})\.scope")),
    ("docker", re.compile(r"/docker/([0-9a-f]{64})(?:/|$)")),
    ("containerd", re.compile(r"/kubepods[^/]*/(?:[^/]+/)*?([0-9a-f]{64})(?:/|$)")),
]
_POD_PATTERN = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")


def container_of(cgroup_path: str) -> dict | None:
    """Container runtime, id and pod uid parsed from a cgroup path, or None."""
    for runtime, pattern in _CONTAINER_PATTERNS:
        m = pattern.search(cgroup_path)
        if m:
            out = {"runtime": runtime, "id": m.group(1)}
            pod = _POD_PATTERN.search(cgroup_path)
            if pod:
                out["pod_uid"] = pod.group(1).replace("_", "-")
            return out
    return None


@dataclass
class WatchedCgroup:
    id: int
    path: str  # relative to the v2 mount, starting with "/"
    level: int


@dataclass
class CgroupSet:
    """Watched cgroups given by path and glob, re-scanned to pick up new ones."""

    root: Path
    paths: list[str] = field(default_factory=list)
    globs: list[str] = field(default_factory=list)
    _names: dict[int, str] = field(default_factory=dict)

    def resolve(self, spec: str) -> Path:
        p = Path(spec)
        if p.is_absolute():
            try:
                p.resolve().relative_to(self.root)
            except ValueError:
                raise CgroupError(f"cgroup {spec} is not under the cgroup v2 mount {self.root}") from None
            return p.resolve()
        return (self.root / spec).resolve()

    def relative(self, path: Path) -> str:
        rel = str(path.relative_to(self.root))
        return "/" if rel == "." else "/" + rel

    def check(self) -> None:
        """Every --cgroup must exist now and must not be the root."""
        for spec in self.paths:
            p = self.resolve(spec)
            if not (p / "cgroup.procs").exists():
                raise CgroupError(f"cgroup {spec} does not exist ({p})")
            if p == self.root:
                raise CgroupError("refusing to watch the root cgroup: choose the agents' cgroup")

    def scan(self) -> dict[int, WatchedCgroup]:
        """Watched cgroups by id. Globs match paths relative to the mount; `**` spans levels."""
        out: dict[int, WatchedCgroup] = {}
        dirs = [self.resolve(s) for s in self.paths]
        for pattern in self.globs:
            dirs.extend(self._glob(pattern))
        for d in dirs:
            if d == self.root:
                continue
            try:
                cid = cgroup_id(d)
            except OSError:
                continue
            rel = self.relative(d)
            out[cid] = WatchedCgroup(cid, rel, rel.count("/"))
            self._names[cid] = rel
        return out

    def matches_glob(self, rel: str) -> bool:
        """Does a cgroup path (relative to the mount, "/a/b" or "a/b") match one of the globs?"""
        rel = rel.strip("/")
        return any(glob_regex(p).fullmatch(rel) for p in self.globs)

    def _glob(self, pattern: str) -> list[Path]:
        regex = glob_regex(pattern)
        found = []
        for dirpath, dirnames, _ in os.walk(self.root):
            for d in dirnames:
                rel = os.path.relpath(os.path.join(dirpath, d), self.root)
                if regex.fullmatch(rel):
                    found.append(Path(dirpath) / d)
        return found

    def name_of(self, cid: int, watched: dict[int, WatchedCgroup]) -> str | None:
        """Path of a cgroup id inside the watched subtrees (cached). A miss asks the kernel for the
        directory of that id (one open_by_handle_at); only where that is refused are the watched
        subtrees walked, which costs as much as they hold cgroups."""
        name = self._names.get(cid)
        if name is not None:
            return name
        if len(self._names) > 100_000:
            self._names.clear()
        try:
            path = path_by_handle(self.root, cid)
        except OSError:
            path = self._walk_for(cid, watched)
        if path is None:
            return None
        if any(path_inside(path, w.path) for w in watched.values()):
            self._names[cid] = path
            return path
        return None

    def _walk_for(self, cid: int, watched: dict[int, WatchedCgroup]) -> str | None:
        for w in watched.values():
            top = self.root / w.path.lstrip("/")
            for dirpath, dirnames, _ in os.walk(top):
                for d in dirnames:
                    full = Path(dirpath) / d
                    try:
                        self._names[full.stat().st_ino] = self.relative(full)
                    except OSError:
                        continue
        return self._names.get(cid)


_FILEID_KERNFS = 0xFE  # a cgroup v2 id is the kernfs node id, which is also a file handle
_mount_fds: dict[str, int] = {}


def path_by_handle(root: Path, cid: int) -> str | None:
    """Path (relative to the v2 mount `root`) of cgroup `cid`, straight from the kernel through
    open_by_handle_at(2); None when no such cgroup exists (any more). Raises OSError where the
    kernel refuses file handles (no CAP_DAC_READ_SEARCH, no support): then walk instead."""
    key = str(root)
    mfd = _mount_fds.get(key)
    if mfd is None:
        mfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:  # a cgroup v2 mount that answers handles gives its own root back
            ok = _open_by_id(mfd, os.fstat(mfd).st_ino, root) == "/"
        except OSError:
            ok = False
        if not ok:
            os.close(mfd)
            mfd = -1
        _mount_fds[key] = mfd
    if mfd < 0:
        raise OSError(errno.EOPNOTSUPP, f"{root}: no cgroup file handles")
    return _open_by_id(mfd, cid, root)


_libc = None


def _open_by_id(mfd: int, cid: int, root: Path) -> str | None:
    import ctypes
    import struct

    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    libc = _libc
    handle = ctypes.create_string_buffer(struct.pack("<IiQ", 8, _FILEID_KERNFS, cid), 16)
    fd = libc.open_by_handle_at(mfd, handle, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        if err in (errno.ESTALE, errno.ENOENT, errno.ENOTDIR):
            return None
        raise OSError(err, os.strerror(err))
    try:
        full = os.readlink(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    rel = os.path.relpath(full, root)
    if rel == ".":
        return "/"
    return None if rel.startswith("..") else "/" + rel


def path_of_id(root: Path, cid: int, max_depth: int = 12) -> str | None:
    """Path (relative to the v2 mount) of the cgroup whose id is `cid`, anywhere in the hierarchy:
    from the kernel where it gives file handles, else by walking the hierarchy."""
    if cid == 1:
        return "/"
    try:
        return path_by_handle(root, cid)
    except OSError:
        pass
    todo = [(root, 0)]
    while todo:
        d, depth = todo.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            if not e.is_dir(follow_symlinks=False):
                continue
            try:
                if e.inode() == cid:
                    return "/" + str(Path(e.path).relative_to(root))
            except (OSError, ValueError):
                continue
            if depth < max_depth:
                todo.append((Path(e.path), depth + 1))
    return None


def glob_regex(pattern: str) -> re.Pattern:
    """A cgroup glob as a regex over relative paths: `*` and `?` stay within one
    level, `**` spans any number of levels (also none)."""
    out = []
    for part in pattern.strip("/").split("/"):
        if part == "**":
            out.append("(?:[^/]+/)*")
            continue
        piece = "".join(
            "[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c) for c in part
        )
        out.append(piece + "/")
    return re.compile("".join(out).rstrip("/"))


def remove_cgroup_tree(top: Path) -> None:
    """Thaw, kill and remove a cgroup and everything below it, deepest first.
    Used to clean up throw-away cgroups (tests, the demo, the benchmark)."""
    import time

    if not top.exists():
        return
    dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [top]
    for d in dirs:
        for name, value in (("cgroup.freeze", "0"), ("cgroup.kill", "1")):
            try:
                (d / name).write_text(value)
            except OSError:
                pass
    for d in dirs:
        for _ in range(300):
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.01)  # the killed tasks are still exiting
        else:
            raise CgroupError(f"cannot remove cgroup {d}: still busy")


class CgroupLock:
    """An exclusive flock on the cgroup directory: one watcher per cgroup."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise CgroupError(f"another agentprobe watcher already watches {path}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
