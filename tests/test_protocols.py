"""Protocol recognition from first bytes, and the rules that use it."""

from __future__ import annotations

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
