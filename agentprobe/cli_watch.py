"""agentprobe watch: its options, its configuration file and its SIGHUP reload (the command
line's half of the watcher; the loop is watch.py, the record path pipeline.py)."""

from __future__ import annotations

import sys

import click

from .errors import AgentprobeError

DEFAULT_OUTPUT = "/var/log/agentprobe/stream.msgpack"

WATCH_EPILOG = """\b
Examples:
  sudo agentprobe watch                          # watch <cgroup2>/agents (created if missing)
  sudo agentprobe watch --cgroup agents/ep-17    # one episode's cgroup
  sudo agentprobe watch --cgroup-glob 'kubepods.slice/**/*agent*'
  sudo agentprobe watch -o - --no-view | agentprobe read -
  sudo agentprobe watch -o unix:/run/agentprobe.sock   # readers: agentprobe read unix:/run/agentprobe.sock
  sudo agentprobe watch -o 'nats://nats.internal:4222?stream=AGENTPROBE' --metrics 127.0.0.1:9477
  sudo agentprobe watch --config /etc/agentprobe/config.yaml    # kill -HUP reloads rules and allowlists

\b
Exit status:
  0  stopped by SIGINT/SIGTERM or --duration
  1  bad input (cgroup missing, output unwritable, ...)
  2  bad command line
  3  kernel or BCC cannot load the programs (no BCC, no BTF, verifier)
  4  not root / missing capabilities
  5  another watcher already watches one of the cgroups
"""


def fail(e: AgentprobeError) -> None:
    click.echo(f"agentprobe: {e}", err=True)
    sys.exit(e.exit_code)


def load_config(ctx: click.Context, _param, value: str | None) -> str | None:
    """--config (eager): the file's values become the defaults of every other option."""
    from .config import ConfigError, load_config, resolve_config

    try:
        path = resolve_config(value)
        if path:
            ctx.default_map = {**(ctx.default_map or {}), **load_config(path, ctx.command)}
    except ConfigError as e:
        fail(e)
    return path



@click.command(epilog=WATCH_EPILOG)
@click.option("--config", "config_path", metavar="FILE", is_eager=True, callback=load_config,
              help="YAML file with any of these options (long names as keys); the command line wins. "
                   "Default: /etc/agentprobe/config.yaml if it exists. SIGHUP re-reads it and the rule files.")
@click.option("--cgroup", "cgroups", multiple=True, metavar="PATH",
              help="Agent cgroup to watch with its subtree: absolute, or relative to the cgroup v2 mount. "
                   "Repeatable. Default: 'agents', created if missing.")
@click.option("--cgroup-glob", "globs", multiple=True, metavar="PATTERN",
              help="Watch every cgroup matching PATTERN (relative to the v2 mount; * within a level, "
                   "** across levels), re-scanned so later ones are watched too. Repeatable.")
@click.option("-o", "--output", "outputs", multiple=True, metavar="SPEC",
              help=f"Stream destination: '-' (stdout), FILE (appended; flushed after every batch, at most "
                   f"every 100 ms, and on exit), unix:PATH or tcp:HOST:PORT (served to readers), "
                   f"nats://HOST:PORT[?prefix=P&stream=JETSTREAM] (published on P.<node>.<type>), "
                   f"jsonl:FILE or jsonl:- (JSON lines, Elastic Common Schema names). "
                   f"Repeatable. Default: {DEFAULT_OUTPUT}.")
@click.option("--metrics", "metrics_addr", metavar="HOST:PORT",
              help="Serve Prometheus metrics on http://HOST:PORT/metrics.")
@click.option("--buffer", type=click.Choice(["auto", "ringbuf", "perf"]), default="auto", show_default=True,
              help="Kernel-to-user buffer: BPF ring buffer (5.8+) or perf buffer.")
@click.option("--no-view", is_flag=True, help="No live one-line-per-event view on the terminal.")
@click.option("--duration", type=float, metavar="SECONDS", help="Stop after SECONDS.")
@click.option("--gpu-interval", type=float, default=2.0, show_default=True, metavar="SECONDS",
              help="How often aggregated GPU ioctl counts are written.")
@click.option("--gpu-major", "gpu_majors", type=click.IntRange(0, 4095), multiple=True, metavar="N",
              help="Treat char-device major N as an NVIDIA device too (195 and the majors in "
                   "/proc/devices are always used).")
