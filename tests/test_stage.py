"""stage.Stage: the one interface of the record path. Its defaults let a stage implement only
what it needs; every hook exists on every stage, so the pipeline looks nothing up by name."""

from __future__ import annotations

from agentprobe.pipeline import Pipeline
from agentprobe.stage import Stage

HOOKS = ("process", "tick", "finish", "forget_cgroup", "adopt_state")


def test_defaults_see_everything_make_nothing_keep_nothing():
    s = Stage()
    assert s.process({"type": "exec"}) == []
    assert s.tick(123.0) == []
    assert s.finish() == []
    assert s.forget_cgroup(42) is None
    assert s.adopt_state(Stage()) == 0


def test_each_call_returns_a_new_list():
    """A caller may extend what a stage returned; the next call must not see it."""
    s = Stage()
    for hook, args in (("process", ({"type": "exec"},)), ("tick", (1.0,)), ("finish", ())):
        first = getattr(s, hook)(*args)
        first.append({"type": "leak"})
        assert getattr(s, hook)(*args) == [], hook


class OnlyProcess(Stage):
    name = "only-process"

    def process(self, record: dict) -> list[dict]:
        return [{"type": "alert", "of": record["type"]}]


def test_a_stage_that_implements_one_hook_has_all_of_them(tmp_path):
    """The pipeline calls every hook of every stage: one implementing only `process` still runs
    through tick, finish and forget_cgroup."""
    s = OnlyProcess()
    for hook in HOOKS:
        assert callable(getattr(s, hook)), hook
    seen = []
    p = Pipeline([], on_record=seen.append)
    p.stages = [s]
    p.emit({"type": "exec"})
    p.tick(1.0)
    p.finish()
    p.forget_cgroup(7)
    assert [r["type"] for r in seen] == ["exec", "alert"]
    assert p.summary.internal_errors == 0
