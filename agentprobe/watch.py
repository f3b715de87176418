"""agentprobe watch: the loop and the lifecycle of one watcher.

    kernel (ebpf/) -> loader -> decoder (events, countevents) -> enricher
        -> stages (pipeline.py: tunnels, losses, rules, responder, verdicts, status) -> sinks

The watcher reads the kernel's records and counts, hands each to the pipeline, keeps the watched
set (scope.py) and the probes in step, and owns the clean-up: whatever happens (an error at start,
SIGINT, SIGTERM), probes are detached, locks released and every sink flushed and closed, with a
`stop` record last.
"""

from __future__ import annotations

import gc
import os
import platform
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__, abi
from .enrich import Enricher
from .errors import AgentprobeError
from .events import DecodeError, MkdirEvent, decode
from .hardening import check_btf, check_privileges, harden_self, set_realtime
from .pipeline import Pipeline, Summary, build_pipeline, rule_engine
from .scope import WatchedScope

# hashed at start: what agents run most (and what tunnels and miners hide behind), so their first
# exec reaches the rules without waiting for a sha256 of the binary
COMMON_AGENT_PROGRAMS = ("python3", "python", "bash", "sh", "dash", "ssh", "scp", "curl", "wget", "git", "node",
                         "perl", "pip", "pip3", "nc", "ncat", "socat", "sleep", "env", "timeout")
REMEMBER_INTERVAL_S = 30.0  # the walk of every cgroup.procs (see _remember_agents)

__all__ = ["Summary", "WatchOptions", "Watcher"]


@dataclass
class WatchOptions:
    cgroups: list[str] = field(default_factory=list)
    cgroup_globs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    rule_files: list[str] = field(default_factory=list)
    default_rules: bool = True
    dry_run: bool = False  # alerts only: the responder says what it would do
    in_kernel_deny: bool = False  # the rules' deny policy enforced by the connect hooks
    cut_network: bool = True  # a freeze also cuts the episode's TCP connections
    verdicts: bool = True  # one verdict record per episode
    buffer: str = "auto"
    rescan_interval: float = 2.0
    gpu_interval: float = 2.0
    lost_interval: float = 1.0
    poll_ms: int = 100
    extra_gpu_majors: tuple[int, ...] = ()
    create_default: bool = True
    duration: float | None = None  # stop after this many seconds (tests, demos)
    status_dir: str = "/run/agentprobe"
    on_loss: str = "alert"  # the action of rule events_lost (records lost while an episode was active)
    ring_pages: int = 1024  # ring buffer size in pages (power of two)
    busy_poll_ms: int = 1  # see loader.LoaderOptions.busy_poll_ms
    rt_priority: int = 0  # SCHED_FIFO priority while waiting for records (run()); 0: normal (CLI: 1)
    label_env: tuple[str, ...] = ()  # environment variables of agent processes that label their records
    label_dir: str | None = None     # a sandbox manager's label files: DIR/<cgroup id>.json
    # in-kernel deny: {"ports": [...], "allow": [CIDR...], "deny": [CIDR...]}, or None for off (set from the
    # rules when in_kernel_deny)
    deny: dict | None = None
    # ports whose connects the kernel always records, never counts as part of a sweep (rules.recorded_ports)
    recorded_ports: tuple[int, ...] = (22, 53)
    probe_mode: str = "auto"  # auto | syscalls (see loader.LoaderOptions)
    gpu_probe: str = "auto"   # auto | fentry | on-demand | always
    gpu_idle_detach: float = 5.0  # on-demand ioctl probe: detach this long after the last GPU holder exits
    pods: object | None = None  # kubeapi.PodSelection: agent pods chosen by label/annotation on the API server


