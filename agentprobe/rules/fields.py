"""Fields a condition can test, read from one record (a plain dict).

Each field has a type that decides its operators: `str`, `int`, `bool`, `ip`
(compared with addresses and CIDRs) and `strs` (a list of strings; an operator
holds when it holds for any element). A field missing from a record is None
and then every comparison is false except `not ...`.

Derived fields (names, exe location, getopt parsing, decoded NVIDIA ioctls)
are computed once per record and cached in its EventView.
"""

from __future__ import annotations

import functools
import ipaddress
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import nvidia
from .argspec import OptionSpec, ParsedArgs, parse_args
from .inline import split_inline_code

STR, INT, BOOL, IP, STRS = "str", "int", "bool", "ip", "strs"
EVENT_TYPES = ("exec", "connect", "gpu", "fork", "exit", "payload", "cgroup_move", "socket", "bind", "packet",
               "flow_counts", "tunnel", "connect_sweep", "listen", "unobserved", "traced")
DESTINATION_TYPES = ("connect", "packet", "flow_counts")  # records whose address/port are a destination
DELETED = " (deleted)"


class EventView:
    """One record as seen by the conditions, with a per-record cache."""

    __slots__ = ("rec", "cache")

    def __init__(self, rec: dict) -> None:
        self.rec = rec
        self.cache: dict = {}


Getter = Callable[[EventView], Any]


@dataclass(frozen=True)
class Field:
    name: str
    type: str
    desc: str
    get: Getter | None = None
    # parametrised fields (`proc.opts[LIST]`): build the getter from an option spec
    make: Callable[[OptionSpec], Getter] | None = None


FIELDS: dict[str, Field] = {}


def _field(name: str, type_: str, desc: str, get: Getter | None = None,
           make: Callable[[OptionSpec], Getter] | None = None) -> None:
    FIELDS[name] = Field(name, type_, desc, get, make)


def _memo(fn: Getter) -> Getter:
    def get(ev: EventView) -> Any:
        cache = ev.cache
        try:
            return cache[fn]
        except KeyError:
            value = cache[fn] = fn(ev)
            return value
    return get


def _top(key: str) -> Getter:
    return lambda ev: ev.rec.get(key)


def _sub(outer: str, key: str) -> Getter:
    def get(ev: EventView) -> Any:
        d = ev.rec.get(outer)
        return d.get(key) if isinstance(d, dict) else None
    return get


def _of_type(type_: str, get: Getter) -> Getter:
    return lambda ev: get(ev) if ev.rec.get("type") == type_ else None


def _of_bind(get: Getter) -> Getter:
    """bind and listen records: both say where a socket of the agent's is reachable"""
    return lambda ev: get(ev) if ev.rec.get("type") in ("bind", "listen") else None


def _proc(ev: EventView) -> dict:
    p = ev.rec.get("proc")
    return p if isinstance(p, dict) else {}


def basename(path: str | None) -> str | None:
    if not path:
        return None
    if path.endswith(DELETED):
        path = path[: -len(DELETED)]
    return path.rstrip("/").rsplit("/", 1)[-1] or None


# ---- process ----
@_memo
def _argv(ev: EventView) -> tuple[str, ...]:
    rec = ev.rec
    argv = rec.get("argv") if rec.get("type") == "exec" else _proc(ev).get("cmdline")
    return tuple(str(a) for a in argv) if argv else ()


def _exe(ev: EventView) -> str | None:
    return _proc(ev).get("exe")


@_memo
def _exe_name(ev: EventView) -> str | None:
    return basename(_exe(ev))


@_memo
def _exe_dir(ev: EventView) -> str | None:
    exe = _exe(ev)
    if not exe or not exe.startswith("/"):
        return None
    if exe.endswith(DELETED):
        exe = exe[: -len(DELETED)]
    head = exe.rsplit("/", 1)[0]
    return head or "/"


@_memo
def _name(ev: EventView) -> str | None:
    return _exe_name(ev) or _proc(ev).get("comm")


