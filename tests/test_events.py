"""Decoding raw kernel records into typed events (no kernel needed)."""

from __future__ import annotations

import ctypes as ct
import ipaddress
import socket
import struct

import pytest

from agentprobe import abi
from agentprobe.events import (
    ConnectEvent,
    DecodeError,
    ExecEvent,
    ExitEvent,
    ForkEvent,
    GpuEvent,
    decode,
    decode_sockaddr,
)


def header(rtype, pid=10, comm=b"agent"):
    return abi.Header(rtype, pid, pid + 1, 1, 1000, 1000, 123456789, 77, comm)


def test_exec_record():
    r = abi.ExecRecord()
    r.h = header(abi.EV_EXEC, comm=b"curl")
    args = b"curl\0-s\0http://x\0"
    ct.memmove(ct.addressof(r) + abi.ExecRecord.args.offset, args, len(args))
    r.args_size = len(args)
    r.argc = 3
    r.argc_total = 70
    r.retval = -13
    r.flags = abi.EXEC_ARGS_TRUNC | abi.EXEC_EXECVEAT
    r.filename = b"/usr/bin/curl"
    r.dirfd = 5
    ev = decode(bytes(r))
    assert isinstance(ev, ExecEvent)
    assert ev.argv == ["curl", "-s", "http://x"]
    assert ev.filename == "/usr/bin/curl" and ev.argc_total == 70 and ev.args_truncated
    assert ev.failed and ev.fields()["error"] == "EACCES"
    assert ev.fields()["execveat"] == {"dirfd": 5, "flags": 0}
    assert (ev.proc.pid, ev.proc.tid, ev.proc.ppid, ev.proc.uid, ev.proc.comm) == (10, 11, 1, 1000, "curl")
    assert ev.ktime_ns == 123456789 and ev.cgroup_id == 77


def test_exec_non_utf8_is_kept_visible():
    r = abi.ExecRecord()
    r.h = header(abi.EV_EXEC)
    args = b"x\xff\x1b[31m\0"
    ct.memmove(ct.addressof(r) + abi.ExecRecord.args.offset, args, len(args))
    r.args_size, r.argc = len(args), 1
    assert decode(bytes(r)).argv == ["x\\xff\x1b[31m"]


def _connect(family, addr: bytes, addrlen=None, retval=0, sock_type=1):
    r = abi.ConnectRecord()
    r.h = header(abi.EV_CONNECT)
    r.family = family
    r.addrlen = addrlen if addrlen is not None else len(addr)
    r.retval = retval
    r.sock_type = sock_type
    ct.memmove(ct.addressof(r) + abi.ConnectRecord.addr.offset, addr, len(addr))
    return decode(bytes(r))


def test_connect_ipv4():
    addr = struct.pack("<H", socket.AF_INET) + struct.pack("!H", 2222) + socket.inet_aton("198.51.100.7")
    ev = _connect(socket.AF_INET, addr + bytes(8), retval=-115)
    assert isinstance(ev, ConnectEvent)
    assert (ev.family, ev.address, ev.port, ev.result) == ("inet", "198.51.100.7", 2222, "in_progress")
    assert ev.fields() == {"family": "inet", "sock_type": "stream", "fd": 0, "retval": -115,
                           "result": "in_progress", "address": "198.51.100.7", "port": 2222}


def test_connect_ipv6_and_mapped():
    def v6(ip):
        return (struct.pack("<H", socket.AF_INET6) + struct.pack("!H", 3333) + bytes(4)
                + socket.inet_pton(socket.AF_INET6, ip) + bytes(4))
    ev = _connect(socket.AF_INET6, v6("2001:db8::1"))
    assert (ev.family, ev.address, ev.port, ev.v4mapped) == ("inet6", "2001:db8::1", 3333, False)
    ev = _connect(socket.AF_INET6, v6("::ffff:203.0.113.9"))
    assert (ev.family, ev.address, ev.v4mapped) == ("inet6", "203.0.113.9", True)
    assert ev.fields()["v4mapped"] is True


def test_connect_unix_paths():
    path = struct.pack("<H", socket.AF_UNIX) + b"/run/x.sock\0"
    ev = _connect(socket.AF_UNIX, path)
    assert (ev.family, ev.unix_path, ev.abstract) == ("unix", "/run/x.sock", False)
    abstract = struct.pack("<H", socket.AF_UNIX) + b"\0hidden"
    ev = _connect(socket.AF_UNIX, abstract)
    assert (ev.unix_path, ev.abstract) == ("@hidden", True)


def test_sockaddr_unknown_family():
    assert decode_sockaddr(16, b"\x10\x00abc", 5) == {"family": "unknown"}


def test_gpu_fork_exit_records():
    g = abi.GpuRecord(header(abi.EV_GPU), 195, 255, abi.GPU_DEV_NVIDIA,
                      abi.GPU_FIRST_DEVICE | abi.GPU_XFER, 0xC00446D3, 0x2B, 0x41, 3)
    ev = decode(bytes(g))
    assert isinstance(ev, GpuEvent)
    assert (ev.major, ev.minor, ev.nr, ev.detail, ev.first_device, ev.xfer) == (195, 255, 0x2B, 0x41, True, True)
    f = decode(bytes(abi.ForkRecord(header(abi.EV_FORK), 99)))
    assert isinstance(f, ForkEvent) and f.child_pid == 99
    e = decode(bytes(abi.ExitRecord(header(abi.EV_EXIT), 9)))
    assert isinstance(e, ExitEvent) and e.fields() == {"status": 9, "signal": 9}
    e = decode(bytes(abi.ExitRecord(header(abi.EV_EXIT), 2 << 8)))
    assert e.fields() == {"status": 512, "code": 2}


