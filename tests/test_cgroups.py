"""cgroup layout detection, globs and container ids (pure logic)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentprobe.cgroups import (
    CgroupError,
    CgroupSet,
    container_of,
    episode_of,
    find_v2_mount,
    glob_regex,
    innermost_top,
    path_inside,
)


def mounts(tmp_path, text) -> str:
    p = tmp_path / "mounts"
    p.write_text(text)
    return str(p)


def test_pure_v2(tmp_path):
    m = mounts(tmp_path, "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n")
    assert find_v2_mount(m) == Path("/sys/fs/cgroup")


def test_hybrid(tmp_path):
    m = mounts(tmp_path, "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n"
                         "cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n"
                         "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n")
    assert find_v2_mount(m) == Path("/sys/fs/cgroup/unified")


def test_no_v2(tmp_path):
    m = mounts(tmp_path, "cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n")
    with pytest.raises(CgroupError, match="no cgroup v2 hierarchy"):
        find_v2_mount(m)


@pytest.mark.parametrize("pattern,path,match", [
    ("agents/*", "agents/ep1", True),
    ("agents/*", "agents/ep1/sub", False),
    ("agents/*", "agentsX/ep1", False),
    ("kubepods.slice/**/*agent*", "kubepods.slice/kubepods-pod1.slice/cri-agent-1.scope", True),
    ("kubepods.slice/**/*agent*", "kubepods.slice/my-agent", True),
    ("kubepods.slice/**/*agent*", "kubepodsXslice/my-agent", False),
    ("ep?", "ep1", True),
    ("ep?", "ep12", False),
])
def test_glob_regex(pattern, path, match):
    assert bool(glob_regex(pattern).fullmatch(path)) is match


def test_scan_paths_and_globs(tmp_path):
    root = tmp_path
    for d in ("agents/ep1", "agents/ep2/inner", "other"):
        (root / d).mkdir(parents=True)
        (root / d / "cgroup.procs").write_text("")
    cs = CgroupSet(root, ["other"], ["agents/*"])
    found = cs.scan()
    assert sorted((w.path, w.level) for w in found.values()) == [("/agents/ep1", 2), ("/agents/ep2", 2),
                                                                  ("/other", 1)]
    (root / "agents/ep3").mkdir()
    assert "/agents/ep3" in {w.path for w in cs.scan().values()}  # re-scan picks up new ones
    inner_id = (root / "agents/ep2/inner").stat().st_ino
    assert cs.name_of(inner_id, found) == "/agents/ep2/inner"


def test_matches_glob(tmp_path):
    cs = CgroupSet(tmp_path, [], ["agents/ep-*", "kubepods.slice/**/*agent*"])
    assert cs.matches_glob("/agents/ep-3") and cs.matches_glob("agents/ep-3")
    assert not cs.matches_glob("/agents/ep-3/inner") and not cs.matches_glob("/agents/other")
    assert cs.matches_glob("/kubepods.slice/kubepods-pod1.slice/my-agent-1")
    assert not CgroupSet(tmp_path, ["agents"]).matches_glob("/agents")


def test_check_refuses_missing_and_root(tmp_path):
    with pytest.raises(CgroupError, match="does not exist"):
        CgroupSet(tmp_path, ["nope"]).check()
    (tmp_path / "cgroup.procs").write_text("")
    with pytest.raises(CgroupError, match="root cgroup"):
        CgroupSet(tmp_path, [str(tmp_path)]).check()
    with pytest.raises(CgroupError, match="not under the cgroup v2 mount"):
        CgroupSet(tmp_path / "x", ["/etc"]).check()


H = "0123456789abcdef" * 4


@pytest.mark.parametrize("path,expect", [
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1a2b3c4d_1111_2222_3333_444455556666.slice/"
     f"cri-containerd-{H}.scope",
     {"runtime": "cri-containerd", "id": H, "pod_uid": "1a2b3c4d-1111-2222-3333-444455556666"}),
    (f"/kubepods.slice/kubepods-pod1a2b3c4d_1111_2222_3333_444455556666.slice/crio-{H}.scope",
     {"runtime": "crio", "id": H, "pod_uid": "1a2b3c4d-1111-2222-3333-444455556666"}),
    (f"/system.slice/docker-{H}.scope", {"runtime": "docker", "id": H}),
    (f"/docker/{H}", {"runtime": "docker", "id": H}),
    (f"/kubepods/burstable/pod1a2b3c4d-1111-2222-3333-444455556666/{H}",
     {"runtime": "containerd", "id": H, "pod_uid": "1a2b3c4d-1111-2222-3333-444455556666"}),
    ("/agents/ep1", None),
])
def test_container_of(path, expect):
    assert container_of(path) == expect


@pytest.mark.kernel
def test_name_of_a_cgroup_comes_from_the_kernel_by_its_id(cgroup_root, agent_cgroup, outside_cgroup):
    """On the real cgroup v2 mount an id is resolved by one file-handle open, not a walk of the
    watched subtrees (which grew with every episode); ids outside the watched subtrees stay unnamed."""
    from agentprobe.cgroups import path_by_handle, path_of_id

    deep = agent_cgroup.child("ep-1").child("step-2")
    cid = deep.path.stat().st_ino
    assert path_by_handle(cgroup_root, cid) == deep.rel
    assert path_by_handle(cgroup_root, 1) == "/"
    cs = CgroupSet(cgroup_root, [str(agent_cgroup.path)])
    found = cs.scan()
    assert cs.name_of(cid, found) == deep.rel
    assert cs.name_of(outside_cgroup.path.stat().st_ino, found) is None
    assert path_of_id(cgroup_root, outside_cgroup.path.stat().st_ino) == outside_cgroup.rel
    gone = agent_cgroup.child("ep-gone")
    gone_id = gone.path.stat().st_ino
    gone.path.rmdir()
    assert path_by_handle(cgroup_root, gone_id) is None and cs.name_of(gone_id, found) is None


def test_where_the_mount_gives_no_handles_the_subtrees_are_walked(tmp_path):
    from agentprobe.cgroups import path_by_handle

    (tmp_path / "agents/ep1/x").mkdir(parents=True)
    with pytest.raises(OSError):
        path_by_handle(tmp_path, (tmp_path / "agents/ep1/x").stat().st_ino)
    cs = CgroupSet(tmp_path, ["agents"])
    assert cs.name_of((tmp_path / "agents/ep1/x").stat().st_ino, cs.scan()) == "/agents/ep1/x"


def test_paths_inside_watched_cgroups_and_their_episodes():
    assert path_inside("/agents", "/agents") and path_inside("/agents/ep-1/x", "/agents/")
    assert not path_inside("/agents-2/ep", "/agents") and not path_inside("/", "/agents")
    tops = ["/agents", "/agents/team-a"]
    assert innermost_top("/agents/team-a/ep-3/job", tops) == "/agents/team-a"
    assert innermost_top("/agents/ep-1", tops) == "/agents" and innermost_top("/other", tops) is None
    assert episode_of("/agents/team-a/ep-3/job", tops) == "/agents/team-a/ep-3"
    assert episode_of("/agents", tops) == "/agents" and episode_of("/other/x", tops) == "/other/x"
