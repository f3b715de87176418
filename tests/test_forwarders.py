"""Who carries a loopback connection on: /proc/net/tcp parsing and the listener among the agent's
processes, with real sockets of the test's own (no kernel programs needed)."""

from __future__ import annotations

import os
import socket

import pytest

from agentprobe.forwarders import (
    TCP_ESTABLISHED,
    TCP_LISTEN,
    Forwarder,
    TcpSocket,
    find_forwarder,
    is_loopback,
    outside_peers,
    parse_tcp_table,
    socket_inodes,
    tcp_sockets,
)

HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"


def test_tcp_table_lines_host_order_words_and_hex_ports():
    text = HEADER + (
        "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1 0 100 0\n"
        "   1: 0500A8C0:0016 0A01A8C0:D431 01 00000000:00000000 02:000A7D2A 00000000     0        0 5678 2 0 20 4\n"
    )
    assert parse_tcp_table(text) == [
        TcpSocket(("127.0.0.1", 8080), ("0.0.0.0", 0), TCP_LISTEN, 1234),
        TcpSocket(("192.168.0.5", 22), ("192.168.1.10", 54321), TCP_ESTABLISHED, 5678),
    ]


def test_tcp6_table_lines_with_ipv4_mapped_peers():
    text = HEADER + (
        "   0: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A "
        "00000000:00000000 00:00000000 00000000     0        0 42 1 0 100 0\n"
        "   1: 0000000000000000FFFF00000100007F:1F90 0000000000000000FFFF00000A01A8C0:C350 01 "
        "00000000:00000000 00:00000000 00000000     0        0 43 1 0 100 0\n"
        "   2: B80D0120000000000000000001000000:01BB B80D0120000000000000000002000000:E000 02 "
        "00000000:00000000 00:00000000 00000000     0        0 44 1 0 100 0\n"
    )
    assert parse_tcp_table(text) == [
        TcpSocket(("::1", 80), ("::", 0), TCP_LISTEN, 42),
        TcpSocket(("127.0.0.1", 8080), ("192.168.1.10", 50000), TCP_ESTABLISHED, 43),
        TcpSocket(("2001:db8::1", 443), ("2001:db8::2", 57344), 2, 44),
    ]


def test_lines_that_do_not_parse_are_skipped():
    good = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 7 1 0 100 0\n"
    text = HEADER + (
        "   1: 0100007F:1F90 00000000:0000 0A\n"  # too short
        "   2: 0100007G:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 8 1 0 100 0\n"
        "   3: 0100007F00:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 9 1 0 1 0\n"
        "   4: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 x 1 0 1 0\n"
    ) + good
    assert [s.inode for s in parse_tcp_table(text)] == [7]
    assert parse_tcp_table("") == [] and parse_tcp_table(HEADER) == []


@pytest.mark.parametrize("ip,loopback", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True),
    ("10.0.0.1", False), ("2001:db8::1", False), ("0.0.0.0", False), ("not an address", False), ("", False),
])
def test_is_loopback(ip, loopback):
    assert is_loopback(ip) is loopback


def _host_address() -> str | None:
    """An address of this machine that is not loopback (none on a host without a route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the source address
            return s.getsockname()[0]
        except OSError:
            return None


def test_a_listener_of_ours_on_loopback_is_the_forwarder():
    with socket.socket() as lsn:
        lsn.bind(("127.0.0.1", 0))
        lsn.listen()
        port = lsn.getsockname()[1]
        me = os.getpid()
        assert any(s.state == TCP_LISTEN and s.local == ("127.0.0.1", port) for s in tcp_sockets(me))
        fwd = find_forwarder(me, port, [me], children={me: [12345678]})
        assert fwd == Forwarder(me, port, pids=[me, 12345678], to=[])
        assert find_forwarder(me, port, []) is None  # not one of the agent's processes
        assert find_forwarder(me, port, [1]) is None
    assert find_forwarder(me, port, [me]) is None  # no longer listening


def test_outside_peers_are_the_non_loopback_connections_of_the_forwarder():
    host = _host_address()
    if host is None or host.startswith("127."):
        pytest.skip("no address outside loopback on this host")
    me = os.getpid()
    with socket.socket() as lsn, socket.socket() as relay_in, socket.socket() as outside, socket.socket() as up:
        lsn.bind(("127.0.0.1", 0))
        lsn.listen()
        port = lsn.getsockname()[1]
        outside.bind((host, 0))
        outside.listen()
        relay_in.connect(("127.0.0.1", port))  # a loopback connection: never an outside peer
        up.connect(outside.getsockname())  # the relay's way out
        accepted, _ = outside.accept()
        with accepted:
            # both ends of the outside connection are this process's: each is the other's outside peer
            dests = {f"{host}:{outside.getsockname()[1]}", f"{host}:{up.getsockname()[1]}"}
            assert sorted(outside_peers(me, [me])) == sorted(dests)
            fwd = find_forwarder(me, port, [me])
            assert fwd is not None and set(fwd.to) == dests and len(fwd.to) == 2 and fwd.pids == [me]
            assert outside_peers(me, []) == []
            listener = {s.inode for s in tcp_sockets(me) if s.state == TCP_LISTEN and s.local[1] == port}
            assert len(listener) == 1 and listener <= socket_inodes(me)
