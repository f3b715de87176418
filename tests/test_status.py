"""status.py: the status file `agentprobe status` reads. Written atomically with mode 0644 whatever
the umask, never through a symlink, with outputs stripped of credentials, rewritten at each freeze."""

from __future__ import annotations

import json
import os
import stat

import pytest

from agentprobe.status import STATUS_FILE_MODE, StatusFile, without_credentials, write_status_file


@pytest.fixture
def umask():
    old = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o077, 0o000, 0o022])
def test_mode_is_0644_whatever_the_umask(tmp_path, umask, mask):
    umask(mask)
    path = tmp_path / "watcher-1.json"
    write_status_file(path, b"{}")
    assert stat.S_IMODE(path.stat().st_mode) == STATUS_FILE_MODE == 0o644
    assert path.read_bytes() == b"{}"


def test_a_rewrite_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "watcher-1.json"
    write_status_file(path, b"old")
    reader = open(path, "rb")  # a reader of the old file keeps reading the old file, whole
    inode = path.stat().st_ino
    write_status_file(path, b"new")
    assert path.read_bytes() == b"new" and path.stat().st_ino != inode
    assert reader.read() == b"old"
    reader.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["watcher-1.json"]


def test_a_temporary_left_by_a_killed_writer_is_replaced(tmp_path):
    path = tmp_path / "watcher-1.json"
    (tmp_path / "watcher-1.json.tmp").write_bytes(b"half a")
    write_status_file(path, b"whole")
    assert path.read_bytes() == b"whole"
    assert not (tmp_path / "watcher-1.json.tmp").exists()


def test_never_through_a_symlink(tmp_path):
    """A symlink planted at the temporary name is removed, its target untouched."""
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    os.chmod(target, 0o600)
    (tmp_path / "watcher-1.json.tmp").symlink_to(target)
    write_status_file(tmp_path / "watcher-1.json", b"status")
    assert target.read_bytes() == b"precious" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert (tmp_path / "watcher-1.json").read_bytes() == b"status"
    assert not (tmp_path / "watcher-1.json").is_symlink()


@pytest.mark.parametrize("spec, want", [
    ("nats://user:pass@host:4222", "nats://host:4222"),
    ("nats://token@host:4222/subj", "nats://host:4222/subj"),
    ("nats://host:4222", "nats://host:4222"),
    ("tcp://a:b@127.0.0.1:9000?x=@y", "tcp://127.0.0.1:9000?x=@y"),
    ("/var/log/agentprobe.msgpack", "/var/log/agentprobe.msgpack"),
    ("nats://host:4222/path@at", "nats://host:4222/path@at"),  # an @ after the host is not a credential
    ("-", "-"),
])
def test_without_credentials(spec, want):
    assert without_credentials(spec) == want


def read_status(s: StatusFile) -> dict:
    assert s.path is not None and s.path.name == f"watcher-{os.getpid()}.json"
    return json.loads(s.path.read_text())


def test_set_watched_writes_what_is_watched_and_the_outputs_without_credentials(tmp_path, umask):
    umask(0o077)
    d = tmp_path / "run" / "agentprobe"
    s = StatusFile(str(d), ["nats://u:secret@n:4222", "/tmp/out.msgpack"])
    s.started = 17
    s.set_watched("/sys/fs/cgroup", [{"id": 5, "path": "/agents"}])
    st = read_status(s)
    assert st == {"pid": os.getpid(), "started": 17, "cgroup_root": "/sys/fs/cgroup",
                  "watched": [{"id": 5, "path": "/agents"}], "frozen": {},
                  "outputs": ["nats://n:4222", "/tmp/out.msgpack"]}
    assert "secret" not in s.path.read_text()
    assert stat.S_IMODE(s.path.stat().st_mode) == 0o644


def test_the_status_directory_is_reachable_by_any_user_whatever_the_umask(tmp_path, umask):
    umask(0o077)
    d = tmp_path / "run" / "agentprobe"
    StatusFile(str(d), []).set_watched("/r", [])
    assert stat.S_IMODE(d.stat().st_mode) == 0o755


def test_the_directories_made_on_the_way_are_reachable_by_any_user_too(tmp_path, umask):
    umask(0o077)
    os.chmod(tmp_path, 0o755)
    d = tmp_path / "run" / "agentprobe"
    StatusFile(str(d), []).set_watched("/r", [])
    assert stat.S_IMODE(d.stat().st_mode) == 0o755
    assert stat.S_IMODE(d.parent.stat().st_mode) & 0o005 == 0o005


def test_an_existing_status_directory_keeps_its_mode(tmp_path, umask):
    """Only a directory the watcher makes gets 0755; one made by the administrator stays as it is."""
    d = tmp_path / "st"
    d.mkdir(mode=0o750)
    os.chmod(d, 0o750)
    StatusFile(str(d), []).set_watched("/r", [])
    assert stat.S_IMODE(d.stat().st_mode) == 0o750


def test_a_freeze_is_recorded_from_the_response(tmp_path):
    s = StatusFile(str(tmp_path), [])
    s.set_watched("/r", [])
    for r in ({"type": "alert", "rule": "x", "cgroup": {"path": "/agents/a"}},
              {"type": "response", "outcome": "dry_run", "rule": "x", "cgroup": {"path": "/agents/b"}},
              {"type": "response", "outcome": "failed", "rule": "x", "cgroup": {"path": "/agents/c"}}):
        assert s.process(r) == []
    assert read_status(s)["frozen"] == {}
    s.process({"type": "response", "outcome": "frozen", "rule": "miner", "ts": 99, "alert_seq": 4,
               "cgroup": {"path": "/agents/ep1"}})
    assert read_status(s)["frozen"] == {"/agents/ep1": {"rule": "miner", "ts": 99, "alert_seq": 4}}


def test_a_status_directory_that_cannot_be_made_is_no_error(tmp_path):
    (tmp_path / "file").write_text("")
    s = StatusFile(str(tmp_path / "file" / "run"), [])
    s.set_watched("/r", [])
    assert s.path is None
    s.remove()  # nothing written: nothing to remove


def test_remove(tmp_path):
    s = StatusFile(str(tmp_path), [])
    s.set_watched("/r", [])
    assert s.path.exists()
    s.remove()
    assert not s.path.exists()
    s.remove()  # twice: no error
