"""Records as JSON lines with Elastic Common Schema names, for SIEMs and log shippers.

ECS names are used where ECS has the field (`process.pid`, `destination.ip`, `rule.name`, …);
everything else keeps its agentprobe name under `agentprobe.` so nothing is lost. The mapping
is documented in docs/events.md ("JSON lines").
"""

from __future__ import annotations

import datetime as dt
import json

ECS_VERSION = "8.11.0"

# record type -> (event.kind, event.category, event.type)
_EVENT = {
    "exec": ("event", ["process"], ["start"]),
    "fork": ("event", ["process"], ["start"]),
    "exit": ("event", ["process"], ["end"]),
    "connect": ("event", ["network"], ["connection", "start"]),
    "payload": ("event", ["network"], ["protocol"]),
    "deny": ("event", ["network"], ["connection", "denied"]),
    "gpu": ("event", ["host"], ["access"]),
    "alert": ("alert", ["intrusion_detection"], ["info"]),
    "response": ("event", ["intrusion_detection"], ["change"]),
    "lost": ("metric", ["host"], ["info"]),
    "start": ("state", ["configuration"], ["start"]),
    "stop": ("state", ["configuration"], ["end"]),
    "cgroup": ("state", ["configuration"], ["change"]),
    "reload": ("state", ["configuration"], ["change"]),
}
# rule priority -> event.severity (higher is worse), and the ECS risk word
_SEVERITY = {"critical": 99, "high": 73, "medium": 47, "low": 21, "info": 1}
# fields mapped to ECS (the rest goes under agentprobe.)
_MAPPED = {"v", "ts", "proc", "node", "container", "rule", "name", "priority", "tags", "mitre", "summary", "address",
           "port", "src_address", "src_port", "argv"}


