"""pipeline.py: the one way records enter the stages and the sinks (Pipeline.emit), the stages'
hooks, a reload's engine swap, the stop record's accounting, and build_pipeline's stage order.
Real outputs (files read back with stream.read_records), real rule engines, real cgroups."""

from __future__ import annotations

import io
import os
import textwrap

import pytest
from rule_samples import Proc, connect_record

from agentprobe.errors import AgentprobeError
from agentprobe.metrics import TimedStage, WatchMetrics
from agentprobe.pipeline import Pipeline, build_pipeline, rule_engine
from agentprobe.rules import build_engine
from agentprobe.rules.engine import RuleEngine
from agentprobe.selfwatch import LossMonitor
from agentprobe.stage import Stage
from agentprobe.status import StatusFile
from agentprobe.stream import read_records


def meta(type_: str, fields: dict) -> dict:
    return {"v": 1, "type": type_, "ts": 1, "ktime": 1, **fields}


class Maker(Stage):
    """Notes what it sees; makes the records `makes[type]` lists; raises on types in `fails`."""

    def __init__(self, name: str, makes: dict[str, list[str]] | None = None, fails: tuple[str, ...] = (),
                 on_tick: list[str] | None = None, finish_fails: bool = False) -> None:
        self.name = name
        self.makes = makes or {}
        self.fails = fails
        self.on_tick = on_tick or []
        self.finish_fails = finish_fails
        self.seen: list[str] = []
        self.forgotten: list[int] = []

    def process(self, record: dict) -> list[dict]:
        self.seen.append(record["type"])
        if record["type"] in self.fails:
            raise RuntimeError(f"{self.name} fails on {record['type']}")
        return [{"type": t, "by": self.name} for t in self.makes.get(record["type"], [])]

    def tick(self, now: float) -> list[dict]:
        return [{"type": t, "by": self.name} for t in self.on_tick]

    def finish(self) -> list[dict]:
        if self.finish_fails:
            raise RuntimeError("finish fails")
        return [{"type": f"{self.name}-final"}]

    def forget_cgroup(self, cgroup_id: int) -> None:
        self.forgotten.append(cgroup_id)


def losses() -> LossMonitor:
    return LossMonitor(lambda p: p, lambda p: None, meta, {1: "exec"})


def pipeline(tmp_path, stages, outputs=None, **kw) -> Pipeline:
    return Pipeline(stages, outputs if outputs is not None else [str(tmp_path / "out.msgpack")], 0, None,
                    losses(), StatusFile(str(tmp_path / "status"), []), err=kw.pop("err", io.StringIO()), **kw)


def written(p: Pipeline, tmp_path) -> list[dict]:
    p.close_sinks()
    return list(read_records(str(tmp_path / "out.msgpack")))


# ------------------------------------------------------------------ emit
def test_emit_is_depth_first_and_never_back_to_the_maker(tmp_path):
    """What a stage makes goes to the sinks and through every later stage before the next stage
    sees the original; the maker itself and the stages before it never see it."""
    s0 = Maker("s0", {"in": ["x", "y"]})
    s1 = Maker("s1", {"x": ["z"]})
    s2 = Maker("s2")
    p = pipeline(tmp_path, [s0, s1, s2])
    p.open_sinks()
    p.emit({"type": "in"})
    assert [r["type"] for r in written(p, tmp_path)] == ["in", "x", "z", "y"]
    assert s0.seen == ["in"]
    assert s1.seen == ["x", "y", "in"]
    assert s2.seen == ["z", "x", "y", "in"]


def test_seq_numbers_every_record_in_the_order_the_sinks_get_them(tmp_path):
    seen = []
    p = pipeline(tmp_path, [Maker("s0", {"in": ["x", "y"]}), Maker("s1", {"x": ["z"]})], on_record=seen.append)
    p.open_sinks()
    p.emit({"type": "in"})
    p.emit({"type": "in"})
    recs = written(p, tmp_path)
    assert [r["seq"] for r in recs] == list(range(8))
    assert [r["seq"] for r in seen] == list(range(8))
    assert p.summary.events == {"in": 2, "x": 2, "y": 2, "z": 2}
    assert p.summary.events_total == 8


def test_emit_from_a_later_stage_skips_the_earlier_ones(tmp_path):
    s0, s1 = Maker("s0"), Maker("s1")
    p = pipeline(tmp_path, [s0, s1], outputs=[])
    p.emit({"type": "late"}, first_stage=1)
    assert (s0.seen, s1.seen) == ([], ["late"])


def test_a_failing_stage_costs_only_its_own_output(tmp_path):
    """s1 fails on `x`: `z` (its output) is never made, but `x` is written, the later stage still
    sees it, the other records are untouched, and the failure is counted and said once."""
    err = io.StringIO()
    s0, s1, s2 = Maker("s0", {"in": ["x", "y"]}), Maker("s1", {"x": ["z"], "y": ["w"]}, fails=("x",)), Maker("s2")
    p = pipeline(tmp_path, [s0, s1, s2], err=err)
    p.open_sinks()
    p.emit({"type": "in"})
    assert [r["type"] for r in written(p, tmp_path)] == ["in", "x", "y", "w"]
    assert s2.seen == ["x", "w", "y", "in"]
    assert p.summary.internal_errors == 1
    assert "s1 fails on x" in err.getvalue()


