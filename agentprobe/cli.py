"""Command line: agentprobe watch | read | ...

Errors a user can cause are AgentprobeError; they are caught here, once, and
printed as one line with a non-zero exit status.
"""

from __future__ import annotations

import json
import sys

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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="agentprobe")
def main() -> None:
    """Kernel-level security monitoring for AI agents (eBPF)."""


@main.command(epilog=WATCH_EPILOG)
@click.option("--cgroup", "cgroups", multiple=True, metavar="PATH",
              help="Agent cgroup to watch with its subtree: absolute, or relative to the cgroup v2 mount. "
                   "Repeatable. Default: 'agents', created if missing.")
@click.option("--cgroup-glob", "globs", multiple=True, metavar="PATTERN",
              help="Watch every cgroup matching PATTERN (relative to the v2 mount; * within a level, "
                   "** across levels), re-scanned so later ones are watched too. Repeatable.")
@click.option("-o", "--output", "outputs", multiple=True, metavar="SPEC",
              help=f"Stream destination: '-' (stdout), FILE (appended; flushed after every batch, at most "
                   f"every 100 ms, and on exit), unix:PATH or tcp:HOST:PORT (served to readers). "
                   f"Repeatable. Default: {DEFAULT_OUTPUT}.")
@click.option("--buffer", type=click.Choice(["auto", "ringbuf", "perf"]), default="auto", show_default=True,
              help="Kernel-to-user buffer: BPF ring buffer (5.8+) or perf buffer.")
@click.option("--no-view", is_flag=True, help="No live one-line-per-event view on the terminal.")
@click.option("--duration", type=float, metavar="SECONDS", help="Stop after SECONDS.")
@click.option("--gpu-interval", type=float, default=2.0, show_default=True, metavar="SECONDS",
              help="How often aggregated GPU ioctl counts are written.")
@click.option("--gpu-major", "gpu_majors", type=int, multiple=True, metavar="N",
              help="Treat char-device major N as an NVIDIA device too (195 and the majors in "
                   "/proc/devices are always used).")
@click.option("--rescan", type=float, default=2.0, show_default=True, metavar="SECONDS",
              help="How often cgroup globs are re-scanned.")
def watch(cgroups, globs, outputs, buffer, no_view, duration, gpu_interval, gpu_majors, rescan) -> None:
    """Trace exec, connect and NVIDIA ioctls of agent processes and stream them as msgpack."""
    from . import view
    from .watch import Watcher, WatchOptions

    outputs = list(outputs) or [DEFAULT_OUTPUT]
    opts = WatchOptions(cgroups=list(cgroups), cgroup_globs=list(globs), outputs=outputs, buffer=buffer,
                        duration=duration, gpu_interval=gpu_interval, extra_gpu_majors=tuple(gpu_majors),
                        rescan_interval=rescan)
    term = sys.stderr if "-" in outputs else sys.stdout

    def show(rec: dict) -> None:
        try:
            print(view.line(rec), file=term, flush=True)
        except BrokenPipeError:
            pass

    watcher = Watcher(opts, on_record=None if no_view else show)
    error = None
    try:
        watcher.prepare()
        if watcher.created_default:
            click.echo(f"agentprobe: created default agent cgroup {watcher.created_default}", err=True)
        if not no_view:
            print(view.HEADER, file=term, flush=True)
        watcher.start()
        paths = ", ".join(f"{watcher.root}{c.path}" for c in watcher.watched.values()) or "(none yet)"
        click.echo(f"agentprobe: watching {paths}; stream -> {', '.join(outputs)}; Ctrl-C to stop", err=True)
        watcher.run()
    except AgentprobeError as e:
        error = e
    finally:
        watcher.close(error=str(error) if error else None)
    if error:
        _fail(error)
    s = watcher.summary
    by_type = ", ".join(f"{k} {v}" for k, v in sorted(s.events.items()))
    click.echo(f"agentprobe: stopped ({s.reason}): {s.events_total} records ({by_type}); "
               f"lost: {sum(s.lost_kernel.values())} in kernel, {s.lost_output} in outputs, "
               f"{s.decode_errors} undecodable", err=True)


def _json_default(o):
    if isinstance(o, bytes):
        return o.hex()
    return str(o)


@main.command()
@click.argument("source")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line instead of readable lines.")
@click.option("--type", "types", multiple=True, metavar="TYPE", help="Only records of TYPE (repeatable).")
def read(source, as_json, types) -> None:
    """Print a msgpack stream: FILE, '-' (stdin), unix:PATH or tcp:HOST:PORT of a running watcher.

    A corrupt or truncated stream prints every record before the damage, then
    one line saying where it is, and exits with status 1.
    """
    from . import view
    from .stream import read_records

    wanted = set(types)
    out = sys.stdout
    if not as_json:
        print(view.HEADER, file=out)
    try:
        for rec in read_records(source):
            if wanted and rec.get("type") not in wanted:
                continue
            if as_json:
                out.write(json.dumps(rec, default=_json_default, ensure_ascii=True) + "\n")
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


if __name__ == "__main__":
    main()
