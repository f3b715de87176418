"""Typed events decoded from the kernel's raw records.

Pure Python: no BCC import, so decoding is tested without a kernel.
"""

from __future__ import annotations

import ctypes as ct
import errno
import socket
import struct
from dataclasses import dataclass, field
from typing import Callable

from . import abi
from .addr import field_ip_text, inet_name, ip_text, is_v4mapped

EINPROGRESS = errno.EINPROGRESS

# the record types of the kernel's contract (ebpf/*.h) by name: the `type` of their stream records
RECORD_NAMES: dict[int, str] = {
    abi.EV_EXEC: "exec", abi.EV_CONNECT: "connect", abi.EV_GPU: "gpu", abi.EV_FORK: "fork", abi.EV_EXIT: "exit",
    abi.EV_PAYLOAD: "payload", abi.EV_DENY: "deny", abi.EV_MOVE: "cgroup_move", abi.EV_SOCKET: "socket",
    abi.EV_BIND: "bind", abi.EV_PACKET: "packet", abi.EV_MKDIR: "cgroup_mkdir", abi.EV_LISTEN: "listen",
}

SOCK_TYPES = {1: "stream", 2: "dgram", 3: "raw", 4: "rdm", 5: "seqpacket", 6: "dccp", 10: "packet"}


def _text(raw: bytes) -> str:
    """Kernel strings are bytes: undecodable bytes are kept visible as \\xNN escapes."""
    return raw.decode("utf-8", errors="backslashreplace")


@dataclass
class Process:
    """What the kernel knows about the task that caused an event."""

    pid: int
    tid: int
    ppid: int
    uid: int
    gid: int
    comm: str


@dataclass
class Event:
    type: str
    ktime_ns: int
    cgroup_id: int
    proc: Process

    def fields(self) -> dict:
        """Type-specific fields of the stream record."""
        return {}


class Record(dict):
    """A record on its way through the pipeline: the stream's fields (this dict, encoded once, at the
    outputs) and the typed event it was made from (`event`: the decoded kernel Event, a countevents
    CountsEvent, or None for a record the watcher or a stage made). Stages read the fields as the
    stream carries them and the typed event where they need more than the stream says."""

    __slots__ = ("event",)

    def __init__(self, fields: dict, event: object | None = None) -> None:
        super().__init__(fields)
        self.event = event


@dataclass
class ExecEvent(Event):
    filename: str = ""
    argv: list[str] = field(default_factory=list)
    argc_total: int = 0
    retval: int = 0
    execveat: bool = False
    dirfd: int = -100
    at_flags: int = 0
    args_truncated: bool = False
    arg_truncated: bool = False
    filename_truncated: bool = False
    argv_fault: bool = False
    killed: bool = False  # a denied name, killed in the kernel before its first instruction

    @property
    def failed(self) -> bool:
        return self.retval < 0

    def fields(self) -> dict:
        out = {
            "filename": self.filename,
            "argv": self.argv,
            "argc": self.argc_total,
            "retval": self.retval,
            "failed": self.failed,
            "truncated": {
                "args": self.args_truncated,
                "arg": self.arg_truncated,
                "filename": self.filename_truncated,
                "fault": self.argv_fault,
            },
        }
        if self.failed:
            out["error"] = errno.errorcode.get(-self.retval, str(-self.retval))
        if self.killed:
            out["killed"] = True
        if self.execveat:
            out["execveat"] = {"dirfd": self.dirfd, "flags": self.at_flags}
        return out


@dataclass
class ConnectEvent(Event):
    family: str = "unknown"
    family_num: int = 0
    address: str | None = None
    port: int | None = None
    v4mapped: bool = False
    unix_path: str | None = None
    abstract: bool = False
    sock_type: str = "unknown"
    fd: int = -1
    retval: int = 0
    addr_fault: bool = False
    at_hook: bool = False  # seen before completion (cgroup hook): 0 means attempted, not succeeded
    sendmsg: bool = False  # a UDP sendto/sendmsg with a destination (no connect)
    cookie: int = 0  # the socket's cookie (0 from the syscall tracepoints)

    @property
    def result(self) -> str:
        if self.retval == 0:
            return "sent" if self.sendmsg else "attempted" if self.at_hook else "ok"
        if self.retval == -EINPROGRESS:
            return "in_progress"
        return "error"

    def fields(self) -> dict:
        out = {
            "family": self.family,
            "sock_type": self.sock_type,
            "fd": self.fd,
            "retval": self.retval,
            "result": self.result,
        }
        if self.result == "error":
            out["error"] = errno.errorcode.get(-self.retval, str(-self.retval))
        if self.family in ("inet", "inet6"):
            out["address"] = self.address
            out["port"] = self.port
            if self.v4mapped:
                out["v4mapped"] = True
        elif self.family == "unix":
            out["path"] = self.unix_path
            out["abstract"] = self.abstract
        else:
            out["family_num"] = self.family_num
        if self.addr_fault:
            out["addr_fault"] = True
        if self.sendmsg:
            out["sendmsg"] = True
        if self.cookie:
            out["cookie"] = self.cookie
        return out


