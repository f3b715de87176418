"""The command line (agentprobe/cli.py): rules list and check, and watch refusing bad rules before it loads anything."""

from __future__ import annotations

import json
import subprocess


def cli(agentprobe_cmd, *args):
    return subprocess.run([*agentprobe_cmd, *args], capture_output=True, text=True, timeout=120)


def test_rules_list(agentprobe_cmd):
    r = cli(agentprobe_cmd, "rules", "list")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["RULE", "PRIORITY", "ACTION"]
    row = next(line for line in lines if line.startswith("ssh_port_forwarding "))
    assert row.split()[1:5] == ["critical", "freeze", "yes", "T1572,T1021.004"]
    infos = json.loads(cli(agentprobe_cmd, "rules", "list", "--json").stdout)
    assert {i["id"]: i["enabled"] for i in infos}["egress_outside_allowlist"] is False


def test_site_file_widens_lists_and_switches_rules(agentprobe_cmd, tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text("- list: allowed_networks\n  append: true\n  items: [10.20.0.0/16]\n"
                    "- rule: egress_outside_allowlist\n  enabled: true\n")
    r = cli(agentprobe_cmd, "rules", "check", str(site))
    assert r.returncode == 0 and r.stdout.strip().startswith(f"{site}: ok (")
    infos = json.loads(cli(agentprobe_cmd, "rules", "list", "--rules", str(site), "--json").stdout)
    assert {i["id"]: i["enabled"] for i in infos}["egress_outside_allowlist"] is True


def test_rules_check_reports_file_line_rule(agentprobe_cmd, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- rule: my_rule\n  desc: d\n  condition: evt.type = exec and proc.args regex '(['\n"
                   "  priority: high\n  tags: [T1059]\n")
    r = cli(agentprobe_cmd, "rules", "check", str(bad))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"agentprobe: {bad}:3: rule 'my_rule': ")
    assert "regex" in lines[0]


def test_watch_refuses_bad_rules_before_loading(agentprobe_cmd, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- rule: a\n  desc: d\n  condition: evt.type = exec\n  priority: high\n"
                   "- rule: a\n  desc: d\n  condition: evt.type = exec\n  priority: high\n")
    out = tmp_path / "s.msgpack"
    r = cli(agentprobe_cmd, "watch", "--rules", str(bad), "-o", str(out), "--no-view", "--duration", "1")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"agentprobe: {bad}:5: rule 'a': ") and "duplicate" in lines[0]
    assert not out.exists()
