"""The cgroup freezer and the responder stage, on real cgroups with real processes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from agentprobe.responder import CgroupFreezer, Responder

pytestmark = pytest.mark.kernel


def alert(cgroup_path, action="freeze", rule="test_rule"):
    return {"v": 1, "type": "alert", "seq": 41, "ts": 1, "ktime": time.monotonic_ns(), "node": "n",
            "cgroup": {"id": 1, "path": cgroup_path}, "rule": rule, "action": action}


def responder(root, watched, **kw):
    return Responder(CgroupFreezer(root), lambda: list(watched), **kw)


def test_freeze_confirmed_with_latency(cgroup_root, agent_cgroup):
    ep = agent_cgroup.child("ep-1")
    sub = ep.child("tool-call-3")
    p = sub.popen(["sleep", "60"])
    r = responder(cgroup_root, [agent_cgroup.rel])
    (resp,) = r.process(alert(sub.rel))
    assert resp["type"] == "response" and resp["action"] == "freeze" and resp["outcome"] == "frozen"
    assert resp["cgroup"] == {"path": ep.rel, "id": ep.id}  # the episode, not just the leaf
    assert resp["rule"] == "test_rule" and resp["alert_seq"] == 41
    assert 0 < resp["latency_ms"] < 5000
    assert "frozen 1" in (ep.path / "cgroup.events").read_text().splitlines()
    state = open(f"/proc/{p.pid}/stat").read().split(") ")[1].split()[0]
    assert state in ("S", "D")  # frozen tasks sleep in the freezer
    (again,) = r.process(alert(sub.rel))
    assert again["outcome"] == "already_frozen"
    assert CgroupFreezer(cgroup_root).thaw(ep.rel).outcome == "thawed"
    assert "frozen 0" in (ep.path / "cgroup.events").read_text().splitlines()
    p.kill()
    p.wait()


def test_freeze_cuts_tcp_connections(cgroup_root, agent_cgroup):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    p = agent_cgroup.popen([sys.executable, "-c",
                            f"import socket,time; s=socket.create_connection(('127.0.0.1',{port})); time.sleep(60)"])
    conn, _ = srv.accept()
    r = responder(cgroup_root, [agent_cgroup.rel])
    (resp,) = r.process(alert(agent_cgroup.rel))
    assert resp["outcome"] == "frozen" and resp["sockets_cut"] == 1
    conn.settimeout(5)
    try:
        data = conn.recv(10)
    except ConnectionResetError:
        data = b""
    assert data == b""  # the tunnel is dead while the process stays frozen
    assert p.poll() is None
    conn.close()
    srv.close()


NETNS_AGENT = r"""
import socket, subprocess, sys, time
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
srv = socket.socket(socket.AF_INET6)
srv.bind(("::1", 0))
srv.listen(4)
c = socket.create_connection(("::1", srv.getsockname()[1]))
a, _ = srv.accept()
print("up", flush=True)
time.sleep(60)
"""


def _tcp_states(pid: int) -> list[str]:
    out = subprocess.run(["nsenter", "-t", str(pid), "-n", "ss", "-tanH"], capture_output=True, text=True,
                         check=True).stdout
    return sorted(line.split()[0] for line in out.splitlines())


def test_freeze_cuts_connections_in_the_agents_own_network_namespace(cgroup_root, agent_cgroup):
    """An agent in a network namespace of its own (IPv6 here): its connections are destroyed there,
    both ends it holds (one connection: destroying one end resets the other), and its listener is
    left alone."""
    p = agent_cgroup.popen(["unshare", "-n", sys.executable, "-c", NETNS_AGENT], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "up\n"
        assert _tcp_states(p.pid) == ["ESTAB", "ESTAB", "LISTEN"]
        r = responder(cgroup_root, [agent_cgroup.rel])
        (resp,) = r.process(alert(agent_cgroup.rel))
        assert resp["outcome"] == "frozen" and resp["sockets_cut"] == 1
        assert _tcp_states(p.pid) == ["LISTEN"]
        assert agent_cgroup.frozen()
    finally:
        p.kill()
        (agent_cgroup.path / "cgroup.freeze").write_text("0")
        p.wait()


def test_kill(cgroup_root, agent_cgroup):
    p = agent_cgroup.popen(["sleep", "60"])
    (resp,) = responder(cgroup_root, [agent_cgroup.rel]).process(alert(agent_cgroup.rel, action="kill"))
    assert resp["outcome"] == "killed"
    assert p.wait(5) == -9


def test_dry_run_does_nothing(cgroup_root, agent_cgroup):
    (resp,) = responder(cgroup_root, [agent_cgroup.rel], dry_run=True).process(alert(agent_cgroup.rel))
    assert resp["outcome"] == "dry_run"
    assert "frozen 0" in (agent_cgroup.path / "cgroup.events").read_text().splitlines()


def test_never_outside_watched_root_or_self(cgroup_root, agent_cgroup, outside_cgroup):
    r = responder(cgroup_root, [agent_cgroup.rel])
    (resp,) = r.process(alert(outside_cgroup.rel))
    assert resp["outcome"] == "refused" and "not inside a watched cgroup" in resp["error"]
    assert "frozen 0" in (outside_cgroup.path / "cgroup.events").read_text().splitlines()
    (resp,) = responder(cgroup_root, ["/"]).process(alert("/"))
    assert resp["outcome"] == "refused" and "root cgroup" in resp["error"]
    # a watcher running inside the agent cgroup refuses to freeze itself
    code = ("from pathlib import Path; from agentprobe.responder import CgroupFreezer, ResponseError\n"
            f"try:\n CgroupFreezer(Path({str(cgroup_root)!r})).check_target({agent_cgroup.rel!r}, "
            f"[{agent_cgroup.rel!r}])\nexcept ResponseError as e: print(e)")
    out = agent_cgroup.run([sys.executable, "-c", code], text=True).stdout.strip()
    assert out == f"refusing to act on {agent_cgroup.rel}: the watcher itself runs in it"


def test_failed_freeze_is_reported_not_raised(cgroup_root, agent_cgroup):
    (resp,) = responder(cgroup_root, [agent_cgroup.rel]).process(alert(agent_cgroup.rel + "/vanished"))
    assert resp["outcome"] == "failed" and "no longer exists" in resp["error"]


def test_non_alerts_and_alert_only_rules_pass(cgroup_root, agent_cgroup):
    r = responder(cgroup_root, [agent_cgroup.rel])
    assert r.process({"type": "exec"}) == []
    assert r.process(alert(agent_cgroup.rel, action="alert")) == []


def test_thaw_and_status_cli(cgroup_root, agent_cgroup, agentprobe_cmd, tmp_path):
    p = agent_cgroup.popen(["sleep", "60"])
    assert CgroupFreezer(cgroup_root).freeze(agent_cgroup.rel).outcome == "frozen"
    (tmp_path / "watcher-1.json").write_text(json.dumps({
        "pid": 1, "started": 0, "cgroup_root": str(cgroup_root), "outputs": ["-"],
        "watched": [{"id": agent_cgroup.id, "path": agent_cgroup.rel}],
        "frozen": {agent_cgroup.rel: {"rule": "ssh_reverse_tunnel", "ts": 0, "alert_seq": 3}}}))
    st = subprocess.run([*agentprobe_cmd, "status", "--status-dir", str(tmp_path)], capture_output=True, text=True)
    assert st.returncode == 0
    assert f"  FROZEN    {agent_cgroup.rel}  (rule ssh_reverse_tunnel)" in st.stdout.splitlines()
    r = subprocess.run([*agentprobe_cmd, "thaw", str(agent_cgroup.path)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"agentprobe: thawed {agent_cgroup.path}"
    st = subprocess.run([*agentprobe_cmd, "status", "--status-dir", str(tmp_path), "--json"],
                        capture_output=True, text=True)
    assert json.loads(st.stdout)[0]["cgroups"][0]["frozen"] is False
    bad = subprocess.run([*agentprobe_cmd, "thaw", "no/such"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip().startswith("agentprobe: cgroup no/such does not exist")
    p.kill()
    p.wait()


def test_a_cgroup_removed_while_its_freeze_is_awaited_is_a_failed_outcome(cgroup_root, agent_cgroup):
    """Found by the soak test: an episode torn down while a freeze waits for the kernel's confirmation
    made cgroup.events fail with ENODEV, which escaped as an exception."""
    import threading
    import time

    gone = agent_cgroup.child("torn-down")
    freezer = CgroupFreezer(cgroup_root)
    t = threading.Timer(0.2, gone.path.rmdir)
    t.start()
    t0 = time.monotonic()
    # wait for a state that never comes, so the wait is still on when the cgroup goes
    out = freezer._v2_set(gone.path, "1", "frozen 0", 5.0, "frozen")
    t.join()
    assert out.outcome == "failed" and "No such device" in out.error and time.monotonic() - t0 < 2
