"""scope.py with real cgroup v2 directories made by the test: the watched set, its locks (one
watcher per cgroup), rescans, questions about paths, and the real processes inside."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from agentprobe.errors import EXIT_BUSY, AgentprobeError
from agentprobe.scope import WatchedScope, v2_cgroup_of


@pytest.fixture
def scopes():
    made: list[WatchedScope] = []

    def make(cgroups=(), globs=(), take=True) -> WatchedScope:
        s = WatchedScope(list(cgroups), list(globs), err=io.StringIO())
        made.append(s)
        if take:
            s.take()
        return s
    try:
        yield make
    finally:
        for s in made:
            s.close()


def test_take_finds_and_locks_an_explicit_cgroup(agent_cgroup, scopes):
    s = scopes([str(agent_cgroup.path)])
    assert s.listing() == [{"id": agent_cgroup.id, "path": agent_cgroup.rel}]
    assert s.paths() == [agent_cgroup.rel]
    with pytest.raises(AgentprobeError) as e:
        scopes([str(agent_cgroup.path)])
    assert e.value.exit_code == EXIT_BUSY and "already watches" in str(e.value)


def test_close_releases_the_locks(agent_cgroup, scopes):
    first = scopes([str(agent_cgroup.path)])
    first.close()
    second = scopes([str(agent_cgroup.path)])
    assert second.paths() == [agent_cgroup.rel]


def test_check_refuses_a_missing_cgroup(agent_cgroup, scopes):
    s = scopes([str(agent_cgroup.path / "missing")], take=False)
    with pytest.raises(AgentprobeError, match="does not exist"):
        s.check()


def test_rescan_adds_and_forgets_glob_matches(agent_cgroup, scopes):
    glob = agent_cgroup.rel.lstrip("/") + "/ep-*"
    s = scopes(globs=[glob])
    assert s.watched == {}
    assert not s.rescan().changed
    a = agent_cgroup.child("ep-a")
    agent_cgroup.child("other")
    change = s.rescan()
    assert list(change.added) == [a.id] and change.added[a.id].path == a.rel and not change.gone
    assert s.matches_glob(a.rel) and not s.matches_glob(agent_cgroup.rel + "/other")
    assert not s.rescan().changed
    a.remove()
    change = s.rescan()
    assert list(change.gone) == [a.id] and not change.added and s.watched == {}
    # its lock went with it: another scope may watch a new cgroup of the same name
    b = agent_cgroup.child("ep-a")
    assert list(s.rescan().added) == [b.id]


def test_rescan_skips_a_cgroup_another_watcher_holds(agent_cgroup, scopes):
    ep = agent_cgroup.child("ep-held")
    scopes([str(ep.path)])
    s = scopes(globs=[agent_cgroup.rel.lstrip("/") + "/ep-*"], take=False)
    assert s.rescan().added == {}
    assert f"skipping {ep.rel}" in s.err.getvalue() and "already watches" in s.err.getvalue()


def test_paths_questions(agent_cgroup, scopes):
    inner = agent_cgroup.child("team")
    s = scopes([str(agent_cgroup.path), str(inner.path)])
    top, team = agent_cgroup.rel, inner.rel
    assert s.inside(top) and s.inside(f"{top}/ep1/x") and s.inside(team)
    assert not s.inside(top + "-sibling") and not s.inside("/") and not s.inside(None)
    assert s.episode_of(f"{top}/ep1/deep/er") == f"{top}/ep1"
    assert s.episode_of(f"{team}/ep2/x") == f"{team}/ep2"  # the innermost watched cgroup holds it
    assert s.episode_of(top) == top
    assert s.episode_of("/elsewhere/x") == "/elsewhere/x"
    assert s.top_of(f"{team}/ep2") == team and s.top_of(f"{top}/ep1") == top and s.top_of("/x") is None
    assert s.exists(top) and not s.exists(f"{top}/nope")
    assert s.id_of(team) == inner.id and s.id_of(f"{top}/nope") is None
    assert s.name_of(inner.id) == team
    ep = agent_cgroup.child("ep-unwatched-child")
    assert s.path_of(ep.id) == ep.rel  # any cgroup by id, watched or not


SLEEPER = [sys.executable, "-c", "import sys; sys.stdin.read()"]


def test_agent_cgroups_finds_real_processes_at_any_depth(agent_cgroup, outside_cgroup, scopes):
    ep = agent_cgroup.child("ep1")
    deep = ep.child("deeper")
    procs = []
    try:
        procs = [agent_cgroup.popen(SLEEPER, stdin=subprocess.PIPE), ep.popen(SLEEPER, stdin=subprocess.PIPE),
                 deep.popen(SLEEPER, stdin=subprocess.PIPE), outside_cgroup.popen(SLEEPER, stdin=subprocess.PIPE)]
        s = scopes([str(agent_cgroup.path)])
        found = s.agent_cgroups()
        assert found == {procs[0].pid: agent_cgroup.id, procs[1].pid: ep.id, procs[2].pid: deep.id}
        assert s.agent_pids() == sorted(found)
        assert v2_cgroup_of(procs[2].pid) == deep.rel
        assert v2_cgroup_of(procs[3].pid) == outside_cgroup.rel
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(10)
    assert s.agent_cgroups() == {}


FORKER = r"""
import os, sys
pid = os.fork()
if pid == 0:
    sys.stdin.read(); os._exit(0)
print(pid, flush=True)
sys.stdin.read()
os.waitpid(pid, 0)
"""


def test_agent_family_gives_children_by_parent(agent_cgroup, scopes):
    p = agent_cgroup.popen([sys.executable, "-c", FORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        child = int(p.stdout.readline())
        s = scopes([str(agent_cgroup.path)])
        agents, children = s.agent_family()
        assert agents == sorted([p.pid, child])
        assert children[p.pid] == [child]
        assert children[os.getpid()] == [p.pid]
    finally:
        p.stdin.close()
        p.wait(10)


def test_v2_cgroup_of_a_gone_process():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(10)
    assert v2_cgroup_of(p.pid) is None
    assert v2_cgroup_of(os.getpid()) == open("/proc/self/cgroup").read().split("0::", 1)[1].split("\n")[0]