def timestamp(ns: int | None) -> str | None:
    """ISO 8601 UTC with nanoseconds, as Elasticsearch's date_nanos takes it."""
    if not isinstance(ns, int):
        return None
    secs, frac = divmod(ns, 10**9)
    return dt.datetime.fromtimestamp(secs, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") + f".{frac:09d}Z"


def _process(proc: dict) -> dict:
    out: dict = {}
    for src, dst in (("pid", "pid"), ("comm", "name"), ("exe", "executable")):
        if proc.get(src) is not None:
            out[dst] = proc[src]
    if proc.get("tid") is not None:
        out["thread"] = {"id": proc["tid"]}
    if proc.get("ppid") is not None:
        out["parent"] = {"pid": proc["ppid"]}
    anc = proc.get("ancestors") or []
    if anc and isinstance(anc[0], dict):
        out.setdefault("parent", {}).update({k: v for k, v in (("name", anc[0].get("comm")),
                                                                  ("executable", anc[0].get("exe"))) if v})
    if isinstance(proc.get("cmdline"), list):
        out["args"] = proc["cmdline"]
        out["args_count"] = len(proc["cmdline"])
        out["command_line"] = " ".join(proc["cmdline"])
    if proc.get("sha256"):
        out["hash"] = {"sha256": proc["sha256"]}
    if proc.get("uid") is not None:
        out["user"] = {"id": str(proc["uid"])}
        if proc.get("user"):
            out["user"]["name"] = proc["user"]
    if proc.get("gid") is not None:
        out["group"] = {"id": str(proc["gid"])}
    return out


def _network(rec: dict, out: dict) -> None:
    if rec.get("address") is not None and rec.get("family") in ("inet", "inet6", None):
        out["destination"] = {"ip": rec["address"], "address": rec["address"]}
        if rec.get("port") is not None:
            out["destination"]["port"] = rec["port"]
    if rec.get("family") in ("inet", "inet6"):
        out.setdefault("network", {})["type"] = "ipv4" if rec["family"] == "inet" or rec.get("v4mapped") else "ipv6"
    transport = rec.get("transport") or {"stream": "tcp", "dgram": "udp"}.get(rec.get("sock_type"))
    if transport:
        out.setdefault("network", {})["transport"] = transport
    if rec.get("src_address") is not None:
        out["source"] = {"ip": rec["src_address"], "address": rec["src_address"]}
        if rec.get("src_port") is not None:
            out["source"]["port"] = rec["src_port"]
    if rec.get("app"):
        out.setdefault("network", {})["protocol"] = rec["app"]


def _jsonable(v):
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def to_ecs(rec: dict) -> dict:
    """One record as an ECS document (nested objects)."""
    rtype = rec.get("type", "unknown")
    kind, category, etype = _EVENT.get(rtype, ("event", ["host"], ["info"]))
    event: dict = {"kind": kind, "category": category, "type": list(etype), "action": rtype,
                   "module": "agentprobe", "dataset": f"agentprobe.{rtype}"}
    if rec.get("seq") is not None:
        event["sequence"] = rec["seq"]
    out: dict = {"@timestamp": timestamp(rec.get("ts")), "ecs": {"version": ECS_VERSION}, "event": event}
    if rec.get("node"):
        out["host"] = {"hostname": rec["node"], "name": rec["node"]}
    if isinstance(rec.get("proc"), dict):
        out["process"] = _process(rec["proc"])
        user = out["process"].get("user")
        if user:
            out["user"] = dict(user)
    if rtype == "exec":
        out.setdefault("process", {})
        if isinstance(rec.get("argv"), list):  # the exec's own argv, as copied in the kernel
            out["process"]["args"] = rec["argv"]
            out["process"]["args_count"] = rec.get("argc", len(rec["argv"]))
            out["process"]["command_line"] = " ".join(rec["argv"])
        if rec.get("failed"):
            event["outcome"] = "failure"
            out["error"] = {"code": rec.get("error") or str(rec.get("retval"))}
        else:
            event["outcome"] = "success"
    if rtype == "exit" and rec.get("code") is not None:
        out.setdefault("process", {})["exit_code"] = rec["code"]
    if rtype in ("connect", "payload", "deny"):
        _network(rec, out)
        if rtype == "connect":
            res = rec.get("result")
            event["outcome"] = "success" if res in ("ok", "in_progress") else "failure" if res else "unknown"
            if rec.get("error"):
                out["error"] = {"code": rec["error"]}
        if rtype == "deny":
            event["outcome"] = "failure"
    if isinstance(rec.get("container"), dict):
        c = rec["container"]
        out["container"] = {k: v for k, v in (("id", c.get("id")), ("runtime", c.get("runtime")),
                                               ("name", c.get("name"))) if v}
        if c.get("pod") or c.get("namespace") or c.get("pod_uid"):
            orch: dict = {"type": "kubernetes"}
            if c.get("namespace"):
                orch["namespace"] = c["namespace"]
            res = {"type": "pod"}
            if c.get("pod"):
                res["name"] = c["pod"]
            if c.get("pod_uid"):
                res["id"] = c["pod_uid"]
            orch["resource"] = res
            out["orchestrator"] = orch
    if rtype == "alert":
        out["rule"] = {"id": rec.get("rule"), "name": rec.get("name") or rec.get("rule"),
                       "ruleset": "agentprobe"}
        if rec.get("summary"):
            out["message"] = rec["summary"]
        if rec.get("priority"):
            event["severity"] = _SEVERITY.get(rec["priority"], 0)
        if rec.get("mitre"):
            out["threat"] = {"framework": "MITRE ATT&CK",
                             "technique": {"id": [m for m in rec["mitre"] if not str(m).startswith("TA")]},
                             "tactic": {"id": [m for m in rec["mitre"] if str(m).startswith("TA")]}}
        if rec.get("tags"):
            out["tags"] = list(rec["tags"])
    if rtype == "response":
        out["rule"] = {"id": rec.get("rule"), "name": rec.get("rule"), "ruleset": "agentprobe"}
        event["outcome"] = {"frozen": "success", "already_frozen": "success", "killed": "success",
                            "failed": "failure", "refused": "failure"}.get(rec.get("outcome"), "unknown")
        if isinstance(rec.get("latency_ms"), (int, float)):
            event["duration"] = int(rec["latency_ms"] * 1e6)  # ECS: nanoseconds
    # the rest under its own name; proc keeps what ECS has no field for (ancestors, tid, comm)
    rest = {k: v for k, v in rec.items() if k not in _MAPPED}
    if isinstance(rec.get("proc"), dict) and rec["proc"].get("ancestors"):
        rest["proc"] = {"ancestors": rec["proc"]["ancestors"]}
    out["agentprobe"] = _jsonable(rest)
    return out


def to_json_line(rec: dict) -> bytes:
    return (json.dumps(_jsonable(to_ecs(rec)), ensure_ascii=True, separators=(",", ":"), default=str)
            + "\n").encode()
