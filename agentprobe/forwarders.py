"""Who carries a loopback connection on: the agent process listening on the port, and where it goes.

A tunnel tool (socat, stunnel, chisel, an SSH -L, a home-made relay) listens on loopback and
forwards what it receives. The first bytes of a loopback socket say what is carried (SSH, stratum);
this module finds the listener among the agent's processes and the outside addresses it (or a
child it forked per connection) is connected to. It reads /proc only: the views of the agent's own
network namespace (/proc/PID/net/tcp*), and the descriptors of the agent's processes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .addr import proc_net_endpoint

TCP_ESTABLISHED, TCP_SYN_SENT, TCP_LISTEN = 0x01, 0x02, 0x0A


@dataclass
class TcpSocket:
    local: tuple[str, int]
    remote: tuple[str, int]
    state: int
    inode: int


def parse_tcp_table(text: str) -> list[TcpSocket]:
    """The sockets of a /proc/net/tcp or tcp6 table (its header line first); lines that do not
    parse are skipped."""
    out = []
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 10:
            continue
        try:
            local, remote = proc_net_endpoint(parts[1]), proc_net_endpoint(parts[2])
            out.append(TcpSocket(local, remote, int(parts[3], 16), int(parts[9])))
        except (ValueError, OSError):
            continue
    return out


def tcp_sockets(pid: int) -> list[TcpSocket]:
    """TCP sockets of the network namespace process `pid` is in."""
    out = []
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                text = f.read()
        except OSError:
            continue
        out += parse_tcp_table(text)
    return out


def fd_paths(pid: int) -> Iterator[str]:
    """/proc/PID/fd/N of each open descriptor of a process (none when it is gone)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return
    for fd in fds:
        yield f"/proc/{pid}/fd/{fd}"


def socket_inodes(pid: int) -> set[int]:
    out = set()
    for path in fd_paths(pid):
        try:
            link = os.readlink(path)
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(int(link[8:-1]))
    return out


def is_loopback(ip: str) -> bool:
    from .rules.fields import parse_ip

    addr = parse_ip(ip)
    return addr is not None and addr.is_loopback


@dataclass
class Forwarder:
    pid: int                      # the process listening on the loopback port
    port: int
    pids: list[int] = field(default_factory=list)  # it and its processes holding sockets
    to: list[str] = field(default_factory=list)     # outside destinations, ADDRESS:PORT


def outside_peers(netns_pid: int, pids: Iterable[int]) -> list[str]:
    """Non-loopback TCP peers (ADDRESS:PORT) of the sockets `pids` hold, seen from `netns_pid`'s namespace."""
    inodes: set[int] = set()
    for p in pids:
        inodes |= socket_inodes(p)
    out: list[str] = []
    for s in tcp_sockets(netns_pid):
        if s.state in (TCP_ESTABLISHED, TCP_SYN_SENT) and s.inode in inodes and not is_loopback(s.remote[0]):
            dest = f"[{s.remote[0]}]:{s.remote[1]}" if ":" in s.remote[0] else f"{s.remote[0]}:{s.remote[1]}"
            if dest not in out:
                out.append(dest)
    return out


def find_forwarder(client_pid: int, port: int, agent_pids: Iterable[int],
                   children: dict[int, list[int]] | None = None) -> Forwarder | None:
    """The agent process listening on loopback `port` in `client_pid`'s network namespace, with the
    non-loopback TCP peers of it and its children (the ones a relay forks per connection)."""
    socks = tcp_sockets(client_pid)
    listening = {s.inode for s in socks if s.state == TCP_LISTEN and s.local[1] == port}
    if not listening:
        return None
    owner = next((p for p in agent_pids if socket_inodes(p) & listening), None)
    if owner is None:
        return None
    family = [owner] + list((children or {}).get(owner, []))
    return Forwarder(owner, port, pids=family, to=outside_peers(client_pid, family))
