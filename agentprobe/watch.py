"""agentprobe watch: kernel -> decoder -> enricher -> stages (rules, responder) -> sinks.

The watcher owns the loop and the clean-up: whatever happens (an error at
start, SIGINT, SIGTERM), probes are detached, locks released and every sink
flushed and closed, with a `stop` record last.
"""

from __future__ import annotations

import gc
import ipaddress
import json
import os
import platform
import signal
import socket
import sys
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from . import __version__, abi, btf
from .cgroups import (
    DEFAULT_AGENT_CGROUP,
    CgroupError,
    CgroupLock,
    CgroupSet,
    WatchedCgroup,
    episode_of,
    find_v2_mount,
    innermost_top,
    path_inside,
    path_of_id,
)
from .enrich import Enricher, read_comm
from .errors import AgentprobeError
from .events import GPU_DEVICE_KINDS, IP_PROTOCOLS, SOCK_TYPES, DecodeError, MkdirEvent, MoveEvent, decode
from .sinks import Sink, check_output, open_sink
from .stream import encode

EV_NAMES = {abi.EV_EXEC: "exec", abi.EV_CONNECT: "connect", abi.EV_GPU: "gpu", abi.EV_FORK: "fork",
            abi.EV_EXIT: "exit", abi.EV_PAYLOAD: "payload", abi.EV_DENY: "deny", abi.EV_MOVE: "cgroup_move",
            abi.EV_SOCKET: "socket", abi.EV_BIND: "bind", abi.EV_PACKET: "packet", abi.EV_MKDIR: "cgroup_mkdir",
            abi.EV_LISTEN: "listen"}

# hashed at start: what agents run most (and what tunnels and miners hide behind), so their first
# exec reaches the rules without waiting for a sha256 of the binary
COMMON_AGENT_PROGRAMS = ("python3", "python", "bash", "sh", "dash", "ssh", "scp", "curl", "wget", "git", "node",
                         "perl", "pip", "pip3", "nc", "ncat", "socat", "sleep", "env", "timeout")

# exit codes, documented in `agentprobe watch --help`
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_KERNEL = 3
EXIT_PERMISSION = 4
EXIT_BUSY = 5
STOP_DRAIN_S = 2.0  # at stop, how long an output whose reader is slow gets to take what is queued


class PermissionProblem(AgentprobeError):
    exit_code = EXIT_PERMISSION


class Stage(Protocol):
    """A step after enrichment (rule engine, responder): sees every record and
    returns new records (alerts, responses) that are emitted and passed on."""

    def process(self, record: dict) -> list[dict]: ...


@dataclass
class WatchOptions:
    cgroups: list[str] = field(default_factory=list)
    cgroup_globs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    buffer: str = "auto"
    rescan_interval: float = 2.0
    gpu_interval: float = 2.0
    lost_interval: float = 1.0
    poll_ms: int = 100
    extra_gpu_majors: tuple[int, ...] = ()
    create_default: bool = True
    duration: float | None = None  # stop after this many seconds (tests, demos)
    status_dir: str = "/run/agentprobe"
    on_loss: str = "alert"  # records lost in the kernel: alert, or freeze the episodes active meanwhile
    ring_pages: int = 1024  # ring buffer size in pages (power of two)
    busy_poll_ms: int = 1  # see loader.LoaderOptions.busy_poll_ms
    rt_priority: int = 0  # SCHED_FIFO priority while waiting for records (run()); 0: normal (CLI: 1)
    label_env: tuple[str, ...] = ()  # environment variables of agent processes that label their records
    label_dir: str | None = None     # a sandbox manager's label files: DIR/<cgroup id>.json
    # in-kernel deny: {"ports": [...], "allow": [CIDR...], "deny": [CIDR...]}, or None for off
    deny: dict | None = None
    # ports whose connects the kernel always records, never counts as part of a sweep (rules.recorded_ports)
    recorded_ports: tuple[int, ...] = (22, 53)
    probe_mode: str = "auto"  # auto | syscalls (see loader.LoaderOptions)
    gpu_probe: str = "auto"   # auto | fentry | on-demand | always
    gpu_idle_detach: float = 5.0  # on-demand ioctl probe: detach this long after the last GPU holder exits
    pods: object | None = None  # kubeapi.PodSelection: agent pods chosen by label/annotation on the API server


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


def check_privileges() -> None:
    if os.geteuid() == 0:
        return
    try:
        with open("/proc/self/status") as f:
            cap_eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        cap_eff = 0
    need = {"CAP_SYS_ADMIN": 21, "CAP_BPF": 39, "CAP_PERFMON": 38}
    if cap_eff & (1 << 21):
        return
    missing = [n for n, bit in need.items() if not cap_eff & (1 << bit)]
    if missing:
        raise PermissionProblem(f"agentprobe watch needs root (missing {', '.join(missing)}): run it with sudo")


def harden_self() -> dict:
    """The watcher is what an agent would attack first: no core dumps or ptrace by same-uid
    processes (PR_SET_DUMPABLE 0), last to go when memory runs out (oom_score_adj -900), and ahead
    of CPU hogs in agent cgroups (nice -5). Returns what took effect, for the start record."""
    import ctypes

    done = {}
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        done["dumpable"] = libc.prctl(4, 0, 0, 0, 0) != 0  # PR_SET_DUMPABLE 0; true if it failed
    except OSError:
        done["dumpable"] = True
    try:
        fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
        try:
            os.write(fd, b"-900")  # needs CAP_SYS_RESOURCE
        finally:
            os.close(fd)
        done["oom_score_adj"] = -900
    except OSError:
        done["oom_score_adj"] = None
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -5)
        done["nice"] = -5
    except OSError:
        done["nice"] = os.getpriority(os.PRIO_PROCESS, 0)
    done["slice_us"] = set_short_slice(done["nice"])
    return done


