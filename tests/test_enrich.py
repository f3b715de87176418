"""Enrichment: process tree, exe hashing, records for processes that are gone."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

from agentprobe.enrich import Enricher, ExeHasher, ProcessTree, ProcInfo
from agentprobe.events import ConnectEvent, ExecEvent, ExitEvent, ForkEvent, Process


def proc(pid, ppid, comm="sh", uid=0):
    return Process(pid, pid, ppid, uid, 0, comm)


def enricher():
    return Enricher(lambda cid: {5: "/agents/kubepods/docker-" + "a" * 64 + ".scope"}.get(cid), 1000, node="n1")


def test_tree_ancestors_and_release():
    t = ProcessTree()
    t.add(ProcInfo(100, 1, "agent"))
    t.fork(t.get(100), 200)
    t.fork(t.get(200), 300)
    assert [a.pid for a in t.ancestors(300)] == [200, 100]
    t.exit(200)  # has a live child: kept as ancestor
    assert [a.pid for a in t.ancestors(300)] == [200, 100]
    t.exit(300)  # last one of its branch: both go
    assert 300 not in t and 200 not in t and 100 in t


def test_tree_is_bounded():
    t = ProcessTree(max_size=10)
    for pid in range(100, 150):
        t.add(ProcInfo(pid, 1))
    assert len(t) == 10 and 149 in t and 100 not in t


def test_tree_survives_parent_cycles():
    t = ProcessTree()
    t.add(ProcInfo(10, 11))
    t.add(ProcInfo(11, 10))
    assert [a.pid for a in t.ancestors(10)] == [11]


def test_exe_hasher_caches_by_inode(tmp_path):
    f = tmp_path / "tool"
    f.write_bytes(b"#!/bin/sh\necho hi\n")
    h = ExeHasher()
    assert h.of_path(str(f)) == hashlib.sha256(f.read_bytes()).hexdigest()
    f.write_bytes(b"changed")
    os.utime(f, ns=(1, 1))  # new mtime: a new cache key
    assert h.of_path(str(f)) == hashlib.sha256(b"changed").hexdigest()
    assert h.of_path(str(tmp_path / "missing")) is None


def test_hash_of_a_running_copy_matches_original(tmp_path):
    """A renamed copy of a binary has the original's sha256, read through /proc/PID/exe."""
    copy = tmp_path / "not-ssh"
    shutil.copy("/bin/sleep", copy)
    p = subprocess.Popen([str(copy), "5"])
    try:
        assert ExeHasher().of_pid(p.pid) == hashlib.sha256(open("/bin/sleep", "rb").read()).hexdigest()
    finally:
        p.kill()
        p.wait()


def test_record_for_a_live_process():
    e = enricher()
    me = os.getpid()
    ev = ConnectEvent("connect", 5000, 5, proc(me, os.getppid(), "pytest"), family="inet",
                      address="127.0.0.1", port=80, sock_type="stream", retval=0)
    rec = e.record(ev)
    assert rec["v"] == 1 and rec["type"] == "connect" and rec["ts"] == 6000 and rec["ktime"] == 5000
    assert rec["node"] == "n1"
    assert rec["cgroup"] == {"id": 5, "path": "/agents/kubepods/docker-" + "a" * 64 + ".scope"}
    assert rec["container"] == {"runtime": "docker", "id": "a" * 64}
    assert rec["proc"]["exe"] == os.path.realpath(sys.executable)
    with open("/proc/self/cmdline", "rb") as f:
        assert rec["proc"]["cmdline"] == [a.decode() for a in f.read().rstrip(b"\0").split(b"\0")]
    assert rec["proc"]["sha256"] == hashlib.sha256(open(sys.executable, "rb").read()).hexdigest()
    assert rec["proc"]["ancestors"][0]["pid"] == os.getppid()
    assert (rec["address"], rec["port"], rec["result"]) == ("127.0.0.1", 80, "ok")


def test_record_for_a_process_that_is_gone():
    e = enricher()
    p = subprocess.Popen(["/bin/true"])
    p.wait()
    ev = ExecEvent("exec", 1, 9, proc(p.pid, 1, "true"), filename="/bin/true", argv=["true", "-x"], argc_total=2)
    rec = e.record(ev)
    assert rec["proc"]["pid"] == p.pid and rec["proc"]["comm"] == "true"
    assert rec["proc"]["exe"] == os.path.realpath("/bin/true")  # the kernel's filename, links resolved
    assert rec["argv"] == ["true", "-x"] and rec["cgroup"] == {"id": 9, "path": None}


