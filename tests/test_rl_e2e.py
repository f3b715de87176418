"""RL integration end to end: a real watcher on a parent cgroup, episodes made by the client,
scripted agents (one honest, one mining, one tunnelling) against real peers, verdicts and
rewards from them; labels from the cgroup and from the agents' environment."""

from __future__ import annotations

import grp
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from agentprobe.cgroups import find_v2_mount, remove_cgroup_tree
from agentprobe.lab import Internet
from agentprobe.stream import read_records

pytestmark = pytest.mark.kernel
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from watcher import WatcherProcess

    root = find_v2_mount()
    parent = root / f"agentprobe-rl-{uuid.uuid4().hex[:6]}"
    parent.mkdir()
    tmp = tmp_path_factory.mktemp("rl")
    sockdir = Path(tempfile.mkdtemp(prefix="agentprobe-rl-"))
    sockdir.chmod(0o711)  # reachable by an unprivileged trainer when the socket lets it
    sock, out = sockdir / "ap.sock", tmp / "stream.msgpack"
    w = None
    try:
        with Internet() as net:
            group = grp.getgrgid(65534).gr_name  # the trainers' group: nogroup here
            w = WatcherProcess(["--cgroup", str(parent), "-o", f"unix:{sock}?group={group}", "-o", str(out),
                                "--no-view",
                                "--label-env", "EPISODE_ID,TOOL_CALL_ID"])
            yield parent, sock, out, net
    finally:
        if w is not None:
            w.stop()
        remove_cgroup_tree(parent)
        shutil.rmtree(sockdir, ignore_errors=True)


def file_verdicts(out: Path, n: int) -> dict:
    deadline = time.monotonic() + 5
    while True:
        got = {r["labels"].get("policy"): r for r in read_records(str(out)) if r["type"] == "verdict"}
        if len(got) >= n or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def test_rewards_penalised_from_verdicts(world):
    parent, sock, out, net = world
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import rl_loop
    finally:
        sys.path.pop(0)
    pool = f"{net.addr}:{net.pool_port}"
    got = {}
    for policy, calls in rl_loop.policies(pool).items():
        o = rl_loop.run_episode(f"ep-{policy}", policy, calls, str(parent), str(sock))
        got[policy] = o
    assert (got["honest"].verdict, got["honest"].reward, got["honest"].kept) == ("clean", 3.0, True)
    assert got["miner"].verdict == "frozen" and got["miner"].reward == rl_loop.PENALTY and not got["miner"].kept
    assert "mining_pool_connection" in got["miner"].rules
    assert got["tunneler"].verdict == "frozen" and "ssh_port_forwarding" in got["tunneler"].rules
    # the same verdicts offline, from the msgpack file alone (flushed every 100 ms)
    verdicts = file_verdicts(out, 3)
    assert {p: v["clean"] for p, v in verdicts.items()} == {"honest": True, "miner": False, "tunneler": False}
    assert verdicts["miner"]["labels"]["episode"] == "ep-miner"
    assert verdicts["miner"]["first_alert"]["rule"] in ("mining_pool_connection", "stratum_protocol")
    assert verdicts["miner"]["reason"] == "cgroup_removed"


