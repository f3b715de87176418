"""What the rule language is made of once loaded: origins, errors, rule specs."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import AgentprobeError

PRIORITIES = ("critical", "high", "medium", "low", "info")
ACTIONS = ("alert", "freeze", "kill")
COUNT_SCOPES = ("process", "cgroup")
SEQUENCE_SCOPES = ("process", "process_tree", "cgroup")
ATTACK_ID = re.compile(r"^T\d{4}(\.\d{3})?$")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_NS = {"ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9, None: 10**9}


class RuleError(AgentprobeError):
    """A rule file the user wrote is wrong; the message is one line:
    `FILE:LINE: KIND 'NAME': reason` (or `FILE:LINE: reason`)."""


@dataclass(frozen=True)
class Origin:
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def error_at(origin: Origin, kind: str | None, name: str | None, reason: str) -> RuleError:
    shown = name if name is None or name.isprintable() else name.encode("unicode_escape").decode("ascii")
    what = f"{kind} '{shown}': " if kind else ""  # a name with a newline or a control byte stays on one line
    return RuleError(f"{origin}: {what}{one_line(reason)}")


def parse_duration(value: object) -> int:
    """'60s', '5m', '1h', '500ms' or a number of seconds -> nanoseconds."""
    if isinstance(value, bool):
        raise ValueError(f"bad duration {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"bad duration {value!r}: negative")
        return int(value * 10**9)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"bad duration {value!r} (use e.g. 500ms, 60s, 5m, 1h)")
    return int(float(m.group(1)) * _UNIT_NS[m.group(2)])


@dataclass(frozen=True)
class CountSpec:
    """Aggregate matching records per process or cgroup over a sliding window."""

    by: str
    within_ns: int
    threshold: int
    distinct: str | None = None  # field whose distinct values are counted
    sum: str | None = None       # int field summed


@dataclass(frozen=True)
class SequenceSpec:
    """Steps that must all match, the first one anchoring the process, cgroup or tree."""

    by: str
    within_ns: int
    ordered: bool
    steps: tuple[str, ...]


@dataclass(frozen=True)
class RuleInfo:
    """One line of `agentprobe rules list`."""

    id: str
    name: str
    priority: str
    action: str
    mitre: tuple[str, ...]
    tags: tuple[str, ...]
    desc: str
    enabled: bool
    kind: str  # "match" | "count" | "sequence"
    origin: str


@dataclass
class RuleSpec:
    """A validated rule, before its conditions are compiled."""

    id: str
    name: str
    desc: str
    priority: str
    action: str
    tags: tuple[str, ...]
    enabled: bool
    output: str | None
    dedup_ns: int | None
    condition: str | None
    count: CountSpec | None
    sequence: SequenceSpec | None
    origin: Origin
    lines: dict[str, int] = field(default_factory=dict)  # key -> line, for errors

    @property
    def kind(self) -> str:
        if self.sequence is not None:
            return "sequence"
        return "count" if self.count is not None else "match"

    @property
    def mitre(self) -> tuple[str, ...]:
        return tuple(t for t in self.tags if ATTACK_ID.match(t))

    def info(self) -> RuleInfo:
        return RuleInfo(self.id, self.name, self.priority, self.action, self.mitre, self.tags, self.desc,
                        self.enabled, self.kind, str(self.origin))
