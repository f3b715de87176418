"""Destroy TCP connections through the kernel's sock_diag netlink interface (SOCK_DESTROY), the
way `ss -K` does, without a process per connection: the responder cuts a frozen agent's tunnels in
well under a millisecond instead of tens.

A netlink socket answers for the network namespace it was created in, so it is created by a
short-lived thread that has entered the agents' namespace (setns affects only the calling thread:
the watcher itself never leaves its own). Needs CONFIG_INET_DIAG_DESTROY, as `ss -K` does.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import threading

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
CLONE_NEWNET = 0x40000000
TCP_LISTEN = 10
TCP_TIME_WAIT = 6
TCP_NEW_SYN_RECV = 12
# every TCP state that a process's socket can be in, except listening ones (a listener is not a
# connection) and the kernel's own mini-sockets (time-wait, new-syn-recv: no process holds them)
STATES = (1 << 13) - 1 & ~(1 << TCP_LISTEN | 1 << TCP_TIME_WAIT | 1 << TCP_NEW_SYN_RECV)

_HDR = struct.Struct("=IHHII")           # nlmsghdr: len, type, flags, seq, pid
_REQ = struct.Struct("=BBBxI48s")        # inet_diag_req_v2: family, protocol, ext, pad, states, sockid
_MSG = struct.Struct("=BBBB48sIIIII")    # inet_diag_msg: family, state, timer, retrans, sockid, expires,
                                         # rqueue, wqueue, uid, inode


class SockDiagError(OSError):
    pass


def netlink_in(netns: str) -> socket.socket:
    """A sock_diag netlink socket in the network namespace at `netns` (e.g. /proc/PID/ns/net)."""
    box: dict = {}

    def enter() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    e = ctypes.get_errno()
                    raise SockDiagError(e, f"setns {netns}: {os.strerror(e)}")
            finally:
                os.close(fd)
            box["sock"] = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                        NETLINK_SOCK_DIAG)
        except OSError as e:
            box["error"] = e

    t = threading.Thread(target=enter, name="agentprobe-setns")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["sock"]


def _messages(sock: socket.socket, seq: int):
    """(type, payload) of each netlink message answering request `seq`, until DONE or an ack/error."""
    while True:
        data = sock.recv(1 << 16)
        off = 0
        while off + _HDR.size <= len(data):
            length, mtype, _flags, mseq, _pid = _HDR.unpack_from(data, off)
            if length < _HDR.size:
                return
            payload = data[off + _HDR.size: off + length]
            off += (length + 3) & ~3
            if mseq != seq:
                continue
            if mtype == NLMSG_DONE:
                return
            yield mtype, payload
            if mtype == NLMSG_ERROR:
                return


def _request(sock: socket.socket, mtype: int, flags: int, seq: int, family: int, sockid: bytes) -> None:
    body = _REQ.pack(family, socket.IPPROTO_TCP, 0, STATES, sockid)
    sock.send(_HDR.pack(_HDR.size + len(body), mtype, flags, seq, 0) + body)


def tcp_sockets(sock: socket.socket) -> list[tuple[int, bytes, int]]:
    """(family, sockid, inode) of every TCP connection of the namespace, listeners excluded."""
    out = []
    for seq, family in ((1, socket.AF_INET), (2, socket.AF_INET6)):
        _request(sock, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, family, bytes(48))
        for mtype, payload in _messages(sock, seq):
            if mtype == NLMSG_ERROR:
                err = -struct.unpack_from("=i", payload)[0]
                raise SockDiagError(err, f"sock_diag dump: {os.strerror(err)}")
            if len(payload) >= _MSG.size:
                fam, _state, _t, _r, sockid, _e, _rq, _wq, _uid, inode = _MSG.unpack_from(payload)
                out.append((fam, sockid, inode))
    return out


def destroy(sock: socket.socket, family: int, sockid: bytes, seq: int) -> bool:
    """SOCK_DESTROY one connection (its sockid carries the cookie: exactly that socket). False when
    it was gone already."""
    _request(sock, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, seq, family, sockid)
    for mtype, payload in _messages(sock, seq):
        if mtype == NLMSG_ERROR:
            err = -struct.unpack_from("=i", payload)[0]
            if err == 0:
                return True
            if err == errno.ENOENT:
                return False
            raise SockDiagError(err, f"SOCK_DESTROY: {os.strerror(err)}")
    return False


def destroy_tcp_of(netns: str, inodes: set[int]) -> int:
    """Destroy the TCP connections whose socket inode is in `inodes`, in the namespace at `netns`.
    Returns how many were destroyed."""
    if not inodes:
        return 0
    sock = netlink_in(netns)
    try:
        cut = 0
        for seq, (family, sockid, inode) in enumerate(tcp_sockets(sock), start=3):
            if inode in inodes and destroy(sock, family, sockid, seq):
                cut += 1
        return cut
    finally:
        sock.close()