def test_internal_errors_are_counted_all_and_said_three_times(tmp_path):
    err = io.StringIO()
    p = pipeline(tmp_path, [Maker("bad", fails=("in",))], outputs=[], err=err)
    for _ in range(5):
        p.emit({"type": "in"})
    assert p.summary.internal_errors == 5
    assert err.getvalue().count("internal error") == 3


# ------------------------------------------------------------------ hooks
def test_tick_output_starts_after_the_ticking_stage(tmp_path):
    s0, s1, s2 = Maker("s0"), Maker("s1", on_tick=["t"]), Maker("s2")
    seen = []
    p = pipeline(tmp_path, [s0, s1, s2], outputs=[], on_record=seen.append)
    p.tick(1.0)
    assert [r["type"] for r in seen] == ["t"]
    assert (s0.seen, s1.seen, s2.seen) == ([], [], ["t"])


def test_finish_a_failing_stage_does_not_stop_the_others(tmp_path):
    seen = []
    s0, s1, s2 = Maker("s0"), Maker("s1", finish_fails=True), Maker("s2")
    p = pipeline(tmp_path, [s0, s1, s2], outputs=[], on_record=seen.append)
    p.finish()
    assert [r["type"] for r in seen] == ["s0-final", "s2-final"]
    assert s1.seen == ["s0-final"] and s2.seen == ["s0-final"]
    assert p.summary.internal_errors == 1


def test_forget_cgroup_reaches_every_stage(tmp_path):
    stages = [Maker("a"), Maker("b")]
    p = pipeline(tmp_path, stages, outputs=[])
    p.forget_cgroup(99)
    assert [s.forgotten for s in stages] == [[99], [99]]


def test_check_losses_emits_lost_records_and_keeps_the_summary(tmp_path):
    seen = []
    p = pipeline(tmp_path, [Stage()], outputs=[], on_record=seen.append)
    p.check_losses({1: 3})
    p.check_losses({1: 5})
    lost = [r for r in seen if r["type"] == "lost"]
    assert [r["total"] for r in lost] == [3, 2]
    assert p.summary.lost_kernel == {"exec": 5}
    assert p.summary.lost_total == 5


# ------------------------------------------------------------------ sinks
def open_fds_to(path) -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == str(path)
        except OSError:
            continue
    return n


def test_open_sinks_closes_what_it_opened_when_one_fails(tmp_path):
    good = tmp_path / "good.msgpack"
    (tmp_path / "a-file").write_text("")
    p = pipeline(tmp_path, [], outputs=[str(good), str(tmp_path / "a-file" / "x.msgpack")])
    with pytest.raises(AgentprobeError):
        p.open_sinks()
    assert p.sinks == []
    assert good.exists() and open_fds_to(good) == 0


def test_extra_sinks_get_every_record(tmp_path):
    metrics = WatchMetrics()
    p = Pipeline([Stage()], [], 0, None, losses(), StatusFile(str(tmp_path), []), extra_sinks=[metrics])
    p.open_sinks()
    p.emit({"type": "exec"})
    p.emit({"type": "exec"})
    assert metrics.records["exec"] == 2


def test_stop_record_fields_count_the_stop_record_itself(tmp_path):
    p = pipeline(tmp_path, [Maker("s0", {"in": ["x"]})])
    p.open_sinks()
    p.emit({"type": "in"})
    p.summary.decode_errors = 2
    f = p.stop_record_fields(None)
    assert f["reason"] == "stopped"
    assert f["events"] == {"in": 1, "x": 1} and f["events_total"] == 3
    assert f["decode_errors"] == 2 and f["lost_total"] == 2
    assert f["unwritten_at_stop"] == {} and f["lost_output"] == 0
    assert p.stop_record_fields("boom")["reason"] == "boom"
    p.close_sinks()


# ------------------------------------------------------------------ reload
COUNT_RULES = """
- rule: three_connects
  desc: three connects to port 7 by one process
  condition: evt.type = connect and net.port = 7
  count: {by: process, within: 60s, threshold: 3}
  priority: high
"""


def count_engine(tmp_path, text: str = COUNT_RULES) -> RuleEngine:
    path = tmp_path / "rules.yaml"
    path.write_text(textwrap.dedent(text))
    return build_engine([path], with_defaults=False, hash_local_ssh=False)


def rules_pipeline(tmp_path, engine, wrap=None) -> tuple[Pipeline, list[dict]]:
    seen: list[dict] = []
    stage = wrap(engine) if wrap else engine
    p = Pipeline([Stage(), stage, Stage()], [], 1, engine, losses(), StatusFile(str(tmp_path), []),
                 on_record=seen.append, wrap_rules=wrap)
    return p, seen


