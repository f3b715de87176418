"""Inline code vs a program's own arguments, per interpreter's option syntax."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentprobe.rules.inline import split_inline_code


@pytest.mark.parametrize("argv, code, rest", [
    (["bash", "-c", "echo hi > f", "arg0", "a1"], ["echo hi > f"], ["-c", "arg0", "a1"]),
    (["/bin/bash", "-ec", "make"], ["make"], ["-ec"]),
    (["bash", "-lc", "make"], ["make"], ["-lc"]),
    (["sh", "-o", "pipefail", "-c", "a | b"], ["a | b"], ["-o", "pipefail", "-c"]),
    (["bash", "--rcfile", "/x", "-c", "code"], ["code"], ["--rcfile", "/x", "-c"]),
    (["bash", "-c"], [], ["-c"]),                                   # no code given
    (["bash", "script.sh", "-c", "x"], [], ["script.sh", "-c", "x"]),  # a script's own -c
    (["bash", "-i"], [], ["-i"]),
    (["busybox", "sh", "-c", "code"], ["code"], ["-c"]),
    (["python3", "-c", "print(1)", "a"], ["print(1)"], ["a"]),
    (["python3", "-cprint(1)", "a"], ["print(1)"], ["a"]),
    (["python3.11", "-W", "ignore", "-c", "code"], ["code"], ["-W", "ignore"]),
    (["python3", "-m", "http.server", "-b", "0.0.0.0"], [], ["-m", "http.server", "-b", "0.0.0.0"]),
    (["python3", "m.py", "-c", "x"], [], ["m.py", "-c", "x"]),       # the script's own arguments
    (["perl", "-e", "a", "-E", "b", "arg"], ["a", "b"], ["-e", "-E", "arg"]),
    (["perl", "-ne", "print", "f"], ["print"], ["-ne", "f"]),       # e in a cluster takes the next argument
    (["perl", "-lane", "print $F[0]", "f"], ["print $F[0]"], ["-lane", "f"]),
    (["perl", "-eprint 1"], ["print 1"], ["-e"]),
    (["perl", "-pi.bak", "-e", "s/a/b/", "f"], ["s/a/b/"], ["-pi.bak", "-e", "f"]),
    (["perl", "-I", "lib", "-e", "x"], ["x"], ["-I", "lib", "-e"]),
    (["perl", "script.pl", "-e", "x"], [], ["script.pl", "-e", "x"]),
    (["ruby", "-e", "puts 1"], ["puts 1"], []),
    (["node", "-e", "code", "x"], ["code"], ["x"]),
    (["node", "--eval=code"], ["code"], []),
    (["node", "-r", "dotenv/config", "app.js", "-e", "x"], [], ["-r", "dotenv/config", "app.js", "-e", "x"]),
    (["php", "-r", "echo 1;"], ["echo 1;"], []),
    (["lua5.4", "-e", "print(1)", "s.lua"], ["print(1)"], ["s.lua"]),
    (["awk", "-F:", "{print $1}", "/etc/passwd"], ["{print $1}"], ["-F:", "/etc/passwd"]),
    (["gawk", "-f", "prog.awk", "data"], [], ["-f", "prog.awk", "data"]),
    (["/tmp/x", "-c", "cfg", "-o", "stratum+tcp://p:3333"], [], ["-c", "cfg", "-o", "stratum+tcp://p:3333"]),
    ([], [], []),
])
def test_split(argv, code, rest):
    assert split_inline_code(argv) == (code, rest)


def test_an_interpreter_known_by_its_exe_or_comm_not_only_argv0():
    assert split_inline_code(["x", "-c", "code"], ("bash",)) == (["code"], ["-c"])
    assert split_inline_code(["x", "-c", "code"], ("python3.11",)) == (["code"], [])
    assert split_inline_code(["x", "-c", "code"], ("xmrig",)) == ([], ["-c", "code"])


@given(st.lists(st.text(max_size=40), max_size=12), st.lists(st.sampled_from(
    ["bash", "sh", "python3", "perl", "node", "ruby", "php", "lua", "awk", "busybox", "x"]), max_size=2))
@settings(max_examples=400, deadline=None)
def test_any_argv_splits_without_an_exception_and_loses_nothing(argv, names):
    code, rest = split_inline_code(argv, tuple(names))
    # every argument is code or the program's own (an option cluster that carried attached code aside)
    assert len(code) + len(rest) <= max(0, len(argv) - 1) + 1
    assert all(isinstance(x, str) for x in code + rest)
