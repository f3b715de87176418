"""The one interface every output implements, and its error.

The registry that chooses an output by its spec (`agentprobe.sinks.open_sink`) imports the
outputs; the outputs import only this module, so nothing reaches back into the registry.

Flushing: every sink is flushed after each batch of records read from the kernel (at most
every poll interval, 100 ms) and when the watcher stops.
"""

from __future__ import annotations

from .errors import AgentprobeError
from .stream import decode_one


class SinkError(AgentprobeError):
    pass


class Sink:
    """One output. `dropped` counts records that could not be delivered."""

    name = "sink"
    start_record: bytes | None = None  # given to each new reader first, by outputs that serve readers

    def __init__(self) -> None:
        self.dropped = 0
        self.written = 0

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def write_record(self, rec: dict, data: bytes) -> None:
        """One record and its msgpack encoding; sinks that need the fields (NATS subjects,
        JSON lines) override this."""
        self.write(data)

    def flush(self) -> None:
        pass

    def drain(self, deadline: float) -> None:
        """At stop: get out what can get out before `deadline` (time.monotonic())."""
        self.flush()

    def service(self) -> None:
        """Non-blocking housekeeping (accept readers, drain queues); called each loop."""

    def close(self) -> None:
        pass

    def unwritten(self) -> int:
        """Records accepted but not yet out (held for a full disk or a slow server)."""
        return 0

    @property
    def connected(self) -> bool | None:
        """Network outputs: whether the connection is up now; None for the others."""
        return None

    def readers(self) -> dict | None:
        """Outputs that serve readers: how many came, hung up or fell behind (the stop record's
        `readers`); None for the others."""
        return None


class RecordSink(Sink):
    """An output that works on the record's fields: it implements `write_record`, and bytes
    given to `write` alone are decoded for it."""

    def write_record(self, rec: dict, data: bytes) -> None:
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        self.write_record(decode_one(data), data)
