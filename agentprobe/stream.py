"""The msgpack stream: encoding records and reading them back.

A stream is a plain concatenation of msgpack maps, one per record, each with
`v` (schema version) and `type`. The watcher writes a `start` record first and
a `stop` record last, so a reader can tell a complete stream from one that was
cut off. See docs/events.md for every field.

Reader API for other tools:

    from agentprobe.stream import read_records
    for record in read_records("/var/log/agentprobe/stream.msgpack"):
        if record["type"] == "alert":
            ...
"""

from __future__ import annotations

import io
import socket
import sys
from collections.abc import Iterator
from typing import BinaryIO

import msgpack

from .errors import AgentprobeError

SCHEMA_VERSION = 1
MAX_RECORD_BYTES = 16 * 1024 * 1024


class StreamError(AgentprobeError):
    """A stream that cannot be read to its end; `records` were read before the error."""

    def __init__(self, message: str, records: int = 0, offset: int = 0) -> None:
        super().__init__(message)
        self.records = records
        self.offset = offset


def encode(record: dict) -> bytes:
    try:
        return msgpack.packb(record, use_bin_type=True)
    except UnicodeEncodeError:  # a name from the file system that is not UTF-8 (a cgroup made so)
        return msgpack.packb(_without_surrogates(record), use_bin_type=True)


def _without_surrogates(value):
    """Bytes that were not UTF-8 (held as surrogates, os.fsdecode) become \\xNN, as in argv."""
    if isinstance(value, str):
        try:
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_without_surrogates(k): _without_surrogates(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_surrogates(v) for v in value]
    return value


def decode_one(data: bytes) -> dict:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def iter_stream(f: BinaryIO, name: str = "stream", chunk: int = 65536) -> Iterator[dict]:
    """Yield records from a binary file object; raise StreamError at the first
    corrupt or truncated record, after yielding every good one before it."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=MAX_RECORD_BYTES)
    count = 0
    fed = 0
    while True:
        data = f.read(chunk) if not isinstance(f, socket.socket) else f.recv(chunk)
        if not data:
            break
        try:
            unpacker.feed(data)
        except msgpack.BufferFull:
            raise StreamError(f"{name}: record at byte {unpacker.tell()} is larger than "
                              f"{MAX_RECORD_BYTES} bytes (corrupt stream?)", count, unpacker.tell()) from None
        fed += len(data)
        while True:
            offset = unpacker.tell()
            try:
                obj = next(unpacker)
            except StopIteration:
                break
            except (ValueError, msgpack.UnpackException, TypeError) as e:
                raise StreamError(f"{name}: corrupt record at byte {offset} after {count} "
                                  f"good records ({type(e).__name__}: {e})", count, offset) from None
            if not isinstance(obj, dict) or "type" not in obj:
                raise StreamError(f"{name}: byte {offset} is not an agentprobe record "
                                  f"(after {count} good records)", count, offset)
            count += 1
            yield obj
    if unpacker.tell() < fed:
        raise StreamError(f"{name}: truncated record at byte {unpacker.tell()} after {count} good "
                          f"records ({fed - unpacker.tell()} bytes left over)", count, unpacker.tell())


def open_source(spec: str) -> tuple[BinaryIO | socket.socket, str]:
    """A stream source: '-' (stdin), a file, unix:PATH or tcp:HOST:PORT (a running watcher)."""
    if spec == "-":
        return sys.stdin.buffer, "<stdin>"
    if spec.startswith("unix:"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(spec[5:])
        except OSError as e:
            s.close()
            raise AgentprobeError(f"cannot connect to {spec}: {e.strerror}") from None
        return s, spec
    if spec.startswith("tcp:"):
        host, _, port = spec[4:].rpartition(":")
        try:
            s = socket.create_connection((host.strip("[]"), int(port)))
        except (OSError, ValueError) as e:
            raise AgentprobeError(f"cannot connect to {spec}: {e}") from None
        return s, spec
    try:
        return open(spec, "rb"), spec
    except OSError as e:
        raise AgentprobeError(f"cannot read {spec}: {e.strerror}") from None


def read_records(spec: str | BinaryIO | bytes) -> Iterator[dict]:
    """Records of a stream given as a path/spec, a binary file object or bytes."""
    if isinstance(spec, bytes):
        yield from iter_stream(io.BytesIO(spec), "<bytes>")
        return
    if not isinstance(spec, str):
        yield from iter_stream(spec, getattr(spec, "name", "stream"))
        return
    src, name = open_source(spec)
    try:
        yield from iter_stream(src, name)
    finally:
        if src is not sys.stdin.buffer:
            src.close()
