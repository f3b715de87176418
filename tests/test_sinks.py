"""Outputs whose reader stalls or goes away: counted in records, never a blocked loop."""

from __future__ import annotations

import io
import os
import time

import msgpack
import pytest

from agentprobe.sinks import FileSink, StdoutSink, _Records
from agentprobe.stream import read_records


def test_records_track_partial_writes():
    q = _Records()
    for data in (b"aaaa", b"bb", b"cccccc"):
        q.add(data)
    assert q.whole(5) == 4 and q.whole(6) == 6 and q.whole(3) == 0
    q.consumed(5)  # aaaa and one byte of bb
    assert bytes(q.buf) == b"bcccccc" and list(q.lens) == [2, 6] and q.head == 1
    assert q.whole(1) == 1 and q.whole(7) == 7  # the rest of bb ends a record
    q.consumed(1)
    assert list(q.lens) == [6] and q.head == 0
    assert q.clear() == 1 and not q and not q.lens


@pytest.fixture
def stdout_pipe():
    r, w = os.pipe()
    try:
        yield r, w
    finally:
        os.set_blocking(w, True)
        for fd in (r, w):
            try:
                os.close(fd)
            except OSError:
                pass


def record(i: int) -> bytes:
    return msgpack.packb({"type": "exec", "n": i, "pad": "x" * 1000})


def test_a_stalled_stdout_reader_costs_records_not_the_loop(stdout_pipe):
    r, w = stdout_pipe
    sink = StdoutSink(limit=256 * 1024, out=io.FileIO(w, "w", closefd=False))
    t0 = time.monotonic()
    for i in range(2000):  # about 2 MB into a 64 KiB pipe that nobody reads
        sink.write(record(i))
        sink.flush()
    assert time.monotonic() - t0 < 2.0  # never waited for the reader
    assert sink.dropped > 0 and sink.written + sink.dropped == 2000
    assert sink.unwritten() > 0
    os.set_blocking(r, False)
    got = bytearray()
    while True:  # the reader comes back: what was queued arrives, whole records in order
        try:
            chunk = os.read(r, 1 << 16)
        except BlockingIOError:
            sink.flush()
            if not sink.unwritten():
                try:
                    got += os.read(r, 1 << 16)
                except BlockingIOError:
                    pass
                break
            continue
        got += chunk
    recs = list(read_records(bytes(got)))
    assert len(recs) == sink.written
    assert [x["n"] for x in recs] == list(range(len(recs)))  # the first ones; the later ones were dropped
    sink.close(grace_s=0.1)
    assert os.get_blocking(w)  # the descriptor is left as it was found


def test_a_stdout_reader_that_went_away_is_counted(stdout_pipe):
    r, w = stdout_pipe
    sink = StdoutSink(limit=1 << 20, out=io.FileIO(w, "w", closefd=False))
    os.close(r)
    for i in range(10):
        sink.write(record(i))
    sink.flush()  # EPIPE (Python ignores SIGPIPE)
    sink.write(record(10))
    sink.close(grace_s=0.1)
    assert sink.written == 0 and sink.dropped == 11


def test_stdout_close_waits_a_little_for_a_slow_reader(stdout_pipe):
    r, w = stdout_pipe
    sink = StdoutSink(limit=1 << 20, out=io.FileIO(w, "w", closefd=False))
    for i in range(200):
        sink.write(record(i))
    sink.flush()
    import threading

    got = bytearray()

    def drain():
        time.sleep(0.2)
        while True:
            chunk = os.read(r, 1 << 16)
            if not chunk:
                return
            got.extend(chunk)
            if len(got) >= sum(len(record(i)) for i in range(200)):
                return

    t = threading.Thread(target=drain)
    t.start()
    sink.close(grace_s=5.0)
    t.join(5)
    assert sink.dropped == 0 and [x["n"] for x in read_records(bytes(got))] == list(range(200))


