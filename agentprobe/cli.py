"""Command line: agentprobe watch | read | ...

Errors a user can cause are AgentprobeError; they are caught here, once, and
printed as one line with a non-zero exit status.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import __version__
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


def _fail(e: AgentprobeError) -> None:
    click.echo(f"agentprobe: {e}", err=True)
    sys.exit(e.exit_code)


def _load_config(ctx: click.Context, _param, value: str | None) -> str | None:
    """--config (eager): the file's values become the defaults of every other option."""
    from .config import ConfigError, load_config, resolve_config

    try:
        path = resolve_config(value)
        if path:
            ctx.default_map = {**(ctx.default_map or {}), **load_config(path, ctx.command)}
    except ConfigError as e:
        _fail(e)
    return path


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="agentprobe")
def main() -> None:
    """Kernel-level security monitoring for AI agents (eBPF)."""


@main.command(epilog=WATCH_EPILOG)
@click.option("--config", "config_path", metavar="FILE", is_eager=True, callback=_load_config,
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
    from .responder import CgroupFreezer, Responder
    from .watch import Watcher, WatchOptions

    outputs = list(outputs) or [DEFAULT_OUTPUT]
    opts = WatchOptions(cgroups=list(cgroups), cgroup_globs=list(globs), outputs=outputs, buffer=buffer,
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
            _fail(e)
    reloader = None
    old_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # not fatal while loading; handled once running

    def show(rec: dict) -> None:
        try:
            print(view.line(rec), file=term, flush=True)
        except BrokenPipeError:
            pass

    watcher = Watcher(opts, on_record=None if no_view else show)
    error = None
    try:
        from .config import resolve_config
        from .trust import check_trusted

        used_config = resolve_config(config_path)
        check_trusted([used_config] if used_config else [], "config file", insecure_files,
                      lambda m: click.echo(m, err=True))
        check_trusted(rule_files, "rule file", insecure_files, lambda m: click.echo(m, err=True))
        rules_stage = _rule_stage(rule_files, not no_default_rules)
        if rules_stage is not None:
            from .rules import recorded_ports

            opts.recorded_ports = recorded_ports(rules_stage.ruleset)
        if in_kernel_deny and not dry_run and rules_stage is not None:
            from .rules import deny_policy

            opts.deny = deny_policy(rules_stage.ruleset)
        if metrics is not None:
            from .metrics import TimedStage

            if rules_stage is not None:
                rules_stage = TimedStage(rules_stage, metrics)
            watcher.sinks.append(metrics)
        reloader = _reloader(watcher, config_path, rule_files, no_default_rules, in_kernel_deny and not dry_run,
                             metrics, insecure_files)
        opts.pods = _pod_selection(**kube)
        watcher.prepare()
        from .cgroups import find_v1_freezer

        responder = Responder(CgroupFreezer(watcher.root, find_v1_freezer()), watcher.watched_paths,
                              dry_run=dry_run, cut_network=not no_cut_network,
                              clock_offset_ns=watcher.clock_offset_ns)
        verdicts = None if no_verdicts else watcher.verdict_stage()
        watcher.stages = [s for s in (rules_stage, responder, verdicts) if s is not None]
        if watcher.created_default:
            click.echo(f"agentprobe: created default agent cgroup {watcher.created_default}", err=True)
        if not no_view:
            print(view.HEADER, file=term, flush=True)
        watcher.start()
        paths = ", ".join(f"{watcher.root}{c.path}" for c in watcher.watched.values()) or "(none yet)"
        for name, path in watcher.probe_paths.items():
            click.echo(f"agentprobe: probe {name}: {path}", err=True)
        if metrics_server is not None:
            host, port = metrics_server.address[:2]
            click.echo(f"agentprobe: metrics on http://{host}:{port}/metrics", err=True)
        click.echo(f"agentprobe: watching {paths}; stream -> {', '.join(outputs)}; Ctrl-C to stop", err=True)
        signal.signal(signal.SIGHUP, reloader.request)
        watcher.run(until=reloader.poll)
    except AgentprobeError as e:
        error = e
    finally:
        signal.signal(signal.SIGHUP, old_hup)
        watcher.close(error=str(error) if error else None)
        if metrics_server is not None:
            metrics_server.close()
    if error:
        _fail(error)
    s = watcher.summary
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


def _reloader(watcher, config_path, cli_rule_files, cli_no_default_rules, with_deny: bool, metrics,
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
        from .rules import build_engine, deny_policy
        from .trust import check_trusted

        def warn(m):
            click.echo(m, err=True)

        check_trusted([config_path] if config_path else [], "config file", insecure_files, warn)
        values = load_config(config_path, ctx.command) if config_path else {}
        files = list(cli_rule_files) if from_cli["rule_files"] else list(values.get("rule_files", ()))
        check_trusted(files, "rule file", insecure_files, warn)
        no_defaults = cli_no_default_rules if from_cli["no_default_rules"] else values.get("no_default_rules", False)
        engine = build_engine(files, with_defaults=not no_defaults)
        return engine, deny_policy(engine.ruleset) if with_deny else None, config_path

    wrap = None
    if metrics is not None:
        from .metrics import TimedStage

        def wrap(engine):
            return TimedStage(engine, metrics)
    return RuleReloader(watcher, build, wrap)


def _rule_stage(rule_files, with_defaults: bool):
    """The rule engine as a watcher stage; None until the rules package is present."""
    try:
        from .rules import build_engine
    except ImportError:
        if rule_files:
            raise AgentprobeError("this agentprobe has no rule engine") from None
        return None
    return build_engine(list(rule_files), with_defaults=with_defaults)


@main.command()
@click.option("-o", "--output", default="/tmp/agentprobe-demo.msgpack", show_default=True, metavar="FILE",
              help="Where the demo's stream is recorded (replaced).")
@click.option("--timeout", default=25.0, show_default=True, metavar="SECONDS")
def demo(output, timeout) -> None:
    """Replay the ROME incident in a throw-away world (root; no GPU, no network needed).

    An agent cgroup, a network namespace standing for the internet with a real
    sshd and a fake stratum pool, imitation NVIDIA devices; a scripted rogue
    agent does honest work, opens a reverse SSH tunnel, then runs a renamed GPU
    miner. The watcher catches and freezes both; everything is removed
    afterwards, also on Ctrl-C.
    """
    from pathlib import Path

    from . import view
    from .demo import report, run_demo

    quiet = {"fork", "exit", "cgroup"}

    def show(rec: dict) -> None:
        if rec["type"] in quiet or (rec["type"] == "gpu" and rec.get("kind") == "counts"):
            return
        click.echo(view.line(rec))

    click.echo(view.HEADER)
    try:
        result = run_demo(Path(output), show, timeout=timeout)
    except AgentprobeError as e:
        _fail(e)
    except KeyboardInterrupt:  # before the watcher took over SIGINT; run_demo has torn down
        click.echo("agentprobe: demo interrupted; everything it built was removed", err=True)
        sys.exit(130)
    for line in report(result):
        click.echo(line)
    if result["interrupted"]:
        click.echo("agentprobe: demo interrupted; everything it built was removed", err=True)
        sys.exit(130)
    frozen = {r["cgroup"]["path"] for r in result["records"] if r["type"] == "response" and r["outcome"] == "frozen"}
    if len(frozen) < 2 or result["tunnel_used"]:
        click.echo("agentprobe: the demo did not go as expected (see above)", err=True)
        sys.exit(1)


@main.group()
def rules() -> None:
    """List and check detection rules."""


@rules.command("list")
@click.option("--rules", "rule_files", multiple=True, metavar="FILE", help="Also load FILE (as watch would).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def rules_list(rule_files, as_json) -> None:
    """The rules watch would run: id, priority, action, ATT&CK ids, description."""
    from .rules import list_rules, load_ruleset

    try:
        infos = list_rules(load_ruleset(list(rule_files)))
    except AgentprobeError as e:
        _fail(e)
    if as_json:
        import dataclasses

        click.echo(json.dumps([dataclasses.asdict(i) for i in infos], indent=2))
        return
    click.echo(f"{'RULE':<40} {'PRIORITY':<9} {'ACTION':<7} {'ON':<3} {'ATT&CK':<22} DESCRIPTION")
    for i in infos:
        desc = " ".join(i.desc.split())
        click.echo(f"{i.id:<40} {i.priority:<9} {i.action:<7} {'yes' if i.enabled else 'no':<3} "
                   f"{','.join(i.mitre):<22} {desc[:100]}")


@rules.command("check")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
def rules_check(files) -> None:
    """Validate rule FILES: alone, then merged over the default rules."""
    from .rules import check_file, list_rules

    for f in files:
        try:
            rs = check_file(f)
        except AgentprobeError as e:
            _fail(e)
        click.echo(f"{f}: ok ({len(list_rules(rs))} rules after merging over the defaults)")


@main.command()
@click.argument("cgroup")
def thaw(cgroup) -> None:
    """Thaw a frozen agent CGROUP (absolute, or relative to the cgroup v2 mount)."""
    from .cgroups import CgroupSet, find_v1_freezer, find_v2_mount
    from .responder import CgroupFreezer

    try:
        root = find_v2_mount()
        cs = CgroupSet(root)
        path = cs.resolve(cgroup)
        rel = cs.relative(path)
        if rel == "/":
            raise AgentprobeError("refusing to thaw the root cgroup")
        if not path.is_dir():
            raise AgentprobeError(f"cgroup {cgroup} does not exist ({path})")
        out = CgroupFreezer(root, find_v1_freezer()).thaw(rel)
        if out.outcome != "thawed":
            raise AgentprobeError(f"cannot thaw {path}: {out.error}")
    except AgentprobeError as e:
        _fail(e)
    click.echo(f"agentprobe: thawed {path}")


@main.command()
@click.option("--status-dir", default="/run/agentprobe", show_default=True, metavar="DIR")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(status_dir, as_json) -> None:
    """Running watchers, the cgroups they watch, and which are frozen and why."""
    import datetime as dt
    from pathlib import Path

    from .cgroups import find_v1_freezer
    from .responder import CgroupFreezer

    watchers = []
    for f in sorted(Path(status_dir).glob("watcher-*.json")):
        try:
            st = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        alive = Path(f"/proc/{st.get('pid')}").exists()
        freezer = CgroupFreezer(Path(st.get("cgroup_root", "/sys/fs/cgroup")), find_v1_freezer())
        cgroups = []
        paths = [w["path"] for w in st.get("watched", [])] + list(st.get("frozen", {}))
        for p in dict.fromkeys(paths):
            exists = (freezer.v2_root / p.lstrip("/")).is_dir()
            cgroups.append({"path": p, "exists": exists, "frozen": exists and freezer.is_frozen(p),
                            "why": st.get("frozen", {}).get(p)})
        watchers.append({"pid": st.get("pid"), "running": alive, "started": st.get("started"),
                         "outputs": st.get("outputs"), "cgroups": cgroups})
    if as_json:
        click.echo(json.dumps(watchers, indent=2))
        return
    if not watchers:
        click.echo("agentprobe: no watcher is running")
        sys.exit(1)
    for w in watchers:
        started = dt.datetime.fromtimestamp((w["started"] or 0) / 1e9).strftime("%Y-%m-%d %H:%M:%S")
        state = "running" if w["running"] else "NOT RUNNING (stale status)"
        click.echo(f"watcher pid {w['pid']} {state}, since {started}, stream -> {', '.join(w['outputs'] or [])}")
        for c in w["cgroups"]:
            flag = "FROZEN" if c["frozen"] else ("gone" if not c["exists"] else "watching")
            why = f"  (rule {c['why']['rule']})" if c["why"] else ""
            click.echo(f"  {flag:<9} {c['path']}{why}")


def _json_default(o):
    if isinstance(o, bytes):
        return o.hex()
    return str(o)


@main.command()
@click.argument("cgroup")
@click.argument("labels", nargs=-1, required=True, metavar="KEY=VALUE...")
def label(cgroup, labels) -> None:
    """Label an agent cgroup (KEY= removes a label): every record of its processes, its alerts and
    its episode's verdict carry the labels. Stored as user.agentprobe.KEY attributes of the cgroup
    directory, so the owner of a delegated cgroup can label it without root.

    \b
    Examples:
      agentprobe label agents/ep-17 episode=17 trajectory=a91f policy=ckpt-2000
      agentprobe label agents/ep-17 tool_call=
    """
    from .cgroups import find_v2_mount
    from .labels import LabelError, parse_assignments, set_cgroup_labels

    try:
        root = find_v2_mount()
        path = Path(cgroup) if cgroup.startswith("/") else root / cgroup
        if not (path / "cgroup.procs").exists():
            raise AgentprobeError(f"{path} is not a cgroup")
        set_cgroup_labels(path, parse_assignments(list(labels)))
    except LabelError as e:
        _fail(AgentprobeError(str(e)))
    except AgentprobeError as e:
        _fail(e)


@main.command()
@click.argument("source")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line instead of readable lines.")
@click.option("--type", "types", multiple=True, metavar="TYPE", help="Only records of TYPE (repeatable).")
@click.option("--verdicts", is_flag=True, help="Only the per-episode verdicts, one line each (with --json: "
              "the records).")
def read(source, as_json, types, verdicts) -> None:
    """Print a msgpack stream: FILE, '-' (stdin), unix:PATH or tcp:HOST:PORT of a running watcher.

    A corrupt or truncated stream prints every record before the damage, then
    one line saying where it is, and exits with status 1.
    """
    from . import view
    from .stream import read_records

    wanted = set(types) | ({"verdict"} if verdicts else set())
    out = sys.stdout
    if verdicts and not as_json:
        print(view.VERDICT_HEADER, file=out)
    elif not as_json:
        print(view.HEADER, file=out)
    try:
        for rec in read_records(source):
            if wanted and rec.get("type") not in wanted:
                continue
            if as_json:
                out.write(json.dumps(rec, default=_json_default, ensure_ascii=True) + "\n")
            elif verdicts:
                out.write(view.verdict_line(rec) + "\n")
            else:
                out.write(view.line(rec) + "\n")
        out.flush()
    except BrokenPipeError:
        return
    except AgentprobeError as e:
        out.flush()
        _fail(e)
    except KeyboardInterrupt:
        return


@main.command()
@click.argument("source", metavar="nats://HOST:PORT[?stream=NAME]")
@click.option("--subject", metavar="SUBJECT", help="What to subscribe to. Default: '<prefix>.>' (every node, "
                                                     "every record type); e.g. 'agentprobe.*.alert'.")
@click.option("-o", "--output", metavar="FILE|-", help="Write the merged msgpack stream here instead of showing it.")
@click.option("--json", "as_json", is_flag=True, help="Show JSON lines instead of readable lines.")
@click.option("--durable", metavar="NAME",
              help="Read through a durable JetStream consumer NAME of the ?stream=: records published while "
                   "this collector was away are delivered when it comes back.")
@click.option("--count", type=int, metavar="N", help="Stop after N records.")
def collect(source, subject, output, as_json, durable, count) -> None:
    """One live view of a fleet: every node's records from NATS, merged.

    \b
    Examples:
      agentprobe collect nats://nats.internal:4222
      agentprobe collect nats://nats.internal:4222 --subject 'agentprobe.*.alert'
      agentprobe collect 'nats://nats.internal:4222?stream=AGENTPROBE' --durable soc -o fleet.msgpack
    """
    from . import view
    from .nats import parse_url, subscribe
    from .stream import decode_one

    try:
        addr = parse_url(source)
        if durable and not addr.stream:
            raise AgentprobeError("--durable needs a JetStream stream: nats://HOST:PORT?stream=NAME")
        subject = subject or f"{addr.prefix}.>"
        messages = subscribe(source, subject, durable=durable)
        sink = None
        if output:
            from .sinks import FileSink, StdoutSink

            sink = StdoutSink() if output == "-" else FileSink(output)
    except AgentprobeError as e:
        _fail(e)
    term = sys.stderr if output == "-" else sys.stdout
    if not output and not as_json:
        print(f"{'NODE':<16} {view.HEADER}", file=term, flush=True)
    seen = bad = 0
    try:
        for msg in messages:
            try:
                rec = decode_one(msg.payload)
                if not isinstance(rec, dict) or "type" not in rec:
                    raise ValueError("not an agentprobe record")
            except Exception as e:  # a stranger on the subject is counted and shown, never fatal
                bad += 1
                click.echo(f"agentprobe: {msg.subject}: not an agentprobe record ({type(e).__name__})", err=True)
                continue
            seen += 1
            if sink is not None:
                sink.write(msg.payload)
                sink.flush()
            elif as_json:
                term.write(json.dumps(rec, default=_json_default, ensure_ascii=True) + "\n")
                term.flush()
            else:
                term.write(f"{view.clean(rec.get('node', '?'), 16):<16} {view.line(rec)}\n")
                term.flush()
            if count and seen >= count:
                break
    except (KeyboardInterrupt, BrokenPipeError):
        pass
    finally:
        if sink is not None:
            sink.close()
    click.echo(f"agentprobe: collected {seen} records ({bad} not readable)", err=True)


@main.group("config")
def config_group() -> None:
    """The configuration file of `agentprobe watch`."""


@config_group.command("show")
@click.option("--config", "config_path", metavar="FILE",
              help="The file to read. Default: /etc/agentprobe/config.yaml if it exists.")
def config_show(config_path) -> None:
    """Print the effective configuration: every watch option, from the file or its default."""
    from .config import ConfigError, dump, effective, load_config, resolve_config

    try:
        path = resolve_config(config_path)
        values = load_config(path, watch) if path else {}
    except ConfigError as e:
        _fail(e)
    rows = effective(watch, values)
    rows = [(k, v or [DEFAULT_OUTPUT], s) if k == "output" and s == "default" else (k, v, s) for k, v, s in rows]
    click.echo(dump(rows, path), nl=False)


if __name__ == "__main__":
    main()
