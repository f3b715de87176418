"""The record path after the decoder: enricher -> stages -> sinks, built once by build_pipeline().

    kernel (ebpf/) -> loader -> decoder (events, countevents) -> enricher
        -> stages: tunnels, tracer, counts, gpu, losses, rules, responder, verdicts, status -> sinks

A record made from a kernel event travels as an events.Record: the stream's fields and the typed
event behind them, which stages such as counts and gpu read.

Every record is encoded once (stream.encode) and handed to every sink, then to the stages in
order; what a stage makes (an alert, a response) goes to the sinks and to the stages after it,
never back upstream. A stage that fails on a record costs that record its output from that
stage, counted as an internal error; the record goes on.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import AgentprobeError
from .events import RECORD_NAMES, Record
from .selfwatch import LossMonitor
from .sink import Sink
from .sinks import check_output, open_sink
from .stage import Stage
from .status import StatusFile
from .stream import encode

STOP_DRAIN_S = 2.0  # at stop, how long an output whose reader is slow gets to take what is queued


@dataclass
class Summary:
    events: Counter = field(default_factory=Counter)
    lost_kernel: Counter = field(default_factory=Counter)
    lost_output: int = 0
    decode_errors: int = 0
    internal_errors: int = 0
    reason: str = ""

    @property
    def events_total(self) -> int:
        return sum(self.events.values())

    @property
    def lost_total(self) -> int:
        return sum(self.lost_kernel.values()) + self.lost_output + self.decode_errors


class Pipeline:
    """The stages and sinks of one watcher, and the one way records enter them (`emit`)."""

    def __init__(self, outputs: list[str], on_record: Callable[[dict], None] | None = None,
                 extra_sinks: list[Sink] | None = None, err=None) -> None:
        self.stages: list[Stage] = []
        self.outputs = outputs
        self.rules_at = 0  # where the rule engine stands among the stages (a plain Stage without one)
        self.engine = None  # the rule engine itself (rules.RuleEngine), None without one
        self.wrap_rules: Callable[[Stage], Stage] | None = None  # the metrics' timer around the engine
        self.status: StatusFile | None = None
        self.gpu = None  # the gpuwatch.GpuWatch stage: the watcher tells it of processes found running
        self.on_record = on_record
        self.sinks: list[Sink] = []
        self._extra_sinks = list(extra_sinks or [])
        self.err = err or sys.stderr
        self.summary = Summary()
        self._seq = 0

    # ---- sinks ----
    def check_outputs(self) -> None:
        for spec in self.outputs:
            check_output(spec)

    def open_sinks(self) -> None:
        """Open every output (AgentprobeError: those opened are closed again)."""
        try:
            for spec in self.outputs:
                self.sinks.append(open_sink(spec))
        except AgentprobeError:
            self.close_sinks()
            raise
        self.sinks.extend(self._extra_sinks)

    def greet(self, start: dict) -> None:
        """Outputs that serve readers give each new one the start record first."""
        data = encode(start)
        for s in self.sinks:
            s.start_record = data

    def flush(self) -> None:
        for s in self.sinks:
            try:
                s.service()
                s.flush()
            except OSError as e:
                print(f"agentprobe: output {s.name}: {e}", file=self.err)

    def dropped(self) -> dict[str, int]:
        return {s.name: s.dropped for s in self.sinks}

    # ---- records ----
    def emit(self, rec: dict, first_stage: int = 0) -> None:
        """`rec` to the sinks and through the stages from `first_stage` on, depth first: what a
        stage makes has been through every later stage before the next stage sees `rec`."""
        stack = [(rec, first_stage, False)]
        while stack:
            r, i, published = stack.pop()
            if not published:
                r = self._publish(r)
            if i >= len(self.stages):
                continue
            made = self._run(self.stages[i], r)
            stack.append((r, i + 1, True))
            stack.extend((m, i + 1, False) for m in reversed(made))

    def _publish(self, rec: dict) -> Record:
        if not isinstance(rec, Record):
            rec = Record(rec)  # made by the watcher or a stage: no kernel event behind it
        rec["seq"] = self._seq
        self._seq += 1
        self.summary.events[rec["type"]] += 1
        data = encode(rec)
        for s in self.sinks:
            s.write_record(rec, data)
        if self.on_record:
            self.on_record(rec)
        return rec

    def _run(self, stage: Stage, rec: dict) -> list[dict]:
        try:
            return stage.process(rec)
        except Exception as e:  # a bug must cost one stage's output for one record, counted and said
            self.internal_error(e)
            return []

    def internal_error(self, e: Exception) -> None:
        self.summary.internal_errors += 1
        if self.summary.internal_errors <= 3:
            import traceback

            print(f"agentprobe: internal error (record skipped): {e!r}\n{traceback.format_exc()}", file=self.err)

    # ---- the stages' hooks ----
    def tick(self, now: float) -> None:
        for i, st in enumerate(self.stages):
            for rec in st.tick(now):
                self.emit(rec, i + 1)

    def finish(self) -> None:
        """Open episodes get their verdict before the stop record."""
        for i, st in enumerate(self.stages):
            try:
                for rec in st.finish():
                    self.emit(rec, i + 1)
            except Exception as e:
                self.internal_error(e)

    def forget_cgroup(self, cid: int) -> None:
        for st in self.stages:
            st.forget_cgroup(cid)

    def replace_rules(self, engine) -> int:
        """A reload: the new engine takes the old one's place and what still holds of its state;
        returns how many entries were kept."""
        new = self.wrap_rules(engine) if self.wrap_rules else engine
        kept = new.adopt_state(self.stages[self.rules_at])
        self.stages[self.rules_at] = new
        self.engine = engine
        return kept

    # ---- stop ----
    def stop_record_fields(self, error: str | None) -> dict:
        """Drain the outputs (STOP_DRAIN_S at most) and say what they still hold."""
        unwritten = {}
        deadline = time.monotonic() + STOP_DRAIN_S
        for s in self.sinks:  # what an output still holds now will not get out: say it here
            try:
                s.drain(deadline)
            except OSError:
                pass
            if s.unwritten():
                unwritten[s.name] = s.unwritten() + 1  # + this stop record
        sm = self.summary
        return {
            "reason": error or sm.reason or "stopped",
            "events": dict(sm.events),
            "events_total": sm.events_total + 1,
            "lost": dict(sm.lost_kernel),
            "lost_output": sm.lost_output + sum(unwritten.values()),
            "unwritten_at_stop": unwritten,
            "readers": {s.name: r for s in self.sinks if (r := s.readers()) is not None},
            "decode_errors": sm.decode_errors,
            "internal_errors": sm.internal_errors,
            "lost_total": sm.lost_total,
        }

    def close_sinks(self) -> None:
        for s in self.sinks:
            before = s.dropped
            try:
                s.close()
            except OSError as e:
                print(f"agentprobe: output {s.name}: {e}", file=self.err)
            if s.dropped > before:  # after the stop record: said here, and counted in the summary
                print(f"agentprobe: output {s.name}: {s.dropped - before} records not delivered before stopping",
                      file=self.err)
                self.summary.lost_output += s.dropped - before
        self.sinks = []


def rule_engine(rule_files, with_defaults: bool, on_loss: str = "alert"):
    """The rule engine of the watcher's options; None where this agentprobe has no rules package.
    `on_loss` is the action of `events_lost` (`watch --on-loss`). Raises RuleError."""
    try:
        from .rules import build_engine
    except ImportError:
        if rule_files:
            raise AgentprobeError("this agentprobe has no rule engine") from None
        return None
    return build_engine(list(rule_files), with_defaults=with_defaults, actions={"events_lost": on_loss})


def build_pipeline(options, scope, enricher, meta: Callable[[str, dict], dict], clock_offset_ns: int,
                   probes: Callable[[], object], engine=None, metrics=None,
                   on_record: Callable[[dict], None] | None = None, err=None) -> Pipeline:
    """The stages and outputs that `options` (watch.WatchOptions) ask for, around `scope` (the
    watched cgroups), `enricher` and `probes()` (the loader's ProbeSet once loaded):

        tunnels, tracer, counts, gpu, losses  (the watcher's own records: before the rules)
        rules, responder, verdicts, status

    `engine`: the rule engine built from the options (rule_engine()), or None for none."""
    from .cgroups import find_v1_freezer
    from .gpuwatch import GpuWatch
    from .kernelcounts import KernelCounts
    from .responder import CgroupFreezer, Responder
    from .scope import v2_cgroup_of
    from .selfwatch import TracerWatch
    from .tunnels import LoopbackTunnels
    from .verdicts import VerdictStage

    pipe = Pipeline(options.outputs, on_record, [metrics] if metrics is not None else [], err)
    counts = KernelCounts(probes, enricher.synthetic, options.lost_interval)
    pipe.gpu = GpuWatch(probes, counts, meta, enricher.synthetic, lambda pid: scope.inside(v2_cgroup_of(pid)),
                        lambda pid: enricher.tree.get(pid) is not None, options.gpu_interval,
                        options.gpu_idle_detach)
    pipe.stages = [
        LoopbackTunnels(scope.agent_family, enricher.synthetic),
        TracerWatch(scope.inside, scope.episode_of, meta),
        counts,
        pipe.gpu,
        LossMonitor(scope.episode_of, scope.id_of, meta, RECORD_NAMES, lambda: probes().lost_counts(),
                    pipe.dropped, options.lost_interval, pipe.summary),
    ]
    if metrics is not None:
        from .metrics import TimedStage

        def wrap(stage: Stage) -> Stage:
            return TimedStage(stage, metrics)
        pipe.wrap_rules = wrap
    pipe.engine = engine
    pipe.rules_at = len(pipe.stages)
    pipe.stages.append(Stage() if engine is None else pipe.wrap_rules(engine) if pipe.wrap_rules else engine)
    pipe.stages.append(Responder(CgroupFreezer(scope.root, find_v1_freezer()), scope.paths,
                                 dry_run=options.dry_run, cut_network=options.cut_network,
                                 clock_offset_ns=clock_offset_ns))
    if options.verdicts:
        pipe.stages.append(VerdictStage(scope.episode_of, scope.exists, enricher.node, clock_offset_ns))
    pipe.status = StatusFile(options.status_dir, options.outputs)
    pipe.stages.append(pipe.status)
    return pipe