@click.option("--rescan", type=float, default=2.0, show_default=True, metavar="SECONDS",
              help="How often cgroup globs are re-scanned.")
@click.option("--rules", "rule_files", multiple=True, metavar="FILE", type=click.Path(dir_okay=False),
              help="Rule file that adds to or overrides the default rules by name. Repeatable.")
@click.option("--no-default-rules", is_flag=True, help="Use only the --rules files.")
@click.option("--dry-run", is_flag=True, help="Alert, but only report the freeze/kill a rule would do.")
@click.option("--in-kernel-deny/--no-in-kernel-deny", default=True, show_default=True,
              help="Refuse agent connects to mining-pool ports outside allowed_networks, and to "
                   "mining_pool_hosts, in the kernel (EPERM before any packet leaves); the freeze follows.")
@click.option("--no-cut-network", is_flag=True,
              help="Freeze without destroying the frozen processes' TCP connections.")
@click.option("--status-dir", default="/run/agentprobe", show_default=True, metavar="DIR",
              help="Where the watcher keeps its state for `agentprobe status`.")
@click.option("--probes", "probe_mode", type=click.Choice(["auto", "syscalls"]), default="auto", show_default=True,
              help="auto: exec on sched_process_exec and connect on the agent cgroups' own hooks, which cost "
                   "processes outside agent cgroups nothing; syscalls: the syscall tracepoints, which also "
                   "report failed execs, AF_UNIX connects and connect results, but slow every syscall of "
                   "every process a little.")
@click.option("--gpu-probe", type=click.Choice(["auto", "fentry", "on-demand", "always"]), default="auto",
              show_default=True,
              help="How NVIDIA ioctls are seen. fentry: on the ioctl syscall only (where the kernel allows "
                   "fentry); on-demand: the ioctl tracepoint, attached while an agent holds a GPU device open; "
                   "always: that tracepoint throughout. auto: fentry, else on-demand.")
@click.option("--gpu-idle-detach", type=float, default=5.0, show_default=True, metavar="SECONDS",
              help="With the on-demand GPU probe: detach it this long after the last agent holding a GPU exits.")
@click.option("--label-env", "label_env", multiple=True, metavar="NAMES",
              help="Environment variables of agent processes that label their records, comma-separated "
                   "(e.g. EPISODE_ID,TRAJECTORY_ID,TOOL_CALL_ID): read at each exec, inherited by children.")
@click.option("--label-dir", metavar="DIR", type=click.Path(file_okay=False),
              help="Also read cgroup labels from DIR/<cgroup id>.json files a sandbox manager writes "
                   "(besides the cgroups' user.agentprobe.* attributes: `agentprobe label`).")
@click.option("--no-verdicts", is_flag=True, help="No per-episode verdict records.")
@click.option("--insecure-files", is_flag=True,
              help="Use rule and config files that users other than root could change (with a warning); "
                   "without it, watch refuses them.")
@click.option("--on-loss", type=click.Choice(["alert", "freeze"]), default="alert", show_default=True,
              help="When the kernel loses records (a flood can blind the monitor): an events_lost alert for "
                   "each episode active meanwhile, or that alert and a freeze of those episodes.")
@click.option("--ring-pages", type=int, default=1024, show_default=True, metavar="PAGES",
              callback=lambda ctx, param, v: v if v > 0 and v & (v - 1) == 0 else (_ for _ in ()).throw(
                  click.BadParameter(f"{v} is not a power of two")),
              help="Size of the kernel-to-user ring buffer in pages (a power of two).")
@click.option("--busy-poll-ms", type=click.IntRange(0, 100), default=1, show_default=True, metavar="MS",
              help="While agents are busy (800 records/s or more), read the ring buffer every MS ms instead of "
                   "being woken for each record: a wake-up interrupts the agent's CPU (24 us of an exec in a VM), "
                   "a poll adds at most MS to detection. Isolated records always wake the watcher. 0: always "
                   "woken.")
@click.option("--rt-priority", type=click.IntRange(0, 99), default=1, show_default=True, metavar="N",
              help="While it waits for records, the watcher runs SCHED_FIFO at N (its children do not): on a "
                   "kernel without preemption a record then wakes it ahead of the agent that wrote it, which "
                   "cuts the tail of the time to freeze. While agents are busy (busy polling) it runs as a "
                   "normal task, so a flood cannot make it hog a CPU. 0: never.")