def connects(p: Pipeline, n: int) -> None:
    agent = Proc(pid=300, exe="/usr/bin/nc")
    for i in range(n):
        p.emit(connect_record(agent, "192.0.2.9", 7, ktime=(i + 1) * 10**9))


@pytest.mark.parametrize("timed", [False, True], ids=["plain", "timed"])
def test_replace_rules_keeps_the_count_in_progress(tmp_path, timed):
    metrics = WatchMetrics()
    wrap = (lambda s: TimedStage(s, metrics)) if timed else None
    old = count_engine(tmp_path)
    p, seen = rules_pipeline(tmp_path, old, wrap)
    connects(p, 2)
    assert not [r for r in seen if r["type"] == "alert"]
    new = count_engine(tmp_path)
    assert p.replace_rules(new) == 1
    assert p.engine is new
    stage = p.stages[1]
    assert (stage.stage if timed else stage) is new
    assert isinstance(stage, TimedStage) is timed
    connects(p, 1)
    assert [r["rule"] for r in seen if r["type"] == "alert"] == ["three_connects"]
    if timed:
        assert metrics.rule_seconds.count == 3


def test_replace_rules_starts_a_changed_rule_afresh(tmp_path):
    p, seen = rules_pipeline(tmp_path, count_engine(tmp_path))
    connects(p, 2)
    changed = count_engine(tmp_path, COUNT_RULES.replace("threshold: 3", "threshold: 2"))
    assert p.replace_rules(changed) == 0
    connects(p, 1)
    assert not [r for r in seen if r["type"] == "alert"]
    connects(p, 1)
    assert [r["rule"] for r in seen if r["type"] == "alert"] == ["three_connects"]


def test_replace_rules_over_a_stage_without_rules(tmp_path):
    p = Pipeline([Stage()], [], 0, None, losses(), StatusFile(str(tmp_path), []))
    engine = count_engine(tmp_path)
    assert p.replace_rules(engine) == 0
    assert p.stages[0] is engine and p.engine is engine


# ------------------------------------------------------------------ rule_engine, build_pipeline
def test_rule_engine_sets_the_action_of_events_lost():
    for action in ("alert", "freeze"):
        engine = rule_engine([], True, on_loss=action)
        (rule,) = [r for r in engine.ruleset.enabled_rules if r.spec.id == "events_lost"]
        assert rule.spec.action == action


def test_rule_engine_without_defaults_or_files_has_no_rules():
    engine = rule_engine([], False)
    assert engine.ruleset.enabled_rules == ()


class Options:
    def __init__(self, status_dir: str, **kw) -> None:
        self.status_dir = status_dir
        self.outputs: list[str] = []
        self.rule_files: list[str] = []
        self.default_rules = False
        self.on_loss = "alert"
        self.dry_run = True
        self.cut_network = False
        self.verdicts = True
        self.__dict__.update(kw)


@pytest.fixture
def scope(agent_cgroup):
    from agentprobe.scope import WatchedScope

    s = WatchedScope([str(agent_cgroup.path)], [], err=io.StringIO())
    s.take()
    try:
        yield s
    finally:
        s.close()


@pytest.mark.parametrize("verdicts", [True, False])
def test_build_pipeline_stage_order(tmp_path, scope, verdicts):
    from agentprobe.enrich import Enricher

    enricher = Enricher(scope.name_of, 0)
    p = build_pipeline(Options(str(tmp_path), verdicts=verdicts), scope, enricher, meta, 0)
    names = [s.name for s in p.stages]
    want = ["tunnels", "losses", "rules", "responder", "verdicts", "status"]
    assert names == (want if verdicts else [n for n in want if n != "verdicts"])
    assert p.stages[p.rules_at] is p.engine
    assert p.losses is p.stages[1] and p.status is p.stages[-1]


def test_build_pipeline_times_the_rules_with_metrics(tmp_path, scope):
    from agentprobe.enrich import Enricher

    metrics = WatchMetrics()
    p = build_pipeline(Options(str(tmp_path)), scope, Enricher(scope.name_of, 0), meta, 0, metrics=metrics)
    assert isinstance(p.stages[p.rules_at], TimedStage) and p.stages[p.rules_at].stage is p.engine
    p.open_sinks()
    assert metrics in p.sinks


def test_build_pipeline_raises_rule_errors_before_anything_opens(tmp_path, scope):
    from agentprobe.enrich import Enricher

    bad = tmp_path / "bad.yaml"
    bad.write_text("- rule: x\n  condition: evt.type = = exec\n")
    out = tmp_path / "out.msgpack"
    with pytest.raises(AgentprobeError):
        build_pipeline(Options(str(tmp_path), rule_files=[str(bad)], outputs=[str(out)]), scope,
                       Enricher(scope.name_of, 0), meta, 0)
    assert not out.exists()
