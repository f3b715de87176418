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
    ("unix:{d}/c.sock?mode=777", "the options of unix: are ?group=NAME&buffer=BYTES"),
    ("unix:{d}/c.sock?buffer=100", "buffer= takes a number of bytes, at least 65536"),
    ("tcp:127.0.0.1:1?group=staff", "the options of tcp: are ?buffer=BYTES"),
])
def test_bad_socket_options_are_one_clear_error(tmp_path, spec, message):
    with pytest.raises(SinkError, match=message.replace("?", r"\?")):
        check_output(spec.format(d=tmp_path))


def test_the_socket_never_exists_with_a_wider_mode(tmp_path, monkeypatch):
    """Bound under a restrictive umask: even with umask 0, the socket file is 0600 from the first
    instant (a chmod after bind would leave a window in which anyone could connect)."""
    import agentprobe.sinks as sinks

    seen = []
    real_chmod, real_chown = os.chmod, os.chown

    def spy(real):
        def call(path, *a, **kw):
            seen.append(os.stat(path).st_mode & 0o777)  # the mode just before we change anything
            return real(path, *a, **kw)
        return call

    monkeypatch.setattr(sinks.os, "chmod", spy(real_chmod))
    monkeypatch.setattr(sinks.os, "chown", spy(real_chown))
    old = os.umask(0)
    try:
        plain = open_sink(f"unix:{tmp_path / 'p.sock'}")
        shared = open_sink(f"unix:{tmp_path / 'g.sock'}?group={grp.getgrgid(65534).gr_name}")
        assert os.umask(0) == 0  # the watcher's umask is left as it was
    finally:
        os.umask(old)
    try:
        assert all(mode == 0o600 for mode in seen), seen
        assert os.stat(tmp_path / "p.sock").st_mode & 0o777 == 0o600
        assert os.stat(tmp_path / "g.sock").st_mode & 0o777 == 0o660
    finally:
        plain.close()
        shared.close()
