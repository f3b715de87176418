"""Fleet use end to end: a real watcher publishing to a real nats-server, serving metrics,
writing JSON lines, reloading its rules on a real SIGHUP; `agentprobe collect` reading it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest
from natsutil import free_port

from agentprobe.stream import read_records

pytestmark = [pytest.mark.kernel, pytest.mark.userland]

MARKER_RULE = """\
- rule: reload_marker
  name: Reload marker
  desc: a test rule that a reload adds
  condition: spawned and proc.name = "reload-marker"
  output: "marker %proc.cmdline"
  priority: low
  tags: [test]
  action: alert
"""


@pytest.fixture
def episode(agent_cgroup):
    ep = agent_cgroup.child(f"ep-{uuid.uuid4().hex[:6]}")
    try:
        yield ep
    finally:
        ep.remove()


def scrape(port: int) -> dict[str, float]:
    """The exposition as {'name{labels}': value}; checks the content type on the way."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_for(pred, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def wait_line(w, text: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in ln for ln in w.stderr_lines):
        assert time.monotonic() < deadline, f"no {text!r} line: {''.join(w.stderr_lines)}"
        w._readline(0.2)


def jetstream_records(url: str, stream: str) -> list[tuple[str, dict]]:
    from natsutil import jetstream_messages

    return jetstream_messages(url, stream)