SCHED_SLICE_NS = 100_000  # the shortest the kernel takes (0.1 ms)


def set_short_slice(nice: int) -> int | None:
    """Ask the scheduler (EEVDF, Linux 6.12+) for a short time slice: a task with a shorter slice
    preempts the running one when it wakes, so the watcher reads a record within microseconds
    instead of waiting up to a tick for a busy agent's slice to end. The CPU share is unchanged
    (that is nice's job). Returns the slice in µs, or None where the kernel has no custom slices."""
    import ctypes
    import struct

    if platform.machine() != "x86_64":
        return None
    nr_sched_setattr, nr_sched_getattr = 314, 315
    libc = ctypes.CDLL(None, use_errno=True)
    # struct sched_attr (VER1, 56 bytes): size, policy, flags, nice, priority, runtime, deadline, period,
    # util_min, util_max; SCHED_OTHER
    attr = ctypes.create_string_buffer(struct.pack("<IIQiIQQQII", 56, 0, 0, nice, 0, SCHED_SLICE_NS, 0, 0, 0, 0), 56)
    if libc.syscall(nr_sched_setattr, 0, attr, 0) != 0:
        return None
    back = ctypes.create_string_buffer(56)
    if libc.syscall(nr_sched_getattr, 0, back, 56, 0) != 0:
        return None
    runtime = struct.unpack_from("<IIQiIQ", back.raw)[5]
    return runtime // 1000 if runtime == SCHED_SLICE_NS else None


def set_realtime(priority: int) -> bool:
    """The calling thread SCHED_FIFO at `priority` (children made normal: SCHED_RESET_ON_FORK), or
    back to a normal task at 0 (its nice value kept, the short slice asked again). False if refused
    (no CAP_SYS_NICE, or RT time not granted to this cgroup)."""
    try:
        if priority:
            os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(priority))
        else:
            os.sched_setscheduler(0, os.SCHED_OTHER | os.SCHED_RESET_ON_FORK, os.sched_param(0))
            set_short_slice(os.getpriority(os.PRIO_PROCESS, 0))
        return True
    except (OSError, AttributeError):
        return False


def check_btf() -> None:
    if not btf.VMLINUX_BTF.exists():
        raise AgentprobeError(f"the kernel has no BTF ({btf.VMLINUX_BTF}): a kernel built with "
                              "CONFIG_DEBUG_INFO_BTF=y is required", EXIT_KERNEL)


