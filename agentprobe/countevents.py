"""Typed events from the kernel's counting maps: the decoder's half for what the loader reads from
them (ProbeSet.conn_counts, conn_sweeps, flow_counts, gpu_counts), where events.py decodes the
ring buffer's records.

Pure Python: no BCC import; the map keys are the ctypes structures of abi.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass

from . import abi
from .addr import field_ip_text, inet_name
from .events import GPU_DEVICE_KINDS, IP_PROTOCOLS, SOCK_TYPES


@dataclass
class CountsEvent:
    """Counts the kernel kept instead of records, since the last read: the watcher emits one record
    of `record_type` with these `fields` for process `pid` (the cgroup is the caller's to find)."""

    record_type: str
    pid: int
    ktime_ns: int  # the last counted one
    fields: dict


@dataclass
class ConnectCountsEvent(CountsEvent):
    """Repeats of a recorded connect within a second, counted in the kernel."""


@dataclass
class ConnectSweepEvent(CountsEvent):
    """Connects to new destinations beyond the record budget, counted in the kernel."""

    cgroup_id: int = 0  # the sweep's own, kept by the kernel


@dataclass
class FlowCountsEvent(CountsEvent):
    """ICMP packets and DNS queries counted in the kernel."""


@dataclass
class GpuCountsEvent(CountsEvent):
    """NVIDIA ioctls of one process on one device, counted in the kernel."""


def decode_conn_counts(items: Iterable[tuple[abi.ConnKey, int, int, int]]) -> list[ConnectCountsEvent]:
    """(key, repeats, first_ns, last_ns) as ProbeSet.conn_counts returns them: one event per process
    and destination."""
    out = []
    for key, n, first, last in items:
        out.append(ConnectCountsEvent("connect_counts", key.pid, last, {
            "family": inet_name(key.family), "address": field_ip_text(key.family, key.addr),
            "port": socket.ntohs(key.port),
            "sock_type": SOCK_TYPES.get(key.sock_type, "unknown"), "refused": bool(key.kind & abi.CONN_KIND_DENIED),
            "sendmsg": bool(key.kind & abi.CONN_KIND_SENDMSG),
            "count": n, "interval_ns": max(0, last - first)}))
    return out


def decode_conn_sweeps(items: Iterable[tuple[int, abi.ConnSweep, int]]) -> list[ConnectSweepEvent]:
    """(pid, state, connects counted) as ProbeSet.conn_sweeps returns them: one event per process."""
    out = []
    for pid, s, n in items:
        out.append(ConnectSweepEvent("connect_sweep", pid, s.last_ns, {
            "count": n, "budget_per_s": abi.CONN_RECORDS_PER_SEC, "min_port": s.min_port,
            "max_port": s.max_port, "family": inet_name(s.family), "address": field_ip_text(s.family, s.addr),
            "port": s.port,
            "interval_ns": max(0, s.last_ns - s.first_ns)}, cgroup_id=s.cgroup_id))
    return out


def decode_flow_counts(items: Iterable[tuple[abi.FlowKey, dict, int, int]]) -> list[FlowCountsEvent]:
    """(key, {packets, bytes, sampled, max_len}, first_ns, last_ns) as ProbeSet.flow_counts returns
    them: one event per process and destination whose counts moved."""
    out = []
    for key, d, first, last in items:
        fam = socket.AF_INET6 if key.v6 else socket.AF_INET
        # the address as the kernel keeps it: an IPv4-mapped one stays IPv6
        fields = {"protocol": IP_PROTOCOLS.get(key.protocol, str(key.protocol)), "family": inet_name(fam),
                  "address": field_ip_text(fam, key.daddr, unmap=False), "packets": d["packets"], "bytes": d["bytes"],
                  "max_len": d["max_len"], "sampled": d["sampled"], "interval_ns": max(0, last - first)}
        if key.protocol == 17:
            fields["port"] = key.dport
        out.append(FlowCountsEvent("flow_counts", key.pid, last, fields))
    return out


def decode_gpu_counts(items: Iterable[tuple[abi.GpuKey, int, int, int]],
                      gpu_majors: dict[int, int]) -> list[GpuCountsEvent]:
    """(key, new ioctls, first_ns, last_ns) as ProbeSet.gpu_counts returns them: one event per process
    and device. `gpu_majors` maps a device major to its abi.GPU_DEV_* kind (ProbeSet.gpu_majors)."""
    grouped: dict[tuple[int, int], list] = {}
    for key, delta, first_ns, last_ns in items:
        grouped.setdefault((key.pid, key.dev), []).append((key, delta, first_ns, last_ns))
    out = []
    for (pid, dev), group in grouped.items():
        first = min(i[2] for i in group)
        last = max(i[3] for i in group)
        major = dev >> 20
        out.append(GpuCountsEvent("gpu", pid, last, {
            "kind": "counts",
            "device": {"major": major, "minor": dev & 0xFFFFF,
                       "kind": GPU_DEVICE_KINDS.get(gpu_majors.get(major, 0), "unknown")},
            "counts": [{"nr": k.nr, "detail": k.detail, "count": d} for k, d, _, _ in group],
            "total": sum(i[1] for i in group),
            "interval_ns": max(0, last - first),
        }))
    return out