@click.option("--kube-pods", is_flag=True,
              help="Watch this node's agent pods, chosen on the Kubernetes API server by --pod-selector or "
                   "--pod-annotation (pods of either kind); each pod's cgroup "
                   "with all its containers. Implied by --pod-selector and --pod-annotation.")
@click.option("--pod-selector", "pod_selectors", multiple=True, metavar="SELECTOR",
              help="Pods whose labels match SELECTOR (key=value, key!=value, key, !key; comma-separated: all "
                   "of them). Repeatable: any of them.")
@click.option("--pod-annotation", "pod_annotations", multiple=True, metavar="KEY[=VALUE]",
              help="Pods with this annotation (any value without =VALUE). Repeatable. "
                   "Default: agentprobe.io/watch=true.")
@click.option("--kube-api", metavar="URL", help="The API server. Default: in-cluster "
              "(https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT).")
@click.option("--kube-credentials", default="/var/run/secrets/kubernetes.io/serviceaccount", show_default=True,
              metavar="DIR", help="Service account token and ca.crt for the API server (token re-read each time).")
@click.option("--node-name", metavar="NAME", help="This node's name in Kubernetes. Default: $NODE_NAME, "
              "else the host name.")
@click.option("--kube-refresh", type=float, default=10.0, show_default=True, metavar="SECONDS",
              help="How often the node's pods are listed again (a new pod cgroup of an unknown pod asks at once).")
def watch(config_path, cgroups, globs, outputs, metrics_addr, buffer, no_view, duration, gpu_interval, gpu_majors,
          rescan, rule_files, no_default_rules, dry_run, in_kernel_deny, no_cut_network, status_dir,
          probe_mode, gpu_probe, gpu_idle_detach, label_env, label_dir, no_verdicts, on_loss, ring_pages,
          busy_poll_ms, rt_priority, insecure_files, **kube) -> None:
    """Trace exec, connect and NVIDIA ioctls of agent processes, apply the detection
    rules, freeze agent cgroups that misbehave, and stream everything as msgpack."""
    import signal

    from . import view
    from .watch import Watcher, WatchOptions

    outputs = list(outputs) or [DEFAULT_OUTPUT]
    opts = WatchOptions(cgroups=list(cgroups), cgroup_globs=list(globs), outputs=outputs, buffer=buffer,
                        rule_files=list(rule_files), default_rules=not no_default_rules, dry_run=dry_run,
                        in_kernel_deny=in_kernel_deny, cut_network=not no_cut_network, verdicts=not no_verdicts,
                        duration=duration, gpu_interval=gpu_interval, extra_gpu_majors=tuple(gpu_majors),
                        rescan_interval=rescan, status_dir=status_dir, probe_mode=probe_mode,
                        label_env=_label_env_names(label_env), label_dir=label_dir,
                        gpu_probe=gpu_probe, gpu_idle_detach=gpu_idle_detach, on_loss=on_loss,
                        ring_pages=ring_pages, busy_poll_ms=busy_poll_ms, rt_priority=rt_priority)
    term = sys.stderr if ("-" in outputs or "jsonl:-" in outputs) else sys.stdout
    metrics = metrics_server = None
    if metrics_addr:  # before anything is loaded: a taken port is a clear error at once
        from .metrics import MetricsServer, WatchMetrics

        try:
            metrics = WatchMetrics(lambda: watcher.sinks)
            metrics_server = MetricsServer(metrics_addr, metrics)
        except AgentprobeError as e:
            fail(e)
    old_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # not fatal while loading; handled once running

    def show(rec: dict) -> None:
        try:
            print(view.line(rec), file=term, flush=True)
        except BrokenPipeError:
            pass

    watcher = Watcher(opts, on_record=None if no_view else show, metrics=metrics)
    error = None
    try:
        from .config import resolve_config
        from .trust import check_trusted

        used_config = resolve_config(config_path)
        for files, what in (([used_config] if used_config else [], "config file"), (rule_files, "rule file")):
            check_trusted(files, what, insecure_files, lambda m: click.echo(m, err=True))
        reloader = _reloader(watcher, config_path, rule_files, no_default_rules, in_kernel_deny and not dry_run,
                             on_loss, insecure_files)
        opts.pods = _pod_selection(**kube)
        watcher.prepare()
        if watcher.created_default:
            click.echo(f"agentprobe: created default agent cgroup {watcher.created_default}", err=True)
        if not no_view:
            print(view.HEADER, file=term, flush=True)
        watcher.start()
        signal.signal(signal.SIGHUP, reloader.request)  # before "watching": a SIGHUP after that line is never lost
        _say_started(watcher, metrics_server, outputs)
        watcher.run(until=reloader.poll)
    except AgentprobeError as e:
        error = e
    finally:
        signal.signal(signal.SIGHUP, old_hup)
        watcher.close(error=str(error) if error else None)
        if metrics_server is not None:
            metrics_server.close()
    if error:
        fail(error)
    _say_stopped(watcher.summary)