@_memo
def _names(ev: EventView) -> tuple[str, ...]:
    """comm, exe basename, argv[0] basename and (exec) the filename's basename."""
    out: list[str] = []
    rec = ev.rec
    argv = _argv(ev)
    cands = [_proc(ev).get("comm"), _exe_name(ev), basename(argv[0]) if argv else None]
    if rec.get("type") == "exec":
        cands.append(basename(rec.get("filename")))
    for c in cands:
        if c and c not in out:
            out.append(c)
    return tuple(out)


def _argc(ev: EventView) -> int:
    if ev.rec.get("type") == "exec" and isinstance(ev.rec.get("argc"), int):
        return ev.rec["argc"]
    return len(_argv(ev))


@_memo
def _cmdline(ev: EventView) -> str:
    return " ".join(_argv(ev))


@_memo
def _inline(ev: EventView) -> tuple[list[str], list[str]]:
    """(code handed to a shell or interpreter on its command line, the program's own arguments)"""
    names = tuple(n for n in (_proc(ev).get("comm"), _exe_name(ev)) if n)
    return split_inline_code(_argv(ev), names)


@_memo
def _program_cmdline(ev: EventView) -> str:
    argv = _argv(ev)
    return " ".join(argv[:1] + tuple(_inline(ev)[1]))


def _ancestors(ev: EventView) -> list[dict]:
    a = _proc(ev).get("ancestors")
    return [x for x in a if isinstance(x, dict)] if isinstance(a, list) else []


def _parent(ev: EventView) -> dict:
    a = _ancestors(ev)
    return a[0] if a else {}


@_memo
def _anames(ev: EventView) -> tuple[str, ...]:
    out: list[str] = []
    for a in _ancestors(ev):
        for c in (a.get("comm"), basename(a.get("exe"))):
            if c and c not in out:
                out.append(c)
    return tuple(out)


def _aexes(ev: EventView) -> tuple[str, ...]:
    return tuple(a["exe"] for a in _ancestors(ev) if a.get("exe"))


def _exe_deleted(ev: EventView) -> bool | None:
    exe = _exe(ev)
    return None if exe is None else exe.endswith(DELETED)


def _exe_memfd(ev: EventView) -> bool | None:
    exe = _exe(ev)
    return None if exe is None else exe.startswith("/memfd:")


def _stdio(ev: EventView) -> dict | None:
    d = _proc(ev).get("stdio_socket")
    return d if isinstance(d, dict) else None


def _stdio_dest(ev: EventView) -> str | None:
    d = _stdio(ev)
    if not d or not d.get("peer_address"):
        return None
    addr = d["peer_address"]
    return f"[{addr}]:{d.get('peer_port')}" if ":" in addr else f"{addr}:{d.get('peer_port')}"


def _make_getopt(part: str) -> Callable[[OptionSpec], Getter]:
    def make(spec: OptionSpec) -> Getter:
        key = ("getopt", spec.key)

        def get(ev: EventView) -> tuple[str, ...]:
            parsed: ParsedArgs | None = ev.cache.get(key)
            if parsed is None:
                parsed = ev.cache[key] = parse_args(spec, _argv(ev)[1:])
            return getattr(parsed, part)
        return get
    return make


