"""Reading the kernel's counting maps: what moved since the last read and what expired, on a
stand-in for a BCC table (no kernel needed)."""

from __future__ import annotations

import ctypes as ct

from agentprobe import abi
from agentprobe.countmaps import moved_entries, moved_gpu_counts, moved_sweeps


class Table:
    """A BCC table's mapping surface: ctypes keys and values, items() as a list, del by key."""

    def __init__(self, pairs) -> None:
        self.rows = {bytes(k): (k, v) for k, v in pairs}

    def items(self):
        return list(self.rows.values())

    def __delitem__(self, key) -> None:
        del self.rows[bytes(key)]


def conn(pid, count, first, last):
    return abi.ConnKey(pid=pid, family=2, port=80), abi.ConnCount(count=count, first_ns=first, last_ns=last)


def test_entries_that_moved_give_their_increase_and_quiet_ones_expire():
    k1, v1 = conn(1, 5, 10, 100)
    k2, v2 = conn(2, 3, 10, 900)
    table, seen = Table([(k1, v1), (k2, v2)]), {}
    out = moved_entries(table, ("count",), seen, expire_ns=500)
    assert [(abi.ConnKey.from_buffer_copy(i).pid, d) for i, _, d in out] == [(1, {"count": 5}), (2, {"count": 3})]
    assert list(table.rows) == [bytes(k2)] and seen == {bytes(k2): (3,)}  # pid 1 quiet since 100: dropped
    table.rows[bytes(k2)] = (k2, abi.ConnCount(count=7, first_ns=10, last_ns=1000))
    assert [d for _, _, d in moved_entries(table, ("count",), seen, 500)] == [{"count": 4}]
    assert moved_entries(table, ("count",), seen, 500) == []  # nothing new


def test_every_counter_moves_with_the_first():
    k = abi.FlowKey(pid=9, protocol=17, dport=53)
    v = abi.FlowCount(packets=4, bytes=400, first_ns=1, last_ns=50, max_len=120, sampled=1)
    seen = {bytes(k): (1, 100, 1)}
    out = moved_entries(Table([(k, v)]), ("packets", "bytes", "sampled"), seen, 0)
    assert [d for _, _, d in out] == [{"packets": 3, "bytes": 300, "sampled": 0}]


def test_gpu_counts_move_per_key_and_gone_keys_are_forgotten():
    k = abi.GpuKey(5, 195 << 20, 0x2B, 0x41)
    table = Table([(k, abi.GpuCount(count=3, first_ns=1, last_ns=2))])
    seen: dict[tuple, int] = {(6, 0, 0, 0): 9}
    assert moved_gpu_counts(table, seen) == [((5, 195 << 20, 0x2B, 0x41), 3, 1, 2)]
    assert seen == {(5, 195 << 20, 0x2B, 0x41): 3}
    assert moved_gpu_counts(table, seen) == []


def test_sweeps_move_per_process_and_expire_by_window_or_last():
    def sweep(pid, count, window_ns, last_ns):
        return ct.c_uint32(pid), abi.ConnSweep(window_ns=window_ns, count=count, last_ns=last_ns, cgroup_id=77)

    table = Table([sweep(1, 40, 100, 100), sweep(2, 10, 900, 100), sweep(3, 5, 100, 900)])
    seen = {2: 10}
    out = moved_sweeps(table, seen, expire_ns=500)
    assert [(pid, v.cgroup_id, n) for pid, v, n in out] == [(1, 77, 40), (3, 77, 5)]
    assert sorted(int.from_bytes(k, "little") for k in table.rows) == [2, 3]
    assert seen == {2: 10, 3: 5}
