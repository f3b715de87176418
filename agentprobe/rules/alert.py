"""Alert records: the rendered summary, trimmed evidence and the process chain."""

from __future__ import annotations

import re
from typing import Any

from . import condition as cond
from .fields import FIELDS, STRS, EventView

MAX_ARGS = 32           # argv entries kept in evidence
MAX_ARG_CHARS = 256     # characters kept per argv entry / string
MAX_COUNTS = 16         # gpu counts entries kept in evidence
MAX_VALUE_CHARS = 200   # characters of one value in a summary
MAX_SUMMARY_CHARS = 1000
NA = "<NA>"
_TEMPLATE = re.compile(r"%%|%([a-z]+\.[a-z0-9_]+(?:\[[^\]\s]*\])?)")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")

TYPE_FIELDS = {
    "exec": ("filename", "argc", "failed", "error", "killed"),
    "connect": ("family", "address", "port", "path", "abstract", "sock_type", "result", "error"),
    "gpu": ("kind", "device", "nr", "detail", "first_device", "xfer", "total", "interval_ns"),
    "payload": ("transport", "address", "port", "app", "method", "banner", "target", "text", "len"),
    "fork": ("child_pid",),
    "exit": ("status", "code", "signal"),
    "cgroup_move": ("to", "mover"),
    "tunnel": ("carried", "port", "to", "client", "detail"),
    "packet": ("family", "protocol", "address", "port", "len", "icmp_type", "echo_request", "dns"),
    "flow_counts": ("family", "protocol", "address", "port", "packets", "bytes", "max_len", "sampled",
                    "interval_ns"),
    "socket": ("family", "sock_type", "protocol", "protocol_name"),
    "bind": ("family", "address", "port", "sock_type", "protocol"),
    "listen": ("family", "address", "port", "sock_type", "protocol"),
}
PROC_FIELDS = ("pid", "ppid", "uid", "comm", "exe", "sha256", "stdio_socket")


def _clean(text: object, limit: int = MAX_VALUE_CHARS) -> str:
    s = _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _cut(s: Any) -> Any:
    return s[:MAX_ARG_CHARS] if isinstance(s, str) else s


def _args(args: Any) -> list | None:
    if not isinstance(args, list):
        return None
    return [_cut(a) for a in args[:MAX_ARGS]]


def trim_record(rec: dict) -> dict:
    """The part of a record kept as evidence: identity, process, the type's own fields."""
    out: dict = {k: rec[k] for k in ("type", "seq", "ts", "ktime") if k in rec}
    proc = rec.get("proc") if isinstance(rec.get("proc"), dict) else {}
    p = {k: _cut(proc[k]) for k in PROC_FIELDS if k in proc}
    if proc.get("cmdline") is not None:
        p["cmdline"] = _args(proc.get("cmdline"))
    out["proc"] = p
    for k in TYPE_FIELDS.get(rec.get("type"), ()):
        if k in rec:
            out[k] = _cut(rec[k])
    if rec.get("type") == "exec" and "argv" in rec:
        out["argv"] = _args(rec["argv"])
    if rec.get("type") == "gpu" and isinstance(rec.get("counts"), list):
        out["counts"] = rec["counts"][:MAX_COUNTS]
    return out


def chain(proc: dict) -> list[dict]:
    """The process, then its known ancestors, parent first."""
    out = [{"pid": proc.get("pid"), "comm": proc.get("comm"), "exe": proc.get("exe")}]
    for a in proc.get("ancestors") or ():
        if isinstance(a, dict):
            out.append({"pid": a.get("pid"), "comm": a.get("comm"), "exe": a.get("exe")})
    return out


class OutputTemplate:
    """A rule's `output` with %field.name placeholders, compiled once."""

    def __init__(self, text: str | None, name: str, resolver: cond.Resolver) -> None:
        if text is None:
            text = f"{name}: %proc.name (pid %proc.pid) %proc.cmdline"
        self.text = text
        self.parts: list = []
        pos = 0
        for m in _TEMPLATE.finditer(text):
            self.parts.append(text[pos:m.start()])
            if m.group() == "%%":
                self.parts.append("%")
            else:
                fm = cond.FIELD_TOKEN.match(m.group(1))
                name_, arg = (fm.group(1), fm.group(2)) if fm else (m.group(1), None)
                fdef = FIELDS.get(name_)
                if fdef is None:
                    raise cond.ConditionError(f"unknown field '%{name_}' in output")
                get = fdef.make(resolver.option_spec(arg)) if fdef.make else fdef.get
                self.parts.append((get, fdef.type == STRS))
            pos = m.end()
        self.parts.append(text[pos:])

    def render(self, ev: EventView) -> str:
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            get, many = part
            try:
                v = get(ev)
            except Exception:  # a malformed record renders as missing, never fails the alert
                v = None
            if v is None:
                out.append(NA)
            elif many:
                out.append(_clean(" ".join(str(x) for x in v)))
            elif isinstance(v, bool):
                out.append("true" if v else "false")
            else:
                out.append(_clean(v))
        s = "".join(out)
        return s if len(s) <= MAX_SUMMARY_CHARS else s[: MAX_SUMMARY_CHARS - 3] + "..."


def build_alert(spec: Any, rec: dict, summary: str, evidence: list[dict]) -> dict:
    """An alert record for `rec`, the record that made the rule fire (the caller sets seq)."""
    proc = rec.get("proc") if isinstance(rec.get("proc"), dict) else {}
    alert = {
        "v": 1,
        "type": "alert",
        "ts": rec.get("ts"),
        "ktime": rec.get("ktime"),
        "node": rec.get("node"),
        "cgroup": rec.get("cgroup"),
        "proc": dict(proc),
        "rule": spec.id,
        "name": spec.name,
        "priority": spec.priority,
        "tags": list(spec.tags),
        "mitre": list(spec.mitre),
        "action": spec.action,
        "summary": summary,
        "evidence": evidence,
        "chain": chain(proc),
    }
    if "container" in rec:
        alert["container"] = rec["container"]
    if rec.get("type") == "unobserved" and isinstance(rec.get("lost"), dict):
        alert["lost"] = dict(rec["lost"])  # what the episode's loss was made of, by record type
    if isinstance(rec.get("labels"), dict):
        alert["labels"] = dict(rec["labels"])
    return alert
