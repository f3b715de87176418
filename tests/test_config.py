"""The configuration file, `config show`, and a reload keeping the rule engine's state."""

from __future__ import annotations

import subprocess
import textwrap

import pytest
from rule_samples import Proc, connect_record

from agentprobe.cli import watch
from agentprobe.config import ConfigError, load_config
from agentprobe.rules import RuleEngine, load_ruleset


def write(tmp_path, text: str):
    p = tmp_path / "config.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_every_watch_option_is_a_key_with_its_type(tmp_path):
    p = write(tmp_path, """\
        cgroup: [agents]
        cgroup_glob: "kubepods.slice/**/*agent*"
        output: [/var/log/x.msgpack, "nats://127.0.0.1:4222?stream=AP", "jsonl:-"]
        metrics: "127.0.0.1:9477"
        buffer: perf
        no-view: true
        duration: 2.5
        gpu-interval: 1
        gpu-major: [240, 241]
        rescan: 0.5
        rules: [/etc/agentprobe/site.yaml]
        no-default-rules: false
        dry-run: true
        in-kernel-deny: false
        no-cut-network: true
        status-dir: /tmp/st
        probes: syscalls
        gpu-probe: always
        gpu-idle-detach: 2
        label-env: [EPISODE_ID, TOOL_CALL_ID]
        label-dir: /run/labels
        no-verdicts: true
        on-loss: freeze
        ring-pages: 256
        busy-poll-ms: 0
        rt-priority: 0
        insecure-files: false
        kube-pods: true
        pod-selector: ["app=rl-agent", "team=research,!canary"]
        pod-annotation: agentprobe.io/watch=true
        kube-api: "https://10.96.0.1:443"
        kube-credentials: /var/run/secrets/kubernetes.io/serviceaccount
        node-name: gpu-node-7
        kube-refresh: 30
        """)
    values = load_config(p, watch)
    assert values == {
        "cgroups": ["agents"], "globs": ["kubepods.slice/**/*agent*"],
        "outputs": ["/var/log/x.msgpack", "nats://127.0.0.1:4222?stream=AP", "jsonl:-"],
        "metrics_addr": "127.0.0.1:9477", "buffer": "perf", "no_view": True, "duration": 2.5, "gpu_interval": 1,
        "gpu_majors": [240, 241], "rescan": 0.5, "rule_files": ["/etc/agentprobe/site.yaml"],
        "no_default_rules": False, "dry_run": True, "in_kernel_deny": False, "no_cut_network": True,
        "status_dir": "/tmp/st", "probe_mode": "syscalls", "gpu_probe": "always", "gpu_idle_detach": 2,
        "label_env": ["EPISODE_ID", "TOOL_CALL_ID"], "label_dir": "/run/labels", "no_verdicts": True,
        "on_loss": "freeze", "ring_pages": 256, "busy_poll_ms": 0, "rt_priority": 0, "insecure_files": False,
        "kube_pods": True, "pod_selectors": ["app=rl-agent", "team=research,!canary"],
        "pod_annotations": ["agentprobe.io/watch=true"], "kube_api": "https://10.96.0.1:443",
        "kube_credentials": "/var/run/secrets/kubernetes.io/serviceaccount", "node_name": "gpu-node-7",
        "kube_refresh": 30}
    # every option of `watch` (but --config itself) can be set in the file
    assert set(values) == {p_.name for p_ in watch.params if p_.name not in ("config_path", "help")}


@pytest.mark.parametrize("text, message", [
    ("colour: red\n", "unknown key 'colour' (known: buffer, busy-poll-ms, cgroup, cgroup-glob, dry-run,"),
    ("rescan: fast\n", "'rescan' must be a number, not 'fast' (str)"),
    ("no-view: 'yes'\n", "'no-view' must be true or false, not 'yes' (str)"),
    ("buffer: ring\n", "'buffer' must be one of auto, ringbuf, perf, not 'ring' (str)"),
    ("gpu-major: [240, x]\n", "'gpu-major' must be a list of integers (or an integer)"),
    ("output: [1]\n", "'output' must be a list of strings (or a string)"),
    ("- a\n- b\n", "expected a mapping of option: value, got list"),
    ("rescan: [1\n", "not valid YAML at line 2"),
])
def test_bad_files_are_one_clear_error(tmp_path, text, message):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p, watch)
    assert str(e.value).startswith(f"config {p}: ") and message in str(e.value)


def test_command_line_wins_over_the_file(tmp_path):
    p = write(tmp_path, "rescan: 7\nbuffer: perf\noutput: [a.msgpack]\n")
    ctx = watch.make_context("watch", ["--config", str(p), "--rescan", "1", "-o", "b.msgpack"])
    assert ctx.params["rescan"] == 1 and ctx.params["buffer"] == "perf" and ctx.params["outputs"] == ("b.msgpack",)


