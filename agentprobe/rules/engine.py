"""The stateful rule engine: records in, alerts out.

Per record: the rules that can match its type are evaluated (conditions are
precompiled closures over a per-record EventView). Three kinds of rules:

- match: the condition holds -> alert;
- count: matching records are aggregated per process or cgroup over a sliding
  window (number of records, distinct values of a field, or the sum of a
  number field) -> alert when the threshold is reached, then the window starts
  afresh;
- sequence: step 1 anchors a process (or cgroup); the remaining steps must
  match, by the anchor or (process_tree) any descendant, within the window
  counted from step 1 -> alert with every step's record as evidence.

All state is bounded: each table is an LRU with a size cap, entries expire
with their window, a process's state goes when it exits (sequence anchors of a
process tree stay until their window ends, for the descendants that outlive
it), a cgroup's with forget_cgroup(). An alert for a rule and the same
process (or cgroup, or anchor) is not repeated within the dedup window.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..stage import Stage
from .alert import build_alert, trim_record
from .fields import EVENT_TYPES, EventView
from .ruleset import Rule, RuleSet

log = logging.getLogger(__name__)

DEFAULT_DEDUP_S = 60.0
MAX_EVIDENCE = 32         # records kept as evidence of a count rule
MAX_WINDOW_ENTRIES = 4096  # records one count window holds at most (oldest dropped)


@dataclass
class EngineLimits:
    max_counters: int = 50_000
    max_sequences: int = 50_000
    max_dedup: int = 100_000
    sweep_interval_ns: int = 10 * 10**9


class StateTable:
    """An LRU-bounded map with indexes by pid and cgroup id, for release."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.evicted = 0
        self._items: OrderedDict[Hashable, tuple[Any, int | None, int | None]] = OrderedDict()
        self._by_pid: dict[int, set] = {}
        self._by_cg: dict[int, set] = {}

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> Any:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: Hashable, value: Any, pid: int | None, cg: int | None) -> None:
        if key in self._items:
            self.pop(key)
        self._items[key] = (value, pid, cg)
        if pid is not None:
            self._by_pid.setdefault(pid, set()).add(key)
        if cg is not None:
            self._by_cg.setdefault(cg, set()).add(key)
        while len(self._items) > self.cap:
            self.pop(next(iter(self._items)))
            self.evicted += 1

    def pop(self, key: Hashable) -> Any:
        item = self._items.pop(key, None)
        if item is None:
            return None
        value, pid, cg = item
        for index, k in ((self._by_pid, pid), (self._by_cg, cg)):
            if k is not None and k in index:
                index[k].discard(key)
                if not index[k]:
                    del index[k]
        return value

    def keys_of_pid(self, pid: int) -> list:
        return list(self._by_pid.get(pid, ()))

    def keys_of_cgroup(self, cg: int) -> list:
        return list(self._by_cg.get(cg, ()))

    def items(self) -> Iterator[tuple[Hashable, Any]]:
        for key, (value, _, _) in list(self._items.items()):
            yield key, value

    def clear(self) -> None:
        self._items.clear()
        self._by_pid.clear()
        self._by_cg.clear()


@dataclass
class _Window:
    """Records of one count rule for one process or cgroup, inside the window."""

    entries: deque = field(default_factory=deque)          # (ktime, value, evidence)
    seen: OrderedDict = field(default_factory=OrderedDict)  # distinct value -> (ktime, evidence)
    total: int = 0

    def prune(self, cutoff: int) -> None:
        while self.entries and self.entries[0][0] < cutoff:
            self.total -= self.entries.popleft()[1]
        while self.seen:
            value, (t, _) = next(iter(self.seen.items()))
            if t >= cutoff:
                break
            del self.seen[value]


@dataclass
class _Partial:
    """A sequence under way: which steps matched, with their records."""

    start: int
    anchor: int | None  # pid (process, process_tree) or None (cgroup)
    cgroup: int | None
    matched: dict = field(default_factory=dict)  # step index -> evidence
    next: int = 1
    exited: bool = False


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


