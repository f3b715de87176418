"""Responder: turns alerts whose rule says `freeze` or `kill` into actions on
the agent's cgroup, confirmed and reported as `response` records.

Freeze writes cgroup v2 `cgroup.freeze` and waits for `frozen 1` in
`cgroup.events` (poll(2) wakes on its change); where only the v1 freezer
exists, `freezer.state`. Kill uses `cgroup.kill` (5.14+) or SIGKILL to every
member. With `cut_network`, the frozen processes' TCP connections are
destroyed (sock_diag SOCK_DESTROY, as `ss -K` does), so a tunnel is dead while the
processes stay frozen for inspection.

Safety: only cgroups inside a watched subtree are ever touched; never the
root cgroup, never one that holds the watcher itself.
"""

from __future__ import annotations

import os
import select
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from .cgroups import episode_of, path_inside
from .errors import AgentprobeError
from .stage import Stage

CONFIRM_TIMEOUT_S = 5.0


class ResponseError(AgentprobeError):
    pass


@dataclass
class Outcome:
    outcome: str  # frozen, already_frozen, killed, dry_run, refused, failed
    error: str | None = None
    confirmed_ns: int | None = None  # CLOCK_MONOTONIC when the freeze was confirmed
    sockets_cut: int = 0
    pulled_back: int | None = None  # pid moved back into the agent cgroup before the freeze
    started_ns: int | None = None    # CLOCK_MONOTONIC when the freeze was asked of the kernel


def own_cgroup_v2() -> str:
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return "/"


