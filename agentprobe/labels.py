"""Labels that say which episode, trajectory and tool call a record belongs to.

Two sources, both bounded and escaped, never interpreted:

- the agent cgroup: extended attributes `user.agentprobe.KEY` on the cgroup directory (and its
  ancestors up to the watched cgroup; the nearest wins). The owner of a delegated cgroup can set
  them without root; they go away with the cgroup. `agentprobe label` and `agentprobe.client`
  write them. A sandbox manager may instead write a JSON file `ID.json` (ID: the cgroup's inode
  number) into the watcher's `--label-dir`.
- the agent process: the environment variables the site names (`--label-env EPISODE_ID,...`), read
  once per exec from /proc/PID/environ and inherited by the process's children: an exec keeps the
  labels the process had and the new environment's win per key, so `env -i` loses none.

A record's labels are the cgroup's with the process's over them, at most MAX_LABELS (the process's
first).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

XATTR_PREFIX = "user.agentprobe."
MAX_LABELS = 16
MAX_KEY = 64
MAX_VALUE = 256
MAX_FILE = 64 * 1024
KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")


class LabelError(ValueError):
    pass


def clean_value(raw: bytes | str) -> str:
    """A label value as safe text: undecodable bytes and control characters escaped, bounded."""
    text = raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else raw
    text = _UNPRINTABLE.sub(lambda m: "\\\\" if m.group() == "\\" else f"\\x{ord(m.group()):02x}", text)
    return text if len(text) <= MAX_VALUE else text[: MAX_VALUE - 3] + "..."


def clean_labels(pairs: dict) -> dict[str, str]:
    """At most MAX_LABELS labels with valid keys (others dropped), values cleaned."""
    out: dict[str, str] = {}
    for k, v in pairs.items():
        if len(out) >= MAX_LABELS:
            break
        if isinstance(k, str) and KEY.match(k) and isinstance(v, (str, bytes, int, float, bool)):
            out[k] = clean_value(v if isinstance(v, (str, bytes)) else str(v))
    return out


def merge_labels(base: dict[str, str], top: dict[str, str]) -> dict[str, str]:
    """`base` with `top` over it, per key, at most MAX_LABELS: every label of `top` (itself at most
    MAX_LABELS) is kept, then those of `base` in their order while there is room."""
    if not top:
        return dict(base)
    if not base:
        return dict(top)
    room = MAX_LABELS - len(top)
    out = {}
    for k, v in base.items():
        if k in top:
            out[k] = top[k]
        elif room > 0:
            out[k] = v
            room -= 1
    for k, v in top.items():
        out.setdefault(k, v)
    return out


def check_labels(labels: dict) -> dict[str, str]:
    """Labels to write, as given (readers escape them): keys and sizes checked, LabelError if bad."""
    if len(labels) > MAX_LABELS:
        raise LabelError(f"at most {MAX_LABELS} labels")
    out = {}
    for k, v in labels.items():
        if not isinstance(k, str) or not KEY.match(k):
            raise LabelError(f"bad label key {k!r}: letters, digits, _ . - (at most {MAX_KEY})")
        v = str(v)
        if len(v.encode()) > MAX_VALUE:
            raise LabelError(f"label {k}: value longer than {MAX_VALUE} bytes")
        out[k] = v
    return out


def parse_assignments(items: list[str]) -> dict[str, str | None]:
    """KEY=VALUE arguments (KEY= removes the label); a bad key is a LabelError."""
    out: dict[str, str | None] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not KEY.match(key):
            raise LabelError(f"bad label {item!r}: want KEY=VALUE, KEY of letters, digits, _ . - (at most {MAX_KEY})")
        if len(value.encode()) > MAX_VALUE:
            raise LabelError(f"label {key}: value longer than {MAX_VALUE} bytes")
        out[key] = value or None
    if len(out) > MAX_LABELS:
        raise LabelError(f"at most {MAX_LABELS} labels")
    return out


def set_cgroup_labels(cgroup_dir: str | Path, labels: dict[str, str | None]) -> None:
    """Write (or, for None, remove) labels as extended attributes of a cgroup directory."""
    d = str(cgroup_dir)
    for key, value in labels.items():
        name = XATTR_PREFIX + key
        try:
            if value is None:
                try:
                    os.removexattr(d, name)
                except OSError as e:
                    if e.errno != 61:  # ENODATA: it was not set
                        raise
            else:
                os.setxattr(d, name, value.encode())
        except OSError as e:
            raise LabelError(f"cannot label {d}: {e.strerror}") from None


def cgroup_xattr_labels(cgroup_dir: str | Path) -> dict[str, str]:
    try:
        names = [n for n in os.listxattr(str(cgroup_dir)) if n.startswith(XATTR_PREFIX)]
    except OSError:
        return {}
    raw: dict[str, bytes] = {}
    for n in sorted(names)[: MAX_LABELS * 2]:
        try:
            raw[n[len(XATTR_PREFIX):]] = os.getxattr(str(cgroup_dir), n)[: MAX_VALUE * 4]
        except OSError:
            continue
    return clean_labels(raw)


def file_labels(path: Path) -> dict[str, str]:
    """Labels from a sandbox manager's JSON file ({"KEY": "VALUE", ...}); bad files give none."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except OSError:
        return {}
    if len(data) > MAX_FILE:
        return {}
    try:
        obj = json.loads(data.decode("utf-8", "replace"))
    except ValueError:
        return {}
    return clean_labels(obj) if isinstance(obj, dict) else {}


def env_labels(pid: int, names: tuple[str, ...]) -> dict[str, str] | None:
    """The named environment variables of a process (None when its environment cannot be read)."""
    if not names:
        return {}
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read(256 * 1024)
    except OSError:
        return None
    wanted = set(names)
    out: dict[bytes, bytes] = {}
    for item in data.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep and k.decode("ascii", "replace") in wanted:
            out[k] = v
    return clean_labels({k.decode("ascii", "replace"): v for k, v in out.items()})


class CgroupLabels:
    """Labels of cgroups by id, cached for `ttl` seconds (so `agentprobe label` takes effect soon)."""

    def __init__(self, root: Path, label_dir: str | None = None, ttl: float = 1.0) -> None:
        self.root = root
        self.label_dir = Path(label_dir) if label_dir else None
        self.ttl = ttl
        self._cache: dict[int, tuple[float, dict[str, str]]] = {}

    def of(self, cgroup_id: int, path: str | None, top: str | None = None) -> dict[str, str]:
        """Labels of the cgroup at `path` (relative to the v2 mount) and its ancestors down from
        `top` (the watched cgroup): the nearest cgroup's label wins."""
        now = time.monotonic()
        hit = self._cache.get(cgroup_id)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        labels: dict[str, str] = {}
        if path:
            chain = [path]
            p = path
            while top and p != top and "/" in p.strip("/") and p.startswith(top.rstrip("/") + "/"):
                p = p.rsplit("/", 1)[0]
                chain.append(p)
            for rel in reversed(chain):  # outermost first, nearest last
                labels.update(cgroup_xattr_labels(self.root / rel.lstrip("/")))
        if self.label_dir is not None:
            labels.update(file_labels(self.label_dir / f"{cgroup_id}.json"))
        labels = dict(list(labels.items())[:MAX_LABELS])
        if len(self._cache) > 65536:
            self._cache.clear()
        self._cache[cgroup_id] = (now, labels)
        return labels
