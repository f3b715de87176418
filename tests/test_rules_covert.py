"""Default rules for covert channels (ICMP and DNS tunnels, raw sockets, listeners), on records
shaped as the watcher writes them. The kernel side and real tools are in the kernel and e2e tests."""

from __future__ import annotations

import pytest
from rule_samples import Proc, bind_record, packet_record, socket_record

from agentprobe.protocols import dns_query, entropy
from agentprobe.rules import build_engine, resolv_conf_nameservers

AGENT = Proc(pid=300, exe="/usr/bin/python3.11", user="agent")


def site_engine(tmp_path):
    extra = tmp_path / "site.yaml"
    extra.write_text("- list: dns_resolvers\n  append: true\n  items: [10.0.0.53]\n")
    return build_engine([extra], hash_local_ssh=False)


@pytest.fixture
def engine(tmp_path):
    return site_engine(tmp_path)


def fired(engine, *recs) -> list[str]:
    return sorted(a["rule"] for r in recs for a in engine.process(r))


def test_raw_and_icmp_sockets(engine):
    assert fired(engine, socket_record(AGENT, "raw", 1)) == ["raw_socket_opened"]


@pytest.mark.parametrize("length, address, expected", [
    (56, "198.51.100.2", []),                    # ping's default
    (1024, "198.51.100.2", ["icmp_tunnel"]),     # data in echo requests
    (1024, "127.0.0.1", []),                     # loopback is in allowed_networks
])
def test_icmp_tunnel(engine, length, address, expected):
    assert fired(engine, packet_record(AGENT, address, protocol="icmp", port=None, length=length)) == expected


def test_dns_to_a_server_that_is_not_a_resolver(engine):
    name = "pypi.org"
    assert fired(engine, packet_record(AGENT, "10.0.0.53", qname=name)) == []
    assert fired(engine, packet_record(AGENT, "127.0.0.53", qname=name)) == []
    assert fired(engine, packet_record(AGENT, "198.51.100.2", qname=name)) == ["dns_to_unexpected_server"]


@pytest.mark.parametrize("qname, expected", [
    ("files.pythonhosted.org", []),
    ("d1a2b3c4d5e6f7.cloudfront.net", []),
    ("paaaebqgcaqcaqcaqaa3k2mh3kj2ceaqbaeaqcaqcaqcaqcaqcaqcaqcaqcaqca.t.example.org", ["dns_tunnel_query"]),
    ("a" * 30 + "." + "b" * 30 + "." + "c" * 30 + ".x.example.org", ["dns_tunnel_query"]),
    ("kq3vxn8zr2mpw7tyf5bd.example.org", ["dns_tunnel_query"]),  # random-looking: entropy above 4.2
])
def test_dns_tunnel_names(engine, qname, expected):
    assert fired(engine, packet_record(AGENT, "10.0.0.53", qname=qname)) == expected


def test_many_data_names_under_one_domain(engine, tmp_path):
    recs = [packet_record(AGENT, "10.0.0.53", qname=f"{i:04d}abcabcabcabcabcabc.t.example.org", ktime=10**9 + i)
            for i in range(30)]
    assert fired(engine, *recs) == ["dns_tunnel_many_names"]
    benign = [packet_record(AGENT, "10.0.0.53", qname=f"mirror{i}.pythonhosted.org", ktime=10**9 + i)
              for i in range(50)]
    assert fired(site_engine(tmp_path), *benign) == []


def test_listeners_outside_loopback(engine):
    assert fired(engine, bind_record(AGENT, "0.0.0.0", 4444)) == ["agent_listens_outside_loopback"]
    assert fired(engine, bind_record(AGENT, "0.0.0.0", 0)) == []  # an ephemeral port: a client


def test_dns_query_decoding_goes_as_far_as_the_bytes():
    q = bytes.fromhex("1234 0100 0001 0000 0000 0000") + b"\x03www\x07example\x03org\x00" + bytes.fromhex("0010 0001")
    assert dns_query(q) == {"qname": "www.example.org", "qdcount": 1, "qtype": "TXT"}
    assert dns_query(q[:20]) == {"qname": "www.exa", "qdcount": 1, "truncated": True}
    assert dns_query(q[:5]) == {}
    assert dns_query(bytes.fromhex("1234 8180 0001 0001 0000 0000") + q[12:]) == {}  # a response
    assert dns_query(bytes.fromhex("1234 0100 0001 0000 0000 0000") + b"\x03a\x1bb\x00") == {
        "qname": "a\\x1bb", "qdcount": 1}  # control bytes escaped; no type: the bytes end there


def test_entropy():
    assert entropy("") == 0.0 and entropy("aaaa") == 0.0 and entropy("abcd") == 2.0


def test_resolv_conf_nameservers(tmp_path):
    f = tmp_path / "resolv.conf"
    f.write_text("# x\nnameserver 10.1.2.3\nnameserver fe80::1%eth0\nnameserver bogus\nsearch example.org\n")
    assert resolv_conf_nameservers(f) == ["10.1.2.3", "fe80::1"]
    assert resolv_conf_nameservers(tmp_path / "missing") == []