def test_miner_alert_reaches_nats_metrics_jsonl_and_collect(agent_cgroup, episode, nats_server, tmp_path):
    from watcher import WatcherProcess

    port = free_port()
    url = nats_server.url + "?stream=AP_E2E"
    config = tmp_path / "config.yaml"
    config.write_text(f"output: ['{url}', 'jsonl:{tmp_path / 'ecs.jsonl'}', '{tmp_path / 's.msgpack'}']\n"
                      f"metrics: '127.0.0.1:{port}'\nno-view: true\nstatus-dir: '{tmp_path / 'st'}'\n")
    miner = tmp_path / "xmrig"
    shutil.copy("/bin/sleep", miner)
    w = WatcherProcess(["--config", str(config), "--cgroup", str(agent_cgroup.path)])
    collector = subprocess.Popen([sys.executable, "-m", "agentprobe", "collect", nats_server.url,
                                  "--subject", "agentprobe.*.alert", "--count", "1", "--json"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # the collector subscribes
        # through a shell, so that an exec the kernel refuses (BPF-LSM) fails in the shell, not in Popen
        p = episode.popen(["/bin/sh", "-c", 'exec "$0" 30', str(miner)])
        try:
            m = wait_for(lambda: (lambda s: s if s.get(
                'agentprobe_responses_total{action="freeze",outcome="frozen"}') else None)(scrape(port)),
                what="the freeze in the metrics")
        finally:
            p.kill()
        col_out, col_err = collector.communicate(timeout=20)
    finally:
        if collector.poll() is None:
            collector.kill()
        rc, _, stderr = w.stop(signal.SIGINT)
    assert rc == 0, stderr
    # where BPF-LSM is allowed (the test VMs) the kernel refuses the miner's exec: miner_exec_denied;
    # elsewhere it starts (and the exec probe kills it): miner_binary_started
    lsm = os.environ.get("AGENTPROBE_EXPECT_LSM") == "1"
    rule = "miner_exec_denied" if lsm else "miner_binary_started"
    assert m[f'agentprobe_alerts_total{{rule="{rule}",priority="critical",action="freeze"}}'] == 1
    assert m["agentprobe_freeze_latency_seconds_count"] == 1
    assert 0 < m["agentprobe_freeze_latency_seconds_sum"] < 1.0
    assert m['agentprobe_freeze_latency_seconds_bucket{le="+Inf"}'] == 1
    assert m["agentprobe_watched_cgroups"] == 1 and m["agentprobe_frozen_cgroups"] == 1
    assert m['agentprobe_records_total{type="exec"}'] >= 1
    assert m["agentprobe_rule_evaluation_seconds_count"] >= m['agentprobe_records_total{type="exec"}']
    assert m['agentprobe_lost_records_total{source="kernel"}'] == 0
    assert m[f'agentprobe_output_connected{{output="{url}"}}'] == 1
    # JetStream holds the whole stream, in order, each record on <prefix>.<node>.<type>
    file_recs = list(read_records(str(tmp_path / "s.msgpack")))
    js = jetstream_records(nats_server.url, "AP_E2E")
    assert [r for _, r in js] == file_recs
    node = file_recs[0]["node"].replace(".", "_")
    assert all(subj == f"agentprobe.{node}.{r['type']}" for subj, r in js)
    # the collector saw the alert
    (line,) = col_out.splitlines()
    alert = json.loads(line)
    # (where BPF-LSM is refused the exec probe also kills the known miner name: miner_exec_denied)
    assert alert["type"] == "alert" and alert["rule"] in ("miner_binary_started", "miner_exec_denied"), col_err
    # the JSON lines carry the same alert under ECS names
    ecs = [json.loads(x) for x in (tmp_path / "ecs.jsonl").read_text().splitlines()]
    assert len(ecs) == len(file_recs)
    (ecs_alert,) = [d for d in ecs if d["event"]["kind"] == "alert" and d["rule"]["id"] == rule]
    assert ecs_alert["event"]["severity"] == 99 and ecs_alert["process"]["pid"] == p.pid
    if not lsm:  # a refused exec leaves the process its old name
        assert ecs_alert["process"]["name"] == "xmrig"
    assert ecs_alert["host"]["hostname"] == file_recs[0]["node"]


def test_nats_outage_while_watching_loses_nothing(agent_cgroup, nats_server, tmp_path):
    from watcher import WatcherProcess

    url = nats_server.url + "?stream=AP_OUTAGE"
    w = WatcherProcess(["--cgroup", str(agent_cgroup.path), "--no-view", "-o", url, "-o", str(tmp_path / "s.msgpack"),
                        "--status-dir", str(tmp_path / "st")])
    try:
        agent_cgroup.run(["/bin/echo", "before"])
        time.sleep(0.5)
        nats_server.stop()
        for i in range(20):
            agent_cgroup.run(["/bin/echo", f"during-{i}"])
        time.sleep(1.0)
        assert w.proc.poll() is None  # the watcher carries on without its server
        nats_server.start()
        agent_cgroup.run(["/bin/echo", "after"])
        time.sleep(2.0)
    finally:
        rc, _, stderr = w.stop(signal.SIGINT)
    assert rc == 0, stderr
    assert "connection lost" in stderr and "reconnected after" in stderr and "0 dropped while away" in stderr
    file_recs = list(read_records(str(tmp_path / "s.msgpack")))
    js = [r for _, r in jetstream_records(nats_server.url, "AP_OUTAGE")]
    assert [r["seq"] for r in js] == [r["seq"] for r in file_recs]  # every record once, in order
    argv = [r["argv"][1] for r in js if r["type"] == "exec"]
    assert argv == ["before", *[f"during-{i}" for i in range(20)], "after"]
    assert js[-1]["type"] == "stop" and js[-1]["lost_output"] == 0


def test_sighup_reloads_rules_without_losing_records(agent_cgroup, tmp_path):
    from watcher import WatcherProcess

    rules = tmp_path / "site.yaml"
    rules.write_text("[]\n")
    config = tmp_path / "config.yaml"
    config.write_text(f"rules: ['{rules}']\n")
    out = tmp_path / "s.msgpack"
    marker = tmp_path / "reload-marker"
    shutil.copy("/bin/true", marker)
    w = WatcherProcess(["--config", str(config), "--cgroup", str(agent_cgroup.path), "--no-view", "-o", str(out),
                        "--status-dir", str(tmp_path / "st")])
    try:
        agent_cgroup.run([str(marker), "one"])
        # the watcher has handled "one" (under the old rules) before the reload
        wait_for(lambda: any(r["type"] == "exec" for r in read_records(str(out))), what="the first exec")
        rules.write_text(MARKER_RULE)
        w.proc.send_signal(signal.SIGHUP)
        wait_line(w, "agentprobe: reloaded")
        agent_cgroup.run([str(marker), "two"])
        rules.write_text("- rule: [broken\n")
        w.proc.send_signal(signal.SIGHUP)
        wait_line(w, "reload failed")
        agent_cgroup.run([str(marker), "three"])  # the rules that were running still are
        time.sleep(0.5)
        assert w.proc.poll() is None
    finally:
        rc, _, stderr = w.stop(signal.SIGINT)
    assert rc == 0, stderr
    recs = list(read_records(str(out)))
    assert [r["seq"] for r in recs] == list(range(len(recs)))
    assert recs[-1]["lost_total"] == 0
    alerts = [r["evidence"][-1]["argv"][1] for r in recs if r["type"] == "alert" and r["rule"] == "reload_marker"]
    assert alerts == ["two", "three"]
    reloads = [r for r in recs if r["type"] == "reload"]
    assert [r["ok"] for r in reloads] == [True, False]
    assert reloads[0]["config"] == str(config) and reloads[0]["rules"] > 1
    assert str(rules) in reloads[1]["error"]
    assert [r["argv"][1] for r in recs if r["type"] == "exec"] == ["one", "two", "three"]


def test_start_faults_are_one_line_and_exit_1(agentprobe_cmd, agent_cgroup, tmp_path):
    dead = free_port()
    r = subprocess.run([*agentprobe_cmd, "watch", "--no-view", "--duration", "1", "--cgroup", str(agent_cgroup.path),
                        "-o", f"nats://127.0.0.1:{dead}", "--status-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip() == f"agentprobe: cannot reach NATS server nats://127.0.0.1:{dead}: Connection refused"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = subprocess.run([*agentprobe_cmd, "watch", "--no-view", "--duration", "1", "--cgroup",
                            str(agent_cgroup.path), "--metrics", f"127.0.0.1:{port}", "-o", str(tmp_path / "s"),
                            "--status-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip() == f"agentprobe: cannot serve metrics on 127.0.0.1:{port}: Address already in use"


def test_nats_drops_reach_the_stream_as_lost_records(agent_cgroup, nats_server, tmp_path):
    """NATS away and a small buffer: what did not fit is counted in `lost` records (source output)
    that the other outputs carry; the file itself misses nothing."""
    from watcher import WatcherProcess

    url = nats_server.url + "?buffer=65536"
    out = tmp_path / "s.msgpack"
    w = WatcherProcess(["--cgroup", str(agent_cgroup.path), "--no-view", "-o", url, "-o", str(out),
                        "--status-dir", str(tmp_path / "st")])
    try:
        nats_server.stop()
        agent_cgroup.run(["/bin/sh", "-c", "for i in $(seq 400); do /bin/true; done"], timeout=60)

        def lost():
            return [r for r in read_records(str(out)) if r["type"] == "lost" and r["source"] == "output"]

        wait_for(lost, what="a lost record from the NATS output")
        assert w.proc.poll() is None  # the watcher carries on
    finally:
        rc, _, stderr = w.stop(signal.SIGINT)
    assert rc == 0, stderr
    assert "connection lost" in stderr
    recs = list(read_records(str(out)))
    assert [r["seq"] for r in recs] == list(range(len(recs)))  # the file output lost nothing
    drops = [r for r in recs if r["type"] == "lost" and r["source"] == "output"]
    assert drops and all(r["total"] > 0 for r in drops)
    # counts are the outputs' totals so far; the records' totals add up to the NATS output's count
    assert drops[-1]["counts"] == {url: sum(r["total"] for r in drops), str(out): 0}
    assert sum(1 for r in recs if r["type"] == "exec") >= 400
    assert recs[-1]["type"] == "stop" and recs[-1]["lost_output"] >= drops[-1]["counts"][url]


CONNECT = "import socket, sys; s = socket.socket(); s.settimeout(2); s.connect_ex((sys.argv[1], int(sys.argv[2])))"


def test_sighup_applies_allowlist_and_kernel_deny_list_changes_and_survives_bad_configs(
        agent_cgroup, tmp_path, monkeypatch):
    """The default config file (pointed elsewhere with $AGENTPROBE_DEFAULT_CONFIG), changed under a
    running watcher: a wider allowed_networks lets a pool-port connect through the kernel; a new
    mining_pool_hosts entry is refused in the kernel; a config with an unknown key or a wrong type is
    one line and a failed reload, and the last good config keeps running. No record lost."""
    from watcher import WatcherProcess

    site = tmp_path / "site.yaml"
    site.write_text("- list: allowed_networks\n  items: [127.0.0.1/32]\n")
    config = tmp_path / "etc" / "config.yaml"
    config.parent.mkdir()
    port = free_port()
    good = f"rules: ['{site}']\nmetrics: '127.0.0.1:{port}'\n"
    config.write_text(good)
    monkeypatch.setenv("AGENTPROBE_DEFAULT_CONFIG", str(config))
    out = tmp_path / "s.msgpack"
    w = WatcherProcess(["--cgroup", str(agent_cgroup.path), "--no-view", "-o", str(out),
                        "--status-dir", str(tmp_path / "st")])
    eps = iter(range(100))

    def connect(addr: str, port_: int) -> int:
        """From a new episode cgroup (a refused pool connect freezes its episode); returns the pid once
        the watcher recorded the connect."""
        ep = agent_cgroup.child(f"ep-{next(eps)}")
        pid = ep.popen([sys.executable, "-c", CONNECT, addr, str(port_)]).pid
        wait_for(lambda: any(r["type"] == "connect" and r["proc"]["pid"] == pid for r in read_records(str(out))),
                 what=f"the connect to {addr}:{port_}")
        time.sleep(0.3)  # a deny record follows its connect
        return pid

    def reload(expect: str, n: int) -> None:
        w.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: (w._readline(0.1), sum(expect in ln for ln in w.stderr_lines) >= n)[1], what=expect)

    try:
        denied_pool = connect("127.0.0.2", 3333)  # a pool port outside allowed_networks
        site.write_text("- list: allowed_networks\n  items: [127.0.0.0/8]\n")
        reload("agentprobe: reloaded", 1)
        allowed_pool = connect("127.0.0.2", 3333)
        not_yet_host = connect("127.0.0.3", 8080)
        site.write_text("- list: allowed_networks\n  items: [127.0.0.0/8]\n"
                        "- list: mining_pool_hosts\n  items: [127.0.0.3/32]\n")
        reload("agentprobe: reloaded", 2)
        denied_host = connect("127.0.0.3", 8080)
        config.write_text(good + "colour: red\n")
        reload("reload failed", 1)
        config.write_text(good.replace("rules: [", "rescan: fast\nrules: ["))
        reload("reload failed", 2)
        still_denied = connect("127.0.0.3", 8080)  # the last good lists still hold, in the kernel too
        still_allowed = connect("127.0.0.2", 3333)
        m = scrape(port)
        assert w.proc.poll() is None
    finally:
        rc, _, stderr = w.stop(signal.SIGINT)
    assert rc == 0, stderr
    recs = list(read_records(str(out)))
    assert [r["seq"] for r in recs] == list(range(len(recs))) and recs[-1]["lost_total"] == 0
    denied = {r["proc"]["pid"]: (r["address"], r["port"]) for r in recs if r["type"] == "deny"}
    assert denied == {denied_pool: ("127.0.0.2", 3333), denied_host: ("127.0.0.3", 8080),
                      still_denied: ("127.0.0.3", 8080)}
    alerted = {r["proc"]["pid"] for r in recs if r["type"] == "alert" and r["rule"] == "mining_pool_connection"}
    assert alerted == {denied_pool, denied_host, still_denied}
    result = {r["proc"]["pid"]: (r["result"], r["retval"]) for r in recs if r["type"] == "connect"}
    for pid in (allowed_pool, not_yet_host, still_allowed):
        assert result[pid] == ("attempted", 0)  # let through by the kernel
    for pid in denied:
        assert result[pid] == ("error", -1)
    reloads = [r for r in recs if r["type"] == "reload"]
    assert [r["ok"] for r in reloads] == [True, True, False, False]
    assert all(r["config"] == str(config) for r in reloads[:2])
    assert reloads[2]["error"].startswith(f"config {config}: unknown key 'colour' (known: ")
    assert reloads[3]["error"] == f"config {config}: 'rescan' must be a number, not 'fast' (str)"
    failed = [ln for ln in stderr.splitlines() if "reload failed" in ln]
    assert failed == [f"agentprobe: reload failed, the running rules stay: {r['error']}" for r in reloads[2:]]
    assert m['agentprobe_config_reloads_total{result="ok"}'] == 2
    assert m['agentprobe_config_reloads_total{result="failed"}'] == 2