def test_cgroup_mkdir_record():
    from agentprobe.events import MkdirEvent

    m = abi.MkdirRecord(header(abi.EV_MKDIR, comm=b"runc"), 4242, 3, 0, b"/kubepods.slice/pod-\xff/agent-1")
    ev = decode(bytes(m))
    assert isinstance(ev, MkdirEvent) and ev.type == "cgroup_mkdir"
    assert (ev.created_id, ev.level, ev.path) == (4242, 3, "/kubepods.slice/pod-\\xff/agent-1")
    assert ev.proc.comm == "runc"


@pytest.mark.parametrize("data,msg", [
    (b"\x01\x00", "shorter than the header"),
    (bytes(abi.Header(99)), "unknown record type 99"),
    (bytes(abi.Header(abi.EV_EXEC)), "expected"),
])
def test_bad_records(data, msg):
    with pytest.raises(DecodeError, match=msg):
        decode(data)


def test_record_names_are_the_contract_s_types():
    from agentprobe.events import RECORD_NAMES

    assert RECORD_NAMES == {abi.EV_EXEC: "exec", abi.EV_CONNECT: "connect", abi.EV_GPU: "gpu", abi.EV_FORK: "fork",
                            abi.EV_EXIT: "exit", abi.EV_PAYLOAD: "payload", abi.EV_DENY: "deny",
                            abi.EV_MOVE: "cgroup_move", abi.EV_SOCKET: "socket", abi.EV_BIND: "bind",
                            abi.EV_PACKET: "packet", abi.EV_MKDIR: "cgroup_mkdir", abi.EV_LISTEN: "listen"}
    assert set(RECORD_NAMES) == set(abi.RECORDS)


@pytest.mark.parametrize("rtype", sorted(abi.RECORDS))
def test_every_record_type_has_its_handler(rtype):
    """The decoder's table covers the contract: a record of each type decodes, typed and named."""
    from agentprobe.events import RECORD_NAMES

    r = abi.RECORDS[rtype]()
    r.h = header(rtype)
    ev = decode(bytes(r))
    assert ev.type == RECORD_NAMES[rtype]
    assert (ev.proc.pid, ev.cgroup_id, ev.ktime_ns) == (10, 77, 123456789)
    assert isinstance(ev.fields(), dict)


MAPPED = socket.inet_pton(socket.AF_INET6, "::ffff:192.0.2.5")


def test_payload_bind_listen_and_packet_addresses_show_the_ipv4_a_mapped_one_maps():
    from agentprobe.events import BindEvent, PacketEvent, PayloadEvent

    p = abi.PayloadRecord()
    p.h, p.family, p.protocol, p.dport, p.sport = header(abi.EV_PAYLOAD), socket.AF_INET6, 6, 443, 40000
    p.daddr[:] = list(MAPPED)
    p.saddr[:] = list(socket.inet_pton(socket.AF_INET6, "2001:db8::7"))
    ev = decode(bytes(p))
    assert isinstance(ev, PayloadEvent)
    assert (ev.family, ev.address, ev.src_address, ev.transport) == ("inet6", "192.0.2.5", "2001:db8::7", "tcp")
    for rtype, name in ((abi.EV_BIND, "bind"), (abi.EV_LISTEN, "listen")):
        b = abi.BindRecord()
        b.h, b.family, b.port = header(rtype), socket.AF_INET6, 8080
        b.addr[:] = list(MAPPED)
        ev = decode(bytes(b))
        assert isinstance(ev, BindEvent) and (ev.type, ev.address, ev.family) == (name, "192.0.2.5", "inet6")
    k = abi.PacketRecord()
    k.h, k.family, k.protocol = header(abi.EV_PACKET), socket.AF_INET, 17
    k.daddr[:4] = list(socket.inet_aton("198.51.100.1"))
    ev = decode(bytes(k))
    assert isinstance(ev, PacketEvent) and (ev.address, ev.family) == ("198.51.100.1", "inet")


def test_a_deny_record_keeps_an_ipv4_mapped_address_as_the_kernel_gave_it():
    from agentprobe.events import DenyEvent

    d = abi.DenyRecord()
    d.h, d.family, d.port, d.reason = header(abi.EV_DENY), socket.AF_INET6, 3333, abi.DENY_PORT
    d.addr[:] = list(MAPPED)
    ev = decode(bytes(d))
    assert isinstance(ev, DenyEvent)
    # the IPv6 form (::ffff:c000:205, or ::ffff:192.0.2.5 from Python 3.13)
    assert ev.fields() == {"action": "connect", "family": "inet6", "address": str(ipaddress.IPv6Address(MAPPED)),
                           "port": 3333, "reason": "pool_port"}
    d.family = socket.AF_INET
    d.addr[:4] = list(socket.inet_aton("203.0.113.4"))
    assert decode(bytes(d)).address == "203.0.113.4"
