"""Hostile input, fuzzed with hypothesis: the stream reader, the rule loader and the terminal view
never fail with anything but their own clear error, and never let control characters through."""

from __future__ import annotations

import io

import msgpack
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentprobe import view
from agentprobe.rules import RuleError, load_ruleset
from agentprobe.stream import StreamError, encode, iter_stream

GOOD = b"".join(encode({"v": 1, "type": t, "ts": i, "seq": i, "proc": {"pid": i, "comm": "x"}})
                for i, t in enumerate(["start", "exec", "connect", "alert", "stop"]))


def read_all(data: bytes) -> list[dict]:
    out = []
    try:
        for rec in iter_stream(io.BytesIO(data), "fuzz"):
            out.append(rec)
    except StreamError:
        pass  # the one error a damaged stream may give, after every good record before it
    return out


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_random_bytes_are_records_or_one_stream_error(data):
    for rec in read_all(data):
        assert isinstance(rec, dict) and "type" in rec


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(GOOD) - 1), st.binary(min_size=1, max_size=8), st.booleans())
def test_damaged_streams_keep_the_records_before_the_damage(at, junk, cut):
    damaged = GOOD[:at] + (b"" if cut else junk + GOOD[at:])
    recs = read_all(damaged)
    whole = list(iter_stream(io.BytesIO(GOOD)))
    # every record that ends before the damage comes back unchanged
    ends = []
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(GOOD)
    for _ in whole:
        next(unpacker)
        ends.append(unpacker.tell())
    intact = sum(1 for e in ends if e <= at)
    assert recs[:intact] == whole[:intact]


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20) | st.sampled_from(
        ["rule", "list", "macro", "condition", "evt.type = exec", "items", "priority", "high", "count", "by"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["rule", "list", "macro", "desc", "condition", "output", "priority", "items", "append",
                         "enabled", "count", "sequence", "by", "within", "threshold", "action", "tags", "x"]),
        inner, max_size=5),
    max_leaves=20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(yaml_values)
def test_any_rule_file_is_loaded_or_refused_with_a_rule_error(tmp_path, doc):
    f = tmp_path / "fuzz.yaml"
    f.write_text(yaml.safe_dump(doc))
    try:
        load_ruleset([f])
    except RuleError as e:
        assert str(e) and "\n" not in str(e).strip()


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60), st.binary(max_size=40))
def test_the_terminal_view_lets_no_control_character_through(text, raw):
    hostile = text + raw.decode("latin-1") + "\x1b[2J\x1b]0;owned\x07\x9b31m"
    for rec in (
        {"type": "exec", "ts": 1, "proc": {"pid": 1, "ppid": 0, "comm": hostile}, "argv": [hostile, hostile],
         "filename": hostile},
        {"type": "connect", "ts": 1, "proc": {"comm": hostile}, "family": "unix", "path": hostile},
        {"type": "alert", "ts": 1, "proc": {}, "rule": hostile, "summary": hostile, "priority": hostile},
        {"type": "cgroup", "ts": 1, "change": "watched", "cgroup": {"path": hostile}},
        {"type": "verdict", "ts": 1, "cgroup": {"path": hostile}, "labels": {"k": hostile}, "rules": {hostile: 1}},
        {"type": hostile, "ts": 1, "x": hostile},
    ):
        line = view.line(rec)
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in line), repr(line)
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F
                   for c in view.verdict_line({"cgroup": {"path": hostile}, "labels": {"a": hostile}}))


# ---------------------------------------------------------------- no shell with event data
SUBPROCESS_CALLS = {"run", "Popen", "call", "check_call", "check_output"}
ALWAYS_A_SHELL = {("os", "system"), ("os", "popen"), ("subprocess", "getoutput"), ("subprocess", "getstatusoutput")}
SHELLS = {"sh", "bash", "dash", "/bin/sh", "/bin/bash", "/bin/dash", "/usr/bin/sh", "/usr/bin/bash"}
# `sh -c SCRIPT` where SCRIPT is fixed text of ours, the data travelling as separate arguments
FIXED_SCRIPTS = {("client.py", "self.JOIN"),  # 'echo $$ > "$0" && exec "$@"': the tool call is "$@"
                 ("demo.py", "script")}        # the demo's own scripted agent, no event data reaches it
# the only modules that start processes; the watcher's pipeline (decode, enrich, rules, respond, sinks) starts none
MAY_START_PROCESSES = {"client.py", "demo.py", "lab.py", "loader.py"}


def test_no_shell_is_ever_spawned_with_data():
    """A static check over the whole package: processes are started with argument lists, never
    shell=True, os.system or os.popen, and `sh -c` only ever runs a fixed script of ours."""
    import ast
    from pathlib import Path

    import agentprobe

    problems = []
    package = Path(agentprobe.__file__).parent
    for f in sorted(package.rglob("*.py")):
        tree = ast.parse(f.read_text(), str(f))

        def where(node, f=f):
            return f"{f.relative_to(package)}:{node.lineno}"

        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if "subprocess" in names and f.name not in MAY_START_PROCESSES:
                    problems.append(f"{where(node)}: imports subprocess")
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            name = node.func.attr
            if (owner, name) in ALWAYS_A_SHELL or (owner == "os" and name.startswith(("spawn", "exec"))):
                problems.append(f"{where(node)}: {owner}.{name}")
            if owner != "subprocess" or name not in SUBPROCESS_CALLS:
                continue
            for kw in node.keywords:
                if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    problems.append(f"{where(node)}: shell={ast.unparse(kw.value)}")
            argv = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "args"), None)
            if isinstance(argv, (ast.Constant, ast.JoinedStr, ast.BinOp)):
                problems.append(f"{where(node)}: a command line as one string: {ast.unparse(argv)}")
            if isinstance(argv, (ast.List, ast.Tuple)) and len(argv.elts) >= 3:
                first, flag, script = argv.elts[:3]
                if (isinstance(first, ast.Constant) and first.value in SHELLS and isinstance(flag, ast.Constant)
                        and flag.value == "-c" and not isinstance(script, ast.Constant)
                        and (f.name, ast.unparse(script)) not in FIXED_SCRIPTS):
                    problems.append(f"{where(node)}: sh -c with a script built from data: {ast.unparse(script)}")
    assert problems == []


def test_a_name_that_is_not_utf8_is_escaped_in_the_stream_and_the_view_not_a_skipped_record():
    """A cgroup made with a byte that is not UTF-8 comes back from the file system as a surrogate
    (os.fsdecode); msgpack refuses those, which skipped every record of that cgroup: an agent could
    hide in one. The stream carries it as \\xNN (as argv), the view likewise."""
    import os

    name = os.fsdecode(b"/agents/ep-\x1b[2J\xff")
    data = encode({"type": "exec", "cgroup": {"path": name}, "argv": [name], name: 1})
    assert next(iter_stream(io.BytesIO(data))) == {"type": "exec", "cgroup": {"path": "/agents/ep-\x1b[2J\\xff"},
                                                   "argv": ["/agents/ep-\x1b[2J\\xff"], "/agents/ep-\x1b[2J\\xff": 1}
    line = view.line({"type": "cgroup", "ts": 1, "change": "watched", "cgroup": {"path": name}})
    assert "/agents/ep-\\x1b[2J\\xff" in line
    line.encode("utf-8")  # printable on any terminal
