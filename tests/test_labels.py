"""Labels: bounds, escaping, sources (cgroup attributes, label files, environment), the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from agentprobe.labels import (
    MAX_LABELS,
    MAX_VALUE,
    CgroupLabels,
    LabelError,
    check_labels,
    clean_labels,
    clean_value,
    env_labels,
    file_labels,
    merge_labels,
    parse_assignments,
    set_cgroup_labels,
)


def test_values_are_escaped_and_bounded():
    assert clean_value(b"ep-1") == "ep-1"
    assert clean_value(b"\x1b[2Jx\xff\\") == "\\x1b[2Jx\\\\xff\\\\"
    assert clean_value("\u009b31m") == "\\x9b31m"  # C1 control too
    assert len(clean_value("v" * 10_000)) == MAX_VALUE


def test_keys_and_counts_are_bounded():
    many = {f"k{i}": "v" for i in range(40)}
    assert len(clean_labels(many)) == MAX_LABELS
    assert clean_labels({"ok": "1", "bad key": "2", "x" * 65: "3", "n": {"nested": 1}}) == {"ok": "1"}
    with pytest.raises(LabelError):
        check_labels({"bad key": "1"})
    with pytest.raises(LabelError):
        check_labels({"k": "v" * (MAX_VALUE + 1)})
    assert parse_assignments(["episode=17", "tool_call="]) == {"episode": "17", "tool_call": None}
    for bad in (["noequals"], ["sp ace=1"], [f"k={'v' * 300}"]):
        with pytest.raises(LabelError):
            parse_assignments(bad)


def test_label_files_are_read_defensively(tmp_path):
    f = tmp_path / "42.json"
    f.write_text(json.dumps({"episode": "42", "bad key": "x"}))
    assert file_labels(f) == {"episode": "42"}
    f.write_bytes(b"\xff\xfe not json")
    assert file_labels(f) == {}
    f.write_text("[1, 2]")
    assert file_labels(f) == {}
    f.write_text(json.dumps({"k": "v" * 100_000}))  # larger than a label file may be
    assert file_labels(f) == {}
    assert file_labels(tmp_path / "missing.json") == {}


def test_environment_labels_of_a_real_process():
    p = subprocess.Popen([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(5)"],
                         env={"EPISODE_ID": "ep-\x1b9", "OTHER": "x", "TOOL_CALL_ID": "3"}, stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"ready\n"  # exec'd: its own environment, not its parent's
        assert env_labels(p.pid, ("EPISODE_ID", "TOOL_CALL_ID", "MISSING")) == {
            "EPISODE_ID": "ep-\\x1b9", "TOOL_CALL_ID": "3"}
    finally:
        p.kill()
        p.wait()
    assert env_labels(p.pid, ("EPISODE_ID",)) is None  # gone


@pytest.mark.kernel
def test_cgroup_labels_nearest_wins_and_files(agent_cgroup, tmp_path):
    inner = agent_cgroup.child("ep-1")
    set_cgroup_labels(agent_cgroup.path, {"site": "a", "episode": "outer"})
    set_cgroup_labels(inner.path, {"episode": "1"})
    (tmp_path / f"{inner.id}.json").write_text(json.dumps({"trajectory": "t9"}))
    labels = CgroupLabels(_root(), str(tmp_path), ttl=0)
    assert labels.of(inner.id, inner.rel, agent_cgroup.rel) == {"site": "a", "episode": "1", "trajectory": "t9"}
    set_cgroup_labels(inner.path, {"episode": None})
    assert labels.of(inner.id, inner.rel, agent_cgroup.rel)["episode"] == "outer"


def _root():
    from agentprobe.cgroups import find_v2_mount

    return find_v2_mount()


@pytest.mark.kernel
def test_label_cli(agent_cgroup, agentprobe_cmd):
    r = subprocess.run([*agentprobe_cmd, "label", str(agent_cgroup.path), "episode=17", "policy=p"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.getxattr(agent_cgroup.path, "user.agentprobe.episode") == b"17"
    r = subprocess.run([*agentprobe_cmd, "label", str(agent_cgroup.path), "bad key=1"], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "bad label" in r.stderr
    r = subprocess.run([*agentprobe_cmd, "label", "/tmp", "a=1"], capture_output=True, text=True)
    assert r.returncode == 1 and "is not a cgroup" in r.stderr


def test_merged_labels_are_bounded_and_the_top_wins():
    base = {f"b{i}": str(i) for i in range(16)}
    top = {"b3": "top", **{f"t{i}": "t" for i in range(5)}}
    got = merge_labels(base, top)
    assert len(got) == MAX_LABELS
    assert got == {**{f"b{i}": str(i) for i in range(11) if i != 3}, "b3": "top",
                   **{f"t{i}": "t" for i in range(5)}} and list(got)[3] == "b3"  # its place kept
    assert merge_labels({}, top) == top and merge_labels(base, {}) == base
