"""Files the watcher acts on as root must not be changeable by other users (agentprobe/trust.py): real
files and directories with real modes and owners, made by root in a temporary directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from agentprobe.errors import AgentprobeError
from agentprobe.trust import UntrustedFile, check_trusted, untrusted_reason

REPO = Path(__file__).resolve().parent.parent
OTHER_UID = 4321  # a user that is not root (no such account is needed: chown takes a number)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="making files of other owners needs root")


@pytest.fixture
def etc(tmp_path):
    """A root-owned directory of mode 0755 under pytest's own (root-owned, 0700) directories."""
    d = tmp_path / "etc"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    assert untrusted_reason(d) is None  # the tree above is root's: what the tests below change is all that counts
    return d


def make(path: Path, mode: int = 0o644, uid: int = 0) -> Path:
    path.write_text("rules: []\n")
    os.chown(path, uid, 0)
    path.chmod(mode)
    return path


def test_a_root_owned_file_no_one_else_can_write_is_trusted(etc):
    assert untrusted_reason(make(etc / "rules.yaml", 0o644)) is None
    assert untrusted_reason(make(etc / "secret.yaml", 0o600)) is None
    assert untrusted_reason(make(etc / "exec.yaml", 0o755)) is None


@pytest.mark.parametrize("mode, who", [(0o664, "its group"), (0o620, "its group"), (0o646, "group and others"),
                                       (0o666, "group and others"), (0o602, "group and others")])
def test_a_file_others_can_write_is_refused_saying_who(etc, mode, who):
    f = make(etc / "rules.yaml", mode)
    assert untrusted_reason(f) == f"{f} is writable by {who}"


def test_a_file_of_another_owner_is_refused(etc):
    f = make(etc / "rules.yaml", 0o644, uid=OTHER_UID)
    assert untrusted_reason(f) == f"{f} is owned by uid {OTHER_UID}"


def test_a_directory_above_of_another_owner_is_refused(etc):
    d = etc / "home"
    d.mkdir(mode=0o755)
    os.chown(d, OTHER_UID, OTHER_UID)
    f = make(d / "rules.yaml", 0o644)  # root's file, but the user can rename it away and put their own there
    assert untrusted_reason(f) == f"{d} is owned by uid {OTHER_UID}"


@pytest.mark.parametrize("mode", [0o777, 0o757, 0o775])
def test_a_directory_above_others_can_write_is_refused_unless_sticky(etc, mode):
    d = etc / "shared"
    d.mkdir()
    d.chmod(mode)
    f = make(d / "rules.yaml", 0o644)
    # (0o775 is refused with the same words, though only the group can write there)
    assert untrusted_reason(f) == f"directory {d} is writable by others (and not sticky)"
    d.chmod(mode | 0o1000)  # sticky, like /tmp: others cannot replace root's file
    assert untrusted_reason(f) is None


def test_the_nearest_reason_is_given_first(etc):
    d = etc / "shared"
    d.mkdir()
    d.chmod(0o777)
    f = make(d / "rules.yaml", 0o666, uid=OTHER_UID)
    assert untrusted_reason(f) == f"{f} is owned by uid {OTHER_UID}"


def test_a_symlink_is_judged_by_the_file_it_leads_to(etc):
    mine = etc / "mine"
    mine.mkdir()
    os.chown(mine, OTHER_UID, OTHER_UID)
    theirs = make(mine / "rules.yaml", 0o644, uid=OTHER_UID)
    link = etc / "rules.yaml"
    link.symlink_to(theirs)
    assert untrusted_reason(link) == f"{theirs} is owned by uid {OTHER_UID}"


def test_a_symlink_in_a_directory_of_another_owner_is_refused(etc):
    trusted = make(etc / "rules.yaml", 0o644)
    home = etc / "home"
    home.mkdir(mode=0o755)
    os.chown(home, OTHER_UID, OTHER_UID)
    link = home / "rules.yaml"
    link.symlink_to(trusted)
    os.lchown(link, OTHER_UID, OTHER_UID)
    assert untrusted_reason(link) == f"{home} is owned by uid {OTHER_UID}"


def test_a_missing_file_is_left_to_whoever_reads_it(etc):
    assert untrusted_reason(etc / "absent.yaml") is None
    assert untrusted_reason(etc / "no" / "such" / "dir.yaml") is None


def test_check_trusted_refuses_the_first_untrusted_file_in_one_line(etc):
    good = make(etc / "a.yaml", 0o644)
    bad = make(etc / "b.yaml", 0o666)
    warned = []
    with pytest.raises(UntrustedFile) as e:
        check_trusted([good, bad], "rule file", False, warned.append)
    assert str(e.value) == (f"rule file {bad}: {bad} is writable by group and others; another user could change "
                            "what agentprobe does (chown root, chmod go-w; or --insecure-files to use it anyway)")
    assert isinstance(e.value, AgentprobeError) and e.value.exit_code == 1 and warned == []


def test_check_trusted_with_insist_warns_about_each_and_goes_on(etc):
    bad1 = make(etc / "a.yaml", 0o664)
    good = make(etc / "b.yaml", 0o644)
    bad2 = make(etc / "c.yaml", 0o644, uid=OTHER_UID)
    warned = []
    check_trusted([bad1, good, bad2], "config file", True, warned.append)
    assert warned == [f"agentprobe: warning: config file {bad1}: {bad1} is writable by its group "
                      "(used anyway: --insecure-files)",
                      f"agentprobe: warning: config file {bad2}: {bad2} is owned by uid {OTHER_UID} "
                      "(used anyway: --insecure-files)"]


def test_check_trusted_passes_trusted_files_silently(etc):
    warned = []
    check_trusted([make(etc / "a.yaml"), make(etc / "b.yaml", 0o600)], "rule file", False, warned.append)
    check_trusted([], "rule file", False, warned.append)
    assert warned == []


def test_check_trusted_checks_nothing_when_not_running_as_root():
    """A user's own watcher (no root) acts with the user's rights only: their own files are fine."""
    d = Path(tempfile.mkdtemp(prefix="agentprobe-trust-"))  # under /tmp, so that `nobody` can see the file
    try:
        d.chmod(0o755)
        f = make(d / "rules.yaml", 0o666, uid=OTHER_UID)
        code = ("import sys; from agentprobe.trust import check_trusted, untrusted_reason\n"
                f"print(untrusted_reason({str(f)!r}))\n"
                f"check_trusted([{str(f)!r}], 'rule file', False, print)\n"
                "print('checked')")

        def run(uid):
            return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                                  user=uid)

        as_nobody = run(65534)
        assert (as_nobody.returncode, as_nobody.stdout) == (0, f"{f} is owned by uid {OTHER_UID}\nchecked\n"), \
            as_nobody.stderr
        as_root = run(0)
        assert as_root.returncode == 1 and "agentprobe.trust.UntrustedFile: rule file" in as_root.stderr
    finally:
        shutil.rmtree(d)