def _say_started(watcher, metrics_server, outputs: list[str]) -> None:
    paths = ", ".join(f"{watcher.root}{c.path}" for c in watcher.watched.values()) or "(none yet)"
    for name, path in watcher.probe_paths.items():
        click.echo(f"agentprobe: probe {name}: {path}", err=True)
    if metrics_server is not None:
        host, port = metrics_server.address[:2]
        click.echo(f"agentprobe: metrics on http://{host}:{port}/metrics", err=True)
    click.echo(f"agentprobe: watching {paths}; stream -> {', '.join(outputs)}; Ctrl-C to stop", err=True)


def _say_stopped(s) -> None:
    by_type = ", ".join(f"{k} {v}" for k, v in sorted(s.events.items()))
    click.echo(f"agentprobe: stopped ({s.reason}): {s.events_total} records ({by_type}); "
               f"lost: {sum(s.lost_kernel.values())} in kernel, {s.lost_output} in outputs, "
               f"{s.decode_errors} undecodable"
               + (f", {s.internal_errors} skipped by internal errors" if s.internal_errors else ""), err=True)


def _pod_selection(kube_pods, pod_selectors, pod_annotations, kube_api, kube_credentials, node_name, kube_refresh):
    """The agent pods of this node from the API server (agentprobe/kubeapi.py), or None when not asked."""
    if not (kube_pods or pod_selectors or pod_annotations):
        return None
    from .kubeapi import DEFAULT_ANNOTATION, KubeApi, KubeError, PodSelection, default_api_url, default_node_name

    url = kube_api or default_api_url()
    if not url:
        raise KubeError("no Kubernetes API server: not in a pod (KUBERNETES_SERVICE_HOST is unset); give --kube-api")
    if kube_refresh <= 0:
        raise KubeError(f"--kube-refresh must be more than 0 seconds, not {kube_refresh}")
    annotations = list(pod_annotations) or [DEFAULT_ANNOTATION]
    return PodSelection(KubeApi(url, kube_credentials), node_name or default_node_name(), list(pod_selectors),
                        annotations, kube_refresh)


def _label_env_names(values) -> tuple[str, ...]:
    import re

    names: list[str] = []
    for v in values:
        for n in v.split(","):
            n = n.strip()
            if not n:
                continue
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", n):
                raise click.BadParameter(f"{n!r} is not an environment variable name", param_hint="--label-env")
            if n not in names:
                names.append(n)
    if len(names) > 16:
        raise click.BadParameter("at most 16 names", param_hint="--label-env")
    return tuple(names)


def _reloader(watcher, config_path, cli_rule_files, cli_no_default_rules, with_deny: bool, on_loss: str,
              insecure_files: bool = False):
    """What SIGHUP does: re-read the config file and the rule files it or the command line names
    (the command line wins, as at start), build the engine, swap it in (agentprobe/reload.py).
    The files are checked again as at start: one made writable by others since is refused (the
    running rules stay) unless --insecure-files."""
    from click.core import ParameterSource

    from .reload import RuleReloader

    ctx = click.get_current_context()
    from_cli = {name: ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE
                for name in ("rule_files", "no_default_rules")}

    def build():
        from .config import load_config
        from .pipeline import rule_engine
        from .rules import deny_policy
        from .trust import check_trusted

        def warn(m):
            click.echo(m, err=True)

        check_trusted([config_path] if config_path else [], "config file", insecure_files, warn)
        values = load_config(config_path, ctx.command) if config_path else {}
        files = list(cli_rule_files) if from_cli["rule_files"] else list(values.get("rule_files", ()))
        check_trusted(files, "rule file", insecure_files, warn)
        no_defaults = cli_no_default_rules if from_cli["no_default_rules"] else values.get("no_default_rules", False)
        engine = rule_engine(files, not no_defaults, on_loss)
        return engine, deny_policy(engine.ruleset) if with_deny else None, config_path

    return RuleReloader(watcher, build)