class Watcher:
    def __init__(self, options: WatchOptions, on_record: Callable[[dict], None] | None = None, metrics=None,
                 err=None) -> None:
        self.options = options
        self.on_record = on_record
        self.metrics = metrics  # metrics.WatchMetrics: an output of its own, and the rules' timing
        self.err = err or sys.stderr
        self.clock_offset_ns = time.time_ns() - time.monotonic_ns()
        self.scope: WatchedScope | None = None
        self.enricher: Enricher | None = None
        self.pipeline: Pipeline | None = None
        self.summary = Summary()
        self.hardening: dict = {}
        self.probe_paths: dict[str, str] = {}
        self._probes = None
        self._kube_records: list[dict] = []
        self._stop = False
        self._next_remember = 0.0

    # ---- set-up ----
    def prepare(self) -> None:
        """Every check that can fail, before anything is attached or written."""
        opts = self.options
        engine = rule_engine(opts.rule_files, opts.default_rules, opts.on_loss)  # RuleError: one line
        check_privileges()
        check_btf()
        from .labels import CgroupLabels
        from .loader import import_bcc

        import_bcc()
        self.scope = WatchedScope(opts.cgroups, opts.cgroup_globs, opts.pods, opts.create_default, self.err)
        self.scope.check()
        labels = CgroupLabels(self.scope.root, opts.label_dir)
        self.enricher = Enricher(self.scope.name_of, self.clock_offset_ns,
                                 cgroup_labels=lambda cid, path: labels.of(cid, path, self.scope.top_of(path)),
                                 label_env=opts.label_env, cgroup_dest=self.scope.describe)
        self.pipeline = build_pipeline(opts, self.scope, self.enricher, self.meta_record, self.clock_offset_ns,
                                       lambda: self._probes, engine, self.metrics, self.on_record, self.err)
        self.summary = self.pipeline.summary
        if engine is not None:
            from .rules import deny_policy, recorded_ports

            opts.recorded_ports = recorded_ports(engine.ruleset)
            if opts.in_kernel_deny and not opts.dry_run:
                opts.deny = deny_policy(engine.ruleset)
        self.pipeline.check_outputs()
        self._kube_records = self.scope.take()  # KubeError: one line, exit 1

    @property
    def root(self) -> Path | None:
        return self.scope.root if self.scope else None

    @property
    def created_default(self) -> Path | None:
        return self.scope.created_default if self.scope else None

    @property
    def watched(self) -> dict:
        return self.scope.watched if self.scope else {}

    @property
    def sinks(self) -> list:
        return self.pipeline.sinks if self.pipeline else []

    def start(self) -> None:
        self.hardening = harden_self()
        # taken in run(), tried here for the start record: SCHED_FIFO while waiting for records
        rt = self.options.rt_priority
        self.hardening["rt_priority"] = rt if rt and set_realtime(rt) and set_realtime(0) else None
        if self.options.pods is not None:  # the API server's pod, namespace and container names
            self.options.pods.name_into(self.enricher.pods)
        self._probes = self._load_probes()
        try:
            self.pipeline.open_sinks()
        except AgentprobeError:
            self._probes.close()
            self._probes = None
            raise
        self._discover_running()
        self.enricher.hasher.warm(shutil.which(n) for n in COMMON_AGENT_PROGRAMS)
        start = self._start_record()
        self._emit_all(self.pipeline.gpu.switch())
        self.pipeline.greet(start)
        self.probe_paths = start["probes"]
        self.pipeline.status.started = start["ts"]
        self.pipeline.emit(start)
        for fields in self._kube_records:
            self.pipeline.emit(self.meta_record("kube", fields))
        self.pipeline.flush()
        self.pipeline.status.set_watched(str(self.scope.root), self.scope.listing())
        # What start-up built (BCC, LLVM's tables, the rules) lives as long as the watcher: keep it out
        # of the collector's full passes, which otherwise stall the loop for milliseconds mid-detection.
        gc.collect()
        gc.freeze()

    def _load_probes(self):
        from .loader import LoaderOptions, ProbeSet

        o = self.options
        probes = ProbeSet(
            LoaderOptions(buffer=o.buffer, extra_gpu_majors=o.extra_gpu_majors,
                          deny_exec_names=tuple((o.deny or {}).get("exec_names", ())),
                          probe_mode=o.probe_mode, gpu_probe=o.gpu_probe,
                          ringbuf_pages=o.ring_pages, busy_poll_ms=o.busy_poll_ms,
                          watch_mkdir=bool(o.cgroup_globs or o.pods)),
            self._on_raw,
            cgroup_root=self.scope.root,
        )
        try:
            probes.set_recorded_ports(o.recorded_ports)
            if o.deny:
                probes.set_deny(o.deny.get("ports", ()), o.deny.get("allow", ()), o.deny.get("deny", ()), True)
            probes.set_watched(self.scope.watched.values())
        except BaseException:
            probes.close()
            raise
        return probes

    def _start_record(self) -> dict:
        p, o = self._probes, self.options
        return self.meta_record("start", {
            "version": __version__,
            "pid": os.getpid(),
            "argv": sys.argv,
            "kernel": platform.release(),
            "buffer": p.buffer,
            "cgroup_root": str(self.scope.root),
            "cgroups": self.scope.listing(),
            "globs": o.cgroup_globs,
            "kube": o.pods.describe() if o.pods is not None else None,
            "gpu_majors": {str(k): v for k, v in p.gpu_majors.items()},
            "nvml": self.pipeline.gpu.nvml.reason,
            "hardening": self.hardening,
            "probes": {
                **p.paths,
                "fork_exit": "raw_tracepoint sched_process_fork/exit",
                "first_bytes": "cgroup_skb/egress + cgroup connect4/6 on the watched cgroups",
                "deny": "cgroup connect4/6 on the watched cgroups: EPERM before any packet" if o.deny else "off",
                "exec_deny": p.lsm_status,
            },
            "deny": o.deny or {},
            "limits": {"argv_args": abi.MAX_ARGS, "argv_bytes": abi.ARGS_LEN, "arg_bytes": abi.ARG_LEN,
                       "filename_bytes": abi.FILENAME_LEN, "argc_counted": abi.MAX_ARGS_SCAN},
        })

    def _discover_running(self) -> None:
        """Processes already in the watched cgroups, at any depth (the agents in their episode
        cgroups below a watched one), join the process tree with their ancestors, and the kernel's
        agent map."""
        for pid in sorted(self._remember_agents()):
            self.enricher.discover(pid)
            self.pipeline.gpu.found_running(pid)

    def _remember_agents(self) -> dict[int, int]:
        """Tell the kernel which processes of the watched cgroups are agents: it learns them at fork
        and exec, so one that ran before the watcher, or was moved in from outside, would otherwise
        leave the agent cgroups (a shell's builtin `echo $$ > other/cgroup.procs`) unreported. At
        start and when cgroups are added. A process moved in from outside is learned by the kernel
        itself, at the move (the attach probe); what is left for this walk is a child that an
        outsider made straight into an agent cgroup (clone3 CLONE_INTO_CGROUP) and that never forks
        or execs: every REMEMBER_INTERVAL_S, since reading every cgroup.procs costs CPU in
        proportion to the cgroups (about 0.1 ms each here: 600 episode cgroups every 2 s were 2 %
        of a CPU at idle)."""
        found = self.scope.agent_cgroups()
        self._probes.remember_agents(found)
        self._next_remember = time.monotonic() + REMEMBER_INTERVAL_S
        return found

    def meta_record(self, type_: str, fields: dict) -> dict:
        """A watcher record (ts, ktime, node set) of `type_`."""
        now = time.monotonic_ns()
        rec = {"v": 1, "type": type_, "ts": now + self.clock_offset_ns, "ktime": now,
               "node": self.enricher.node if self.enricher else platform.node()}
        rec.update(fields)
        return rec

    def emit(self, rec: dict) -> None:
        self.pipeline.emit(rec)

    def _emit_all(self, records: list[dict]) -> None:
        for rec in records:
            self.pipeline.emit(rec)

    # ---- records from the kernel ----
    def _on_raw(self, data: bytes) -> None:
        try:
            self._handle_raw(data)
        except Exception as e:  # a bug must cost one record, counted and said, never the watcher
            self.pipeline.internal_error(e)

    def _handle_raw(self, data: bytes) -> None:
        try:
            ev = decode(data)
        except DecodeError:
            self.summary.decode_errors += 1
            return
        if isinstance(ev, MkdirEvent):
            self._new_cgroup(ev.path)
            return
        try:
            rec = self.enricher.record(ev)
        except Exception as e:  # one bad record must not stop the watcher
            self.summary.decode_errors += 1
            print(f"agentprobe: could not enrich a {ev.type} record: {e}", file=self.err)
            return
        self.pipeline.emit(rec)

    def _new_cgroup(self, path: str) -> None:
        """A cgroup was made (reported while globs or pods are watched): watched now if it matches,
        not at the next periodic rescan."""
        pods = self.options.pods
        if self.scope.matches_glob(path) or (pods is not None and pods.new_pod_cgroup(path)):
            self.rescan()
        elif pods is not None:
            self._kube_refreshed(pods.take_pending())

    # ---- the loop ----
    def stop(self, *_args) -> None:
        self._stop = True

    def run(self, until: Callable[[], bool] | None = None) -> Summary:
        """Loop until SIGINT/SIGTERM, --duration, or `until()` returns true."""
        old = {sig: signal.signal(sig, self.stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        o = self.options
        deadline = time.monotonic() + o.duration if o.duration else None
        now = time.monotonic()
        next_rescan = now + o.rescan_interval
        # SCHED_FIFO while waiting for records (a record wakes us ahead of the busy agent that wrote
        # it: this kernel may not preempt), a normal task while agents are busy (we poll then, and a
        # flood must not make us hog a CPU); children never inherit it
        rt = o.rt_priority if self.hardening.get("rt_priority") else 0
        if rt:
            self._probes.on_busy = lambda busy: set_realtime(0 if busy else rt)
            set_realtime(0 if self._probes.busy else rt)
        try:
            while not self._stop:
                self._probes.poll(o.poll_ms)
                now = time.monotonic()
                self.pipeline.tick(now)
                if now >= next_rescan:
                    self.rescan()
                    next_rescan = now + o.rescan_interval
                self.pipeline.flush()
                if deadline and now >= deadline:
                    self.summary.reason = "duration"
                    break
                if until is not None and until():
                    self.summary.reason = "done"
                    break
            if not self.summary.reason:
                self.summary.reason = "signal"
        finally:
            if rt:
                self._probes.on_busy = None
                set_realtime(0)
            for sig, handler in old.items():
                signal.signal(sig, handler)
        return self.summary

    # ---- the watched set ----
    def _kube_refreshed(self, records: list[dict]) -> None:
        """`kube` records of a pod list: a new selection, or a failure (said once on stderr per streak)."""
        for fields in records:
            if not fields.get("ok") and fields.pop("first", False):
                print(f"agentprobe: {fields['error']}; the {fields['selected_kept']} pods selected before stay "
                      "watched, retrying", file=self.err, flush=True)
            elif fields.get("recovered"):
                print("agentprobe: the Kubernetes API answers again", file=self.err, flush=True)
            self.pipeline.emit(self.meta_record("kube", fields))

    def rescan(self) -> None:
        if self.options.pods is not None:
            self._kube_refreshed(self.options.pods.refresh())
        change = self.scope.rescan()
        if change.changed:
            self._probes.set_watched(self.scope.watched.values())
        for cid, cg in change.gone.items():
            self.pipeline.emit(self.meta_record("cgroup", {"change": "gone", "cgroup": {"id": cid, "path": cg.path}}))
            self.pipeline.forget_cgroup(cid)
        for cid, cg in change.added.items():
            self.pipeline.emit(self.meta_record("cgroup", {"change": "watched",
                                                           "cgroup": {"id": cid, "path": cg.path}}))
        if change.added:
            self._discover_running()
        elif time.monotonic() >= self._next_remember:
            self._remember_agents()
        if change.changed:
            self.pipeline.status.set_watched(str(self.scope.root), self.scope.listing())

    # ---- for the CLI's configuration reload ----
    def update_recorded_ports(self, ports) -> None:
        """New ports never counted as part of a sweep (after a reload)."""
        self.options.recorded_ports = tuple(ports)
        if self._probes is not None:
            self._probes.set_recorded_ports(self.options.recorded_ports)

    def update_deny(self, deny: dict | None) -> None:
        """New in-kernel deny lists (after a reload); the exec-name deny keeps what it loaded with."""
        self.options.deny = deny
        if self._probes is not None:
            d = deny or {}
            self._probes.set_deny(d.get("ports", ()), d.get("allow", ()), d.get("deny", ()), bool(deny))

    # ---- tear-down ----
    def close(self, error: str | None = None) -> None:
        p = self.pipeline
        if self._probes is not None:
            try:
                self._probes.poll(0)  # what the kernel still holds
            except Exception:
                pass
            p.finish()  # the counts, losses and open episodes' verdicts, before the stop record
            p.emit(self.meta_record("stop", p.stop_record_fields(error)))
            self._probes.close()
            self._probes = None
            p.gpu.close()
        if p is not None:
            p.close_sinks()
            p.status.remove()
        if self.scope is not None:
            self.scope.close()
