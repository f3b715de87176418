"""Shared fixtures. Kernel tests need root, BCC and BTF: where those are missing
they skip, except when AGENTPROBE_REQUIRE_KERNEL=1 (set by .ci/run), where
they fail: in CI an eBPF test that skips is a failure."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from agentprobe.cgroups import cgroup_id, find_v2_mount, remove_cgroup_tree

REQUIRE_KERNEL = os.environ.get("AGENTPROBE_REQUIRE_KERNEL") == "1"
REPO = Path(__file__).resolve().parent.parent


def kernel_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "kernel tests need root"
    if not Path("/sys/kernel/btf/vmlinux").exists():
        return "kernel has no BTF"
    try:
        from agentprobe.loader import import_bcc

        import_bcc()
    except Exception as e:  # noqa: BLE001
        return f"BCC unavailable: {e}"
    return None


def pytest_collection_modifyitems(config, items):
    reason = kernel_unavailable()
    if reason is None:
        return
    for item in items:
        if "kernel" in item.keywords:
            if REQUIRE_KERNEL:
                item.user_properties.append(("kernel_missing", reason))
            else:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _no_watcher_left_running():
    """A test that fails between starting a watcher and stopping it leaves none behind. Module-wide
    watchers (started by module fixtures) are stopped by their own fixtures."""
    import watcher

    before = set(map(id, watcher.RUNNING))
    yield
    for w in [w for w in watcher.RUNNING if id(w) not in before]:
        if w.proc.poll() is None:
            w.stop()
        watcher.RUNNING.remove(w)


def pytest_runtest_setup(item):
    for name, reason in item.user_properties:
        if name == "kernel_missing":
            pytest.fail(f"required kernel test cannot run: {reason}", pytrace=False)


class Cgroup:
    """A throw-away cgroup v2 directory; removal kills what is left inside."""

    def __init__(self, root: Path, rel: str) -> None:
        self.root = root
        self.path = root / rel
        self.path.mkdir(parents=True)
        self.rel = "/" + rel
        self.id = cgroup_id(self.path)

    def child(self, name: str) -> Cgroup:
        return Cgroup(self.root, f"{self.rel.lstrip('/')}/{name}")

    def enter(self) -> None:
        """preexec_fn: move the calling (child) process into this cgroup."""
        with open(self.path / "cgroup.procs", "w") as f:
            f.write(str(os.getpid()))

    def run(self, argv, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("timeout", 30)
        return subprocess.run(argv, preexec_fn=self.enter, **kw)

    def frozen(self) -> bool:
        return "frozen 1" in (self.path / "cgroup.events").read_text().splitlines()

    def wait_frozen(self, timeout: float = 10.0) -> bool:
        """True once cgroup.events says `frozen 1`, False if it did not within `timeout` s."""
        deadline = time.monotonic() + timeout
        while not self.frozen():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def popen(self, argv, **kw) -> subprocess.Popen:
        return subprocess.Popen(argv, preexec_fn=self.enter, **kw)

    def remove(self) -> None:
        remove_cgroup_tree(self.path)


@pytest.fixture
def cgroup_root() -> Path:
    return find_v2_mount()


def _throwaway(root: Path, prefix: str):
    cg = Cgroup(root, f"{prefix}-{uuid.uuid4().hex[:8]}")
    try:
        yield cg
    finally:
        cg.remove()


@pytest.fixture
def scope(agent_cgroup):
    """A WatchedScope of the agent cgroup, its lock taken (and released after the test)."""
    import io

    from agentprobe.scope import WatchedScope

    s = WatchedScope([str(agent_cgroup.path)], [], err=io.StringIO())
    s.take()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def agent_cgroup(cgroup_root):
    yield from _throwaway(cgroup_root, "agentprobe-test")


@pytest.fixture
def outside_cgroup(cgroup_root):
    """A cgroup that is not watched, for the 'nothing from outside' checks."""
    yield from _throwaway(cgroup_root, "agentprobe-outside")


@pytest.fixture
def nats_server(tmp_path):
    """A real nats-server with JetStream on a loopback port, stopped after the test."""
    from natsutil import NatsServer

    server = NatsServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def agentprobe_cmd() -> list[str]:
    """The CLI of the agentprobe under test, run by the interpreter running the tests."""
    return [sys.executable, "-m", "agentprobe"]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = terminalreporter.stats.get("skipped", [])
    if REQUIRE_KERNEL and skipped:
        terminalreporter.write_line(f"AGENTPROBE_REQUIRE_KERNEL=1: {len(skipped)} test(s) skipped; "
                                    "in CI every test must run", red=True)


def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if REQUIRE_KERNEL and reporter and reporter.stats.get("skipped"):
        session.exitstatus = 1