def test_cli_config_show_and_bad_config(agentprobe_cmd, tmp_path):
    p = write(tmp_path, "metrics: ':9477'\nrules: [/etc/site.yaml]\n")
    r = subprocess.run([*agentprobe_cmd, "config", "show", "--config", str(p)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"# effective configuration of agentprobe watch (from {p})"
    assert "metrics: ':9477'" in lines[4] and lines[4].endswith("# config")
    assert any(ln.startswith("output: [/var/log/agentprobe/stream.msgpack]") and ln.endswith("# default")
               for ln in lines)
    import yaml

    assert yaml.safe_load(r.stdout)["rules"] == ["/etc/site.yaml"]  # the output is itself a config file
    again = tmp_path / "again.yaml"
    again.write_text(r.stdout)
    r2 = subprocess.run([*agentprobe_cmd, "config", "show", "--config", str(again)], capture_output=True, text=True)
    assert r2.returncode == 0, r2.stderr
    assert [ln.split("#")[0] for ln in r2.stdout.splitlines()[1:]] == [ln.split("#")[0] for ln in lines[1:]]
    bad = write(tmp_path, "rescn: 1\n")
    for cmd in (["config", "show", "--config", str(bad)], ["watch", "--config", str(bad)]):
        r = subprocess.run([*agentprobe_cmd, *cmd], capture_output=True, text=True)
        assert r.returncode == 1
        assert r.stderr.splitlines() == [f"agentprobe: config {bad}: unknown key 'rescn' (known: buffer, "
                                         "busy-poll-ms, cgroup, cgroup-glob, dry-run, duration, gpu-idle-detach, "
                                         "gpu-interval, gpu-major, gpu-probe, in-kernel-deny, insecure-files, "
                                         "kube-api, kube-credentials, "
                                         "kube-pods, kube-refresh, label-dir, label-env, metrics, no-cut-network, "
                                         "no-default-rules, no-verdicts, no-view, node-name, on-loss, output, "
                                         "pod-annotation, pod-selector, probes, rescan, ring-pages, rt-priority, "
                                         "rules, status-dir)"]
    r = subprocess.run([*agentprobe_cmd, "watch", "--config", str(tmp_path / "none.yaml")], capture_output=True,
                       text=True)
    assert r.returncode == 1 and r.stderr == f"agentprobe: cannot read config {tmp_path / 'none.yaml'}: no such file\n"


COUNT_RULES = """
- rule: connects
  desc: connections counted
  condition: evt.type = connect and net.port = 7
  count: {by: process, within: 60s, threshold: %d}
  priority: low
- rule: other
  desc: unrelated
  condition: evt.type = exec and proc.name = nothing
  priority: low
"""


def engine(tmp_path, threshold: int, extra: str = "") -> RuleEngine:
    p = tmp_path / f"r{threshold}{len(extra)}.yaml"
    p.write_text(extra + COUNT_RULES % threshold)
    return RuleEngine(load_ruleset([p], defaults=False))


def test_a_reload_keeps_the_state_of_unchanged_rules(tmp_path):
    proc = Proc(pid=300, exe="/usr/bin/curl")
    old = engine(tmp_path, 3)
    for k in range(2):
        assert old.process(connect_record(proc, "192.0.2.1", 7, ktime=(k + 1) * 10**9)) == []
    # a new rule in front shifts every index; the count rule itself did not change
    new = engine(tmp_path, 3, extra="- rule: first\n  desc: d\n  condition: evt.type = fork\n  priority: low\n")
    assert new.adopt_state(old) == 1
    (alert,) = new.process(connect_record(proc, "192.0.2.1", 7, ktime=3 * 10**9))
    assert alert["rule"] == "connects" and len(alert["evidence"]) == 3
    # a changed rule starts afresh
    changed = engine(tmp_path, 4)
    old2 = engine(tmp_path, 3)
    for k in range(2):
        old2.process(connect_record(proc, "192.0.2.1", 7, ktime=(k + 1) * 10**9))
    assert changed.adopt_state(old2) == 0
    assert changed.process(connect_record(proc, "192.0.2.1", 7, ktime=3 * 10**9)) == []


def test_the_default_file_is_read_when_no_config_is_given(agentprobe_cmd, tmp_path):
    """/etc/agentprobe/config.yaml by default; $AGENTPROBE_DEFAULT_CONFIG points the default elsewhere
    (here, so that the test never writes to /etc)."""
    import os

    from agentprobe.config import DEFAULT_CONFIG, default_config, resolve_config

    env = {k: v for k, v in os.environ.items() if k != "AGENTPROBE_DEFAULT_CONFIG"}
    assert DEFAULT_CONFIG == "/etc/agentprobe/config.yaml"
    p = tmp_path / "etc" / "config.yaml"
    env["AGENTPROBE_DEFAULT_CONFIG"] = str(p)
    r = subprocess.run([*agentprobe_cmd, "config", "show"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.splitlines()[0].endswith("(no config file)")  # absent: defaults only
    p.parent.mkdir()
    p.write_text("rescan: 7\n")
    r = subprocess.run([*agentprobe_cmd, "config", "show"], capture_output=True, text=True, env=env)
    assert r.stdout.splitlines()[0] == f"# effective configuration of agentprobe watch (from {p})"
    assert any(ln.startswith("rescan: 7 ") and ln.endswith("# config") for ln in r.stdout.splitlines())
    p.write_text("rescan: fast\n")  # the default file is checked like a given one
    r = subprocess.run([*agentprobe_cmd, "config", "show"], capture_output=True, text=True, env=env)
    assert (r.returncode, r.stderr) == (1, f"agentprobe: config {p}: 'rescan' must be a number, not 'fast' (str)\n")
    old = os.environ.pop("AGENTPROBE_DEFAULT_CONFIG", None)
    try:
        assert default_config() == DEFAULT_CONFIG
        assert resolve_config(None) == (DEFAULT_CONFIG if os.path.isfile(DEFAULT_CONFIG) else None)
    finally:
        if old is not None:
            os.environ["AGENTPROBE_DEFAULT_CONFIG"] = old
