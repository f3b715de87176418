"""Raw address bytes as text: the one conversion of the decoder and the /proc readers."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from agentprobe.addr import field_ip_text, inet_name, ip_text, is_v4mapped, proc_net_endpoint


def test_ipv4_and_ipv6_bytes():
    assert ip_text(socket.inet_aton("198.51.100.7")) == "198.51.100.7"
    assert ip_text(socket.inet_pton(socket.AF_INET6, "2001:db8::1")) == "2001:db8::1"


def test_an_ipv4_mapped_address_is_the_ipv4_one_unless_kept():
    raw = socket.inet_pton(socket.AF_INET6, "::ffff:203.0.113.9")
    assert is_v4mapped(raw) and not is_v4mapped(raw[12:])
    assert not is_v4mapped(socket.inet_pton(socket.AF_INET6, "::203.0.113.9"))  # IPv4-compatible, not mapped
    assert ip_text(raw) == "203.0.113.9"
    assert ip_text(raw, unmap=False) == str(ipaddress.IPv6Address(raw))


@pytest.mark.parametrize("raw", [b"", b"\x01\x02\x03", bytes(8), bytes(17)])
def test_other_lengths_are_a_value_error(raw):
    with pytest.raises(ValueError):
        ip_text(raw)


def test_kernel_address_fields():
    field = list(socket.inet_aton("192.0.2.1")) + [0xAA] * 12  # an AF_INET address uses the first 4 bytes
    assert (inet_name(socket.AF_INET), field_ip_text(socket.AF_INET, field)) == ("inet", "192.0.2.1")
    mapped = socket.inet_pton(socket.AF_INET6, "::ffff:192.0.2.1")
    assert (inet_name(socket.AF_INET6), field_ip_text(socket.AF_INET6, mapped)) == ("inet6", "192.0.2.1")
    assert field_ip_text(socket.AF_INET6, mapped, unmap=False) == str(ipaddress.IPv6Address(mapped))


@pytest.mark.parametrize("text,expected", [
    ("0100007F:1F90", ("127.0.0.1", 8080)),
    ("0500A8C0:0016", ("192.168.0.5", 22)),
    ("00000000000000000000000001000000:0050", ("::1", 80)),
    ("0000000000000000FFFF00000100007F:1F90", ("127.0.0.1", 8080)),  # IPv4-mapped, as tcp6 shows them
    ("B80D0120000000000000000001000000:01BB", ("2001:db8::1", 443)),
])
def test_proc_net_endpoints_are_host_order_words(text, expected):
    assert proc_net_endpoint(text) == expected


@pytest.mark.parametrize("text", ["0100007F", "0100007G:1F90", "0100007F00:1F90", "0100007F:zz"])
def test_a_bad_proc_net_endpoint_is_a_value_error(text):
    with pytest.raises(ValueError):
        proc_net_endpoint(text)
