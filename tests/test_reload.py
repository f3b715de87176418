"""reload.py: SIGHUP swaps the rule engine of a real Watcher's pipeline in place; a bad file is a
`reload` record with ok false, and the running rules stay."""

from __future__ import annotations

import io
import os
import signal
import textwrap

import pytest

from agentprobe.errors import AgentprobeError
from agentprobe.pipeline import Pipeline, rule_engine
from agentprobe.reload import RuleReloader
from agentprobe.stage import Stage
from agentprobe.status import StatusFile
from agentprobe.watch import Watcher, WatchOptions

RULES = """
- rule: port_seven
  desc: a connect to port 7
  condition: evt.type = connect and net.port = 7
  priority: high
- rule: port_eight
  desc: a connect to port 8
  condition: evt.type = connect and net.port = 8
  priority: high
"""


@pytest.fixture
def setup(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(textwrap.dedent(RULES))
    seen: list[dict] = []
    w = Watcher(WatchOptions(rule_files=[str(rules)], default_rules=False))
    engine = rule_engine([str(rules)], False)
    w.pipeline = Pipeline([], on_record=seen.append)
    w.pipeline.stages, w.pipeline.rules_at, w.pipeline.engine = [Stage(), engine], 1, engine
    w.pipeline.status = StatusFile(str(tmp_path), [])
    err = io.StringIO()

    def build():
        return rule_engine([str(rules)], False), None, str(rules)
    return w, RuleReloader(w, build, err=err), rules, seen, err


def reloads(seen: list[dict]) -> list[dict]:
    return [r for r in seen if r["type"] == "reload"]


def test_a_reload_swaps_the_engine_and_says_so(setup):
    w, r, rules, seen, err = setup
    old = w.pipeline.engine
    rules.write_text(textwrap.dedent(RULES).split("- rule: port_eight")[0])
    r.reload()
    assert w.pipeline.engine is not old and w.pipeline.stages[1] is w.pipeline.engine
    assert [x.spec.id for x in w.pipeline.engine.ruleset.enabled_rules] == ["port_seven"]
    (rec,) = reloads(seen)
    assert rec["ok"] is True and rec["config"] == str(rules) and rec["rules"] == 1 and rec["state_kept"] == 0
    assert r.reloads == 1 and r.failures == 0
    assert "reloaded" in err.getvalue() and "1 rules" in err.getvalue()
    assert w.options.recorded_ports == (53,)  # from the new rule set


@pytest.mark.parametrize("content, error", [
    ("- rule: x\n  condition: evt.type = = exec\n", AgentprobeError),
    (None, ValueError),
])
def test_a_failed_reload_keeps_the_running_rules(setup, content, error):
    w, r, rules, seen, err = setup
    old = w.pipeline.engine
    if content is not None:
        rules.write_text(content)
    else:
        def broken():
            raise ValueError("disk on fire")
        r.build = broken
    r.reload()
    assert w.pipeline.engine is old and w.pipeline.stages[1] is old
    (rec,) = reloads(seen)
    assert rec["ok"] is False and rec["error"]
    if error is ValueError:
        assert rec["error"] == "ValueError: disk on fire"
    assert r.failures == 1 and r.reloads == 0
    assert "reload failed, the running rules stay" in err.getvalue()


def test_sighup_only_asks_and_the_loop_reloads(setup):
    w, r, rules, seen, err = setup
    assert r.poll() is False and reloads(seen) == []
    old = signal.signal(signal.SIGHUP, r.request)
    try:
        os.kill(os.getpid(), signal.SIGHUP)  # the handler runs before kill returns to Python code
    finally:
        signal.signal(signal.SIGHUP, old)
    assert reloads(seen) == []  # nothing done in the handler
    assert r.poll() is False  # never stops the loop
    assert [x["ok"] for x in reloads(seen)] == [True]
    r.poll()
    assert len(reloads(seen)) == 1  # asked once, done once


def test_a_deny_policy_of_the_new_rules_is_given_to_the_watcher(setup):
    w, r, rules, seen, err = setup
    r.build = lambda: (rule_engine([str(rules)], False), {"ports": [7], "allow": [], "deny": []}, None)
    r.reload()
    assert w.options.deny == {"ports": [7], "allow": [], "deny": []}
    assert reloads(seen)[0]["config"] is None and "the rule files" in err.getvalue()
