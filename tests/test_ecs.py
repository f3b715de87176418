"""JSON lines with Elastic Common Schema names."""

from __future__ import annotations

import json

from rule_samples import Proc, connect_record, exec_record

from agentprobe.ecs import to_ecs, to_json_line
from agentprobe.sinks import JsonLinesSink, StdoutSink, open_sink


def test_exec_maps_to_ecs_process_fields():
    proc = Proc(pid=4242, exe="/usr/bin/ssh", user="agent", sha256="5e" * 32)
    rec = exec_record(proc, ["ssh", "-R", "8080:localhost:22", "gw"], seq=9, ktime=5 * 10**9)
    rec["ts"] = 1_700_000_000_123_456_789
    rec["container"] = {"runtime": "cri-containerd", "id": "ab" * 32, "pod_uid": "1234", "pod": "agent-0",
                        "namespace": "rl", "name": "worker"}
    d = to_ecs(rec)
    assert d["@timestamp"] == "2023-11-14T22:13:20.123456789Z"
    assert d["event"] == {"kind": "event", "category": ["process"], "type": ["start"], "action": "exec",
                          "module": "agentprobe", "dataset": "agentprobe.exec", "sequence": 9, "outcome": "success"}
    p = d["process"]
    assert p["pid"] == 4242 and p["parent"]["pid"] == rec["proc"]["ppid"]
    assert p["name"] == rec["proc"]["comm"] and p["executable"] == "/usr/bin/ssh"
    assert p["args"] == ["ssh", "-R", "8080:localhost:22", "gw"] and p["args_count"] == 4
    assert p["command_line"] == "ssh -R 8080:localhost:22 gw"
    assert p["hash"] == {"sha256": rec["proc"]["sha256"]}
    assert d["user"]["name"] == "agent" and d["host"]["hostname"] == rec["node"]
    assert d["container"] == {"id": "ab" * 32, "runtime": "cri-containerd", "name": "worker"}
    assert d["orchestrator"] == {"type": "kubernetes", "namespace": "rl",
                                 "resource": {"type": "pod", "name": "agent-0", "id": "1234"}}
    # what ECS has no field for stays, under agentprobe.
    assert d["agentprobe"]["cgroup"] == rec["cgroup"] and d["agentprobe"]["truncated"] == rec["truncated"]
    assert d["agentprobe"]["type"] == "exec" and d["agentprobe"]["filename"] == rec["filename"]


def test_connect_and_alert():
    proc = Proc(pid=7, exe="/usr/bin/curl")
    c = to_ecs(connect_record(proc, "192.0.2.10", 3333, result="error") | {"error": "ECONNREFUSED"})
    assert c["destination"] == {"ip": "192.0.2.10", "address": "192.0.2.10", "port": 3333}
    assert c["network"] == {"type": "ipv4", "transport": "tcp"}
    assert c["event"]["outcome"] == "failure" and c["error"] == {"code": "ECONNREFUSED"}
    alert = {"v": 1, "type": "alert", "ts": 1, "seq": 3, "node": "gpu-1", "rule": "mining_pool_connection",
             "name": "Mining pool connection", "priority": "critical", "mitre": ["T1496", "TA0040"],
             "tags": ["miner", "T1496"], "action": "freeze", "summary": "pool connect by xmrig",
             "proc": {"pid": 7, "comm": "xmrig"}, "evidence": [{"type": "connect"}]}
    a = to_ecs(alert)
    assert a["event"]["kind"] == "alert" and a["event"]["severity"] == 99
    assert a["rule"] == {"id": "mining_pool_connection", "name": "Mining pool connection", "ruleset": "agentprobe"}
    assert a["message"] == "pool connect by xmrig"
    assert a["threat"]["technique"]["id"] == ["T1496"] and a["threat"]["tactic"]["id"] == ["TA0040"]
    assert a["agentprobe"]["evidence"] == [{"type": "connect"}] and a["agentprobe"]["action"] == "freeze"
    r = to_ecs({"type": "response", "ts": 1, "rule": "x", "action": "freeze", "outcome": "frozen", "latency_ms": 2.5})
    assert r["event"]["outcome"] == "success" and r["event"]["duration"] == 2_500_000


def test_lines_are_json_with_bytes_as_hex(capsys):
    line = to_json_line({"type": "payload", "ts": 1, "data": b"\x00SSH", "address": "192.0.2.1", "port": 22,
                         "transport": "tcp", "family": "inet"})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    d = json.loads(line)
    assert d["agentprobe"]["data"] == "00535348" and d["destination"]["port"] == 22
    sink = open_sink("jsonl:-")
    assert isinstance(sink, JsonLinesSink) and isinstance(sink.inner, StdoutSink)


def test_jsonl_file_sink_counts_like_the_file_sink(tmp_path):
    sink = open_sink(f"jsonl:{tmp_path / 'out.jsonl'}")
    sink.write_record({"type": "exec", "ts": 1, "seq": 0}, b"")
    sink.write_record({"type": "exit", "ts": 2, "seq": 1}, b"")
    sink.close()
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert [json.loads(x)["event"]["action"] for x in lines] == ["exec", "exit"]
    assert sink.written == 2 and sink.dropped == 0
    assert (tmp_path / "out.jsonl").stat().st_mode & 0o777 == 0o600