@dataclass
class GpuEvent(Event):
    major: int = 0
    minor: int = 0
    device_kind: str = "nvidia"
    cmd: int = 0
    nr: int = 0
    detail: int = 0
    fd: int = -1
    first_device: bool = False
    first_cmd: bool = False
    xfer: bool = False
    opened: bool = False  # an open of the device (cgroup device hook), not an ioctl

    def fields(self) -> dict:
        if self.opened:
            return {
                "kind": "open",
                "device": {"major": self.major, "minor": self.minor, "kind": self.device_kind},
                "access": [n for bit, n in ((1, "mknod"), (2, "read"), (4, "write")) if self.cmd & bit],
            }
        return {
            "kind": "first_use",
            "device": {"major": self.major, "minor": self.minor, "kind": self.device_kind},
            "cmd": self.cmd,
            "nr": self.nr,
            "detail": self.detail,
            "fd": self.fd,
            "first_device": self.first_device,
            "xfer": self.xfer,
        }


@dataclass
class ForkEvent(Event):
    child_pid: int = 0

    def fields(self) -> dict:
        return {"child_pid": self.child_pid}


@dataclass
class ExitEvent(Event):
    exit_code: int = 0

    def fields(self) -> dict:
        status = self.exit_code
        out: dict = {"status": status}
        if status & 0x7F:
            out["signal"] = status & 0x7F
        else:
            out["code"] = (status >> 8) & 0xFF
        return out


@dataclass
class PayloadEvent(Event):
    """The first bytes an agent socket sent. proc.pid is 0 when the socket was
    never connected with connect(2) by a watched process."""

    transport: str = "tcp"
    family: str = "inet"
    address: str = ""
    port: int = 0
    src_address: str = ""
    src_port: int = 0
    cookie: int = 0
    length: int = 0
    data: bytes = b""

    def fields(self) -> dict:
        from .protocols import classify, printable

        out = {
            "transport": self.transport,
            "family": self.family,
            "address": self.address,
            "port": self.port,
            "src_address": self.src_address,
            "src_port": self.src_port,
            "cookie": self.cookie,
            "len": self.length,
            "data": self.data,
            "text": printable(self.data),
        }
        out.update(classify(self.data, self.transport))
        return out


@dataclass
class SocketEvent(Event):
    """An agent created a raw or ICMP socket."""

    family: str = "inet"
    sock_type: str = "raw"
    protocol: int = 0
    cookie: int = 0

    def fields(self) -> dict:
        return {"family": self.family, "sock_type": self.sock_type, "protocol": self.protocol,
                "protocol_name": IP_PROTOCOLS.get(self.protocol, str(self.protocol)), "cookie": self.cookie}


@dataclass
class BindEvent(Event):
    """An agent bound a socket to an address other than loopback."""

    family: str = "inet"
    address: str = ""
    port: int = 0
    sock_type: str = "stream"
    protocol: int = 0

    def fields(self) -> dict:
        return {"family": self.family, "address": self.address, "port": self.port, "sock_type": self.sock_type,
                "protocol": self.protocol}


@dataclass
class PacketEvent(Event):
    """A sampled ICMP packet or DNS query of an agent socket."""

    family: str = "inet"
    protocol: int = 0
    icmp_type: int = 0
    address: str = ""
    port: int = 0
    cookie: int = 0
    length: int = 0
    data: bytes = b""

    def fields(self) -> dict:
        from .protocols import dns_query, printable

        out = {"family": self.family, "protocol": IP_PROTOCOLS.get(self.protocol, str(self.protocol)),
               "address": self.address, "cookie": self.cookie, "len": self.length, "data": self.data,
               "text": printable(self.data)}
        if self.protocol in (1, 58):
            out["icmp_type"] = self.icmp_type
            out["echo_request"] = self.icmp_type == (8 if self.protocol == 1 else 128)
        else:
            out["port"] = self.port
            out["dns"] = dns_query(self.data)
        return out


IP_PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 255: "raw"}


@dataclass
class DenyEvent(Event):
    """A connect(2) the kernel refused (EPERM) before any packet left."""

    family: str = "inet"
    address: str = ""
    port: int = 0
    reason: str = ""

    def fields(self) -> dict:
        return {"action": "connect", "family": self.family, "address": self.address, "port": self.port,
                "reason": self.reason}


@dataclass
class MoveEvent(Event):
    """An agent process was moved to another cgroup. proc is the task that moved it."""

    moved_pid: int = 0
    dst_cgroup_id: int = 0
    dst_level: int = 0
    src_cgroup_id: int = 0