class RuleEngine(Stage):
    """Evaluates a RuleSet over stream records; `process(record)` returns alert records."""

    name = "rules"

    def __init__(self, ruleset: RuleSet, *, dedup_window_s: float = DEFAULT_DEDUP_S,
                 limits: EngineLimits | None = None) -> None:
        self.ruleset = ruleset
        self.limits = limits or EngineLimits()
        self.dedup_ns = int(dedup_window_s * 10**9)
        self._single: dict[str, list[Rule]] = {t: [] for t in EVENT_TYPES}
        self._sequences: dict[str, list[Rule]] = {t: [] for t in EVENT_TYPES}
        for rule in ruleset.enabled_rules:
            table = self._sequences if rule.spec.sequence is not None else self._single
            for t in EVENT_TYPES:
                if rule.types is None or t in rule.types:
                    table[t].append(rule)
        self._counters = StateTable(self.limits.max_counters)
        self._partials = StateTable(self.limits.max_sequences)
        self._dedup = StateTable(self.limits.max_dedup)
        self._clock = 0
        self._next_sweep = 0
        self.alerts = 0
        self.suppressed = 0
        self.errors = 0

    # ---- public ----
    def process(self, record: dict) -> list[dict]:
        rtype = record.get("type")
        if rtype not in self._single:
            self._control(record)
            return []
        now = _int(record.get("ktime")) or 0
        if now > self._clock:
            self._clock = now
        ev = EventView(record)
        proc = record.get("proc") if isinstance(record.get("proc"), dict) else {}
        pid = _int(proc.get("pid"))
        cgroup = record.get("cgroup") if isinstance(record.get("cgroup"), dict) else {}
        cg = _int(cgroup.get("id"))
        out: list[dict] = []
        for rule in self._single[rtype]:
            try:
                if not rule.match(ev):
                    continue
                if rule.spec.count is not None:
                    alert = self._count(rule, ev, record, now, pid, cg)
                else:
                    alert = self._fire(rule, ev, record, [trim_record(record)], now, (rule.index, cg, pid),
                                       pid, cg)
            except Exception:  # a rule must never stop the watcher
                self._error(rule, record)
                continue
            if alert is not None:
                out.append(alert)
        for rule in self._sequences[rtype]:
            try:
                alert = self._sequence(rule, ev, record, now, pid, cg, proc)
            except Exception:
                self._error(rule, record)
                continue
            if alert is not None:
                out.append(alert)
        if rtype == "exit" and pid is not None:
            self.forget_process(pid)
        elif rtype == "fork":
            child = _int(record.get("child_pid"))
            if child is not None:
                self._new_pid(child)
        if self._clock >= self._next_sweep:
            self.sweep()
        return out

    def forget_process(self, pid: int) -> None:
        """Release what is kept for a process that exited."""
        for key in self._counters.keys_of_pid(pid):
            self._counters.pop(key)
        for key in self._dedup.keys_of_pid(pid):
            self._dedup.pop(key)
        for key in self._partials.keys_of_pid(pid):
            p = self._partials.get(key)
            if p is None:
                continue
            if self.ruleset.rules[key[0]].spec.sequence.by == "process_tree":
                p.exited = True  # descendants may still complete it
            else:
                self._partials.pop(key)

    def forget_cgroup(self, cgroup_id: int) -> None:
        """Release everything kept for a cgroup that went away."""
        for table in (self._counters, self._partials, self._dedup):
            for key in table.keys_of_cgroup(cgroup_id):
                table.pop(key)

    def reset(self) -> None:
        for table in (self._counters, self._partials, self._dedup):
            table.clear()

    def sweep(self) -> None:
        """Drop state whose window has passed (also runs by itself every few seconds of ktime)."""
        now = self._clock
        self._next_sweep = now + self.limits.sweep_interval_ns
        for key, w in self._counters.items():
            spec = self.ruleset.rules[key[0]].spec.count
            w.prune(now - spec.within_ns)
            if not w.entries and not w.seen:
                self._counters.pop(key)
        for key, p in self._partials.items():
            if now - p.start > self.ruleset.rules[key[0]].spec.sequence.within_ns:
                self._partials.pop(key)
        for key, (last, window) in self._dedup.items():
            if now - last >= window:
                self._dedup.pop(key)

    def stats(self) -> dict:
        return {
            "rules": len(self.ruleset.enabled_rules),
            "alerts": self.alerts,
            "suppressed": self.suppressed,
            "errors": self.errors,
            "counters": len(self._counters),
            "sequences": len(self._partials),
            "dedup": len(self._dedup),
            "evicted": self._counters.evicted + self._partials.evicted + self._dedup.evicted,
        }

    # ---- internals ----
    def _control(self, record: dict) -> None:
        rtype = record.get("type")
        if rtype in ("start", "stop"):
            self.reset()
        elif rtype == "cgroup" and record.get("change") == "gone":
            cg = record.get("cgroup")
            if isinstance(cg, dict) and _int(cg.get("id")) is not None:
                self.forget_cgroup(cg["id"])

    def _error(self, rule: Rule, record: dict) -> None:
        self.errors += 1
        log.debug("rule %s failed on record seq=%s", rule.id, record.get("seq"), exc_info=True)

    def _new_pid(self, pid: int) -> None:
        """A fork made `pid`: sequence anchors of an exited process with that pid are stale."""
        for key in self._partials.keys_of_pid(pid):
            p = self._partials.get(key)
            if p is not None and p.exited:
                self._partials.pop(key)

    def _fire(self, rule: Rule, ev: EventView, record: dict, evidence: list[dict], now: int,
              key: tuple, pid: int | None, cg: int | None) -> dict | None:
        window = rule.spec.dedup_ns if rule.spec.dedup_ns is not None else self.dedup_ns
        if window > 0:
            last = self._dedup.get(key)
            # records may arrive slightly out of order: an earlier ktime is inside the window too
            if last is not None and now - last[0] < last[1]:
                self.suppressed += 1
                return None
            self._dedup.put(key, (now, window), pid, cg)
        self.alerts += 1
        return build_alert(rule.spec, record, rule.output.render(ev), evidence)

    def _count(self, rule: Rule, ev: EventView, record: dict, now: int, pid: int | None,
               cg: int | None) -> dict | None:
        spec = rule.spec.count
        per_process = spec.by == "process"
        key = (rule.index, cg, pid if per_process else None)
        if rule.value is not None:
            value = rule.value(ev)
            if value is None:
                return None
            if isinstance(value, (list, tuple)):
                value = tuple(value)
        else:
            value = 1
        if spec.sum is not None and (_int(value) is None or value <= 0):
            return None
        w = self._counters.get(key)
        if w is None:
            w = _Window()
            self._counters.put(key, w, pid if per_process else None, cg)
        w.prune(now - spec.within_ns)
        evidence = trim_record(record)
        if spec.distinct is not None:
            w.seen.pop(value, None)
            w.seen[value] = (now, evidence)
            if len(w.seen) > MAX_WINDOW_ENTRIES:
                w.seen.popitem(last=False)
            reached = len(w.seen) >= spec.threshold
            kept = [e for _, e in w.seen.values()]
        else:
            w.entries.append((now, value, evidence))
            w.total += value
            if len(w.entries) > MAX_WINDOW_ENTRIES:
                w.total -= w.entries.popleft()[1]
            reached = w.total >= spec.threshold
            kept = [e for _, _, e in w.entries]
        if not reached:
            return None
        self._counters.pop(key)
        return self._fire(rule, ev, record, kept[-MAX_EVIDENCE:], now, key, pid if per_process else None, cg)

    def _sequence(self, rule: Rule, ev: EventView, record: dict, now: int, pid: int | None, cg: int | None,
                  proc: dict) -> dict | None:
        spec = rule.spec.sequence
        rtype = record["type"]
        steps, step_types = rule.steps, rule.step_types
        n = len(steps)
        if spec.by == "cgroup":
            own_key = (rule.index, "cgroup", cg)
            keys = [own_key]
        else:
            own_key = (rule.index, pid)
            keys = [own_key]
            if spec.by == "process_tree":
                for a in proc.get("ancestors") or ():
                    apid = _int(a.get("pid")) if isinstance(a, dict) else None
                    if apid is not None:
                        keys.append((rule.index, apid))
        completed: list[tuple[tuple, _Partial]] = []
        for key in keys:
            p = self._partials.get(key)
            if p is None:
                continue
            if now - p.start > spec.within_ns or (key == own_key and p.exited):
                self._partials.pop(key)
                continue
            candidates = (p.next,) if spec.ordered else [i for i in range(1, n) if i not in p.matched]
            for i in candidates:
                t = step_types[i]
                if (t is None or rtype in t) and steps[i](ev):
                    p.matched[i] = trim_record(record)
                    p.next = i + 1
                    break
            if len(p.matched) == n:
                completed.append((key, p))
        alert = None
        if completed:
            for key, _ in completed:
                self._partials.pop(key)
            _, p = completed[0]
            evidence = sorted(p.matched.values(), key=lambda e: (e.get("ktime") or 0, e.get("seq") or 0))
            anchor_key = (rule.index, p.cgroup, p.anchor)
            alert = self._fire(rule, ev, record, evidence, now, anchor_key, p.anchor, p.cgroup)
        t0 = step_types[0]
        if (t0 is None or rtype in t0) and steps[0](ev):
            existing = self._partials.get(own_key)
            if existing is None or len(existing.matched) == 1 or existing.exited \
                    or now - existing.start > spec.within_ns:
                anchor = None if spec.by == "cgroup" else pid
                p = _Partial(now, anchor, cg, {0: trim_record(record)})
                self._partials.put(own_key, p, anchor, cg)
        return alert

    def adopt_state(self, old: Stage) -> int:
        """After a configuration reload: take over the counters, sequences in progress and
        dedup windows of every rule whose id and logic (condition, count, sequence, dedup)
        did not change; state of changed or removed rules starts afresh. Returns the entries kept."""
        if not isinstance(old, RuleEngine):
            return 0  # nothing to take over from a stage that held no rules

        def logic(spec) -> tuple:
            return (spec.condition, spec.count, spec.sequence, spec.dedup_ns)

        now = {r.spec.id: r for r in self.ruleset.enabled_rules}
        index_map = {}
        for r in old.ruleset.enabled_rules:
            new = now.get(r.spec.id)
            if new is not None and logic(new.spec) == logic(r.spec):
                index_map[r.index] = new.index
        kept = 0
        for mine, theirs in ((self._counters, old._counters), (self._partials, old._partials),
                             (self._dedup, old._dedup)):
            for key, (value, pid, cg) in list(theirs._items.items()):
                if isinstance(key, tuple) and key and key[0] in index_map:
                    mine.put((index_map[key[0]], *key[1:]), value, pid, cg)
                    kept += 1
        self._clock = max(self._clock, old._clock)
        self._next_sweep = old._next_sweep
        self.alerts, self.suppressed, self.errors = old.alerts, old.suppressed, old.errors
        return kept