class Watcher:
    def __init__(self, options: WatchOptions, stages: list[Stage] | None = None,
                 on_record: Callable[[dict], None] | None = None, err=None) -> None:
        self.options = options
        self.stages = stages or []
        self.on_record = on_record
        self.err = err or sys.stderr
        self.summary = Summary()
        self.sinks: list[Sink] = []
        self.watched: dict[int, WatchedCgroup] = {}
        self._locks: dict[int, CgroupLock] = {}
        self._stop = False
        self._seq = 0
        self._probes = None
        self._gpu_pids: dict[int, int] = {}  # pid -> cgroup id, processes with in-kernel GPU state
        self._lost_seen: Counter = Counter()
        self._output_dropped = 0
        self.root: Path | None = None
        self.cgroup_set: CgroupSet | None = None
        self.enricher: Enricher | None = None
        self.created_default: Path | None = None
        self.clock_offset_ns = time.time_ns() - time.monotonic_ns()
        self._nvml = None
        self._status_path: Path | None = None
        self._started = 0
        self._frozen: dict[str, dict] = {}
        self.hardening: dict = {}
        self._conn_pids: dict[int, int] = {}  # pid -> cgroup id, processes with connects
        self._loopback_sessions: list[tuple] = []  # (when to look, tries, payload record, Forwarder)
        self._recent_dest: OrderedDict[int, list[str]] = OrderedDict()  # pid -> outside destinations it connected
        self._gpu_holders: set[int] = set()  # agent processes that opened a GPU device (or inherited it)
        self._active: OrderedDict[str, tuple[float, int | None]] = OrderedDict()  # episode -> (last seen, id)
        self._loss_alerted: dict[str, float] = {}
        self._tracer = 0  # the pid ptracing the watcher, as last seen
        self._next_remember = 0.0  # when the slow walk of every cgroup.procs is due (_remember_agents)
        self._gpu_idle_since: float | None = None

    # ---- set-up ----
    def prepare(self) -> None:
        """Every check that can fail, before anything is attached or written."""
        check_privileges()
        check_btf()
        from .loader import import_bcc

        import_bcc()
        self.root = find_v2_mount()
        opts = self.options
        paths = list(opts.cgroups)
        if not paths and not opts.cgroup_globs and opts.pods is None:
            default = self.root / DEFAULT_AGENT_CGROUP
            if not default.exists() and opts.create_default:
                default.mkdir()
                self.created_default = default
            paths = [str(default)]
        self.cgroup_set = CgroupSet(self.root, paths, list(opts.cgroup_globs))
        self.cgroup_set.check()
        for spec in opts.outputs:
            check_output(spec)
        self._kube_records = opts.pods.start() if opts.pods is not None else []  # KubeError: one line, exit 1
        self.watched = self._scan()
        for cg in self.watched.values():
            self._lock(cg, explicit=True)

    def _lock(self, cg: WatchedCgroup, explicit: bool) -> bool:
        if cg.id in self._locks:
            return True
        try:
            self._locks[cg.id] = CgroupLock(self.root / cg.path.lstrip("/"))
            return True
        except CgroupError as e:
            if explicit:
                raise AgentprobeError(str(e), EXIT_BUSY) from None
            print(f"agentprobe: skipping {cg.path}: {e}", file=self.err)
            return False
        except OSError:
            return False

    def start(self) -> None:
        self.hardening = harden_self()
        # taken in run(), tried here for the start record: SCHED_FIFO while waiting for records
        rt = self.options.rt_priority
        self.hardening["rt_priority"] = rt if rt and set_realtime(rt) and set_realtime(0) else None
        from .labels import CgroupLabels
        from .loader import LoaderOptions, ProbeSet

        self._labels = CgroupLabels(self.root, self.options.label_dir)
        self.enricher = Enricher(self._cgroup_name, self.clock_offset_ns, cgroup_labels=self._cgroup_labels,
                                 label_env=self.options.label_env)
        if self.options.pods is not None:  # the API server's pod, namespace and container names
            self.options.pods.directory = self.enricher.pods
            self.options.pods._names()
        self._probes = ProbeSet(
            LoaderOptions(buffer=self.options.buffer, extra_gpu_majors=self.options.extra_gpu_majors,
                          deny_exec_names=tuple((self.options.deny or {}).get("exec_names", ())),
                          probe_mode=self.options.probe_mode, gpu_probe=self.options.gpu_probe,
                          ringbuf_pages=self.options.ring_pages, busy_poll_ms=self.options.busy_poll_ms,
                          watch_mkdir=bool(self.options.cgroup_globs or self.options.pods)),
            self._on_raw,
            cgroup_root=self.root,
        )
        try:
            for spec in self.options.outputs:
                self.sinks.append(open_sink(spec))
        except AgentprobeError:
            self._probes.close()
            self._probes = None
            raise
        self._probes.set_recorded_ports(self.options.recorded_ports)
        deny = self.options.deny
        if deny:
            self._probes.set_deny(deny.get("ports", ()), deny.get("allow", ()), deny.get("deny", ()), True)
        self._probes.set_watched(self.watched.values())
        from .nvml import NvmlSampler

        self._nvml = NvmlSampler()
        self._discover_running()
        import shutil

        self.enricher.hasher.warm(shutil.which(n) for n in COMMON_AGENT_PROGRAMS)
        start = self._start_record()
        self._update_ioctl_probe()
        for s in self.sinks:
            if hasattr(s, "start_record"):
                s.start_record = encode(start)
        self.probe_paths = start["probes"]
        self._started = start["ts"]
        self.emit(start)
        for fields in self._kube_records:
            self.emit(self._meta("kube", fields))
        self.flush()
        self.write_status()
        # What start-up built (BCC, LLVM's tables, the rules) lives as long as the watcher: keep it out
        # of the collector's full passes, which otherwise stall the loop for milliseconds mid-detection.
        gc.collect()
        gc.freeze()

    def _start_record(self) -> dict:
        return self._meta("start", {
            "version": __version__,
            "pid": os.getpid(),
            "argv": sys.argv,
            "kernel": platform.release(),
            "buffer": self._probes.buffer,
            "cgroup_root": str(self.root),
            "cgroups": [{"id": c.id, "path": c.path} for c in self.watched.values()],
            "globs": self.options.cgroup_globs,
            "kube": self.options.pods.describe() if self.options.pods is not None else None,
            "gpu_majors": {str(k): v for k, v in self._probes.gpu_majors.items()},
            "nvml": self._nvml.reason,
            "hardening": self.hardening,
            "probes": {
                **self._probes.paths,
                "fork_exit": "raw_tracepoint sched_process_fork/exit",
                "first_bytes": "cgroup_skb/egress + cgroup connect4/6 on the watched cgroups",
                "deny": ("cgroup connect4/6 on the watched cgroups: EPERM before any packet"
                         if self.options.deny else "off"),
                "exec_deny": self._probes.lsm_status,
            },
            "deny": self.options.deny or {},
            "limits": {"argv_args": abi.MAX_ARGS, "argv_bytes": abi.ARGS_LEN, "arg_bytes": abi.ARG_LEN,
                       "filename_bytes": abi.FILENAME_LEN, "argc_counted": abi.MAX_ARGS_SCAN},
        })

    def _discover_running(self) -> None:
        """Processes already in the watched cgroups, at any depth (the agents in their episode
        cgroups below a watched one), join the process tree with their ancestors, and the kernel's
        agent map."""
        found = self._remember_agents()
        for pid in sorted(found):
            self.enricher.discover(pid)
            if self._holds_gpu(pid):
                self._gpu_holders.add(pid)

    REMEMBER_INTERVAL_S = 30.0

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
        found = self._agent_cgroups()
        self._probes.remember_agents(found)
        self._next_remember = time.monotonic() + self.REMEMBER_INTERVAL_S
        return found

    def _holds_gpu(self, pid: int) -> bool:
        """Has this running process a GPU device open (found at start or when a cgroup is added)?"""
        from .forwarders import fd_paths

        majors = self._probes.gpu_majors if self._probes else {}
        for path in fd_paths(pid):
            try:
                st = os.stat(path)
            except OSError:
                continue
            if (st.st_mode & 0o170000) == 0o020000 and os.major(st.st_rdev) in majors:
                return True
        return False

    def _update_ioctl_probe(self) -> None:
        """On-demand ioctl tracing: attached while some agent process holds a GPU device."""
        p = self._probes
        if p is None or p.gpu_probe != "on-demand":
            return
        if self._gpu_holders:
            self._gpu_idle_since = None
            if p.attach_ioctl():
                self.emit(self._meta("probe", {"probe": "gpu_ioctl", "change": "attached",
                                                "holders": sorted(self._gpu_holders)[:16]}))
        elif p.ioctl_attached:
            now = time.monotonic()
            if self._gpu_idle_since is None:
                self._gpu_idle_since = now
            elif now - self._gpu_idle_since >= self.options.gpu_idle_detach:
                self._flush_gpu_counts()
                p.detach_ioctl()
                self._gpu_idle_since = None
                self.emit(self._meta("probe", {"probe": "gpu_ioctl", "change": "detached"}))

    def _meta(self, type_: str, fields: dict) -> dict:
        now = time.monotonic_ns()
        rec = {"v": 1, "type": type_, "ts": now + self.clock_offset_ns, "ktime": now,
               "node": self.enricher.node if self.enricher else platform.node()}
        rec.update(fields)
        return rec

    def _cgroup_name(self, cid: int) -> str | None:
        return self.cgroup_set.name_of(cid, self.watched)

    def episode_of(self, path: str) -> str:
        """The episode a cgroup path belongs to: the child of the (innermost) watched cgroup that holds
        it, or the watched cgroup itself (what the responder acts on)."""
        return episode_of(path, (w.path for w in self.watched.values()))

    def cgroup_exists(self, path: str) -> bool:
        return (self.root / path.lstrip("/")).is_dir()

    def verdict_stage(self):
        from .verdicts import VerdictStage

        return VerdictStage(self.episode_of, self.cgroup_exists, self.enricher.node if self.enricher else
                            platform.node(), self.clock_offset_ns)

    def _tick_stages(self) -> None:
        """Stages that produce records on their own (verdicts of ended episodes)."""
        for i, st in enumerate(self.stages):
            tick = getattr(st, "poll_ended", None)
            if tick is not None:
                for rec in tick():
                    self.emit(rec, i + 1)

    def _cgroup_labels(self, cid: int, path: str) -> dict[str, str]:
        return self._labels.of(cid, path, innermost_top(path, (w.path for w in self.watched.values())))

    # ---- the loop ----
    def _on_raw(self, data: bytes) -> None:
        try:
            self._handle_raw(data)
        except Exception as e:  # a bug must cost one record, counted and said, never the watcher
            self._internal_error(e)

    def _internal_error(self, e: Exception) -> None:
        self.summary.internal_errors += 1
        if self.summary.internal_errors <= 3:
            import traceback

            print(f"agentprobe: internal error (record skipped): {e!r}\n{traceback.format_exc()}", file=self.err)

    def _handle_raw(self, data: bytes) -> None:
        try:
            ev = decode(data)
        except DecodeError:
            self.summary.decode_errors += 1
            return
        if isinstance(ev, MoveEvent):
            self.emit(self._move_record(ev))
            return
        if isinstance(ev, MkdirEvent):
            pods = self.options.pods
            if self.cgroup_set.matches_glob(ev.path) or (pods is not None and pods.new_pod_cgroup(ev.path)):
                self.rescan()  # watched now, not at the next periodic rescan
            elif pods is not None:
                self._kube_refreshed(pods.take_pending())
            return
        try:
            rec = self.enricher.record(ev)
        except Exception as e:  # one bad record must not stop the watcher
            self.summary.decode_errors += 1
            print(f"agentprobe: could not enrich a {ev.type} record: {e}", file=self.err)
            return
        if ev.type == "gpu":
            self._gpu_pids[ev.proc.pid] = ev.cgroup_id
        elif ev.type in ("connect", "packet", "socket"):
            self._conn_pids[ev.proc.pid] = ev.cgroup_id  # kept after exit: counts are flushed later
            if len(self._conn_pids) > 65536:
                del self._conn_pids[next(iter(self._conn_pids))]
        elif ev.type == "fork" and ev.proc.pid in self._gpu_holders:
            self._gpu_holders.add(ev.child_pid)  # the child inherits the open device
        self.emit(rec)
        if ev.type == "gpu" and ev.opened and ev.proc.pid not in self._gpu_holders:
            self._gpu_holders.add(ev.proc.pid)
            self._update_ioctl_probe()
        if ev.type == "exit":
            self._gpu_holders.discard(ev.proc.pid)
            if ev.proc.pid in self._gpu_pids:
                self._flush_gpu_counts()
                self._probes.forget_process(ev.proc.pid)
                del self._gpu_pids[ev.proc.pid]

    def _move_record(self, ev: MoveEvent) -> dict:
        """An agent process moved to another cgroup: the record is about the moved process, in the
        agent cgroup it left (what a freeze acts on), with where it went and who moved it."""
        to_path = self._cgroup_name(ev.dst_cgroup_id) or path_of_id(self.root, ev.dst_cgroup_id)
        inside = self._in_watched(to_path)
        return self.enricher.synthetic("cgroup_move", ev.moved_pid, ev.src_cgroup_id, ev.ktime_ns, {
            "to": {"id": ev.dst_cgroup_id, "path": to_path, "watched": inside},
            "mover": {"pid": ev.proc.pid, "comm": ev.proc.comm, "uid": ev.proc.uid,
                      "cgroup_id": ev.cgroup_id},
        })

    # ---- sessions carried by a local tunnel ----
    CARRIED_APPS = ("ssh", "stratum")

    def _watch_loopback_session(self, rec: dict) -> None:
        """SSH or stratum sent to a loopback port: find the agent process that listens there now, before
        any response cuts connections; where it forwards to may only show a moment later."""
        if rec.get("type") != "payload" or rec.get("app") not in self.CARRIED_APPS:
            return
        from .forwarders import find_forwarder, is_loopback

        client = (rec.get("proc") or {}).get("pid") or 0
        if not client or not is_loopback(rec.get("address", "")) or len(self._loopback_sessions) >= 256:
            return
        agents, children = self._agent_family()
        fwd = find_forwarder(client, rec.get("port", 0), agents, children)
        if fwd is None:
            return  # nobody of the agent's listens there (a node service)
        self._loopback_sessions.append((time.monotonic(), 0, rec, fwd))

    def _agent_family(self) -> tuple[list[int], dict[int, list[int]]]:
        """Live agent pids, and their children by parent."""
        agents = self._agent_pids()
        children: dict[int, list[int]] = {}
        for pid in agents:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(pid)
        return agents, children

    def _remember_dest(self, rec: dict) -> None:
        """Outside destinations each agent process connected to (the last 8), for naming relays."""
        from .forwarders import is_loopback

        addr, port, pid = rec.get("address") or "", rec.get("port"), (rec.get("proc") or {}).get("pid")
        if not pid or is_loopback(addr):
            return
        dests = self._recent_dest.setdefault(pid, [])
        self._recent_dest.move_to_end(pid)
        dest = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
        if dest not in dests:
            dests.append(dest)
            del dests[:-8]
        if len(self._recent_dest) > 4096:
            self._recent_dest.popitem(last=False)

    def _check_loopback_sessions(self) -> None:
        """Name where each found forwarder goes (its and its children's outside peers, live or recorded),
        and emit a `tunnel` record; a relay that connects out only after the client came is looked at
        again a few times."""
        if not self._loopback_sessions:
            return
        from .forwarders import outside_peers

        now = time.monotonic()
        due = [x for x in self._loopback_sessions if x[0] <= now]
        self._loopback_sessions = [x for x in self._loopback_sessions if x[0] > now]
        if not due:
            return
        _, children = self._agent_family()
        for _, tries, rec, fwd in due:
            family = [fwd.pid, *children.get(fwd.pid, [])]
            client = (rec.get("proc") or {}).get("pid") or 0
            for dest in outside_peers(client, family) + [d for p in family for d in self._recent_dest.get(p, [])]:
                if dest not in fwd.to:
                    fwd.to.append(dest)
            if not fwd.to and tries < 5:
                self._loopback_sessions.append((now + 0.3, tries + 1, rec, fwd))
                continue
            self.emit(self.enricher.synthetic("tunnel", fwd.pid, (rec.get("cgroup") or {}).get("id") or 0,
                                              time.monotonic_ns(), {
                "carried": rec.get("app"), "port": fwd.port, "to": fwd.to, "forwarder_pids": family,
                "client": {"pid": client, "comm": (rec.get("proc") or {}).get("comm")},
                "detail": rec.get("banner") or rec.get("method"), "payload_seq": rec.get("seq")}))

    def emit(self, rec: dict, from_stage: int = 0) -> None:
        rec["seq"] = self._seq
        self._seq += 1
        self.summary.events[rec["type"]] += 1
        data = encode(rec)
        for s in self.sinks:
            s.write_record(rec, data)
        if self.on_record:
            self.on_record(rec)
        self._note_activity(rec)
        try:  # bookkeeping for tunnel records: never in the way of the rules below
            if rec["type"] == "payload":
                self._watch_loopback_session(rec)
            elif rec["type"] == "connect" and rec.get("family") in ("inet", "inet6"):
                self._remember_dest(rec)
        except Exception as e:
            self._internal_error(e)
        for i in range(from_stage, len(self.stages)):
            for out in self.stages[i].process(rec):
                self.emit(out, i + 1)
        if rec["type"] == "response" and rec.get("outcome") == "frozen":
            frozen = dict(self._frozen)
            frozen[rec["cgroup"]["path"]] = {"rule": rec.get("rule"), "ts": rec.get("ts"),
                                             "alert_seq": rec.get("alert_seq")}
            self.write_status(frozen)

    def flush(self) -> None:
        for s in self.sinks:
            try:
                s.service()
                s.flush()
            except OSError as e:
                print(f"agentprobe: output {s.name}: {e}", file=self.err)

    def stop(self, *_args) -> None:
        self._stop = True

    def run(self, until: Callable[[], bool] | None = None) -> Summary:
        """Loop until SIGINT/SIGTERM, --duration, or `until()` returns true."""
        old = {sig: signal.signal(sig, self.stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        deadline = time.monotonic() + self.options.duration if self.options.duration else None
        now = time.monotonic()
        next_rescan = now + self.options.rescan_interval
        next_lost = now + self.options.lost_interval
        next_gpu = now + self.options.gpu_interval
        next_tick = now + 0.5
        # SCHED_FIFO while waiting for records (a record wakes us ahead of the busy agent that wrote
        # it: this kernel may not preempt), a normal task while agents are busy (we poll then, and a
        # flood must not make us hog a CPU); children never inherit it
        rt = self.options.rt_priority if self.hardening.get("rt_priority") else 0
        if rt and self._probes is not None:
            self._probes.on_busy = lambda busy: set_realtime(0 if busy else rt)
            set_realtime(0 if self._probes.busy else rt)
        try:
            while not self._stop:
                self._probes.poll(self.options.poll_ms)
                self._check_loopback_sessions()
                now = time.monotonic()
                if now >= next_tick:
                    self._tick_stages()
                    self._check_tracer()
                    next_tick = now + 0.5
                if now >= next_lost:
                    self._check_losses()
                    self._flush_conn_counts()
                    self._flush_flow_counts()
                    next_lost = now + self.options.lost_interval
                if now >= next_rescan:
                    self.rescan()
                    next_rescan = now + self.options.rescan_interval
                if now >= next_gpu:
                    self._flush_gpu_counts()
                    self._update_ioctl_probe()
                    next_gpu = now + self.options.gpu_interval
                self.flush()
                if deadline and now >= deadline:
                    self.summary.reason = "duration"
                    break
                if until is not None and until():
                    self.summary.reason = "done"
                    break
            if not self.summary.reason:
                self.summary.reason = "signal"
        finally:
            if rt and self._probes is not None:
                self._probes.on_busy = None
                set_realtime(0)
            for sig, handler in old.items():
                signal.signal(sig, handler)
        return self.summary

    def drain(self) -> None:
        """Read what the kernel still holds (used before stopping)."""
        if self._probes is not None:
            self._probes.poll(0)
            self._flush_gpu_counts()
            self._flush_conn_counts()
            self._flush_flow_counts()
            self._check_losses()

    def _scan(self) -> dict[int, WatchedCgroup]:
        found = self.cgroup_set.scan()
        if self.options.pods is not None:
            for cid, cg in self.options.pods.cgroups(self.root).items():
                found.setdefault(cid, cg)
        return found

    def _kube_refreshed(self, records: list[dict]) -> None:
        """`kube` records of a pod list: a new selection, or a failure (said once on stderr per streak)."""
        for fields in records:
            if not fields.get("ok") and fields.pop("first", False):
                print(f"agentprobe: {fields['error']}; the {fields['selected_kept']} pods selected before stay "
                      "watched, retrying", file=self.err, flush=True)
            elif fields.get("recovered"):
                print("agentprobe: the Kubernetes API answers again", file=self.err, flush=True)
            self.emit(self._meta("kube", fields))

    def rescan(self) -> None:
        if self.options.pods is not None:
            self._kube_refreshed(self.options.pods.refresh())
        found = self._scan()
        for cid in set(found) - set(self.watched):
            if not self._lock(found[cid], explicit=False):
                del found[cid]
        changed = set(found) != set(self.watched)
        gone = set(self.watched) - set(found)
        added = set(found) - set(self.watched)
        if changed:
            self._probes.set_watched(found.values())
        for cid in gone:
            lock = self._locks.pop(cid, None)
            if lock:
                lock.close()
            self.emit(self._meta("cgroup", {"change": "gone", "cgroup": {"id": cid,
                                                                          "path": self.watched[cid].path}}))
            for st in self.stages:
                forget = getattr(st, "forget_cgroup", None)
                if forget:
                    forget(cid)
        for cid in added:
            self.emit(self._meta("cgroup", {"change": "watched", "cgroup": {"id": cid,
                                                                             "path": found[cid].path}}))
        self.watched = found
        if added:
            self._discover_running()
        elif time.monotonic() >= self._next_remember:
            self._remember_agents()
        if changed:
            self.write_status()

    def _check_losses(self) -> None:
        counts = self._probes.lost_counts()
        delta = {EV_NAMES.get(t, str(t)): n - self._lost_seen[t] for t, n in counts.items()
                 if n > self._lost_seen[t]}
        for t, n in counts.items():
            self._lost_seen[t] = n
        if delta:
            for k, v in delta.items():
                self.summary.lost_kernel[k] += v
            self.emit(self._meta("lost", {"source": "kernel", "counts": delta, "total": sum(delta.values())}))
            self._loss_alerts(delta)
        dropped = sum(s.dropped for s in self.sinks)
        if dropped > self._output_dropped:
            n = dropped - self._output_dropped
            self._output_dropped = dropped
            self.summary.lost_output = dropped
            self.emit(self._meta("lost", {"source": "output", "counts": {s.name: s.dropped for s in self.sinks},
                                          "total": n}))

    def _check_tracer(self) -> None:
        """Root can ptrace the watcher whatever PR_SET_DUMPABLE says, and then read and change it:
        an alert within a tick (0.5 s), and a freeze of the tracer's episode when it is an agent."""
        tracer = traced_by(os.getpid())
        if tracer == self._tracer:
            return
        self._tracer = tracer
        if not tracer:
            return
        path = v2_cgroup_of(tracer)
        agent = self._in_watched(path)
        comm = read_comm(tracer) or ""
        who = f"agent process {tracer} ({comm}) in {path}" if agent else f"process {tracer} ({comm}), not an agent"
        self.emit(self._meta("alert", {
            "rule": "monitor_traced", "name": "The watcher is being ptraced", "priority": "critical",
            "tags": ["evasion", "T1562.001"], "mitre": ["T1562.001"], "action": "freeze" if agent else "alert",
            "summary": f"{who} is ptracing the watcher (pid {os.getpid()}): it can read and change it",
            "cgroup": {"id": None, "path": self.episode_of(path) if agent else path},
            "proc": {"pid": tracer, "comm": comm}, "evidence": [], "chain": []}))

    LOSS_WINDOW_S = 2.0

    def _note_activity(self, rec: dict) -> None:
        """Which episodes produced records lately: the suspects when the kernel loses some."""
        cg = rec.get("cgroup") or {}
        path = cg.get("path")
        if not path or rec.get("type") in ("alert", "response", "verdict"):
            return
        ep = self.episode_of(path)
        self._active[ep] = (time.monotonic(), cg.get("id") if path == ep else None)
        self._active.move_to_end(ep)
        if len(self._active) > 1024:
            self._active.popitem(last=False)

    def _loss_alerts(self, delta: dict) -> None:
        """Lost records can hide an attack (a flood to blind the monitor): an `events_lost` alert for
        each episode active meanwhile, with the --on-loss action (the responder freezes on `freeze`)."""
        now = time.monotonic()
        suspects = [ep for ep, (t, _) in reversed(self._active.items()) if now - t <= self.LOSS_WINDOW_S][:16]
        total = sum(delta.values())
        counts = ", ".join(f"{k} {v}" for k, v in sorted(delta.items()))
        for ep in suspects or [None]:
            if ep is not None and now - self._loss_alerted.get(ep, -1e9) < 10:
                continue  # one a 10 s per episode: the lost records themselves are all in `lost`
            if ep is not None:
                self._loss_alerted[ep] = now
            action = self.options.on_loss if ep is not None else "alert"
            where = f"while {ep} was active" if ep else "with no agent active"
            self.emit(self._meta("alert", {
                "rule": "events_lost", "name": "Records lost in the kernel", "priority": "high",
                "tags": ["evasion", "T1562"], "mitre": ["T1562"], "action": action,
                "summary": f"{total} records lost in the kernel ({counts}) {where}: a flood can blind the monitor",
                "cgroup": {"id": self._active.get(ep, (0, None))[1] if ep else None, "path": ep},
                "proc": {}, "evidence": [], "chain": [], "lost": dict(delta)}))

    def _in_watched(self, path: str | None) -> bool:
        """Is this v2 cgroup path a watched cgroup or below one?"""
        return path is not None and any(path_inside(path, w.path) for w in self.watched.values())

    def _agent_pids(self) -> list[int]:
        """Live processes of the watched cgroups (from cgroup.procs of every watched subtree)."""
        return sorted(self._agent_cgroups())

    def _agent_cgroups(self) -> dict[int, int]:
        """Live processes of the watched cgroups -> the id of the cgroup each is in. One read of
        cgroup.procs and one directory listing per cgroup (no pathlib glob: it lists every file)."""
        pids: dict[int, int] = {}  # (a watched cgroup may lie below another)
        stack = [str(self.root / cg.path.lstrip("/")) for cg in self.watched.values()]
        while stack:
            d = stack.pop()
            try:
                fd = os.open(f"{d}/cgroup.procs", os.O_RDONLY)
                try:
                    chunks = []
                    while chunk := os.read(fd, 1 << 16):
                        chunks.append(chunk)
                finally:
                    os.close(fd)
                data = b"".join(chunks)
                if data:
                    cid = os.stat(d).st_ino
                    pids.update((int(p), cid) for p in data.split())
                with os.scandir(d) as it:
                    stack.extend(e.path for e in it if e.is_dir(follow_symlinks=False))
            except OSError:
                continue  # removed meanwhile
        return pids

    def _sample_nvml(self) -> None:
        if self._nvml is None or not self._nvml.available:
            return
        # NVML lists the GPU's processes: each is looked up (its /proc cgroup line), no walk of the
        # watched cgroups, whose cost grows with the number of episode cgroups
        for s in self._nvml.sample(lambda pid: self._in_watched(v2_cgroup_of(pid))):
            info = self.enricher.tree.get(s["pid"])
            cid = self._gpu_pids.get(s["pid"], 0)
            rec = self.enricher.synthetic("gpu", s["pid"], cid, time.monotonic_ns(), {
                "kind": "nvml", "device": s["device"], "used_memory": s["used_memory"],
                "sm_util": s["sm_util"], "mem_util": s["mem_util"]})
            if info is None:
                rec["proc"]["comm"] = ""
            self.emit(rec)

    def _flush_conn_counts(self) -> None:
        """Connects the kernel counted instead of recording (repeats of a recorded one within a
        second): one `connect_counts` record per process and destination."""
        if self._probes is None:
            return
        for key, n, first, last in self._probes.conn_counts(time.monotonic_ns() - 10 * 10**9):
            fam = "inet" if key.family == socket.AF_INET else "inet6"
            raw = bytes(key.addr)[: 4 if fam == "inet" else 16]
            addr = ipaddress.ip_address(raw)
            mapped = getattr(addr, "ipv4_mapped", None)
            rec = self.enricher.synthetic("connect_counts", key.pid, self._conn_pids.get(key.pid, 0), last, {
                "family": fam, "address": str(mapped or addr), "port": socket.ntohs(key.port),
                "sock_type": SOCK_TYPES.get(key.sock_type, "unknown"), "refused": bool(key.kind & 1),
                "sendmsg": bool(key.kind & 2),
                "count": n, "interval_ns": max(0, last - first)})
            self.emit(rec)
        for pid, s, n in self._probes.conn_sweeps(time.monotonic_ns() - 10 * 10**9):
            fam = "inet" if s.family == socket.AF_INET else "inet6"
            addr = ipaddress.ip_address(bytes(s.addr)[: 4 if fam == "inet" else 16])
            mapped = getattr(addr, "ipv4_mapped", None)
            self.emit(self.enricher.synthetic("connect_sweep", pid, s.cgroup_id, s.last_ns, {
                "count": n, "budget_per_s": abi.CONN_RECORDS_PER_SEC, "min_port": s.min_port,
                "max_port": s.max_port, "family": fam, "address": str(mapped or addr), "port": s.port,
                "interval_ns": max(0, s.last_ns - s.first_ns)}))

    def _flush_flow_counts(self) -> None:
        """ICMP packets and DNS queries counted in the kernel: one `flow_counts` record per process and
        destination whose counts moved (the sampled ones were also records of their own)."""
        if self._probes is None:
            return
        for key, d, first, last in self._probes.flow_counts(time.monotonic_ns() - 10 * 10**9):
            fam = "inet6" if key.v6 else "inet"
            addr = ipaddress.ip_address(bytes(key.daddr)[: 4 if fam == "inet" else 16])
            fields = {"protocol": IP_PROTOCOLS.get(key.protocol, str(key.protocol)), "family": fam,
                      "address": str(addr), "packets": d["packets"], "bytes": d["bytes"], "max_len": d["max_len"],
                      "sampled": d["sampled"], "interval_ns": max(0, last - first)}
            if key.protocol == 17:
                fields["port"] = key.dport
            self.emit(self.enricher.synthetic("flow_counts", key.pid, self._conn_pids.get(key.pid, 0), last, fields))

    def _flush_gpu_counts(self) -> None:
        if self._probes is None:
            return
        self._sample_nvml()
        grouped: dict[tuple[int, int], list] = {}
        for key, delta, first_ns, last_ns in self._probes.gpu_counts():
            grouped.setdefault((key.pid, key.dev), []).append((key, delta, first_ns, last_ns))
        for (pid, dev), items in grouped.items():
            first = min(i[2] for i in items)
            last = max(i[3] for i in items)
            kinds = self._probes.gpu_majors
            major = dev >> 20
            rec = self.enricher.synthetic("gpu", pid, self._gpu_pids.get(pid, 0), last, {
                "kind": "counts",
                "device": {"major": major, "minor": dev & 0xFFFFF,
                           "kind": GPU_DEVICE_KINDS.get(kinds.get(major, 0), "unknown")},
                "counts": [{"nr": k.nr, "detail": k.detail, "count": d} for k, d, _, _ in items],
                "total": sum(i[1] for i in items),
                "interval_ns": max(0, last - first),
            })
            self.emit(rec)

    # ---- status for `agentprobe status` ----
    def watched_paths(self) -> list[str]:
        return [c.path for c in self.watched.values()]

    def write_status(self, frozen: dict | None = None) -> None:
        if frozen is not None:
            self._frozen = frozen
        d = Path(self.options.status_dir)
        try:
            d.mkdir(mode=0o755, parents=True, exist_ok=True)
            path = d / f"watcher-{os.getpid()}.json"
            data = json.dumps({
                "pid": os.getpid(),
                "started": self._started,
                "cgroup_root": str(self.root),
                "watched": [{"id": c.id, "path": c.path} for c in self.watched.values()],
                "frozen": self._frozen,
                "outputs": [_without_credentials(o) for o in self.options.outputs],
            }).encode()
            write_status_file(path, data)
            self._status_path = path
        except OSError:
            pass  # status is a convenience; the stream is the record

    def _remove_status(self) -> None:
        path = self._status_path
        if path is not None:
            try:
                path.unlink()
            except OSError:
                pass

    # ---- tear-down ----
    def close(self, error: str | None = None) -> None:
        if self._probes is not None:
            try:
                self.drain()
            except Exception:
                pass
            for i, st in enumerate(self.stages):  # open episodes get their verdict before the stop record
                flush = getattr(st, "end_all", None)
                if flush is not None:
                    try:
                        for rec in flush():
                            self.emit(rec, i + 1)
                    except Exception as e:
                        self._internal_error(e)
            unwritten = {}
            deadline = time.monotonic() + STOP_DRAIN_S
            for s in self.sinks:  # what an output still holds now will not get out: say it here
                try:
                    s.drain(deadline)
                except OSError:
                    pass
                if s.unwritten():
                    unwritten[s.name] = s.unwritten() + 1  # + this stop record
            stop = self._meta("stop", {
                "reason": error or self.summary.reason or "stopped",
                "events": dict(self.summary.events),
                "events_total": self.summary.events_total + 1,
                "lost": dict(self.summary.lost_kernel),
                "lost_output": self.summary.lost_output + sum(unwritten.values()),
                "unwritten_at_stop": unwritten,
                "readers": {s.name: s.readers() for s in self.sinks if hasattr(s, "readers")},
                "decode_errors": self.summary.decode_errors,
                "internal_errors": self.summary.internal_errors,
                "lost_total": self.summary.lost_total,
            })
            self.emit(stop)
            self._probes.close()
            self._probes = None
            if self._nvml is not None:
                self._nvml.close()
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
        for lock in self._locks.values():
            lock.close()
        self._locks = {}
        self._remove_status()
        if self.options.pods is not None:
            self.options.pods.close()  # the pod lister thread

    # ---- for the CLI's configuration reload ----
    def meta_record(self, type_: str, fields: dict) -> dict:
        """A watcher record (ts, ktime, node set) of `type_`, for emit()."""
        return self._meta(type_, fields)

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


STATUS_FILE_MODE = 0o644  # `agentprobe status` works for any local user; it holds no event data, no secrets


def write_status_file(path: Path, data: bytes) -> None:
    """Atomically, with exactly STATUS_FILE_MODE whatever the umask: a new temporary file (never
    one that is there already, never through a symlink) renamed over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o600)
    except FileExistsError:  # left by a watcher of this pid that was killed mid-write
        os.unlink(tmp)
        fd = os.open(tmp, flags, 0o600)
    try:
        os.fchmod(fd, STATUS_FILE_MODE)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _without_credentials(spec: str) -> str:
    """nats://user:pass@host:4222 -> nats://host:4222: the status file is readable by every user."""
    import re

    return re.sub(r"^([a-z]+://)[^/?#@]*@", r"\1", spec)


def traced_by(pid: int) -> int:
    """The pid ptracing `pid` (TracerPid in /proc/PID/status), 0 if none."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"TracerPid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def v2_cgroup_of(pid: int) -> str | None:
    """A process's cgroup v2 path (relative to the v2 mount), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/cgroup", "rb") as f:
            for line in f:
                if line.startswith(b"0::"):
                    return os.fsdecode(line[3:].rstrip(b"\n"))
    except OSError:
        pass
    return None
