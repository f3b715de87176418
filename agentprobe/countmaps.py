"""Reading the kernel's counting maps: what moved since the last read, and which entries expired.

The kernel counts what it does not record (repeated connects, sweeps, ICMP and DNS flows, NVIDIA
ioctls); the loader reads those maps every tick. These functions take the map itself (a BCC table,
or any mapping of ctypes keys to ctypes values: a dict in the tests) and the counts seen at the
last read, which they update.
"""

from __future__ import annotations

from collections.abc import MutableMapping


def _drop(table: MutableMapping, key) -> None:
    try:
        del table[key]
    except KeyError:
        pass  # the kernel or an earlier pass removed it


def moved_entries(table: MutableMapping, counters: tuple[str, ...], seen: dict, expire_ns: int) -> list:
    """(key bytes, value, {counter: increase since the last read}) of the entries whose first counter
    moved; entries quiet since `expire_ns` (their last_ns, monotonic) are dropped from the map."""
    out = []
    for k, v in list(table.items()):
        ident = bytes(k)
        now = tuple(getattr(v, c) for c in counters)
        last = seen.get(ident, (0,) * len(counters))
        if now[0] > last[0]:
            seen[ident] = now
            out.append((ident, v, {c: n - p for c, n, p in zip(counters, now, last, strict=True)}))
        if v.last_ns < expire_ns:
            _drop(table, k)
            seen.pop(ident, None)
    return out


def moved_gpu_counts(table: MutableMapping, seen: dict[tuple, int]) -> list[tuple[tuple, int, int, int]]:
    """((pid, dev, nr, detail), new ioctls, first_ns, last_ns) of the keys that moved; keys gone from
    the map are forgotten."""
    out = []
    present = set()
    for k, v in list(table.items()):
        ident = (k.pid, k.dev, k.nr, k.detail)
        present.add(ident)
        delta = v.count - seen.get(ident, 0)
        if delta > 0:
            seen[ident] = v.count
            out.append((ident, delta, v.first_ns, v.last_ns))
    for ident in set(seen) - present:
        del seen[ident]
    return out


def moved_sweeps(table: MutableMapping, seen: dict[int, int], expire_ns: int) -> list[tuple[int, object, int]]:
    """(pid, value, connects counted since the last read) of the processes whose sweep count moved;
    processes quiet since `expire_ns` are dropped from the map."""
    out = []
    for k, v in list(table.items()):
        pid = k.value
        moved = v.count - seen.get(pid, 0)
        if moved > 0:
            seen[pid] = v.count
            out.append((pid, v, moved))
        if max(v.window_ns, v.last_ns) < expire_ns:
            _drop(table, k)
            seen.pop(pid, None)
    return out