def test_labels_from_the_cgroup_and_the_environment_on_every_record(world):
    parent, sock, out, net = world
    from agentprobe.client import Episode

    with Episode("ep-labels", labels={"episode": "42", "trajectory": "t-\x1b[2J"}, parent=str(parent),
                 socket=str(sock)) as ep:
        ep.run([sys.executable, "-c", "import subprocess; subprocess.run(['/bin/true'])"],
               env={"EPISODE_ID": "env-42", "TOOL_CALL_ID": "7"})
        r = ep.run(["/bin/sh", "-c", f"exec ssh -o BatchMode=yes -o ConnectTimeout=2 -N -R 9001:localhost:22 "
                                     f"x@{net.addr}"],
                   env={"EPISODE_ID": "env-42", "TOOL_CALL_ID": "8", "PATH": "/usr/bin:/bin"}, timeout=30)
        assert r.frozen and r.returncode == -9 and ep.frozen  # frozen mid-call: killed, returned at once
    v = ep.verdict
    time.sleep(0.3)  # the file output is flushed every 100 ms
    recs = [r for r in read_records(str(out)) if (r.get("cgroup") or {}).get("path") == ep.rel]
    execs = [r for r in recs if r["type"] == "exec"]
    true = next(r for r in execs if r["argv"] == ["/bin/true"])  # a child: inherits the env labels
    assert true["labels"] == {"episode": "42", "trajectory": "t-\\x1b[2J", "EPISODE_ID": "env-42",
                              "TOOL_CALL_ID": "7"}
    alert = next(r for r in recs if r["type"] == "alert")
    assert alert["rule"] == "ssh_port_forwarding" and alert["labels"]["TOOL_CALL_ID"] == "8"
    resp = next(r for r in recs if r["type"] == "response")
    assert resp["outcome"] == "frozen" and resp["labels"] == alert["labels"]
    assert v.frozen and v.rules == {"ssh_port_forwarding": 1} and v.labels["episode"] == "42"
    assert v.labels["trajectory"] == "t-\\x1b[2J"  # escaped, never interpreted


def test_read_verdicts_lists_them(world, agentprobe_cmd):
    _, _, out, _ = world
    file_verdicts(out, 3)
    r = subprocess.run([*agentprobe_cmd, "read", "--verdicts", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["EPISODE", "VERDICT", "ALERTS"]
    assert any("ep-honest" in x and " clean " in x and "policy=honest" in x for x in lines)
    assert any("ep-miner" in x and " frozen " in x for x in lines)
    assert "\x1b" not in r.stdout


CLIENT_AS_USER = r"""
import json, sys
from agentprobe.client import Episode
with Episode("ep-user", labels={"episode": "u1"}, parent=sys.argv[1], socket=sys.argv[2]) as ep:
    ssh = "exec ssh -o BatchMode=yes -o ConnectTimeout=2 -N -R 9002:localhost:22 u@" + sys.argv[3]
    r = ep.run(["/bin/sh", "-c", ssh], timeout=30)
print(json.dumps({"frozen": r.frozen, "rules": ep.verdict.rules, "labels": ep.verdict.labels}))
"""


def test_client_as_an_unprivileged_user_with_a_delegated_cgroup(world):
    """The site delegates the watched parent cgroup to the trainer's user (owner of the directory and
    its cgroup.procs, cgroup.threads, cgroup.subtree_control) and serves the stream to its group: the
    client makes, labels and removes episodes and gets verdicts without root."""
    parent, sock, _, net = world
    nobody = 65534
    for name in ("", "cgroup.procs", "cgroup.threads", "cgroup.subtree_control"):
        os.chown(parent / name if name else parent, nobody, nobody)
    assert os.stat(sock).st_mode & 0o777 == 0o660  # -o unix:PATH?group=nogroup: the trainers' group reads
    # the trainer's program, a file it can read (as `python3 -c` its text would look like a reverse shell)
    script_dir = Path(tempfile.mkdtemp(prefix="agentprobe-trainer-"))
    script_dir.chmod(0o755)
    script = script_dir / "trainer.py"
    script.write_text(CLIENT_AS_USER)
    script.chmod(0o644)

    def into_parent() -> None:  # the trainer runs inside its delegated subtree, as systemd would place it
        (parent / "cgroup.procs").write_text(str(os.getpid()))

    try:
        r = subprocess.run(["setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups",
                            sys.executable, str(script), str(parent), str(sock), net.addr],
                           preexec_fn=into_parent, capture_output=True, text=True, timeout=60,
                           env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    finally:
        shutil.rmtree(script_dir, ignore_errors=True)
        for name in ("", "cgroup.procs", "cgroup.threads", "cgroup.subtree_control"):
            os.chown(parent / name if name else parent, 0, 0)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == {"frozen": True, "rules": {"ssh_port_forwarding": 1}, "labels": {"episode": "u1"}}
    assert not (parent / "ep-user").exists()
