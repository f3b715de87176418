"""pipeline.py: the one way records enter the stages and the sinks (Pipeline.emit), as events.Record
(the enricher's keep their typed event, any other dict is wrapped with none), the stages' hooks
(the loss monitor's among them), a reload's engine swap, the stop record's accounting, and
build_pipeline's stage order. Real outputs (files read back with stream.read_records), real rule
engines, real cgroups."""

from __future__ import annotations

import io
import os
import textwrap
import time

import pytest
from rule_samples import Proc, connect_record

from agentprobe.enrich import Enricher
from agentprobe.errors import AgentprobeError
from agentprobe.events import RECORD_NAMES, ExecEvent, Process, Record
from agentprobe.gpuwatch import GpuWatch
from agentprobe.kernelcounts import KernelCounts
from agentprobe.metrics import TimedStage, WatchMetrics
from agentprobe.pipeline import Pipeline, build_pipeline, rule_engine
from agentprobe.rules import build_engine
from agentprobe.rules.engine import RuleEngine
from agentprobe.selfwatch import LossMonitor, TracerWatch
from agentprobe.stage import Stage
from agentprobe.status import StatusFile
from agentprobe.stream import read_records
from agentprobe.watch import Watcher, WatchOptions


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


class Keeper(Stage):
    """Keeps the very objects it is handed."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def process(self, record: dict) -> list[dict]:
        self.records.append(record)
        return []


def pipeline(tmp_path, stages, outputs=None, **kw) -> Pipeline:
    p = Pipeline(outputs if outputs is not None else [str(tmp_path / "out.msgpack")],
                 err=kw.pop("err", io.StringIO()), **kw)
    p.stages = stages
    p.status = StatusFile(str(tmp_path / "status"), [])
    return p


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


def test_the_loss_monitor_stage_emits_lost_records_and_keeps_the_summary(tmp_path):
    """The loss monitor reads the counters on its tick and at finish; what it says goes to the
    stages after it, and the pipeline's summary follows."""
    seen = []
    kernel = {1: 3}
    after = Maker("after")
    p = pipeline(tmp_path, [Stage(), after], outputs=[], on_record=seen.append)
    p.stages.insert(1, LossMonitor(lambda p: p, lambda p: None, meta, {1: "exec"}, lambda: dict(kernel),
                                   p.dropped, 1.0, p.summary))
    p.tick(time.monotonic() + 1.0)
    kernel[1] = 5
    p.finish()
    lost = [r for r in seen if r["type"] == "lost"]
    assert [r["total"] for r in lost] == [3, 2]
    assert "lost" in after.seen and "unobserved" in after.seen
    assert p.summary.lost_kernel == {"exec": 5}
    assert p.summary.lost_total == 5
    assert p.stop_record_fields(None)["lost"] == {"exec": 5}


# ------------------------------------------------------------------ records
def test_a_plain_dict_becomes_a_record_without_an_event(tmp_path):
    keep, seen = Keeper(), []
    p = pipeline(tmp_path, [Maker("s0", {"in": ["made"]}), keep], on_record=seen.append)
    p.open_sinks()
    p.emit({"type": "in", "n": 1})
    assert [r["type"] for r in keep.records] == ["made", "in"]
    for r in keep.records + seen:
        assert isinstance(r, Record) and r.event is None
    assert keep.records[1] == {"type": "in", "n": 1, "seq": 0}
    assert [r["type"] for r in written(p, tmp_path)] == ["in", "made"]