class CgroupFreezer:
    """Freeze, thaw and kill cgroups by their path relative to the v2 mount."""

    def __init__(self, v2_root: Path, v1_freezer: Path | None = None) -> None:
        self.v2_root = v2_root
        self.v1_freezer = v1_freezer

    def dir_of(self, rel: str) -> Path:
        return self.v2_root / rel.lstrip("/")

    def check_target(self, rel: str, watched_paths: list[str]) -> None:
        if rel in ("", "/"):
            raise ResponseError("refusing to act on the root cgroup")
        if not any(path_inside(rel, w) for w in watched_paths):
            raise ResponseError(f"refusing to act on {rel}: not inside a watched cgroup")
        if path_inside(own_cgroup_v2(), rel):
            raise ResponseError(f"refusing to act on {rel}: the watcher itself runs in it")

    def is_frozen(self, rel: str) -> bool:
        d = self.dir_of(rel)
        events = d / "cgroup.events"
        if events.exists():
            return "frozen 1" in events.read_text().splitlines()
        if self.v1_freezer:
            state = self.v1_freezer / rel.lstrip("/") / "freezer.state"
            return state.exists() and state.read_text().strip() == "FROZEN"
        return False

    def freeze(self, rel: str, timeout: float = CONFIRM_TIMEOUT_S) -> Outcome:
        d = self.dir_of(rel)
        if not d.is_dir():
            return Outcome("failed", f"cgroup {rel} no longer exists")
        if (d / "cgroup.freeze").exists():
            return self._v2_set(d, "1", "frozen 1", timeout, "frozen")
        if self.v1_freezer and (self.v1_freezer / rel.lstrip("/") / "freezer.state").exists():
            return self._v1_set(self.v1_freezer / rel.lstrip("/"), "FROZEN", timeout, "frozen")
        return Outcome("failed", "no cgroup freezer (cgroup v2 cgroup.freeze needs Linux 5.2+)")

    def thaw(self, rel: str, timeout: float = CONFIRM_TIMEOUT_S) -> Outcome:
        d = self.dir_of(rel)
        if not d.is_dir():
            return Outcome("failed", f"cgroup {rel} does not exist")
        if (d / "cgroup.freeze").exists():
            return self._v2_set(d, "0", "frozen 0", timeout, "thawed")
        if self.v1_freezer and (self.v1_freezer / rel.lstrip("/") / "freezer.state").exists():
            return self._v1_set(self.v1_freezer / rel.lstrip("/"), "THAWED", timeout, "thawed")
        return Outcome("failed", "no cgroup freezer")

    def _v2_set(self, d: Path, value: str, want: str, timeout: float, done: str) -> Outcome:
        events = d / "cgroup.events"
        try:
            fd = os.open(events, os.O_RDONLY)
        except OSError as e:
            return Outcome("failed", f"{events}: {e.strerror}")
        try:
            started = time.monotonic_ns()
            try:
                (d / "cgroup.freeze").write_text(value)
            except OSError as e:
                return Outcome("failed", f"{d}/cgroup.freeze: {e.strerror}")
            poller = select.poll()
            poller.register(fd, select.POLLPRI | select.POLLERR)
            start = time.monotonic()
            deadline = start + timeout
            while True:
                try:  # ENODEV once the cgroup is removed under us (an episode torn down meanwhile)
                    os.lseek(fd, 0, os.SEEK_SET)
                    text = os.read(fd, 4096).decode()
                except OSError as e:
                    return Outcome("failed", f"{events}: {e.strerror}")
                if want in text.splitlines():
                    return Outcome(done, confirmed_ns=time.monotonic_ns(), started_ns=started)
                left = deadline - time.monotonic()
                if left <= 0:
                    return Outcome("failed", f"not confirmed in {timeout:.0f} s ({events} says {text.split()})")
                # kernfs rate-limits cgroup.events notifications: re-read every 50 µs at first
                # rather than wait for a wake-up that comes late (a freeze takes tens of µs;
                # poll(2) cannot wait less than a millisecond, a sleep can)
                waited = time.monotonic() - start
                if waited < 0.02:  # (a sleep, not a spin: the tasks need the CPU to reach the freezer)
                    time.sleep(min(left, 0.00005))
                else:
                    poller.poll(min(left, 0.001 if waited < 0.1 else 0.01) * 1000)
        finally:
            os.close(fd)

    @staticmethod
    def _v1_set(d: Path, value: str, timeout: float, done: str) -> Outcome:
        state = d / "freezer.state"
        try:
            state.write_text(value)
        except OSError as e:
            return Outcome("failed", f"{state}: {e.strerror}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if state.read_text().strip() == value:
                return Outcome(done, confirmed_ns=time.monotonic_ns())
            time.sleep(0.001)
        return Outcome("failed", f"{state} did not reach {value}")

    def pids(self, rel: str) -> list[int]:
        out = []
        for procs in self.dir_of(rel).rglob("cgroup.procs"):
            try:
                out += [int(p) for p in procs.read_text().split()]
            except OSError:
                continue
        return out

    def kill(self, rel: str) -> Outcome:
        d = self.dir_of(rel)
        if not d.is_dir():
            return Outcome("failed", f"cgroup {rel} no longer exists")
        try:
            if (d / "cgroup.kill").exists():
                (d / "cgroup.kill").write_text("1")
            else:
                for pid in self.pids(rel):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        except OSError as e:
            return Outcome("failed", f"kill {rel}: {e.strerror}")
        return Outcome("killed", confirmed_ns=time.monotonic_ns())

    def cut_tcp(self, rel: str) -> int:
        """Destroy the TCP connections held by the cgroup's processes (sock_diag SOCK_DESTROY, in
        each network namespace they use); returns how many."""
        from .sockdiag import destroy_tcp_of

        inodes_by_ns: dict[str, tuple[int, set[int]]] = {}
        for pid in self.pids(rel):
            try:
                netns = os.readlink(f"/proc/{pid}/ns/net")
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            entry = inodes_by_ns.setdefault(netns, (pid, set()))
            for fd in fds:
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    entry[1].add(int(target[8:-1]))
        cut = 0
        for pid, inodes in inodes_by_ns.values():
            try:
                cut += destroy_tcp_of(f"/proc/{pid}/ns/net", inodes)
            except FileNotFoundError:
                continue  # the process is gone, and its namespace with it
        return cut


class Responder(Stage):
    """Pipeline stage: acts on alerts, emits `response` records."""

    name = "responder"

    def __init__(self, freezer: CgroupFreezer, watched_paths, dry_run: bool = False,
                 cut_network: bool = True, clock_offset_ns: int = 0) -> None:
        self.freezer = freezer
        self._watched_paths = watched_paths  # callable -> list[str]
        self.dry_run = dry_run
        self.cut_network = cut_network
        self.clock_offset_ns = clock_offset_ns
        self.frozen: dict[str, dict] = {}  # cgroup path -> {rule, alert_seq, ts}

    def target_of(self, cgroup_path: str) -> str:
        """The agent unit to act on: the child of the watched cgroup that holds the
        process (an episode's cgroup), or the watched cgroup itself."""
        return episode_of(cgroup_path, self._watched_paths())

    def process(self, record: dict) -> list[dict]:
        if record.get("type") != "alert" or record.get("action") not in ("freeze", "kill"):
            return []
        action = record["action"]
        path = (record.get("cgroup") or {}).get("path")
        if not path:
            return [self._response(record, action, None, Outcome("failed", "cgroup of the alert is unknown"))]
        target = self.target_of(path)
        try:
            self.freezer.check_target(target, self._watched_paths())
        except ResponseError as e:
            return [self._response(record, action, target, Outcome("refused", str(e)))]
        if self.dry_run:
            return [self._response(record, action, target, Outcome("dry_run"))]
        pulled_back = self._pull_back(record, target)
        if action == "freeze":
            if target in self.frozen and self.freezer.is_frozen(target) and pulled_back is None:
                return [self._response(record, action, target, Outcome("already_frozen"))]
            out = self.freezer.freeze(target)
            out.pulled_back = pulled_back
            if out.outcome == "frozen":
                self.frozen[target] = {"rule": record.get("rule"), "alert_seq": record.get("seq"),
                                       "ts": record.get("ts")}
                if self.cut_network:
                    try:
                        out.sockets_cut = self.freezer.cut_tcp(target)
                    except OSError as e:
                        out.error = f"cutting connections failed: {e}"
        else:
            out = self.freezer.kill(target)
        return [self._response(record, action, target, out)]

    def _pull_back(self, alert: dict, target: str) -> int | None:
        """An agent process that moved itself out of the agent cgroups goes back into the one it
        left before that is frozen or killed: it is not to escape the response."""
        evidence = alert.get("evidence") or [{}]
        trigger = evidence[-1] if isinstance(evidence[-1], dict) else {}
        if trigger.get("type") != "cgroup_move" or (trigger.get("to") or {}).get("watched"):
            return None
        pid = (alert.get("proc") or {}).get("pid")
        if not isinstance(pid, int) or pid <= 0:
            return None
        try:
            with open(os.path.join(self.freezer.dir_of(target), "cgroup.procs"), "w") as f:
                f.write(str(pid))
            return pid
        except OSError:
            return None  # it exited meanwhile

    def _response(self, alert: dict, action: str, target: str | None, out: Outcome) -> dict:
        now = time.monotonic_ns()
        rec = {
            "v": 1, "type": "response", "ts": now + self.clock_offset_ns, "ktime": now,
            "node": alert.get("node"), "action": action, "outcome": out.outcome,
            "rule": alert.get("rule"), "alert_seq": alert.get("seq"),
            "cgroup": {"path": target, "id": _cgroup_id(self.freezer, target)},
            "trigger_ktime": alert.get("ktime"),
        }
        if out.confirmed_ns is not None and alert.get("ktime"):
            rec["latency_ms"] = (out.confirmed_ns - alert["ktime"]) / 1e6
            if out.started_ns is not None:  # detection (kernel to decision) and the freeze itself
                rec["detect_ms"] = (out.started_ns - alert["ktime"]) / 1e6
                rec["freeze_ms"] = (out.confirmed_ns - out.started_ns) / 1e6
        if out.error:
            rec["error"] = out.error
        if isinstance(alert.get("labels"), dict):
            rec["labels"] = dict(alert["labels"])
        if action == "freeze" and out.outcome == "frozen":
            rec["sockets_cut"] = out.sockets_cut
        if out.pulled_back:
            rec["pulled_back"] = out.pulled_back
        return rec


def _cgroup_id(freezer: CgroupFreezer, rel: str | None) -> int | None:
    if not rel:
        return None
    try:
        return os.stat(freezer.dir_of(rel)).st_ino
    except OSError:
        return None
