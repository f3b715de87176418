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
