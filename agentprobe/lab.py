"""A throw-away "internet" for tests and the demo: a network namespace reached over a veth
pair, with a real sshd (key auth) and a fake mining pool that speaks stratum.

Only addresses inside the namespace (198.51.100.0/24, a documentation range)
are used. Everything is torn down on exit, also when a test fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HOST_ADDR = "198.51.100.1"
OUTSIDE_ADDR = "198.51.100.2"
INTERNAL_HOST_ADDR = "10.213.0.1"
INTERNAL_ADDR = "10.213.0.2"

POOL_SCRIPT = r'''
import json, socket, sys, threading
port = int(sys.argv[1])
log = open(sys.argv[2], "a", buffering=1)
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", port)); srv.listen(16)
def serve(c):
    f = c.makefile("rwb")
    for line in f:
        try:
            req = json.loads(line)
        except ValueError:
            return
        log.write(json.dumps(req) + "\n")
        m = req.get("method")
        if m == "mining.subscribe":
            res = [[["mining.notify", "ae6812eb4cd7735a302a8a9dd95cf71f"]], "08000002", 4]
        elif m in ("mining.authorize", "login"):
            res = True
        else:
            res = True
        f.write((json.dumps({"id": req.get("id"), "result": res, "error": None}) + "\n").encode()); f.flush()
        if m == "mining.authorize":
            note = {"id": None, "method": "mining.notify", "params": ["bf", "00" * 32, "01", "02", [], "20000000",
                                                                       "1d00ffff", "5f5e1000", True]}
            f.write((json.dumps(note) + "\n").encode()); f.flush()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
'''


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


class Internet:
    """`with Internet() as net:` — net.ssh_argv(...), net.pool_port, net.ns."""

    SSH_ALT_PORT = 443   # sshd also listens here: SSH on a port that says nothing
    POOL_ALT_PORT = 8080  # and the pool here: stratum on a web port

    def __init__(self, pool_port: int = 3333) -> None:
        tag = uuid.uuid4().hex[:6]
        self.ns = f"ap-inet-{tag}"
        self.veth = f"apv{tag}"
        self.dir = Path(tempfile.mkdtemp(prefix="agentprobe-net-"))
        self.pool_port = pool_port
        self.addr = OUTSIDE_ADDR
        self._procs: list[subprocess.Popen] = []

    # ---- lifecycle ----
    def __enter__(self) -> Internet:
        try:
            self._net()
            self._sshd()
            self._pool()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        subprocess.run(["ip", "link", "del", f"{self.veth}a"], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _net(self) -> None:
        a, b = f"{self.veth}a", f"{self.veth}b"
        _run("ip", "netns", "add", self.ns)
        _run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        _run("ip", "link", "set", b, "netns", self.ns)
        _run("ip", "addr", "add", f"{HOST_ADDR}/24", "dev", a)
        _run("ip", "link", "set", a, "up")
        _run("ip", "-n", self.ns, "addr", "add", f"{OUTSIDE_ADDR}/24", "dev", b)
        _run("ip", "-n", self.ns, "link", "set", b, "up")
        _run("ip", "-n", self.ns, "link", "set", "lo", "up")
        # an internal (RFC 1918) address of our own, for the probing scenario
        _run("ip", "addr", "add", f"{INTERNAL_HOST_ADDR}/24", "dev", a)
        _run("ip", "-n", self.ns, "addr", "add", f"{INTERNAL_ADDR}/24", "dev", b)

    def exec_argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]

    # ---- sshd with key auth ----
    def _sshd(self) -> None:
        d = self.dir
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key"))
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "user_key"))
        shutil.copy(d / "user_key.pub", d / "authorized_keys")
        os.chmod(d, 0o700)
        Path("/run/sshd").mkdir(exist_ok=True)
        (d / "sshd_config").write_text(
            f"Port 22\nPort {self.SSH_ALT_PORT}\nListenAddress {OUTSIDE_ADDR}\nHostKey {d / 'host_key'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nStrictModes no\nAllowTcpForwarding yes\nPermitTunnel yes\nLogLevel VERBOSE\n")
        p = subprocess.Popen(self.exec_argv(sshd, "-D", "-e", "-f", str(d / "sshd_config")),
                             stdout=subprocess.DEVNULL, stderr=open(d / "sshd.log", "wb"))
        self._procs.append(p)
        self._wait_port(22)

    def ssh_argv(self, *extra: str, client: str = "ssh") -> list[str]:
        """An ssh command to the outside host, non-interactive, with our throw-away key."""
        return [client, "-i", str(self.dir / "user_key"), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
                *extra]

    # ---- fake mining pool ----
    def _pool(self) -> None:
        (self.dir / "pool.py").write_text(POOL_SCRIPT)
        for port in (self.pool_port, self.POOL_ALT_PORT):
            p = subprocess.Popen(self.exec_argv(sys.executable, str(self.dir / "pool.py"), str(port),
                                                str(self.dir / "pool.log")),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self._procs.append(p)
            self._wait_port(port)

    def pool_requests(self) -> list[str]:
        import json

        path = self.dir / "pool.log"
        if not path.exists():
            return []
        return [json.loads(x).get("method") for x in path.read_text().splitlines() if x]

    def _wait_port(self, port: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = subprocess.run(self.exec_argv("ss", "-Htln", f"sport = :{port}"), capture_output=True, text=True)
            if r.stdout.strip():
                return
            time.sleep(0.05)
        raise RuntimeError(f"nothing listens on {self.ns}:{port}: "
                           + (self.dir / "sshd.log").read_text(errors="replace")[-2000:])

    def port_open_inside(self, port: int) -> bool:
        """Is something listening on 127.0.0.1:PORT inside the namespace (a remote forward)?"""
        r = subprocess.run(self.exec_argv("ss", "-Htln", f"sport = :{port}"), capture_output=True, text=True)
        return bool(r.stdout.strip())
