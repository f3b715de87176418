"""The one interface of the record path's stages (tunnel bookkeeping, rules, responder, verdicts).

A stage sees every record after enrichment, in order, and returns the records it makes (alerts,
responses, verdicts); those go to the sinks and on to the stages after it, never back to itself
or upstream. Every hook has a default, so a stage implements only what it needs; the watcher
calls each hook of every stage, nothing is looked up by name.

A stage never blocks the loop: slow work (hashing, /proc or file reads) goes to a
worker.SlowWork pool with a deadline, and the stage picks the result up in a later `tick` or
judges without it once the deadline has passed.
"""

from __future__ import annotations

import time


class Stage:
    """Defaults: sees everything, makes nothing, keeps nothing."""

    name = "stage"

    def process(self, record: dict) -> list[dict]:
        """Records this one makes (alerts from a rule, a response from an alert)."""
        return []

    def tick(self, now: float) -> list[dict]:
        """Called on every turn of the watcher's loop (`now`: time.monotonic()); a stage keeps
        its own schedule and must return within a fraction of a millisecond."""
        return []

    def finish(self) -> list[dict]:
        """The watcher stops: what is still open (an episode's verdict), before the stop record."""
        return []

    def forget_cgroup(self, cgroup_id: int) -> None:
        """A watched cgroup went away: release what is kept for it."""

    def adopt_state(self, old: Stage) -> int:
        """A reload replaces `old` by this stage: carry over what still holds; returns how many
        entries were kept."""
        return 0


class Every:
    """A stage's own schedule: `due(now)` is true once `interval_s` has passed since the last time
    it was (or since the schedule was made), and then starts the next interval."""

    __slots__ = ("interval_s", "_next")

    def __init__(self, interval_s: float, first: float | None = None) -> None:
        self.interval_s = interval_s
        self._next = time.monotonic() + interval_s if first is None else first

    def due(self, now: float) -> bool:
        if now < self._next:
            return False
        self._next = now + self.interval_s
        return True
