"""Prometheus metrics of a watcher: `agentprobe watch --metrics HOST:PORT` serves /metrics.

Written here rather than with prometheus_client: a dozen counters, two histograms and the
text exposition format 0.0.4 are ~150 lines, and the library would add a dependency (and
its own registry and threads) for that. The numbers come from the records the watcher
emits (this is a sink), plus a timer around the rule stage; the HTTP server runs in one
daemon thread so a slow scraper never holds up the watcher loop.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .errors import AgentprobeError
from .sink import Sink
from .stage import Stage

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RULE_SECONDS_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 0.1)
FREEZE_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class MetricsError(AgentprobeError):
    pass


def _label_value(v: object) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**kv: object) -> str:
    if not kv:
        return ""
    return "{" + ",".join(f'{k}="{_label_value(v)}"' for k, v in kv.items()) + "}"


def _num(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    return repr(float(v)) if isinstance(v, float) else str(v)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1
                break

    def lines(self, name: str) -> list[str]:
        out = []
        cumulative = 0
        for b, c in zip(self.buckets, self.counts, strict=True):
            cumulative += c
            out.append(f"{name}_bucket{_labels(le=_num(b))} {cumulative}")
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {_num(self.sum)}")
        out.append(f"{name}_count {self.count}")
        return out


class WatchMetrics(Sink):
    """Counts what the watcher emits; `render()` gives the exposition text."""

    name = "metrics"

    def __init__(self, outputs: Callable[[], list[Sink]] | None = None) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._outputs = outputs
        self.records: Counter = Counter()
        self.lost: Counter = Counter()
        self.lost_kernel: Counter = Counter()
        self.alerts: Counter = Counter()
        self.responses: Counter = Counter()
        self.reloads: Counter = Counter()
        self.kube_errors = 0
        self.kube_selected: int | None = None  # None: pods are not chosen on the API server
        self.rule_seconds = Histogram(RULE_SECONDS_BUCKETS)
        self.freeze_seconds = Histogram(FREEZE_SECONDS_BUCKETS)
        self.watched: dict[int, str] = {}
        self.frozen: set[str] = set()
        self.cgroup_root: Path | None = None
        self.started: float | None = None
        self.scrapes = 0
        self.scrape_errors = 0

    # -- records in (the watcher loop's thread) --
    def write_record(self, rec: dict, data: bytes) -> None:
        t = rec.get("type")
        with self._lock:
            self.records[t] += 1
            if t == "alert":
                self.alerts[(rec.get("rule"), rec.get("priority"), rec.get("action"))] += 1
            elif t == "response":
                self.responses[(rec.get("action"), rec.get("outcome"))] += 1
                path = (rec.get("cgroup") or {}).get("path")
                if rec.get("outcome") in ("frozen", "already_frozen") and path:
                    self.frozen.add(path)
                    if isinstance(rec.get("latency_ms"), (int, float)) and rec.get("outcome") == "frozen":
                        self.freeze_seconds.observe(rec["latency_ms"] / 1000)
            elif t == "lost":
                self.lost[rec.get("source", "unknown")] += int(rec.get("total") or 0)
                if rec.get("source") == "kernel":
                    for k, v in (rec.get("counts") or {}).items():
                        self.lost_kernel[k] += int(v)
            elif t == "start":
                self.started = (rec.get("ts") or time.time_ns()) / 1e9
                self.cgroup_root = Path(rec["cgroup_root"]) if rec.get("cgroup_root") else None
                self.watched = {c["id"]: c["path"] for c in rec.get("cgroups") or []}
            elif t == "cgroup":
                cg = rec.get("cgroup") or {}
                if rec.get("change") == "watched":
                    self.watched[cg.get("id")] = cg.get("path")
                elif rec.get("change") == "gone":
                    self.watched.pop(cg.get("id"), None)
            elif t == "reload":
                self.reloads["ok" if rec.get("ok") else "failed"] += 1
            elif t == "kube":
                if rec.get("ok"):
                    if "selected" in rec:
                        self.kube_selected = len(rec["selected"])
                else:
                    self.kube_errors += 1
                    self.kube_selected = self.kube_selected or 0
        self.written += 1

    def write(self, data: bytes) -> None:
        from .stream import decode_one

        self.write_record(decode_one(data), data)

    def observe_rules(self, seconds: float) -> None:
        with self._lock:
            self.rule_seconds.observe(seconds)

    def _still_frozen(self) -> int:
        """Frozen cgroups that still are (a thaw or removal since is seen here, not in the stream)."""
        if self.cgroup_root is None:
            return len(self.frozen)
        for path in list(self.frozen):
            try:
                events = (self.cgroup_root / path.lstrip("/") / "cgroup.events").read_text()
            except OSError:
                self.frozen.discard(path)
                continue
            if "frozen 1" not in events:
                self.frozen.discard(path)
        return len(self.frozen)

    # -- the exposition (the server's thread) --
    def render(self) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help_: str, samples: list[str]) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(samples)

        with self._lock:
            family("agentprobe_records_total", "counter", "Records emitted, by type.",
                   [f"agentprobe_records_total{_labels(type=k)} {v}" for k, v in sorted(self.records.items())])
            family("agentprobe_lost_records_total", "counter",
                   "Records lost: in the kernel (buffer full) or in an output (could not take them).",
                   [f"agentprobe_lost_records_total{_labels(source=s)} {self.lost.get(s, 0)}"
                    for s in ("kernel", "output")])
            family("agentprobe_kernel_lost_records_total", "counter", "Records the kernel could not write, by type.",
                   [f"agentprobe_kernel_lost_records_total{_labels(type=k)} {v}"
                    for k, v in sorted(self.lost_kernel.items())])
            family("agentprobe_alerts_total", "counter", "Alerts, by rule.",
                   [f"agentprobe_alerts_total{_labels(rule=r, priority=p, action=a)} {v}"
                    for (r, p, a), v in sorted(self.alerts.items(), key=str)])
            family("agentprobe_responses_total", "counter", "Responses to alerts (freeze, kill), by outcome.",
                   [f"agentprobe_responses_total{_labels(action=a, outcome=o)} {v}"
                    for (a, o), v in sorted(self.responses.items(), key=str)])
            family("agentprobe_rule_evaluation_seconds", "histogram", "Time the rule engine took per record.",
                   self.rule_seconds.lines("agentprobe_rule_evaluation_seconds"))
            family("agentprobe_freeze_latency_seconds", "histogram",
                   "From the triggering syscall to the confirmed freeze of the agent cgroup.",
                   self.freeze_seconds.lines("agentprobe_freeze_latency_seconds"))
            family("agentprobe_watched_cgroups", "gauge", "Agent cgroups watched now.",
                   [f"agentprobe_watched_cgroups {len(self.watched)}"])
            family("agentprobe_frozen_cgroups", "gauge", "Agent cgroups this watcher froze that are still frozen.",
                   [f"agentprobe_frozen_cgroups {self._still_frozen()}"])
            family("agentprobe_config_reloads_total", "counter", "Configuration reloads (SIGHUP), by result.",
                   [f"agentprobe_config_reloads_total{_labels(result=r)} {self.reloads.get(r, 0)}"
                    for r in ("ok", "failed")])
            if self.kube_selected is not None:
                family("agentprobe_kube_selected_pods", "gauge", "Pods of this node chosen by label or annotation.",
                       [f"agentprobe_kube_selected_pods {self.kube_selected}"])
                family("agentprobe_kube_api_errors_total", "counter",
                       "Pod lists the Kubernetes API server did not give (the last good selection stays).",
                       [f"agentprobe_kube_api_errors_total {self.kube_errors}"])
            if self.started is not None:
                family("agentprobe_start_time_seconds", "gauge", "When the watcher started (Unix time).",
                       [f"agentprobe_start_time_seconds {_num(self.started)}"])
        outputs = [s for s in (self._outputs() if self._outputs else []) if s is not self]
        if outputs:
            family("agentprobe_output_records_total", "counter", "Records handed to each output.",
                   [f"agentprobe_output_records_total{_labels(output=s.name)} {s.written}" for s in outputs])
            family("agentprobe_output_dropped_total", "counter", "Records each output could not deliver.",
                   [f"agentprobe_output_dropped_total{_labels(output=s.name)} {s.dropped}" for s in outputs])
            connected = [s for s in outputs if s.connected is not None]
            if connected:
                family("agentprobe_output_connected", "gauge", "1 while a network output is connected.",
                       [f"agentprobe_output_connected{_labels(output=s.name)} {int(bool(s.connected))}"
                        for s in connected])
        return "\n".join(out) + "\n"


class TimedStage(Stage):
    """A watcher stage (the rule engine) whose `process` time goes into a histogram."""

    def __init__(self, stage: Stage, metrics: WatchMetrics) -> None:
        self.stage = stage
        self.metrics = metrics
        self.name = stage.name

    def process(self, record: dict) -> list[dict]:
        t0 = time.perf_counter()
        try:
            return self.stage.process(record)
        finally:
            self.metrics.observe_rules(time.perf_counter() - t0)

    def tick(self, now: float) -> list[dict]:
        return self.stage.tick(now)

    def finish(self) -> list[dict]:
        return self.stage.finish()

    def forget_cgroup(self, cgroup_id: int) -> None:
        self.stage.forget_cgroup(cgroup_id)

    def adopt_state(self, old: Stage) -> int:
        return self.stage.adopt_state(old.stage if isinstance(old, TimedStage) else old)


def parse_address(spec: str) -> tuple[str, int]:
    """HOST:PORT, :PORT or [V6]:PORT."""
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise MetricsError(f"bad metrics address {spec}: expected HOST:PORT (e.g. 127.0.0.1:9477 or :9477)")
    return host.strip("[]") or "0.0.0.0", int(port)


class MetricsServer:
    """Serves GET /metrics from a daemon thread."""

    def __init__(self, spec: str, metrics: WatchMetrics) -> None:
        host, port = parse_address(spec)
        self.metrics = metrics

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics here")
                    return
                body = metrics.render().encode()
                metrics.scrapes += 1
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args) -> None:  # scrapes are not news
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

            def handle_error(self, request, client_address) -> None:  # a broken scrape is counted, not printed
                metrics.scrape_errors += 1

        try:
            self._server = Server((host, port), Handler)
        except OSError as e:
            raise MetricsError(f"cannot serve metrics on {spec}: {e.strerror or e}") from None
        self.address = self._server.server_address
        self._thread = threading.Thread(target=self._server.serve_forever, name="agentprobe-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
