"""The msgpack stream: round trip, damaged streams, and `agentprobe read`."""

from __future__ import annotations

import io
import json
import subprocess

import msgpack
import pytest

from agentprobe.stream import StreamError, encode, iter_stream, read_records

RECORDS = [
    {"v": 1, "type": "start", "seq": 0, "ts": 1, "ktime": 1, "node": "n", "cgroups": [{"id": 5, "path": "/a"}]},
    {"v": 1, "type": "exec", "seq": 1, "ts": 2, "ktime": 2, "node": "n", "cgroup": {"id": 5, "path": "/a"},
     "proc": {"pid": 7, "ppid": 1, "comm": "sh"}, "argv": ["sh", "-c", "ünïcode \x1b[2J"], "filename": "/bin/sh"},
    {"v": 1, "type": "stop", "seq": 2, "ts": 3, "ktime": 3, "node": "n", "events_total": 3, "lost_total": 0},
]


def stream_bytes(recs=RECORDS) -> bytes:
    return b"".join(encode(r) for r in recs)


def test_round_trip():
    assert list(read_records(stream_bytes())) == RECORDS


def test_round_trip_in_small_chunks():
    assert list(iter_stream(io.BytesIO(stream_bytes()), chunk=3)) == RECORDS


def test_truncated_stream_yields_good_records_then_error():
    data = stream_bytes()[:-5]
    got = []
    with pytest.raises(StreamError, match=r"truncated record at byte \d+ after 2 good records") as ei:
        for r in read_records(data):
            got.append(r)
    assert got == RECORDS[:2] and ei.value.records == 2


def test_corrupt_stream():
    data = stream_bytes(RECORDS[:1]) + b"\xc1garbage" + stream_bytes(RECORDS[1:])
    got = []
    with pytest.raises(StreamError, match="corrupt record at byte") as ei:
        for r in read_records(data):
            got.append(r)
    assert got == RECORDS[:1] and ei.value.offset == len(stream_bytes(RECORDS[:1]))


def test_not_a_record():
    data = stream_bytes(RECORDS[:1]) + msgpack.packb([1, 2, 3])
    with pytest.raises(StreamError, match="not an agentprobe record"):
        list(read_records(data))


def _read_cli(agentprobe_cmd, data, *args):
    return subprocess.run([*agentprobe_cmd, "read", *args, "-"], input=data, capture_output=True)


def test_read_cli_lines_and_json(agentprobe_cmd):
    r = _read_cli(agentprobe_cmd, stream_bytes())
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0].split()[:3] == ["TIME", "TYPE", "PID"]
    assert "EXEC" in lines[2] and "ünïcode" in lines[2]
    assert "\x1b" not in r.stdout.decode()  # escape sequences never reach the terminal
    r = _read_cli(agentprobe_cmd, stream_bytes(), "--json", "--type", "exec")
    assert [json.loads(x) for x in r.stdout.decode().splitlines()] == [RECORDS[1]]


def test_read_cli_on_truncated_stream(agentprobe_cmd):
    r = _read_cli(agentprobe_cmd, stream_bytes()[:-4], "--json")
    assert r.returncode == 1
    assert [json.loads(x)["type"] for x in r.stdout.decode().splitlines()] == ["start", "exec"]
    err = r.stderr.decode().strip().splitlines()
    assert len(err) == 1 and err[0].startswith("agentprobe: <stdin>: truncated record at byte")


def test_read_cli_missing_file(agentprobe_cmd, tmp_path):
    r = subprocess.run([*agentprobe_cmd, "read", str(tmp_path / "nope")], capture_output=True, text=True)
    assert r.returncode == 1
    missing = tmp_path / "nope"
    assert r.stderr.strip().splitlines()[-1] == f"agentprobe: cannot read {missing}: No such file or directory"
