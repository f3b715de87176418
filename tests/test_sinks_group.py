"""The unix-socket output's permissions: owner only, or a named group with ?group=NAME."""

from __future__ import annotations

import grp
import os
import stat

import pytest

from agentprobe.sinks import SinkError, check_output, open_sink


def test_unix_socket_is_owner_only_by_default(tmp_path):
    sink = open_sink(f"unix:{tmp_path / 'a.sock'}")
    try:
        st = os.stat(tmp_path / "a.sock")
        assert stat.S_ISSOCK(st.st_mode) and st.st_mode & 0o777 == 0o600
    finally:
        sink.close()


def test_unix_socket_for_a_group(tmp_path):
    group = grp.getgrgid(65534).gr_name  # nogroup
    sink = open_sink(f"unix:{tmp_path / 'b.sock'}?group={group}")
    try:
        st = os.stat(tmp_path / "b.sock")
        assert st.st_mode & 0o777 == 0o660 and st.st_gid == 65534
    finally:
        sink.close()


@pytest.mark.parametrize("spec, message", [
    ("unix:{d}/c.sock?group=no-such-group-here", "output socket group 'no-such-group-here': no such group"),
    ("unix:{d}/c.sock?mode=777", "the only option of unix: is ?group=NAME"),
])
def test_bad_socket_options_are_one_clear_error(tmp_path, spec, message):
    with pytest.raises(SinkError, match=message.replace("?", r"\?")):
        check_output(spec.format(d=tmp_path))