def test_file_sink_keeps_whole_records_when_the_write_is_short(tmp_path, monkeypatch):
    sink = FileSink(str(tmp_path / "s.msgpack"))
    real_write = os.write
    calls = []

    def short_write(fd, data):  # the disk takes a record and a half, then is full
        if not calls:
            calls.append(1)
            return real_write(fd, bytes(data[: len(record(0)) + 100]))
        raise OSError(28, "No space left on device")

    for i in range(3):
        sink.write(record(i))
    monkeypatch.setattr(os, "write", short_write)
    sink.flush()
    monkeypatch.setattr(os, "write", real_write)
    assert [x["n"] for x in read_records(str(tmp_path / "s.msgpack"))] == [0]
    assert sink.unwritten() == 2
    sink.flush()  # space again
    sink.close()
    assert [x["n"] for x in read_records(str(tmp_path / "s.msgpack"))] == [0, 1, 2]
    assert sink.written == 3 and sink.dropped == 0


# ---------------------------------------------------------------- least privilege
def test_a_symlink_as_output_file_is_refused(tmp_path):
    from agentprobe.sinks import SinkError, check_output

    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    link = tmp_path / "s.msgpack"
    link.symlink_to(target)
    for attempt in (lambda: check_output(str(link)), lambda: FileSink(str(link))):
        with pytest.raises(SinkError) as e:
            attempt()
        assert str(e.value) == f"cannot write output {link}: is a symbolic link (refused; name the file itself)"
    assert target.read_bytes() == b""


def test_an_existing_output_file_is_made_owner_only(tmp_path):
    f = tmp_path / "s.msgpack"
    f.write_bytes(record(0))
    f.chmod(0o666)
    sink = FileSink(str(f))
    sink.write(record(1))
    sink.close()
    assert f.stat().st_mode & 0o777 == 0o600
    assert [x["n"] for x in read_records(str(f))] == [0, 1]  # appended to, not replaced


def test_a_new_output_file_is_owner_only_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        sink = FileSink(str(tmp_path / "new.msgpack"))
    finally:
        os.umask(old)
    sink.close()
    assert (tmp_path / "new.msgpack").stat().st_mode & 0o777 == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a file another user owns")
def test_an_output_file_another_user_owns_is_refused(tmp_path):
    from agentprobe.sinks import SinkError, check_output

    f = tmp_path / "theirs.msgpack"
    f.write_bytes(b"")
    os.chown(f, 65534, 65534)
    for attempt in (lambda: check_output(str(f)), lambda: FileSink(str(f))):
        with pytest.raises(SinkError, match=r"owned by uid 65534, who could read the stream"):
            attempt()


# ---------------------------------------------------------------- stream readers going away
def test_server_readers_that_close_or_stall_are_counted_and_the_others_get_everything(tmp_path):
    import socket

    from agentprobe.sinks import ServerSink

    start = msgpack.packb({"type": "start"})
    sink = ServerSink(f"unix:{tmp_path / 's.sock'}?buffer=65536", start_record=start)
    try:
        def reader():
            c = socket.socket(socket.AF_UNIX)
            c.connect(str(tmp_path / "s.sock"))
            return c

        steady, leaving, stalled = reader(), reader(), reader()
        sink.service()  # accepted; each is sent the start record
        for c in (steady, leaving, stalled):
            assert c.recv(len(start)) == start
        leaving.close()  # mid-stream
        got = bytearray()
        steady.setblocking(False)
        for i in range(400):  # 400 KB: far more than the stalled reader's 64 KiB and its socket buffer
            sink.write(record(i))
            sink.flush()
            try:
                while chunk := steady.recv(1 << 16):
                    got += chunk
            except BlockingIOError:
                pass
        steady.setblocking(True)
        steady.settimeout(2)
        while len(got) < sum(len(record(i)) for i in range(400)):
            sink.flush()
            got += steady.recv(1 << 16)
        assert [x["n"] for x in read_records(bytes(got))] == list(range(400))
        assert sink.readers() == {"connected": 1, "dropped": 1, "closed": 1}
        assert sink.written == 400 and sink.dropped == 1  # the record that overflowed the stalled reader
        stalled.settimeout(2)
        while stalled.recv(1 << 16):  # what it had been sent, then the end: we hung up on it
            pass
    finally:
        sink.close()
