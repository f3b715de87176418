"""Recognise an application protocol from the first bytes a socket sends.

Pure functions, no kernel: the payload records carry the bytes, this module
says what they are, whatever the port or the program.
"""

from __future__ import annotations

import re

# JSON-RPC methods of the mining protocols: stratum v1 (Bitcoin-style), the
# Monero/xmrig dialect, and the Ethereum "ethproxy"/stratum variants
STRATUM_METHODS = frozenset({
    "mining.subscribe", "mining.authorize", "mining.submit", "mining.configure",
    "mining.extranonce.subscribe", "mining.suggest_difficulty", "mining.hello", "mining.noop",
    "login", "getjob", "submit", "keepalived",
    "eth_submitLogin", "eth_getWork", "eth_submitWork", "eth_submitHashrate",
})
_METHOD = re.compile(rb'"method"\s*:\s*"([A-Za-z0-9_.]{1,40})"')
_HTTP = re.compile(rb"^(GET|POST|PUT|HEAD|DELETE|OPTIONS|PATCH|CONNECT) (\S{1,200}) HTTP/\d")


def classify(data: bytes, transport: str = "tcp") -> dict:
    """{"app": name, ...details} for the first bytes of a connection; app None if unknown."""
    if data.startswith(b"SSH-"):
        banner = data.split(b"\r", 1)[0].split(b"\n", 1)[0]
        return {"app": "ssh", "banner": banner.decode("ascii", "backslashreplace")}
    if len(data) >= 3 and data[0] == 0x16 and data[1] == 0x03 and data[2] <= 0x04:
        return {"app": "tls"}
    m = _HTTP.match(data)
    if m:
        method = m.group(1).decode()
        out = {"app": "http", "method": method}
        if method == "CONNECT":
            out["app"] = "http-connect"
            out["target"] = m.group(2).decode("ascii", "backslashreplace")
        return out
    if data[:1] in (b"{", b"[") or data.lstrip()[:1] == b"{":
        m = _METHOD.search(data)
        if m:
            method = m.group(1).decode()
            if method in STRATUM_METHODS:
                return {"app": "stratum", "method": method}
            return {"app": "json-rpc", "method": method}
    if len(data) >= 3 and data[0] == 0x05 and 1 <= data[1] <= 9 and len(data) == 2 + data[1]:
        return {"app": "socks5"}
    if len(data) >= 9 and data[0] == 0x04 and data[1] in (1, 2) and data.endswith(b"\0"):
        return {"app": "socks4"}
    return {"app": None}


def printable(data: bytes, limit: int = 64) -> str:
    """The bytes as text for people: printable ASCII kept, everything else \\xNN."""
    return "".join(chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}" for b in data[:limit])


def dns_query(data: bytes) -> dict:
    """The question of a DNS query (UDP payload): {"qname", "qtype", "qdcount"}, decoded as far as the
    bytes go ({} when they are not a query). Labels are read as bytes and shown escaped."""
    if len(data) < 12:
        return {}
    flags = int.from_bytes(data[2:4], "big")
    qdcount = int.from_bytes(data[4:6], "big")
    if flags & 0x8000 or qdcount == 0:  # a response, or no question
        return {}
    labels: list[str] = []
    pos = 12
    truncated = False
    while True:
        if pos >= len(data):
            truncated = True
            break
        n = data[pos]
        if n == 0:
            pos += 1
            break
        if n & 0xC0:  # compression pointers do not appear in a question's first name
            return {}
        label = data[pos + 1: pos + 1 + n]
        if len(label) < n:
            truncated = True
        labels.append("".join(chr(b) if 0x21 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in label))
        pos += 1 + n
        if truncated or len(labels) > 127:
            break
    out: dict = {"qname": ".".join(labels), "qdcount": qdcount}
    if not truncated and pos + 2 <= len(data):
        out["qtype"] = DNS_TYPES.get(int.from_bytes(data[pos:pos + 2], "big"), int.from_bytes(data[pos:pos + 2], "big"))
    if truncated:
        out["truncated"] = True
    return out


DNS_TYPES = {1: "A", 2: "NS", 5: "CNAME", 10: "NULL", 15: "MX", 16: "TXT", 28: "AAAA", 33: "SRV", 65: "HTTPS",
             255: "ANY"}


def entropy(text: str) -> float:
    """Shannon entropy in bits per character."""
    import math
    from collections import Counter

    if not text:
        return 0.0
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in Counter(text).values())