def test_an_enricher_record_keeps_its_event_through_the_stages(tmp_path):
    """The Record itself goes through: every stage and on_record get the same object, its typed
    event with it; the outputs get its fields only."""
    first, last, seen = Keeper(), Keeper(), []
    p = pipeline(tmp_path, [first, Maker("mid", {"exec": ["alert"]}), last], on_record=seen.append)
    p.open_sinks()
    ev = ExecEvent("exec", 5, 0, Process(os.getpid(), os.getpid(), os.getppid(), 0, 0, "pytest"),
                   filename="/bin/true", argv=["true"], argc_total=1)
    rec = Enricher(lambda cid: None, 0, node="n1").record(ev)
    assert isinstance(rec, Record) and rec.event is ev
    p.emit(rec)
    assert first.records == [rec] and first.records[0] is rec and seen[0] is rec
    assert last.records[1] is rec and last.records[1].event is ev
    assert last.records[0]["type"] == "alert" and last.records[0].event is None
    (out, alert) = written(p, tmp_path)
    assert out["type"] == "exec" and out["filename"] == "/bin/true" and out["seq"] == 0 and "event" not in out
    assert alert["type"] == "alert"


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
    p = Pipeline([], extra_sinks=[metrics])
    p.stages = [Stage()]
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
    p = Pipeline([], on_record=seen.append)
    p.stages, p.rules_at, p.engine, p.wrap_rules = [Stage(), stage, Stage()], 1, engine, wrap
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
    p = Pipeline([])
    p.stages = [Stage()]
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
        self.lost_interval = 1.0
        self.gpu_interval = 2.0
        self.gpu_idle_detach = 5.0
        self.__dict__.update(kw)



class FakeProbes:
    gpu_majors: dict = {}

    def lost_counts(self) -> dict:
        return {}


@pytest.mark.parametrize("verdicts", [True, False])
def test_build_pipeline_stage_order(tmp_path, scope, verdicts):
    enricher = Enricher(scope.name_of, 0)
    probes = FakeProbes()
    engine = rule_engine([], False)
    p = build_pipeline(Options(str(tmp_path), verdicts=verdicts), scope, enricher, meta, 0, lambda: probes, engine)
    names = [s.name for s in p.stages]
    want = ["tunnels", "tracer", "counts", "gpu", "losses", "rules", "responder", "verdicts", "status"]
    assert names == (want if verdicts else [n for n in want if n != "verdicts"])
    assert p.stages[p.rules_at] is p.engine and p.engine is engine
    assert isinstance(p.stages[1], TracerWatch) and isinstance(p.stages[2], KernelCounts)
    assert isinstance(p.gpu, GpuWatch) and p.gpu is p.stages[3] and p.gpu.counts is p.stages[2]
    assert isinstance(p.stages[4], LossMonitor) and p.stages[4].summary is p.summary
    assert p.status is p.stages[-1]
    assert p.gpu.probes() is probes and p.stages[2].probes() is probes
    assert p.stages[2].schedule.interval_s == 1.0 and p.gpu.schedule.interval_s == 2.0 and p.gpu.idle_detach_s == 5.0
    assert p.stages[4].schedule.interval_s == 1.0 and p.stages[4].record_names == RECORD_NAMES


def test_build_pipeline_without_an_engine_keeps_a_plain_stage_in_its_place(tmp_path, scope):
    p = build_pipeline(Options(str(tmp_path)), scope, Enricher(scope.name_of, 0), meta, 0, FakeProbes)
    assert p.engine is None and type(p.stages[p.rules_at]) is Stage
    assert [s.name for s in p.stages][p.rules_at - 1:p.rules_at + 2] == ["losses", "stage", "responder"]


def test_build_pipeline_times_the_rules_with_metrics(tmp_path, scope):
    metrics = WatchMetrics()
    p = build_pipeline(Options(str(tmp_path)), scope, Enricher(scope.name_of, 0), meta, 0, FakeProbes,
                       rule_engine([], False), metrics=metrics)
    assert isinstance(p.stages[p.rules_at], TimedStage) and p.stages[p.rules_at].stage is p.engine
    assert p.wrap_rules is not None
    p.open_sinks()
    assert metrics in p.sinks


def test_rule_errors_are_raised_before_anything_opens(tmp_path):
    """rule_engine raises them, and the watcher builds its engine first of all (Watcher.prepare):
    nothing checked, made or opened before."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("- rule: x\n  condition: evt.type = = exec\n")
    out = tmp_path / "out.msgpack"
    with pytest.raises(AgentprobeError):
        rule_engine([str(bad)], False)
    w = Watcher(WatchOptions(rule_files=[str(bad)], default_rules=False, outputs=[str(out)],
                             status_dir=str(tmp_path / "st")), err=io.StringIO())
    with pytest.raises(AgentprobeError):
        w.prepare()
    assert w.scope is None and w.pipeline is None and w.enricher is None
    assert not out.exists() and not (tmp_path / "st").exists()
