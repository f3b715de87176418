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
from .cli_watch import DEFAULT_OUTPUT, fail, watch
from .errors import AgentprobeError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="agentprobe")
def main() -> None:
    """Kernel-level security monitoring for AI agents (eBPF)."""


main.add_command(watch)


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
        fail(e)
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
        fail(e)
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
            fail(e)
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
        fail(e)
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
        fail(AgentprobeError(str(e)))
    except AgentprobeError as e:
        fail(e)


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
        fail(e)
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
        fail(e)
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
        fail(e)
    rows = effective(watch, values)
    rows = [(k, v or [DEFAULT_OUTPUT], s) if k == "output" and s == "default" else (k, v, s) for k, v, s in rows]
    click.echo(dump(rows, path), nl=False)


if __name__ == "__main__":
    main()