@dataclass
class MkdirEvent(Event):
    """A cgroup was created in the v2 hierarchy (reported only for --cgroup-glob). proc is the
    task that created it; path is relative to the hierarchy's root."""

    created_id: int = 0
    level: int = 0
    path: str = ""


GPU_DEVICE_KINDS = {abi.GPU_DEV_NVIDIA: "nvidia", abi.GPU_DEV_UVM: "nvidia-uvm", abi.GPU_DEV_CAPS: "nvidia-caps"}


class DecodeError(ValueError):
    pass


def _process(h: abi.Header) -> Process:
    return Process(h.pid, h.tid, h.ppid, h.uid, h.gid, _text(h.comm))


def _base(h: abi.Header, rtype: int) -> dict:
    return {"type": RECORD_NAMES[rtype], "ktime_ns": h.ktime_ns, "cgroup_id": h.cgroup_id, "proc": _process(h)}


def split_arg_area(raw: bytes) -> list[str]:
    """A process's argument area: NUL-terminated elements, the last one cut when the area was."""
    parts = raw.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    return [_text(p) for p in parts]


def split_args(raw: bytes, argc: int) -> list[str]:
    parts = raw.split(b"\0")
    return [_text(p) for p in parts[:argc]]


def decode_sockaddr(family: int, raw: bytes, addrlen: int) -> dict:
    """Decode a raw sockaddr as passed to connect(2)."""
    if family == socket.AF_INET and len(raw) >= 8:
        port = struct.unpack_from("!H", raw, 2)[0]
        return {"family": "inet", "address": ip_text(raw[4:8]), "port": port}
    if family == socket.AF_INET6 and len(raw) >= 24:
        port = struct.unpack_from("!H", raw, 2)[0]
        if is_v4mapped(raw[8:24]):
            return {"family": "inet6", "address": ip_text(raw[8:24]), "port": port, "v4mapped": True}
        return {"family": "inet6", "address": ip_text(raw[8:24]), "port": port}
    if family == socket.AF_UNIX:
        path = raw[2 : max(2, min(addrlen, len(raw)))]
        if path[:1] == b"\0":
            return {"family": "unix", "unix_path": "@" + _text(path[1:]), "abstract": True}
        return {"family": "unix", "unix_path": _text(path.split(b"\0", 1)[0]), "abstract": False}
    return {"family": "unknown"}


# ---- the record handlers: one per record type, registered in _HANDLERS ----
_HANDLERS: dict[int, Callable[[ct.Structure], Event]] = {}


def _handles(rtype: int) -> Callable:
    def register(fn: Callable[[ct.Structure], Event]) -> Callable[[ct.Structure], Event]:
        _HANDLERS[rtype] = fn
        return fn

    return register


@_handles(abi.EV_EXEC)
def _exec(r: abi.ExecRecord) -> ExecEvent:
    raw_args = bytes(r.args)[: r.args_size]
    if r.flags & abi.EXEC_ARGV_RAW:
        argv = split_arg_area(raw_args)
        argc_total = max(r.argc_total, len(argv))  # the kernel's count (bprm->argc), beyond the copied area
    else:
        argv = split_args(raw_args, r.argc)
        argc_total = r.argc_total
    fname = _text(r.filename)
    return ExecEvent(
        **_base(r.h, abi.EV_EXEC),
        filename=fname,
        argv=argv,
        argc_total=argc_total,
        retval=r.retval,
        # sched_process_exec sees fexecve/execveat(AT_EMPTY_PATH) as /dev/fd/N
        execveat=bool(r.flags & abi.EXEC_EXECVEAT) or fname.startswith("/dev/fd/"),
        dirfd=r.dirfd,
        at_flags=r.at_flags,
        args_truncated=bool(r.flags & abi.EXEC_ARGS_TRUNC),
        arg_truncated=bool(r.flags & abi.EXEC_ARG_TRUNC),
        filename_truncated=bool(r.flags & abi.EXEC_FILENAME_TRUNC),
        argv_fault=bool(r.flags & abi.EXEC_ARGV_FAULT),
        killed=bool(r.flags & abi.EXEC_KILLED),
    )


@_handles(abi.EV_CONNECT)
def _connect(r: abi.ConnectRecord) -> ConnectEvent:
    addr = decode_sockaddr(r.family, bytes(r.addr), r.addrlen)
    addr.setdefault("family", "unknown")
    return ConnectEvent(
        **_base(r.h, abi.EV_CONNECT),
        family_num=r.family,
        sock_type=SOCK_TYPES.get(r.sock_type, "unknown"),
        fd=r.fd,
        retval=r.retval,
        addr_fault=bool(r.flags & abi.CONNECT_ADDR_FAULT),
        at_hook=bool(r.flags & abi.CONNECT_AT_HOOK),
        sendmsg=bool(r.flags & abi.CONNECT_SENDMSG),
        cookie=r.cookie,
        **addr,
    )


