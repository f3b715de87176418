"""Typed events from the kernel's counting maps, built from the map keys of abi (no kernel needed)."""

from __future__ import annotations

import ctypes as ct
import ipaddress
import socket

from agentprobe import abi
from agentprobe.countevents import (
    ConnectCountsEvent,
    ConnectSweepEvent,
    FlowCountsEvent,
    GpuCountsEvent,
    decode_conn_counts,
    decode_conn_sweeps,
    decode_flow_counts,
    decode_gpu_counts,
)

MAPPED = socket.inet_pton(socket.AF_INET6, "::ffff:192.0.2.5")


def addr16(raw: bytes):
    return (ct.c_uint8 * 16)(*raw.ljust(16, b"\0"))


def test_connect_counts_one_event_per_process_and_destination():
    k4 = abi.ConnKey(41, socket.AF_INET, socket.htons(8080), addr16(socket.inet_aton("198.51.100.7")), 1, 1)
    k6 = abi.ConnKey(42, socket.AF_INET6, socket.htons(53), addr16(MAPPED), 2, 2)
    evs = decode_conn_counts([(k4, 7, 1_000, 5_000), (k6, 1, 9_000, 8_000)])
    assert all(isinstance(e, ConnectCountsEvent) for e in evs)
    assert [(e.record_type, e.pid, e.ktime_ns) for e in evs] == [("connect_counts", 41, 5_000),
                                                                  ("connect_counts", 42, 8_000)]
    assert evs[0].fields == {"family": "inet", "address": "198.51.100.7", "port": 8080, "sock_type": "stream",
                             "refused": True, "sendmsg": False, "count": 7, "interval_ns": 4_000}
    assert evs[1].fields == {"family": "inet6", "address": "192.0.2.5", "port": 53, "sock_type": "dgram",
                             "refused": False, "sendmsg": True, "count": 1, "interval_ns": 0}
    assert decode_conn_counts([]) == []


def test_connect_sweeps_keep_their_own_cgroup():
    s = abi.ConnSweep(window_ns=1, count=300, first_ns=2_000, last_ns=9_000, cgroup_id=555, recorded=20,
                      family=socket.AF_INET, port=22, min_port=1, max_port=1024,
                      addr=addr16(socket.inet_aton("10.0.0.9")))
    (ev,) = decode_conn_sweeps([(77, s, 120)])
    assert isinstance(ev, ConnectSweepEvent)
    assert (ev.record_type, ev.pid, ev.ktime_ns, ev.cgroup_id) == ("connect_sweep", 77, 9_000, 555)
    assert ev.fields == {"count": 120, "budget_per_s": abi.CONN_RECORDS_PER_SEC, "min_port": 1, "max_port": 1024,
                         "family": "inet", "address": "10.0.0.9", "port": 22, "interval_ns": 7_000}
    s6 = abi.ConnSweep(family=socket.AF_INET6, addr=addr16(MAPPED), first_ns=5, last_ns=3)
    assert decode_conn_sweeps([(78, s6, 1)])[0].fields["address"] == "192.0.2.5"
    assert decode_conn_sweeps([(78, s6, 1)])[0].fields["interval_ns"] == 0


def test_flow_counts_port_for_udp_only_and_the_kernel_s_address_form():
    dns = abi.FlowKey(50, 17, 0, 53, addr16(socket.inet_aton("192.0.2.53")))
    ping6 = abi.FlowKey(51, 58, 1, 0, addr16(MAPPED))
    counts = {"packets": 4, "bytes": 400, "sampled": 1, "max_len": 120}
    evs = decode_flow_counts([(dns, counts, 100, 600), (ping6, counts, 100, 100)])
    assert all(isinstance(e, FlowCountsEvent) for e in evs)
    assert [(e.record_type, e.pid, e.ktime_ns) for e in evs] == [("flow_counts", 50, 600), ("flow_counts", 51, 100)]
    assert evs[0].fields == {"protocol": "udp", "family": "inet", "address": "192.0.2.53", "packets": 4,
                             "bytes": 400, "max_len": 120, "sampled": 1, "interval_ns": 500, "port": 53}
    assert evs[1].fields == {"protocol": "icmpv6", "family": "inet6", "address": str(ipaddress.IPv6Address(MAPPED)),
                             "packets": 4, "bytes": 400, "max_len": 120, "sampled": 1, "interval_ns": 0}
    assert decode_flow_counts([(abi.FlowKey(1, 99, 0, 7), counts, 0, 0)])[0].fields["protocol"] == "99"


def test_gpu_counts_grouped_by_process_and_device():
    nvidia = (195 << 20) | 0
    uvm = (511 << 20) | 3
    items = [
        (abi.GpuKey(60, nvidia, 0x2B, 0x41), 5, 1_000, 2_000),
        (abi.GpuKey(60, uvm, 0x19, 0), 2, 500, 4_000),
        (abi.GpuKey(60, nvidia, 0x2A, 0), 1, 1_500, 3_000),
        (abi.GpuKey(61, (7 << 20) | 1, 1, 2), 9, 10, 10),
    ]
    evs = decode_gpu_counts(items, {195: abi.GPU_DEV_NVIDIA, 511: abi.GPU_DEV_UVM})
    assert all(isinstance(e, GpuCountsEvent) for e in evs)
    assert [(e.record_type, e.pid, e.ktime_ns) for e in evs] == [("gpu", 60, 3_000), ("gpu", 60, 4_000),
                                                                  ("gpu", 61, 10)]
    assert evs[0].fields == {"kind": "counts", "device": {"major": 195, "minor": 0, "kind": "nvidia"},
                             "counts": [{"nr": 0x2B, "detail": 0x41, "count": 5},
                                        {"nr": 0x2A, "detail": 0, "count": 1}],
                             "total": 6, "interval_ns": 2_000}
    assert evs[1].fields["device"] == {"major": 511, "minor": 3, "kind": "nvidia-uvm"}
    assert evs[2].fields["device"] == {"major": 7, "minor": 1, "kind": "unknown"}
    assert (evs[2].fields["total"], evs[2].fields["interval_ns"]) == (9, 0)
    assert decode_gpu_counts([], {}) == []
