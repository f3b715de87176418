"""Run `agentprobe watch` as a real subprocess for end-to-end tests."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

RUNNING: list[WatcherProcess] = []  # stopped by conftest after every test, whatever the test did


class WatcherProcess:
    def __init__(self, args: list[str], ready_timeout: float = 60.0) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "agentprobe", "watch", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        RUNNING.append(self)
        self.stderr_lines: list[str] = []
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            line = self._readline(deadline - time.monotonic())
            if line is None:
                break
            if "agentprobe: watching" in line:
                return
        self.stop()
        raise AssertionError("watcher did not start: " + "".join(self.stderr_lines))

    def _readline(self, timeout: float) -> str | None:
        r, _, _ = select.select([self.proc.stderr], [], [], max(0.0, timeout))
        if not r:
            return None
        line = self.proc.stderr.readline().decode(errors="replace")
        if not line:
            return None
        self.stderr_lines.append(line)
        return line

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        self.stdout_bytes = out
        return self.proc.returncode, out.decode(errors="replace"), "".join(self.stderr_lines) + err.decode(
            errors="replace")
