"""Protocol recognition from first bytes, and the rules that use it."""

from __future__ import annotations

import ctypes as ct
import json

import pytest

from agentprobe.protocols import classify, printable
from agentprobe.rules import build_engine


@pytest.mark.parametrize("data,expect", [
    (b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n", {"app": "ssh", "banner": "SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3"}),
    (b"SSH-2.0-dropbear_2022.83\r\n", {"app": "ssh", "banner": "SSH-2.0-dropbear_2022.83"}),
    (json.dumps({"id": 1, "method": "mining.subscribe", "params": []}).encode()[:64],
     {"app": "stratum", "method": "mining.subscribe"}),
    (b'{"id":1,"jsonrpc":"2.0","method":"login","params":{"login":"4', {"app": "stratum", "method": "login"}),
    (b'{"worker": "eth1.0", "jsonrpc": "2.0", "params": ["0x', {"app": None}),
    (b'{"id":3,"method":"eth_submitLogin","params":["0xabc"]}', {"app": "stratum", "method": "eth_submitLogin"}),
    (b'{"jsonrpc":"2.0","method":"textDocument/didOpen"}', {"app": None}),
    (b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}', {"app": "json-rpc", "method": "initialize"}),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", {"app": "tls"}),
    (b"GET / HTTP/1.1\r\nHost: x\r\n", {"app": "http", "method": "GET"}),
    (b"CONNECT 198.51.100.2:22 HTTP/1.1\r\n",
     {"app": "http-connect", "method": "CONNECT", "target": "198.51.100.2:22"}),
    (b"\x05\x01\x00", {"app": "socks5"}),
    (b"\x04\x01\x00\x16\xc6\x33\x64\x02\x00", {"app": "socks4"}),
    (b"\x00\x00\x00\x10hello", {"app": None}),
    (b"", {"app": None}),
])
def test_classify(data, expect):
    assert classify(data) == expect


def test_printable():
    assert printable(b"SSH-2.0-x\r\n\x1b[2J") == "SSH-2.0-x\\x0d\\x0a\\x1b[2J"


def payload(**kw):
    rec = {"v": 1, "type": "payload", "seq": 1, "ts": 1, "ktime": 1, "node": "n",
           "cgroup": {"id": 7, "path": "/agents/ep"}, "transport": "tcp", "family": "inet", "len": 40,
           "proc": {"pid": 50, "ppid": 1, "comm": "sync", "exe": "/tmp/sync", "cmdline": ["sync"], "ancestors": []}}
    rec.update(kw)
    rec.update(classify(rec.pop("data")))
    return rec


def fired(rec) -> list[str]:
    return [a["rule"] for a in build_engine(hash_local_ssh=False).process(rec)]


def test_payload_rules():
    assert fired(payload(address="198.51.100.2", port=443, data=b"SSH-2.0-paramiko_3.4\r\n")) == [
        "ssh_protocol_outside_allowlist"]
    assert fired(payload(address="127.0.0.1", port=2222, data=b"SSH-2.0-OpenSSH_9.2\r\n")) == []  # loopback
    assert fired(payload(address="127.0.0.1", port=8080, data=b'{"id":1,"method":"mining.authorize"}')) == [
        "stratum_protocol"]  # a local tunnel endpoint still carries mining
    assert fired(payload(address="127.0.0.1", port=3128, data=b"CONNECT 203.0.113.5:3333 HTTP/1.1\r\n")) == [
        "proxy_connect_to_session_or_pool_port"]
    assert fired(payload(address="127.0.0.1", port=3128, data=b"CONNECT pypi.org:443 HTTP/1.1\r\n")) == []
    assert fired(payload(address="198.51.100.2", port=443, data=b"\x16\x03\x01\x00\x10")) == []


# ------------------------------------------------------------------ bad input: decoded as far as it goes, never raises
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from agentprobe import abi  # noqa: E402
from agentprobe.events import DecodeError, decode  # noqa: E402
from agentprobe.protocols import dns_query, entropy  # noqa: E402

# prefixes that steer random bytes into each branch of the decoders
_PREFIXES = [b"", b"SSH-", b"\x16\x03\x01", b"CONNECT ", b"POST /index.html?crap=", b"GET ", b'{"method":"',
             b"{", b"\x05", b"\x04\x01", bytes.fromhex("1234 0100 0001 0000 0000 0000"),
             bytes.fromhex("1234 0100 0001 0000 0000 0000") + b"\x3f"]
_FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(prefix=st.sampled_from(_PREFIXES), tail=st.binary(max_size=140), cut=st.integers(0, 140))
def test_first_bytes_never_raise(prefix, tail, cut):
    data = (prefix + tail)[:cut]
    for transport in ("tcp", "udp"):
        out = classify(data, transport)
        assert "app" in out and all(isinstance(v, str) or v is None for v in out.values())
    assert len(printable(data)) <= 4 * 64
    q = dns_query(data)
    assert set(q) <= {"qname", "qtype", "qdcount", "truncated"}
    if q:
        assert q["qdcount"] > 0 and isinstance(q["qname"], str) and entropy(q["qname"]) >= 0


def test_dns_names_that_end_early_or_point_elsewhere():
    head = bytes.fromhex("1234 0100 0001 0000 0000 0000")
    assert dns_query(head + b"\x3fabc") == {"qname": "abc", "qdcount": 1, "truncated": True}  # label cut
    assert dns_query(head + b"\xc0\x0c") == {}  # a compression pointer in the question
    assert dns_query(head + b"\x01a" * 200 + b"\x00")["qname"].count(".") == 127  # at most 128 labels
    assert dns_query(head + b"\x03www\x00\x00") == {"qname": "www", "qdcount": 1}  # half a type


_RECORDS = {abi.EV_PACKET: abi.PacketRecord, abi.EV_PAYLOAD: abi.PayloadRecord, abi.EV_SOCKET: abi.SocketRecord,
            abi.EV_LISTEN: abi.BindRecord,
            abi.EV_BIND: abi.BindRecord}


@_FUZZ
@given(rtype=st.sampled_from(sorted(_RECORDS)), body=st.binary(min_size=0, max_size=400),
       family=st.sampled_from([2, 10, 0, 1, 0xFFFF]), protocol=st.sampled_from([1, 6, 17, 58, 255, 0]),
       captured=st.integers(0, 2**32 - 1))
def test_socket_packet_and_payload_records_decode_or_fail_cleanly(rtype, body, family, protocol, captured):
    """Raw kernel records of the covert-channel types, any content and any length: a typed event whose
    fields can be built, or a DecodeError. Never another exception."""
    cls = _RECORDS[rtype]
    size = ct.sizeof(cls)
    raw = bytearray(body.ljust(size, b"\0")[:size]) if len(body) >= ct.sizeof(abi.Header) else bytearray(body)
    if len(raw) >= 4:
        raw[:4] = rtype.to_bytes(4, "little")
    if len(raw) == size:
        rec = cls.from_buffer(raw)
        rec.family = family
        rec.protocol = protocol
        if hasattr(rec, "captured"):
            rec.captured = captured
    try:
        ev = decode(bytes(raw))
    except DecodeError:
        assert len(raw) < size
        return
    fields = ev.fields()
    assert isinstance(fields, dict)
    if "data" in fields:
        assert len(fields["data"]) <= (128 if rtype == abi.EV_PACKET else abi.PAYLOAD_LEN)
