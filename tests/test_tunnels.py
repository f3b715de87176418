"""tunnels.py: a loopback session carrying SSH or stratum, followed to where the agent's relay goes.
Real loopback listeners and clients; the relay is a real process in a real agent cgroup, and its
"outside" peer is this machine's own non-loopback address (forwarders.is_loopback never calls any
127/8 address outside)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from agentprobe.enrich import Enricher
from agentprobe.forwarders import is_loopback
from agentprobe.tunnels import RETRIES, RETRY_S, LoopbackTunnels


def outside_address() -> str:
    """An address of this machine that is not loopback (where the relay's peer listens)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: only the route's source address is chosen
            addr = s.getsockname()[0]
        except OSError:
            addr = ""
    if not addr or is_loopback(addr):
        pytest.skip("this machine has no non-loopback IPv4 address")
    return addr


# A relay: listens on loopback, takes one client, then (if given an address) connects out; a child
# forked per connection (fork=1) does the connecting, as socat fork does.
RELAY = r"""
import os, socket, sys
out_host, out_port, fork = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
print(ls.getsockname()[1], flush=True)
conn, _ = ls.accept()
if fork and os.fork() != 0:
    sys.stdin.read(); os._exit(0)
if out_host:
    up = socket.create_connection((out_host, out_port))
    print("connected", flush=True)
sys.stdin.read()
"""



class Relay:
    def __init__(self, cgroup, out_host: str = "", out_port: int = 0, fork: bool = False) -> None:
        self.proc = cgroup.popen([sys.executable, "-c", RELAY, out_host, str(out_port), "1" if fork else "0"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.port = int(self.proc.stdout.readline())
        self.client = socket.create_connection(("127.0.0.1", self.port))
        if out_host:
            assert self.proc.stdout.readline().strip() == "connected"

    def close(self) -> None:
        self.client.close()
        self.proc.stdin.close()
        self.proc.wait(10)


@pytest.fixture
def relays():
    made: list[Relay] = []

    def make(*a, **kw) -> Relay:
        made.append(Relay(*a, **kw))
        return made[-1]
    try:
        yield make
    finally:
        for r in made:
            r.close()


@pytest.fixture
def outside():
    ls = socket.socket()
    ls.bind((outside_address(), 0))
    ls.listen(4)
    try:
        yield ls
    finally:
        ls.close()


def payload(port: int, cgroup_id: int, app: str = "ssh", address: str = "127.0.0.1") -> dict:
    return {"type": "payload", "app": app, "address": address, "port": port, "seq": 41,
            "banner": "SSH-2.0-OpenSSH_9.6", "proc": {"pid": os.getpid(), "comm": "pytest"},
            "cgroup": {"id": cgroup_id, "path": "/x"}}


def tunnels(scope) -> LoopbackTunnels:
    return LoopbackTunnels(scope.agent_family, Enricher(scope.name_of, 0).synthetic)


def tick_until(t: LoopbackTunnels, timeout: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while not (out := t.tick(time.monotonic())) and time.monotonic() < deadline:
        time.sleep(0.02)
    return out


def test_a_tunnel_record_names_the_outside_peer(agent_cgroup, scope, relays, outside):
    host, port = outside.getsockname()
    relay = relays(agent_cgroup, host, port)
    t = tunnels(scope)
    assert t.process(payload(relay.port, agent_cgroup.id)) == []
    (rec,) = tick_until(t)
    assert rec["type"] == "tunnel" and rec["proc"]["pid"] == relay.proc.pid
    assert rec["cgroup"]["id"] == agent_cgroup.id and rec["cgroup"]["path"] == agent_cgroup.rel
    assert rec["to"] == [f"{host}:{port}"]
    assert (rec["carried"], rec["port"], rec["forwarder_pids"]) == ("ssh", relay.port, [relay.proc.pid])
    assert rec["client"]["pid"] == payload(0, 0)["proc"]["pid"] and rec["payload_seq"] == 41
    assert rec["detail"] == "SSH-2.0-OpenSSH_9.6"
    assert t.tick(time.monotonic() + 60) == []  # reported once


def test_a_relay_child_forked_per_connection_is_followed(agent_cgroup, scope, relays, outside):
    host, port = outside.getsockname()
    relay = relays(agent_cgroup, host, port, fork=True)
    t = tunnels(scope)
    t.process(payload(relay.port, agent_cgroup.id, app="stratum"))
    (rec,) = tick_until(t)
    assert rec["to"] == [f"{host}:{port}"] and rec["carried"] == "stratum"
    assert rec["forwarder_pids"][0] == relay.proc.pid and len(rec["forwarder_pids"]) == 2


def test_a_relay_that_goes_nowhere_is_reported_after_the_retries(agent_cgroup, scope, relays):
    relay = relays(agent_cgroup)
    t = tunnels(scope)
    t.process(payload(relay.port, agent_cgroup.id))
    now = time.monotonic()
    for i in range(RETRIES):
        assert t.tick(now + i * (RETRY_S + 0.01)) == [], i
    (rec,) = t.tick(now + RETRIES * (RETRY_S + 0.01))
    assert rec["to"] == [] and rec["forwarder_pids"] == [relay.proc.pid]


def test_an_earlier_outside_connect_of_the_relay_names_where_it_goes(agent_cgroup, scope, relays):
    relay = relays(agent_cgroup)
    t = tunnels(scope)
    for addr, port in (("198.51.100.7", 443), ("2001:db8::1", 22), ("127.0.0.1", 8080), ("198.51.100.7", 443)):
        t.process({"type": "connect", "family": "inet6" if ":" in addr else "inet", "address": addr,
                   "port": port, "proc": {"pid": relay.proc.pid}})
    t.process(payload(relay.port, agent_cgroup.id))
    (rec,) = t.tick(time.monotonic())
    assert rec["to"] == ["198.51.100.7:443", "[2001:db8::1]:22"]


def test_what_is_not_a_tunnel_is_left_alone(agent_cgroup, scope, relays):
    relay = relays(agent_cgroup)
    t = tunnels(scope)
    t.process(payload(relay.port, agent_cgroup.id, app="http"))          # not carried
    t.process(payload(relay.port, agent_cgroup.id, address="192.0.2.9"))  # not loopback
    other = socket.socket()  # a loopback listener of this (non-agent) process
    other.bind(("127.0.0.1", 0))
    other.listen(1)
    try:
        t.process(payload(other.getsockname()[1], agent_cgroup.id))
    finally:
        other.close()
    assert t.tick(time.monotonic() + 3600) == []