def test_an_exec_record_read_after_the_process_exec_d_again_keeps_its_own_program():
    """`sh -c 'exec sleep …'`: by the time the shell's exec record is enriched the process runs sleep;
    /proc would give the shell's record sleep's exe and hash (a program that re-execs at once would
    hide behind the next one). The kernel's comm tells: the record keeps the file it ran."""
    e = enricher()
    p = subprocess.Popen(["/bin/sh", "-c", "exec /bin/sleep 5"])
    try:
        deadline = time.monotonic() + 5
        while Path(f"/proc/{p.pid}/comm").read_text().strip() != "sleep" and time.monotonic() < deadline:
            time.sleep(0.01)
        rec = e.record(ExecEvent("exec", 1, 9, proc(p.pid, os.getpid(), "sh"), filename="/bin/sh",
                                 argv=["/bin/sh", "-c", "exec /bin/sleep 5"], argc_total=3))
        dash = os.path.realpath("/bin/sh")
        assert rec["proc"]["exe"] == dash
        assert rec["proc"]["sha256"] == hashlib.sha256(Path(dash).read_bytes()).hexdigest()
        # and the record of the program it runs now is its own
        rec = e.record(ExecEvent("exec", 2, 9, proc(p.pid, os.getpid(), "sleep"), filename="/bin/sleep",
                                 argv=["/bin/sleep", "5"], argc_total=2))
        assert rec["proc"]["exe"] == os.path.realpath("/bin/sleep")
    finally:
        p.kill()
        p.wait()


def test_fork_exec_exit_build_parent_chain():
    e = enricher()
    gone = 4_000_000  # no such pid: everything comes from the events
    e.tree.add(ProcInfo(gone, 1, "agent", "/usr/bin/python3"))
    e.record(ForkEvent("fork", 1, 5, proc(gone, 1, "agent"), child_pid=gone + 1))
    e.record(ExecEvent("exec", 2, 5, proc(gone + 1, gone, "bash"), filename="/bin/bash", argv=["bash"]))
    e.record(ForkEvent("fork", 3, 5, proc(gone + 1, gone, "bash"), child_pid=gone + 2))
    rec = e.record(ExecEvent("exec", 4, 5, proc(gone + 2, gone + 1, "ssh"), filename="/usr/bin/ssh",
                             argv=["ssh", "-R", "9000:localhost:22", "x"]))
    assert [(a["pid"], a["comm"]) for a in rec["proc"]["ancestors"]] == [(gone + 1, "bash"), (gone, "agent")]
    assert rec["proc"]["cmdline"] == ["ssh", "-R", "9000:localhost:22", "x"]
    e.record(ExitEvent("exit", 5, 5, proc(gone + 2, gone + 1, "ssh")))
    assert gone + 2 not in e.tree


def test_socket_owners_exact_by_cookie_inferred_by_destination_and_bounded():
    from agentprobe.enrich import SocketOwners
    from agentprobe.events import ConnectEvent, Process

    def conn(pid, cookie, addr="203.0.113.9", port=22, cg=7):
        return ConnectEvent("connect", 1, cg, Process(pid, pid, 1, 0, 0, f"p{pid}"), family="inet",
                            address=addr, port=port, cookie=cookie)

    o = SocketOwners(max_entries=8)
    o.learn(conn(10, 100))
    o.learn(conn(11, 101))  # another process of the same cgroup, same place, later
    assert o.owner(100, 7, "203.0.113.9", 22) == (Process(10, 10, 1, 0, 0, "p10"), False)
    assert o.owner(999, 7, "203.0.113.9", 22)[0].pid == 11 and o.owner(999, 7, "203.0.113.9", 22)[1]
    assert o.owner(999, 8, "203.0.113.9", 22) is None  # another cgroup: never guessed across
    assert o.owner(999, 7, "203.0.113.9", 443) is None
    o.learn(conn(0, 102))  # no process: nothing learnt
    assert o.owner(102, 7, "198.51.100.1", 1) is None
    for i in range(20):
        o.learn(conn(20 + i, 200 + i, port=1000 + i))
    assert len(o.by_cookie) == 8 and len(o.by_dest) == 2 and o.owner(100, 7, "x", 0) is None