# ---- network ----
@functools.lru_cache(maxsize=65536)
def parse_ip(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address string as an address object, or None; cached: a busy agent talks to few
    addresses, and parsing one costs microseconds."""
    try:
        return ipaddress.ip_address(addr)
    except ValueError:
        return None


@_memo
def _ip(ev: EventView) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if ev.rec.get("type") not in DESTINATION_TYPES:
        return None
    addr = ev.rec.get("address")
    if not addr:
        return None
    return parse_ip(addr)


def _dns(ev: EventView) -> dict:
    d = ev.rec.get("dns") if ev.rec.get("type") == "packet" else None
    return d if isinstance(d, dict) else {}


def _dns_len(ev: EventView) -> int | None:
    d = _dns(ev)
    return len(d["qname"]) if isinstance(d.get("qname"), str) else None


def _dns_domain(ev: EventView) -> str | None:
    name = _dns(ev).get("qname")
    if not isinstance(name, str):
        return None
    return ".".join(name.rstrip(".").split(".")[-2:]).lower()


def _dns_entropy(ev: EventView) -> int | None:
    from ..protocols import entropy

    name = _dns(ev).get("qname")
    if not isinstance(name, str):
        return None
    sub = "".join(name.rstrip(".").split(".")[:-2])
    return int(entropy(sub) * 100) if len(sub) >= 16 else 0


@_memo
def _dest(ev: EventView) -> str | None:
    rec = ev.rec
    if rec.get("type") != "connect":
        return None
    if rec.get("family") == "unix":
        return rec.get("path")
    addr, port = rec.get("address"), rec.get("port")
    if addr is None:
        return None
    if ":" in addr:
        return f"[{addr}]:{port}"
    return f"{addr}:{port}"


# ---- gpu ----
def _device(key: str) -> Getter:
    def get(ev: EventView) -> Any:
        if ev.rec.get("type") != "gpu":
            return None
        d = ev.rec.get("device")
        return d.get(key) if isinstance(d, dict) else None
    return get


_device_kind = _device("kind")


@_memo
def _decoded(ev: EventView) -> dict:
    rec = ev.rec
    if rec.get("type") != "gpu" or rec.get("kind") != "first_use":
        return {}
    return nvidia.decode(_device_kind(ev) or "", rec.get("nr") or 0, rec.get("detail") or 0)


@_memo
def _meanings(ev: EventView) -> tuple[str, ...]:
    rec = ev.rec
    if rec.get("type") != "gpu":
        return ()
    if rec.get("kind") == "first_use":
        m = _decoded(ev).get("meaning")
        return (m,) if m else ()
    kind = _device_kind(ev) or ""
    out: list[str] = []
    for c in rec.get("counts") or ():
        if isinstance(c, dict):
            m = nvidia.decode(kind, c.get("nr") or 0, c.get("detail") or 0)["meaning"]
            if m and m not in out:
                out.append(m)
    return tuple(out)


def _gpu_total(ev: EventView) -> int | None:
    rec = ev.rec
    if rec.get("type") != "gpu":
        return None
    if rec.get("kind") == "first_use":
        return 1
    return rec.get("total")


def _gpu_rate(ev: EventView) -> int | None:
    rec = ev.rec
    if rec.get("type") != "gpu" or rec.get("kind") != "counts":
        return None
    total, interval = rec.get("total"), rec.get("interval_ns")
    if not isinstance(total, int) or not isinstance(interval, int):
        return None
    return total * 10**9 // interval if interval > 0 else total


def _exit(key: str) -> Getter:
    return _of_type("exit", _top(key))


def _truncated(ev: EventView) -> bool | None:
    t = ev.rec.get("truncated")
    if ev.rec.get("type") != "exec" or not isinstance(t, dict):
        return None
    return any(bool(v) for v in t.values())


_field("evt.type", STR, "record type: exec, connect, gpu, fork, exit, payload, cgroup_move, socket, bind, packet, "
       "flow_counts, tunnel, connect_sweep, listen, unobserved, traced", _top("type"))
_field("net.sendmsg", BOOL, "connect: a UDP sendto/sendmsg with a destination, not a connect",
       _of_type("connect", lambda ev: bool(ev.rec.get("sendmsg"))))
_field("tunnel.carried", STR, "tunnel: what a local forwarder carries (ssh, stratum)",
       _of_type("tunnel", _top("carried")))
_field("tunnel.port", INT, "tunnel: the loopback port it listens on", _of_type("tunnel", _top("port")))
_field("tunnel.to", STRS, "tunnel: the outside ADDRESS:PORTs the forwarder is connected to",
       _of_type("tunnel", lambda ev: list(ev.rec.get("to") or [])))
_field("tunnel.to_outside", BOOL, "tunnel: the forwarder is connected outside loopback",
       _of_type("tunnel", lambda ev: bool(ev.rec.get("to"))))
_field("socket.type", STR, "socket: raw, or dgram for an ICMP (ping) socket", _of_type("socket", _top("sock_type")))
_field("socket.protocol", STR, "socket: icmp, icmpv6, udp, tcp, raw or the number",
       _of_type("socket", _top("protocol_name")))
_field("bind.address", STR, "bind/listen: the local address (not loopback)", _of_bind(_top("address")))
_field("bind.port", INT, "bind/listen: the local port (0: ephemeral at bind; at listen: chosen by the kernel after)",
       _of_bind(_top("port")))
_field("bind.type", STR, "bind/listen: stream, dgram, ...", _of_bind(_top("sock_type")))
_field("packet.protocol", STR, "packet/flow_counts: icmp, icmpv6 or udp",
       lambda ev: ev.rec.get("protocol") if ev.rec.get("type") in ("packet", "flow_counts") else None)
_field("packet.len", INT, "packet: payload bytes after the ICMP/UDP header", _of_type("packet", _top("len")))
_field("packet.echo_request", BOOL, "packet: an ICMP echo request", _of_type("packet", _top("echo_request")))
_field("flow.packets", INT, "flow_counts: packets since the last record", _of_type("flow_counts", _top("packets")))
_field("flow.max_len", INT, "flow_counts: largest payload", _of_type("flow_counts", _top("max_len")))
_field("sweep.count", INT, "connect_sweep: connects to new destinations counted past the record budget",
       _of_type("connect_sweep", _top("count")))
_field("sweep.min_port", INT, "connect_sweep: lowest destination port counted",
       _of_type("connect_sweep", _top("min_port")))
_field("sweep.max_port", INT, "connect_sweep: highest destination port counted",
       _of_type("connect_sweep", _top("max_port")))
_field("sweep.address", STR, "connect_sweep: the last destination address counted",
       _of_type("connect_sweep", _top("address")))
_field("flow.bytes", INT, "flow_counts: payload bytes since the last record", _of_type("flow_counts", _top("bytes")))
_field("dns.qname", STR, "packet: the DNS question's name", lambda ev: _dns(ev).get("qname"))
_field("dns.qtype", STR, "packet: the DNS question's type (A, AAAA, TXT, NULL, ...)",
       lambda ev: None if _dns(ev).get("qtype") is None else str(_dns(ev)["qtype"]))
_field("dns.qname_len", INT, "packet: length of the question's name", lambda ev: _dns_len(ev))
_field("dns.longest_label", INT, "packet: length of the question's longest label",
       lambda ev: max((len(x) for x in _dns(ev).get("qname", "").split(".")), default=0) if _dns(ev) else None)
_field("dns.label_entropy", INT, "packet: Shannon entropy x100 of the labels below the domain (bits per char)",
       lambda ev: _dns_entropy(ev))
_field("dns.domain", STR, "packet: the last two labels of the question's name", lambda ev: _dns_domain(ev))
_field("lost.total", INT, "unobserved: records the kernel lost while the episode was active",
       _of_type("unobserved", _top("total")))
_field("lost.counts", STR, "unobserved: the lost records by type, e.g. 'connect 3, exec 120'",
       _of_type("unobserved", _top("counts_text")))
_field("traced.by_agent", BOOL, "traced: the process ptracing the watcher is in an agent cgroup",
       _of_type("traced", lambda ev: bool(ev.rec.get("agent"))))
_field("traced.watcher_pid", INT, "traced: the watcher's pid", _of_type("traced", _top("watcher_pid")))
_field("move.to_watched", BOOL, "cgroup_move: the destination is inside the watched cgroups",
       _of_type("cgroup_move", lambda ev: bool((ev.rec.get("to") or {}).get("watched"))))
_field("move.to_path", STR, "cgroup_move: the destination cgroup's path",
       _of_type("cgroup_move", lambda ev: (ev.rec.get("to") or {}).get("path") or ""))
_field("move.mover_pid", INT, "cgroup_move: the process that moved it",
       _of_type("cgroup_move", lambda ev: (ev.rec.get("mover") or {}).get("pid")))
_field("evt.node", STR, "node name", _top("node"))
_field("cgroup.id", INT, "cgroup v2 id of the agent cgroup", _sub("cgroup", "id"))
_field("cgroup.path", STR, "cgroup path, e.g. /agents/ep1", _sub("cgroup", "path"))
_field("container.id", STR, "container id, when the cgroup is a container's", _sub("container", "id"))
_field("container.runtime", STR, "container runtime", _sub("container", "runtime"))
_field("container.pod_uid", STR, "Kubernetes pod uid", _sub("container", "pod_uid"))

_field("proc.pid", INT, "process id", lambda ev: _proc(ev).get("pid"))
_field("proc.tid", INT, "thread id", lambda ev: _proc(ev).get("tid"))
_field("proc.ppid", INT, "parent process id", lambda ev: _proc(ev).get("ppid"))
_field("proc.uid", INT, "user id", lambda ev: _proc(ev).get("uid"))
_field("proc.gid", INT, "group id", lambda ev: _proc(ev).get("gid"))
_field("proc.user", STR, "user name", lambda ev: _proc(ev).get("user"))
_field("proc.comm", STR, "kernel command name (15 chars, settable by the process)",
       lambda ev: _proc(ev).get("comm"))
_field("proc.exe", STR, "absolute path of the executable (exec: the new image)", _exe)
_field("proc.exe_name", STR, "basename of proc.exe, without ' (deleted)'", _exe_name)
_field("proc.exe_dir", STR, "directory of proc.exe", _exe_dir)
_field("proc.exe_deleted", BOOL, "the executable was deleted after it was started", _exe_deleted)
_field("proc.exe_memfd", BOOL, "the executable is a memfd (fileless)", _exe_memfd)
_field("proc.name", STR, "proc.exe_name, or proc.comm when the exe is unknown", _name)
_field("proc.names", STRS, "every name the process goes by: comm, exe and argv[0] basenames, exec "
       "filename basename", _names)
_field("proc.sha256", STR, "sha256 of the executable", lambda ev: _proc(ev).get("sha256"))
_field("proc.argv", STRS, "command line, argv[0] included", _argv)
_field("proc.args", STRS, "command line arguments, argv[0] excluded", lambda ev: _argv(ev)[1:])
_field("proc.argc", INT, "number of arguments (exec: counted by the kernel, even beyond those copied)", _argc)
_field("proc.cmdline", STR, "argv joined with spaces", _cmdline)
_field("proc.code", STRS, "code handed to a shell or interpreter on its command line: the string after sh -c, "
       "python -c, perl -e, node -e, ruby -e, php -r, an awk program", lambda ev: _inline(ev)[0])
_field("proc.program_args", STRS, "proc.args less proc.code: the arguments the program itself takes (a script's "
       "path and its own arguments included)", lambda ev: _inline(ev)[1])
_field("proc.program_cmdline", STR, "argv[0] and proc.program_args joined with spaces", _program_cmdline)
_field("proc.cmdline_quoted", STR, "argv shell-quoted, for output", lambda ev: shlex.join(_argv(ev)))
_field("proc.opts", STRS, "options given, parsed with the option spec in list LIST: proc.opts[LIST]",
       make=_make_getopt("opts"))
_field("proc.optargs", STRS, "option values as OPT=VALUE ('-R=8080:h:22'): proc.optargs[LIST]",
       make=_make_getopt("optargs"))
_field("proc.operands", STRS, "arguments that are neither options nor their values: proc.operands[LIST]",
       make=_make_getopt("operands"))
_field("proc.stdio_socket", BOOL, "a TCP/UDP socket was behind the process's stdin at its exec: the socket itself, "
       "or relayed by its parent (see proc.stdio_relayed)", lambda ev: _stdio(ev) is not None)
_field("proc.stdio_relayed", BOOL, "the parent holds that socket: stdin is a pty and the parent's stdin the socket "
       "(pty.spawn, script)",
       lambda ev: None if _stdio(ev) is None else bool(_stdio(ev).get("relayed")))
_field("proc.stdio_proto", STR, "tcp or udp: the protocol of that socket", lambda ev: (_stdio(ev) or {}).get("proto"))
_field("proc.stdio_peer", IP, "that socket's peer address", lambda ev: parse_ip((_stdio(ev) or {}).get("peer_address")
                                                                                or ""))
_field("proc.stdio_dest", STR, "that socket's peer as ADDRESS:PORT", lambda ev: _stdio_dest(ev))
_field("proc.pname", STR, "parent's comm", lambda ev: _parent(ev).get("comm"))
_field("proc.pexe", STR, "parent's executable", lambda ev: _parent(ev).get("exe"))
_field("proc.anames", STRS, "comm and exe basename of every known ancestor", _anames)
_field("proc.aexes", STRS, "executables of every known ancestor", _aexes)

_field("exec.filename", STR, "path as passed to execve", _of_type("exec", _top("filename")))
_field("exec.failed", BOOL, "execve failed", _of_type("exec", _top("failed")))
_field("exec.error", STR, "errno name of a failed execve", _of_type("exec", _top("error")))
_field("exec.killed", BOOL, "a denied name killed by the exec probe before its first instruction (no BPF-LSM)",
       lambda ev: bool(ev.rec.get("killed")) if ev.rec.get("type") == "exec" else None)
_field("exec.truncated", BOOL, "argv or filename was cut by the kernel limits", _truncated)
_field("exec.execveat", BOOL, "the call was execveat", lambda ev: (
    ("execveat" in ev.rec) if ev.rec.get("type") == "exec" else None))

_field("net.family", STR, "inet, inet6, unix or unknown", _of_type("connect", _top("family")))
_field("net.address", STR, "destination address as text (v4-mapped shown as IPv4)",
       _of_type("connect", _top("address")))
_field("net.ip", IP, "destination address, compared with addresses and CIDRs", _ip)
_field("net.port", INT, "destination port (connect, and UDP packet/flow_counts records)",
       lambda ev: ev.rec.get("port") if ev.rec.get("type") in DESTINATION_TYPES else None)
_field("net.dest", STR, "ADDRESS:PORT ([v6]:PORT; unix: the path)", _dest)
_field("net.sock_type", STR, "stream, dgram, raw, ...", _of_type("connect", _top("sock_type")))
_field("net.result", STR, "ok, in_progress or error", _of_type("connect", _top("result")))
_field("net.error", STR, "errno name of a failed connect", _of_type("connect", _top("error")))
_field("net.path", STR, "unix socket path ('@name' when abstract)", _of_type("connect", _top("path")))
_field("net.abstract", BOOL, "abstract unix socket", _of_type("connect", _top("abstract")))
_field("net.v4mapped", BOOL, "IPv4-mapped IPv6 destination", lambda ev: (
    bool(ev.rec.get("v4mapped")) if ev.rec.get("type") == "connect" else None))

_field("gpu.kind", STR, "first_use (first time a process issues this ioctl), open (device opened), counts or nvml",
       _of_type("gpu", _top("kind")))
_field("gpu.device", STR, "nvidia, nvidia-uvm or nvidia-caps", _device_kind)
_field("gpu.major", INT, "device major", _device("major"))
_field("gpu.minor", INT, "device minor (nvidia: 255 nvidiactl, 0-247 a GPU)", _device("minor"))
_field("gpu.nr", INT, "driver command number (first_use)", _of_type("gpu", _top("nr")))
_field("gpu.detail", INT, "RM_ALLOC class / RM_CONTROL command (first_use)", _of_type("gpu", _top("detail")))
_field("gpu.name", STR, "decoded command name, e.g. RM_ALLOC, UVM_INITIALIZE (first_use)",
       lambda ev: _decoded(ev).get("name"))
_field("gpu.class", STR, "decoded RM_ALLOC class, e.g. NV01_ROOT_CLIENT (first_use)",
       lambda ev: _decoded(ev).get("class"))
_field("gpu.meaning", STR, "context_create, uvm_init, compute_engine, channel_create, gpu_memory_alloc, "
       "gpu_memory_map, driver_probe, ... (first_use)", lambda ev: _decoded(ev).get("meaning"))
_field("gpu.meanings", STRS, "meanings of the ioctls in the record (first_use: one; counts: all)", _meanings)
_field("gpu.first_device", BOOL, "first ioctl of the process on this device", _of_type("gpu", _top("first_device")))
_field("gpu.xfer", BOOL, "the command came wrapped in IOCTL_XFER_CMD", _of_type("gpu", _top("xfer")))
_field("gpu.total", INT, "ioctls in the record (counts: total of the interval; first_use: 1)", _gpu_total)
_field("gpu.interval_ns", INT, "counts: length of the interval", _of_type("gpu", _top("interval_ns")))
_field("gpu.rate", INT, "counts: ioctls per second over the interval", _gpu_rate)

@_memo
def _payload_ip(ev: EventView) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if ev.rec.get("type") != "payload":
        return None
    return parse_ip(ev.rec.get("address") or "")


def _payload_dest(ev: EventView) -> str | None:
    rec = ev.rec
    if rec.get("type") != "payload" or not rec.get("address"):
        return None
    addr = rec["address"]
    return f"[{addr}]:{rec.get('port')}" if ":" in addr else f"{addr}:{rec.get('port')}"


def _payload_target_port(ev: EventView) -> int | None:
    target = ev.rec.get("target") if ev.rec.get("type") == "payload" else None
    if not target or ":" not in target:
        return None
    try:
        return int(target.rsplit(":", 1)[1])
    except ValueError:
        return None


_field("payload.app", STR, "protocol recognised in the first bytes a socket sent: ssh, stratum, tls, http, "
       "http-connect, socks5, socks4, json-rpc (empty when unknown)",
       _of_type("payload", lambda ev: ev.rec.get("app") or ""))
_field("payload.transport", STR, "tcp or udp", _of_type("payload", _top("transport")))
_field("payload.ip", IP, "destination address of the socket", _payload_ip)
_field("payload.address", STR, "destination address as text", _of_type("payload", _top("address")))
_field("payload.port", INT, "destination port", _of_type("payload", _top("port")))
_field("payload.dest", STR, "ADDRESS:PORT of the socket's destination", _payload_dest)
_field("payload.method", STR, "JSON-RPC method (stratum: mining.subscribe, login, ...)",
       _of_type("payload", _top("method")))
_field("payload.banner", STR, "SSH identification string", _of_type("payload", _top("banner")))
_field("payload.target", STR, "HTTP CONNECT target HOST:PORT", _of_type("payload", _top("target")))
_field("payload.target_port", INT, "port of the HTTP CONNECT target", _payload_target_port)
_field("payload.text", STR, "the first bytes as printable text", _of_type("payload", _top("text")))
_field("payload.len", INT, "payload bytes in the first packet", _of_type("payload", _top("len")))

_field("gpu.used_memory", INT, "nvml: GPU memory used by the process, bytes",
       lambda ev: ev.rec.get("used_memory") if ev.rec.get("kind") == "nvml" else None)
_field("gpu.sm_util", INT, "nvml: percent of the GPU's SMs the process kept busy",
       lambda ev: ev.rec.get("sm_util") if ev.rec.get("kind") == "nvml" else None)

_field("fork.child_pid", INT, "pid of the new child", _of_type("fork", _top("child_pid")))
_field("exit.status", INT, "raw wait status", _exit("status"))
_field("exit.code", INT, "exit code (when not killed by a signal)", _exit("code"))
_field("exit.signal", INT, "signal that killed the process", _exit("signal"))
