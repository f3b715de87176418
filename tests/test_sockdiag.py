"""Cutting TCP connections through the kernel's sock_diag netlink (agentprobe/sockdiag.py): loopback
connections of the test's own, destroyed by the real SOCK_DESTROY, in this network namespace and in
one made for the test."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import struct
import subprocess
import threading
import uuid

import pytest

from agentprobe import sockdiag

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="SOCK_DESTROY needs CAP_NET_ADMIN")

HERE = "/proc/self/ns/net"


def inode(s: socket.socket) -> int:
    return os.fstat(s.fileno()).st_ino


@contextlib.contextmanager
def connections(n: int, family: int = socket.AF_INET, host: str = "127.0.0.1"):
    """A listener on loopback and `n` connections to it: [(client, server side)], all closed after."""
    made: list[socket.socket] = []
    try:
        lsn = socket.socket(family, socket.SOCK_STREAM)
        made.append(lsn)
        lsn.bind((host, 0))
        lsn.listen(n)
        pairs = []
        for _ in range(n):
            c = socket.create_connection(lsn.getsockname()[:2], timeout=5)
            made.append(c)
            a, _ = lsn.accept()
            made.append(a)
            a.settimeout(5)
            pairs.append((c, a))
        yield lsn, pairs
    finally:
        for s in made:
            s.close()


def alive(c: socket.socket, a: socket.socket) -> bool:
    c.sendall(b"ping")
    return a.recv(4) == b"ping"


def test_the_connections_named_are_cut_and_the_others_left_alone():
    with connections(3) as (lsn, pairs):
        (c1, a1), (c2, a2), (c3, a3) = pairs
        assert sockdiag.destroy_tcp_of(HERE, {inode(c1), inode(a2), inode(lsn)}) == 2  # a listener is no connection
        with pytest.raises(ConnectionAbortedError):
            c1.recv(1)  # the destroyed end: aborted
        with pytest.raises(ConnectionResetError):
            a1.recv(1)  # its peer got a reset
        with pytest.raises(ConnectionAbortedError):
            a2.recv(1)
        assert alive(c3, a3) and alive(a3, c3)
        c4 = socket.create_connection(lsn.getsockname(), timeout=5)  # the listener still listens
        c4.close()


def test_ipv6_connections_are_cut_too():
    with connections(2, socket.AF_INET6, "::1") as (_lsn, pairs):
        (c1, _a1), (c2, a2) = pairs
        assert sockdiag.destroy_tcp_of(HERE, {inode(c1)}) == 1
        with pytest.raises(ConnectionAbortedError):
            c1.recv(1)
        assert alive(c2, a2)


def test_a_connection_its_peer_closed_is_still_cut():
    with connections(1) as (_lsn, [(c, a)]):
        a.shutdown(socket.SHUT_WR)
        assert c.recv(1) == b""  # c is in CLOSE-WAIT now
        assert sockdiag.destroy_tcp_of(HERE, {inode(c)}) == 1
        with pytest.raises(ConnectionAbortedError):
            c.send(b"x")


def test_the_dump_lists_connections_by_family_with_their_ports_and_not_listeners():
    with connections(1) as (lsn, [(c, a)]), connections(1, socket.AF_INET6, "::1") as (lsn6, [(c6, _a6)]):
        sock = sockdiag.netlink_in(HERE)
        try:
            found = {ino: (fam, sockid) for fam, sockid, ino in sockdiag.tcp_sockets(sock)}
        finally:
            sock.close()
        assert inode(lsn) not in found and inode(lsn6) not in found
        fam, sockid = found[inode(c)]
        assert fam == socket.AF_INET and len(sockid) == 48
        # inet_diag_sockid: source and destination port (network order), then the addresses
        assert struct.unpack(">HH", sockid[:4]) == (c.getsockname()[1], lsn.getsockname()[1])
        assert sockid[4:8] == socket.inet_aton("127.0.0.1")
        assert found[inode(a)][1][:4] == struct.pack(">HH", lsn.getsockname()[1], c.getsockname()[1])
        fam6, sockid6 = found[inode(c6)]
        assert fam6 == socket.AF_INET6 and sockid6[4:20] == socket.inet_pton(socket.AF_INET6, "::1")


def test_destroying_a_connection_twice_says_it_was_gone():
    with connections(1) as (_lsn, [(c, _a)]):
        sock = sockdiag.netlink_in(HERE)
        try:
            (fam, sockid) = [(f, s) for f, s, ino in sockdiag.tcp_sockets(sock) if ino == inode(c)][0]
            assert sockdiag.destroy(sock, fam, sockid, 100) is True
            assert sockdiag.destroy(sock, fam, sockid, 101) is False
        finally:
            sock.close()
        with pytest.raises(ConnectionAbortedError):
            c.recv(1)


def test_nothing_asked_nothing_opened():
    assert sockdiag.destroy_tcp_of("/no/such/namespace", set()) == 0


def test_a_namespace_that_is_gone_is_file_not_found():
    """The responder skips a process that exited between listing and cutting on exactly this error."""
    with pytest.raises(FileNotFoundError):
        sockdiag.destroy_tcp_of("/proc/999999999/ns/net", {1})


def test_a_path_that_is_no_network_namespace_is_refused_by_setns(tmp_path):
    for path in (str(tmp_path / "plain"), "/proc/self/ns/mnt"):
        if path.endswith("plain"):
            (tmp_path / "plain").write_text("")
        with pytest.raises(sockdiag.SockDiagError) as e:
            sockdiag.netlink_in(path)
        assert (e.value.errno, e.value.strerror) == (errno.EINVAL, f"setns {path}: Invalid argument")


@pytest.fixture
def netns():
    """A network namespace of the test's own, with only its loopback up."""
    name = f"ap-sockdiag-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, capture_output=True)
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def inside(netns: str, fn):
    """Run fn in a thread that has entered `netns` (sockets it makes stay in that namespace)."""
    box = {}

    def run():
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(netns, os.O_RDONLY)
            try:
                assert libc.setns(fd, sockdiag.CLONE_NEWNET) == 0, os.strerror(ctypes.get_errno())
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_connections_in_another_namespace_are_cut_there_and_the_caller_stays_home(netns):
    home = os.readlink("/proc/thread-self/ns/net")
    with contextlib.ExitStack() as stack:
        lsn, [(c, a)] = inside(netns, lambda: stack.enter_context(connections(1)))
        assert os.readlink("/proc/thread-self/ns/net") == home
        here = sockdiag.netlink_in(HERE)
        try:
            assert inode(c) not in {ino for _f, _s, ino in sockdiag.tcp_sockets(here)}
        finally:
            here.close()
        assert sockdiag.destroy_tcp_of(HERE, {inode(c)}) == 0  # not in this namespace: not found here
        assert alive(c, a)
        assert sockdiag.destroy_tcp_of(netns, {inode(c), inode(lsn)}) == 1
        assert os.readlink("/proc/thread-self/ns/net") == home  # setns was the helper thread's alone
        with pytest.raises(ConnectionAbortedError):
            c.recv(1)
