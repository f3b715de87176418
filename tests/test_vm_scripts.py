"""scripts/vm-run's answers to bad input (the VM runs themselves are scripts/vm-test's job)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VM_RUN = [sys.executable, str(REPO / "scripts" / "vm-run")]


def run(*args, env=None):
    return subprocess.run([*VM_RUN, *args], capture_output=True, text=True, timeout=60, env=env)


def test_unknown_kernel():
    r = run("--kernel", "4.19", "--", "true")
    assert r.returncode == 2
    assert r.stderr.strip() == "vm-run: unknown kernel '4.19': choose one of 6.1, 6.12"


def test_no_command():
    r = run("--kernel", "6.1")
    assert r.returncode == 2 and r.stderr.strip() == "vm-run: usage: vm-run [--kernel 6.1|6.12] -- CMD [ARG...]"


def test_no_qemu(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("needs root: vm-run checks for root before its tools")
    env = {**os.environ, "PATH": str(tmp_path)}  # nothing on PATH
    r = run("--", "true", env=env)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("vm-run: qemu-system-x86_64, mke2fs, git not found: apt-get install")


def test_not_enough_disk(tmp_path):
    """A cache on a full filesystem: one line, and no half-built image left behind."""
    if os.geteuid() != 0:
        pytest.fail("needs root (a tmpfs mount)")
    small = tmp_path / "cache"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "none", str(small)], check=True)
    try:
        r = run("--", "true", env={**os.environ, "AGENTPROBE_VM_CACHE": str(small)})
        assert r.returncode == 2
        assert r.stderr.strip().startswith(f"vm-run: not enough disk in {small}:")
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)
