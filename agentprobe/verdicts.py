"""One verdict per episode: did this agent run misbehave, how, and was it stopped.

An episode is the unit the responder acts on: a child cgroup of a watched cgroup (or the watched
cgroup itself for processes placed directly in it). The stage sees every record after the rules
and the responder, keeps a small summary per episode, and writes a `verdict` record when the
episode's cgroup is removed (the end of an RL episode, the sandbox torn down), or for every
episode still open when the watcher stops. A trainer or a data pipeline filters trajectories
from the verdicts alone. Memory is bounded: at most `max_episodes` open at once (further ones
are counted in `overflow`, reported in every verdict), 16 responses and 64 rules per episode.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from .stage import Every, Stage

META_TYPES = frozenset({"start", "stop", "lost", "verdict", "probe", "cgroup"})
MAX_RULES = 64
MAX_RESPONSES = 16


@dataclass
class EpisodeState:
    path: str
    cgroup_id: int | None = None
    labels: dict = field(default_factory=dict)
    events: Counter = field(default_factory=Counter)
    rules: Counter = field(default_factory=Counter)
    first_alert: dict | None = None
    responses: list = field(default_factory=list)
    frozen: bool = False
    first_ts: int | None = None
    last_ts: int | None = None


class VerdictStage(Stage):
    name = "verdicts"
    TICK_S = 0.5  # how often the ended episodes are looked for

    def __init__(self, episode_of: Callable[[str], str], exists: Callable[[str], bool], node: str,
                 clock_offset_ns: int, max_episodes: int = 4096) -> None:
        self.episode_of = episode_of
        self.exists = exists
        self.node = node
        self.clock_offset_ns = clock_offset_ns
        self.max_episodes = max_episodes
        self.episodes: dict[str, EpisodeState] = {}
        self._to_check: list[str] = []  # episodes poll_ended() has yet to look at this round
        self.overflow = 0
        self.schedule = Every(self.TICK_S, first=0.0)

    def process(self, rec: dict) -> list[dict]:
        if rec.get("type") in META_TYPES:
            return []
        path = (rec.get("cgroup") or {}).get("path")
        if not path:
            return []
        ep_path = self.episode_of(path)
        st = self.episodes.get(ep_path)
        if st is None:
            if len(self.episodes) >= self.max_episodes:
                self.overflow += 1
                return []
            st = self.episodes[ep_path] = EpisodeState(ep_path)
        self._add(st, rec, path == ep_path)
        return []

    def _add(self, st: EpisodeState, rec: dict, own_cgroup: bool) -> None:
        t = rec.get("type")
        st.events[t] += 1
        ts = rec.get("ts")
        if isinstance(ts, int):
            st.first_ts = ts if st.first_ts is None else min(st.first_ts, ts)
            st.last_ts = ts if st.last_ts is None else max(st.last_ts, ts)
        if own_cgroup and st.cgroup_id is None:
            st.cgroup_id = (rec.get("cgroup") or {}).get("id")
        labels = rec.get("labels")
        if isinstance(labels, dict):
            for k, v in labels.items():  # the first value of each label stays; bounded like labels
                if k not in st.labels and len(st.labels) < 16:
                    st.labels[k] = v
        if t == "alert":
            rule = rec.get("rule")
            if rule in st.rules or len(st.rules) < MAX_RULES:
                st.rules[rule] += 1
            if st.first_alert is None:
                st.first_alert = {k: rec.get(k) for k in ("rule", "priority", "summary", "ts", "seq", "labels")}
        elif t == "response":
            if len(st.responses) < MAX_RESPONSES:
                st.responses.append({k: rec.get(k) for k in ("action", "outcome", "rule", "latency_ms", "seq")})
            if rec.get("outcome") in ("frozen", "already_frozen", "killed"):
                st.frozen = st.frozen or rec.get("outcome") != "killed"

    def tick(self, now: float) -> list[dict]:
        if not self.schedule.due(now):
            return []
        return self.poll_ended()

    def finish(self) -> list[dict]:
        return self.end_all()

    def poll_ended(self, budget_s: float = 0.0005) -> list[dict]:
        """Verdicts of the episodes whose cgroup is gone. The episodes are looked at in turn,
        within `budget_s` per call: with hundreds open, checking them all at once would hold up
        the records queued behind this check (a miner's exec among them) for milliseconds."""
        if not self._to_check:
            self._to_check = list(self.episodes)
        deadline = time.monotonic() + budget_s
        gone = []
        while self._to_check:
            p = self._to_check.pop()
            if p in self.episodes and not self.exists(p):
                gone.append(p)
            if time.monotonic() >= deadline:
                break
        return [self._verdict(self.episodes.pop(p), "cgroup_removed") for p in gone]

    def end(self, path: str, reason: str) -> dict | None:
        st = self.episodes.pop(path, None)
        return self._verdict(st, reason) if st is not None else None

    def end_all(self) -> list[dict]:
        """Verdicts of every open episode (the watcher stops)."""
        out = [self._verdict(st, "watcher_stopped") for st in self.episodes.values()]
        self.episodes.clear()
        return out

    def _verdict(self, st: EpisodeState, reason: str) -> dict:
        now = time.monotonic_ns()
        return {
            "v": 1, "type": "verdict", "ts": now + self.clock_offset_ns, "ktime": now, "node": self.node,
            "cgroup": {"id": st.cgroup_id, "path": st.path},
            "labels": dict(st.labels),
            "clean": not st.rules,
            "alerts": sum(st.rules.values()),
            "rules": dict(st.rules),
            "first_alert": st.first_alert,
            "frozen": st.frozen,
            "responses": list(st.responses),
            "events": dict(st.events),
            "first_ts": st.first_ts, "last_ts": st.last_ts,
            "reason": reason,
            "overflow": self.overflow,
        }