@_handles(abi.EV_GPU)
def _gpu(r: abi.GpuRecord) -> GpuEvent:
    return GpuEvent(
        **_base(r.h, abi.EV_GPU),
        major=r.major,
        minor=r.minor,
        device_kind=GPU_DEVICE_KINDS.get(r.dev_kind, "unknown"),
        cmd=r.cmd,
        nr=r.nr,
        detail=r.detail,
        fd=r.fd,
        first_device=bool(r.flags & abi.GPU_FIRST_DEVICE),
        first_cmd=bool(r.flags & abi.GPU_FIRST_CMD),
        xfer=bool(r.flags & abi.GPU_XFER),
        opened=bool(r.flags & abi.GPU_OPEN),
    )


@_handles(abi.EV_PAYLOAD)
def _payload(r: abi.PayloadRecord) -> PayloadEvent:
    return PayloadEvent(
        **_base(r.h, abi.EV_PAYLOAD),
        transport={6: "tcp", 17: "udp"}.get(r.protocol, str(r.protocol)),
        family=inet_name(r.family),
        address=field_ip_text(r.family, r.daddr), port=r.dport,
        src_address=field_ip_text(r.family, r.saddr), src_port=r.sport,
        cookie=r.cookie, length=r.len, data=bytes(r.data)[: r.captured],
    )


@_handles(abi.EV_DENY)
def _deny(r: abi.DenyRecord) -> DenyEvent:
    return DenyEvent(
        **_base(r.h, abi.EV_DENY),
        family=inet_name(r.family),
        address=field_ip_text(r.family, r.addr, unmap=False),
        port=r.port,
        reason={abi.DENY_PORT: "pool_port", abi.DENY_HOST: "denied_host"}.get(r.reason, str(r.reason)),
    )


@_handles(abi.EV_SOCKET)
def _socket(r: abi.SocketRecord) -> SocketEvent:
    return SocketEvent(**_base(r.h, abi.EV_SOCKET), family=inet_name(r.family),
                       sock_type=SOCK_TYPES.get(r.type, str(r.type)), protocol=r.protocol, cookie=r.cookie)


@_handles(abi.EV_BIND)
@_handles(abi.EV_LISTEN)
def _bind(r: abi.BindRecord) -> BindEvent:
    return BindEvent(**_base(r.h, r.h.type), family=inet_name(r.family), address=field_ip_text(r.family, r.addr),
                     port=r.port, sock_type=SOCK_TYPES.get(r.type, str(r.type)), protocol=r.protocol)


@_handles(abi.EV_PACKET)
def _packet(r: abi.PacketRecord) -> PacketEvent:
    return PacketEvent(**_base(r.h, abi.EV_PACKET), family=inet_name(r.family), protocol=r.protocol,
                       icmp_type=r.icmp_type, address=field_ip_text(r.family, r.daddr), port=r.dport, cookie=r.cookie,
                       length=r.len, data=bytes(r.data)[: r.captured])


@_handles(abi.EV_MOVE)
def _move(r: abi.MoveRecord) -> MoveEvent:
    return MoveEvent(**_base(r.h, abi.EV_MOVE), moved_pid=r.moved_pid, dst_cgroup_id=r.dst_cgroup_id,
                     dst_level=r.dst_level, src_cgroup_id=r.src_cgroup_id)


@_handles(abi.EV_MKDIR)
def _mkdir(r: abi.MkdirRecord) -> MkdirEvent:
    return MkdirEvent(**_base(r.h, abi.EV_MKDIR), created_id=r.cgroup_id, level=r.level, path=_text(r.path))


@_handles(abi.EV_FORK)
def _fork(r: abi.ForkRecord) -> ForkEvent:
    return ForkEvent(**_base(r.h, abi.EV_FORK), child_pid=r.child_pid)


@_handles(abi.EV_EXIT)
def _exit(r: abi.ExitRecord) -> ExitEvent:
    return ExitEvent(**_base(r.h, abi.EV_EXIT), exit_code=r.exit_code)


def decode(data: bytes) -> Event:
    """Turn one raw kernel record into a typed event."""
    if len(data) < ct.sizeof(abi.Header):
        raise DecodeError(f"record of {len(data)} bytes is shorter than the header")
    rtype = struct.unpack_from("<I", data, 0)[0]
    cls = abi.RECORDS.get(rtype)
    handler = _HANDLERS.get(rtype)
    if cls is None or handler is None:
        raise DecodeError(f"unknown record type {rtype}")
    if len(data) < ct.sizeof(cls):
        raise DecodeError(f"record type {rtype}: {len(data)} bytes, expected {ct.sizeof(cls)}")
    return handler(cls.from_buffer_copy(data[: ct.sizeof(cls)]))

