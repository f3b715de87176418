"""The throw-away "internet" of the end-to-end tests and the demo (agentprobe/lab.py): a real network
namespace with a real sshd and a stratum pool, spoken to from inside the namespace only, and nothing
left behind when it closes, also when it fails to start."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from agentprobe.lab import INTERNAL_ADDR, OUTSIDE_ADDR, Internet

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(not (shutil.which("sshd") or os.path.exists("/usr/sbin/sshd")) or not shutil.which("ssh"),
                       reason="needs OpenSSH"),
]

STRATUM_CLIENT = r'''
import json, socket, sys
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
f = c.makefile("rwb")
for req in ({"id": 1, "method": "mining.subscribe", "params": ["cpuminer/2.5"]},
            {"id": 2, "method": "mining.authorize", "params": ["wallet.worker", "x"]}):
    f.write((json.dumps(req) + "\n").encode()); f.flush()
    print(f.readline().decode().strip())
print(f.readline().decode().strip())
'''


def gone(net: Internet) -> list[str]:
    """What of `net` is still there (an empty list when it all went)."""
    left = []
    if net.ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split():
        left.append(f"netns {net.ns}")
    if subprocess.run(["ip", "link", "show", f"{net.veth}a"], capture_output=True).returncode == 0:
        left.append(f"veth {net.veth}a")
    if net.dir.exists():
        left.append(f"dir {net.dir}")
    left += [f"pid {p.pid}" for p in net._procs if p.poll() is None]
    return left


def test_the_pool_speaks_stratum_and_logs_what_it_was_asked(tmp_path):
    with Internet() as net:
        for port in (net.pool_port, Internet.POOL_ALT_PORT):
            (tmp_path / "client.py").write_text(STRATUM_CLIENT)
            r = subprocess.run(net.exec_argv(sys.executable, str(tmp_path / "client.py"), str(port)),
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stderr
            sub, auth, notify = map(json.loads, r.stdout.splitlines())
            assert sub == {"id": 1, "result": [[["mining.notify", "ae6812eb4cd7735a302a8a9dd95cf71f"]], "08000002", 4],
                           "error": None}
            assert auth == {"id": 2, "result": True, "error": None}
            assert notify["method"] == "mining.notify" and notify["id"] is None
        assert net.pool_requests() == ["mining.subscribe", "mining.authorize"] * 2
    assert gone(net) == []


def test_sshd_takes_the_throwaway_key_on_both_ports_and_a_remote_forward_is_seen():
    with Internet() as net:
        assert (net.addr, net.ns.startswith("ap-inet-")) == (OUTSIDE_ADDR, True)
        for port in ("22", str(Internet.SSH_ALT_PORT)):
            r = subprocess.run(net.exec_argv(*net.ssh_argv("-p", port, f"root@{OUTSIDE_ADDR}", "echo", "in")),
                               capture_output=True, text=True, timeout=60)
            assert (r.returncode, r.stdout) == (0, "in\n"), r.stderr
        assert not net.port_open_inside(2222)
        fwd = subprocess.Popen(net.exec_argv(*net.ssh_argv("-N", "-R", "127.0.0.1:2222:127.0.0.1:9",
                                                            f"root@{OUTSIDE_ADDR}")),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            net._wait_port(2222)
            assert net.port_open_inside(2222)
        finally:
            fwd.kill()
            fwd.wait()
        # the internal (RFC 1918) address answers inside too
        r = subprocess.run(net.exec_argv("ip", "-o", "-4", "addr", "show"), capture_output=True, text=True)
        assert f"inet {INTERNAL_ADDR}/24" in r.stdout and f"inet {OUTSIDE_ADDR}/24" in r.stdout
    assert gone(net) == []


def test_a_lab_that_fails_to_start_leaves_nothing_behind():
    net = Internet(pool_port=70000)  # no such port: the pool cannot listen
    with pytest.raises(RuntimeError, match=f"nothing listens on {net.ns}:70000"):
        with net:
            pass
    assert net._procs and gone(net) == []  # sshd had started: it was stopped