def test_records_after_exit_still_name_the_process():
    """Counts flushed after a process exited (connect sweeps, GPU counts) still carry its name and
    command line; a new process that reuses the pid wins."""
    from agentprobe.enrich import Enricher, ProcInfo

    e = Enricher(lambda cid: "/agents/ep", 0, node="n")
    e.tree.add(ProcInfo(4242, 1, "nmap", "/usr/bin/nmap", ["nmap", "-sT", "127.0.0.1"], 0))
    e.tree.exit(4242)
    assert e.tree.get(4242) is None
    rec = e.synthetic("connect_sweep", 4242, 9, 1, {"count": 5})
    assert (rec["proc"]["comm"], rec["proc"]["cmdline"], rec["count"]) == ("nmap", ["nmap", "-sT", "127.0.0.1"], 5)
    e.tree.add(ProcInfo(4242, 1, "sleep", "/usr/bin/sleep", ["sleep", "9"], 0))
    assert e.synthetic("connect_sweep", 4242, 9, 1, {})["proc"]["comm"] == "sleep"
    for pid in range(10000, 10000 + 5000):
        e.tree.add(ProcInfo(pid, 1, "x", None, [], 0))
        e.tree.exit(pid)
    assert len(e.tree._gone) == 4096 and e.tree.get_recent(10000) is None


def test_exec_labels_inherit_and_the_new_environment_wins(tmp_path):
    """A real tree: a labelled shell starts a child with `env -i` (no EPISODE_ID) and a grandchild that
    sets its own TOOL_CALL_ID; an exec keeps what the process inherited, its own variables win per key."""
    e = Enricher(lambda cid: "/agents/ep-1", 1000, node="n1",
                 cgroup_labels=lambda cid, path: {f"c{i}": str(i) for i in range(16)} | {"TOOL_CALL_ID": "cg"},
                 label_env=("EPISODE_ID", "TOOL_CALL_ID"))
    go = tmp_path / "go"
    os.mkfifo(go)
    # sh (labelled) -> env -i sh (empty environment) -> env TOOL_CALL_ID=9 sleep: each waits on the fifo
    p = subprocess.Popen(["/bin/sh", "-c", f"env -i /bin/sh -c 'env TOOL_CALL_ID=9 /bin/sleep 30 & "
                                           f"read x < {go}; kill $!' & read x < {go}; wait"],
                         env={"EPISODE_ID": "ep-7", "TOOL_CALL_ID": "1", "PATH": "/usr/bin:/bin"})
    kids = []
    try:
        deadline = time.monotonic() + 5
        while True:
            kids = psutil.Process(p.pid).children(recursive=True)
            sleep = [k for k in kids if k.name() == "sleep"]
            if sleep or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        inner = sleep[0].ppid()
        e.record(ExecEvent("exec", 1, 5, proc(p.pid, 1, "sh"), filename="/bin/sh", argv=["sh"]))
        e.record(ForkEvent("fork", 2, 5, proc(p.pid, 1, "sh"), child_pid=inner))
        rec = e.record(ExecEvent("exec", 3, 5, proc(inner, p.pid, "sh"), filename="/bin/sh", argv=["sh"]))
        assert rec["proc"]["pid"] == inner and e.tree.get(inner).labels == {"EPISODE_ID": "ep-7", "TOOL_CALL_ID": "1"}
        e.record(ForkEvent("fork", 4, 5, proc(inner, p.pid, "sh"), child_pid=sleep[0].pid))
        rec = e.record(ExecEvent("exec", 5, 5, proc(sleep[0].pid, inner, "sleep"), filename="/bin/sleep",
                                 argv=["sleep", "30"]))
        # the process's labels win over the cgroup's and are all kept: 16 in all, the cgroup's in their order
        assert rec["labels"] == {**{f"c{i}": str(i) for i in range(14)}, "TOOL_CALL_ID": "9", "EPISODE_ID": "ep-7"}
    finally:
        with open(go, "w") as f:  # releases both readers
            f.write("x\ny\n")
        for k in [*kids, p]:
            try:
                k.kill()
            except psutil.NoSuchProcess:
                pass
        p.wait()
