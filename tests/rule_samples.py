"""Stream records built by hand, shaped as the enricher writes them.

For tests and for trying rules without a kernel:

    p = Proc(pid=200, exe="/usr/bin/ssh", ancestors=[Proc(pid=100, exe="/bin/bash")])
    engine.process(exec_record(p, ["ssh", "-R", "9000:localhost:22", "host"]))
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

NODE = "node-1"
CGROUP = {"id": 4242, "path": "/agents/ep1"}
_seq = itertools.count(1)


@dataclass
class Proc:
    pid: int = 1000
    ppid: int | None = None
    comm: str | None = None
    exe: str | None = "/usr/bin/python3.11"
    cmdline: list[str] | None = None
    uid: int = 1000
    user: str | None = "agent"
    sha256: str | None = None
    ancestors: list[Proc] = field(default_factory=list)

    def child(self, pid: int, exe: str | None = None, cmdline: list[str] | None = None,
              comm: str | None = None) -> Proc:
        """A child process (same user), with this process first among its ancestors."""
        return replace(self, pid=pid, ppid=self.pid, exe=exe or self.exe, comm=comm,
                       cmdline=cmdline if cmdline is not None else self.cmdline, sha256=None,
                       ancestors=[self] + list(self.ancestors))

    def as_dict(self) -> dict:
        exe = self.exe
        comm = self.comm or (exe.rsplit("/", 1)[-1].removesuffix(" (deleted)")[:15] if exe else "?")
        return {
            "pid": self.pid,
            "tid": self.pid,
            "ppid": self.ppid if self.ppid is not None else (self.ancestors[0].pid if self.ancestors else 1),
            "uid": self.uid,
            "gid": self.uid,
            "comm": comm,
            "exe": exe,
            "cmdline": self.cmdline,
            "user": self.user,
            "sha256": self.sha256,
            "ancestors": [{"pid": a.pid, "comm": a.as_dict()["comm"], "exe": a.exe} for a in self.ancestors],
        }


def _header(type_: str, proc: Proc, ktime: int, cgroup: dict | None, seq: int | None) -> dict:
    return {
        "v": 1,
        "type": type_,
        "seq": next(_seq) if seq is None else seq,
        "ts": 1_700_000_000_000_000_000 + ktime,
        "ktime": ktime,
        "node": NODE,
        "cgroup": dict(cgroup or CGROUP),
        "proc": proc.as_dict(),
    }


def exec_record(proc: Proc, argv: list[str], *, filename: str | None = None, ktime: int = 10**9,
                failed: bool = False, error: str = "ENOENT", cgroup: dict | None = None,
                seq: int | None = None) -> dict:
    """An execve by `proc`, whose exe is the new image."""
    proc = replace(proc, cmdline=list(argv))
    rec = _header("exec", proc, ktime, cgroup, seq)
    rec.update({
        "filename": filename if filename is not None else (proc.exe or argv[0]),
        "argv": list(argv),
        "argc": len(argv),
        "retval": -2 if failed else 0,
        "failed": failed,
        "truncated": {"args": False, "arg": False, "filename": False, "fault": False},
    })
    if failed:
        rec["error"] = error
    return rec


def connect_record(proc: Proc, address: str | None = None, port: int | None = None, *, path: str | None = None,
                   sock_type: str = "stream", result: str = "in_progress", ktime: int = 2 * 10**9,
                   cgroup: dict | None = None, seq: int | None = None) -> dict:
    rec = _header("connect", proc, ktime, cgroup, seq)
    if path is not None:
        rec.update({"family": "unix", "path": path, "abstract": path.startswith("@")})
    else:
        rec.update({"family": "inet6" if ":" in (address or "") else "inet", "address": address, "port": port})
    rec.update({"sock_type": sock_type, "fd": 3, "retval": {"ok": 0, "in_progress": -115}.get(result, -111),
                "result": result})
    if result == "error":
        rec["error"] = "ECONNREFUSED"
    return rec


def gpu_first_use(proc: Proc, nr: int, detail: int = 0, *, device: str = "nvidia", minor: int = 255,
                  major: int = 195, first_device: bool = False, ktime: int = 3 * 10**9,
                  cgroup: dict | None = None, seq: int | None = None) -> dict:
    rec = _header("gpu", proc, ktime, cgroup, seq)
    rec.update({"kind": "first_use", "device": {"major": major, "minor": minor, "kind": device},
                "cmd": 0xC0004600 | nr, "nr": nr, "detail": detail, "fd": 5, "first_device": first_device,
                "xfer": False})
    return rec


def gpu_counts(proc: Proc, counts: list[tuple[int, int, int]], *, device: str = "nvidia", minor: int = 0,
               major: int = 195, interval_ns: int = 2 * 10**9, ktime: int = 4 * 10**9,
               cgroup: dict | None = None, seq: int | None = None) -> dict:
    """Aggregated ioctls: counts is [(nr, detail, count), ...]."""
    rec = _header("gpu", proc, ktime, cgroup, seq)
    rec.update({"kind": "counts", "device": {"major": major, "minor": minor, "kind": device},
                "counts": [{"nr": n, "detail": d, "count": c} for n, d, c in counts],
                "total": sum(c for _, _, c in counts), "interval_ns": interval_ns})
    return rec


def fork_record(proc: Proc, child_pid: int, *, ktime: int = 5 * 10**9, cgroup: dict | None = None,
                seq: int | None = None) -> dict:
    rec = _header("fork", proc, ktime, cgroup, seq)
    rec["child_pid"] = child_pid
    return rec


def exit_record(proc: Proc, code: int = 0, *, ktime: int = 6 * 10**9, cgroup: dict | None = None,
                seq: int | None = None) -> dict:
    rec = _header("exit", proc, ktime, cgroup, seq)
    rec.update({"status": code << 8, "code": code})
    return rec


def packet_record(proc: Proc, address: str, *, protocol: str = "udp", port: int | None = 53, length: int = 40,
                  qname: str | None = None, echo: bool = True, ktime: int = 3 * 10**9, cgroup: dict | None = None,
                  seq: int | None = None) -> dict:
    """A sampled ICMP packet or DNS query, as the watcher writes it (fields from events.PacketEvent)."""
    rec = _header("packet", proc, ktime, cgroup, seq)
    rec.update({"family": "inet6" if ":" in address else "inet", "protocol": protocol, "address": address,
                "cookie": 1, "len": length, "data": b"", "text": ""})
    if protocol in ("icmp", "icmpv6"):
        rec.update({"icmp_type": 8 if echo else 0, "echo_request": echo})
    else:
        rec.update({"port": port, "dns": {"qname": qname, "qdcount": 1, "qtype": "A"} if qname else {}})
    return rec


def socket_record(proc: Proc, sock_type: str = "raw", protocol: int = 1, *, ktime: int = 10**9) -> dict:
    rec = _header("socket", proc, ktime, None, None)
    rec.update({"family": "inet", "sock_type": sock_type, "protocol": protocol,
                "protocol_name": {1: "icmp", 58: "icmpv6", 255: "raw"}.get(protocol, str(protocol)), "cookie": 1})
    return rec


def bind_record(proc: Proc, address: str, port: int, sock_type: str = "stream", *, ktime: int = 10**9) -> dict:
    rec = _header("bind", proc, ktime, None, None)
    rec.update({"family": "inet6" if ":" in address else "inet", "address": address, "port": port,
                "sock_type": sock_type, "protocol": 6 if sock_type == "stream" else 17})
    return rec
