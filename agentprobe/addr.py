"""Raw IP address bytes as address text: the one conversion the decoder and /proc readers share.

An IPv4-mapped IPv6 address (::ffff:a.b.c.d) is written as the IPv4 address it maps, unless the
caller keeps it (records whose field has always carried the IPv6 form).
"""

from __future__ import annotations

import ipaddress
import socket

_V4MAPPED_PREFIX = bytes(10) + b"\xff\xff"


def is_v4mapped(raw: bytes) -> bool:
    """An IPv6 address of the ::ffff:0:0/96 block."""
    return len(raw) == 16 and raw[:12] == _V4MAPPED_PREFIX


def ip_text(raw: bytes, unmap: bool = True) -> str:
    """4 or 16 bytes in network order as address text (ValueError for any other length)."""
    raw = bytes(raw)
    if unmap and is_v4mapped(raw):
        raw = raw[12:]
    return str(ipaddress.ip_address(raw))


def proc_net_endpoint(text: str) -> tuple[str, int]:
    """ADDR:PORT of /proc/net/tcp* and udp* (the address in host-order 32-bit words, the port in
    hex) as (address text, port)."""
    addr, port = text.split(":")
    raw = bytes.fromhex(addr)
    # little-endian hosts write each 32-bit word of the address reversed
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ip_text(raw), int(port, 16)


def inet_name(family: int) -> str:
    """The family of a kernel address field that is AF_INET or else AF_INET6."""
    return "inet" if family == socket.AF_INET else "inet6"


def field_ip_text(family: int, raw, unmap: bool = True) -> str:
    """A kernel address field (16 bytes, of which AF_INET uses the first 4) as address text."""
    return ip_text(bytes(raw)[: 4 if family == socket.AF_INET else 16], unmap)
