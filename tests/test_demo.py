"""agentprobe demo end to end: the ROME replay, its stream, its clean-up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from agentprobe.stream import read_records

pytestmark = pytest.mark.kernel


def leftovers(cgroup_root) -> list[str]:
    found = []
    if (cgroup_root / "agentprobe-demo").exists():
        found.append("cgroup")
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [line.split()[0] for line in ns.splitlines() if line.startswith("ap-inet-")]
    return found


def run_demo(agentprobe_cmd, out, **kw):
    return subprocess.run([*agentprobe_cmd, "demo", "-o", str(out)], capture_output=True, text=True,
                          timeout=120, **kw)


def test_demo_catches_tunnel_and_miner(agentprobe_cmd, tmp_path, cgroup_root):
    out = tmp_path / "demo.msgpack"
    t0 = time.monotonic()
    r = run_demo(agentprobe_cmd, out)
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    # under emulation (scripts/vm-test boots TCG guests) wall-clock limits scale with it
    assert elapsed < 30 * float(os.environ.get("AGENTPROBE_TIME_SCALE", "1"))
    recs = list(read_records(str(out)))
    assert recs[0]["type"] == "start" and recs[-1]["type"] == "stop"
    by_episode: dict[str, list[str]] = {}
    for a in (x for x in recs if x["type"] == "alert"):
        by_episode.setdefault(a["cgroup"]["path"], []).append(a["rule"])
    assert by_episode["/agentprobe-demo/episode-1"][0] == "ssh_port_forwarding"
    assert "mining_pool_connection" in by_episode["/agentprobe-demo/episode-2"]
    # the kernel refused the pool connection before a packet left; the freeze followed
    denies = [(d["address"], d["port"], d["reason"]) for d in recs if d["type"] == "deny"]
    assert denies == [("198.51.100.2", 3333, "pool_port")]
    assert "mining pool received: nothing" in r.stdout
    frozen = [x["cgroup"]["path"] for x in recs if x["type"] == "response" and x["outcome"] == "frozen"]
    assert frozen == ["/agentprobe-demo/episode-1", "/agentprobe-demo/episode-2"]
    # the miner really touched the (imitation) GPU before it was stopped
    gpu = [x for x in recs if x["type"] == "gpu" and x.get("kind") == "first_use"]
    assert {(g["device"]["major"], g["device"]["minor"]) for g in gpu} == {(195, 255), (195, 0)}
    # the report
    assert "=== agentprobe demo report ===" in r.stdout
    assert "reverse tunnel port 9000 on the outside host: never opened" in r.stdout
    assert f"agentprobe read {out}" in r.stdout
    assert leftovers(cgroup_root) == []


@pytest.mark.userland
def test_demo_cleans_leftovers_of_an_interrupted_run(agentprobe_cmd, tmp_path, cgroup_root):
    (cgroup_root / "agentprobe-demo" / "episode-9").mkdir(parents=True)
    subprocess.run(["ip", "netns", "add", "ap-inet-stale1"], check=True)
    try:
        r = run_demo(agentprobe_cmd, tmp_path / "d.msgpack")
        assert r.returncode == 0, r.stdout + r.stderr
        assert leftovers(cgroup_root) == []
    finally:
        subprocess.run(["ip", "netns", "del", "ap-inet-stale1"], capture_output=True)
        if (cgroup_root / "agentprobe-demo").exists():
            from agentprobe.cgroups import remove_cgroup_tree

            remove_cgroup_tree(cgroup_root / "agentprobe-demo")


@pytest.mark.userland
def test_demo_ctrl_c_tears_everything_down(agentprobe_cmd, tmp_path, cgroup_root):
    p = subprocess.Popen([*agentprobe_cmd, "demo", "-o", str(tmp_path / "d.msgpack"), "--timeout", "60"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (cgroup_root / "agentprobe-demo").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err  # the world takes seconds to build: this lands in the middle
    assert "demo interrupted; everything it built was removed" in err
    assert leftovers(cgroup_root) == []


def test_demo_needs_root(agentprobe_cmd, tmp_path):
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                        sys.executable, "-m", "agentprobe", "demo", "-o", str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 4
    assert r.stderr.strip().splitlines()[-1] == "agentprobe: agentprobe demo needs root: run it with sudo"


def test_demo_without_sshd(tmp_path):
    """No sshd: one line, non-zero, nothing built."""
    code = ("import os, agentprobe.demo as d; d.SSHD_PATHS = (); os.environ['PATH'] = '/nonexistent'; "
            "from agentprobe.cli import main; main()")
    r = subprocess.run([sys.executable, "-c", code, "demo", "-o", str(tmp_path / "x")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == "agentprobe: agentprobe demo needs sshd: apt-get install openssh-server"
    assert not (tmp_path / "x").exists()
