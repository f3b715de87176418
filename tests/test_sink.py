"""The interface every output implements: what a sink gets by default."""

from __future__ import annotations

import pytest

from agentprobe.errors import AgentprobeError
from agentprobe.sink import RecordSink, Sink, SinkError
from agentprobe.stream import encode


class Bytes(Sink):
    def __init__(self) -> None:
        super().__init__()
        self.got: list[bytes] = []
        self.flushes = 0

    def write(self, data: bytes) -> None:
        self.got.append(data)

    def flush(self) -> None:
        self.flushes += 1


class Fields(RecordSink):
    def __init__(self) -> None:
        super().__init__()
        self.got: list[tuple[dict, bytes]] = []

    def write_record(self, rec: dict, data: bytes) -> None:
        self.got.append((rec, data))


def test_a_byte_sink_gets_the_encoding_and_drains_by_flushing():
    rec = {"v": 1, "type": "exec", "seq": 3}
    sink = Bytes()
    sink.write_record(rec, encode(rec))
    sink.drain(0.0)
    sink.service()
    assert sink.got == [encode(rec)] and sink.flushes == 1
    assert (sink.written, sink.dropped, sink.unwritten()) == (0, 0, 0)


def test_a_record_sink_given_bytes_alone_gets_the_fields_too():
    rec = {"v": 1, "type": "alert", "node": "gpu-7", "seq": 9}
    sink = Fields()
    sink.write(encode(rec))
    assert sink.got == [(rec, encode(rec))]


def test_the_bare_interface_writes_nothing():
    with pytest.raises(NotImplementedError):
        Sink().write(b"x")
    with pytest.raises(NotImplementedError):
        RecordSink().write_record({}, b"x")


def test_a_sink_error_is_a_user_error():
    assert issubclass(SinkError, AgentprobeError)
