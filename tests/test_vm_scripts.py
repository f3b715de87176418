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


def _vm_run_module():
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.SourceFileLoader("vm_run", str(REPO / "scripts" / "vm-run"))
    spec = importlib.util.spec_from_loader("vm_run", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def test_kvm_that_dies_at_once_falls_back_to_tcg(tmp_path, monkeypatch, capsys):
    """On some hosts /dev/kvm is there but qemu aborts at start (an MSR the host will not set): the
    run goes on under TCG, says so, and remembers TCG for the next runs."""
    if os.geteuid() != 0:
        pytest.fail("needs root: vm-run checks for root")
    vm = _vm_run_module()
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "calls"
    (fake / "qemu-system-x86_64").write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {calls}\n'
        'case "$*" in *-enable-kvm*)\n'
        '  echo "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69"\n'
        "  echo \"kvm.c:3183: kvm_buf_set_msrs: Assertion failed.\"; exit 134;;\n"
        "esac\n"
        f'echo "{vm.INIT_MARK} 6.1.0-fake"; echo "hello from the guest"; echo "{vm.EXIT_MARK}7"\n')
    (fake / "qemu-system-x86_64").chmod(0o755)
    image = tmp_path / "cache" / "6.1-x"
    image.mkdir(parents=True)
    for name in ("root.img", "vmlinuz", "initrd.img"):
        (image / name).write_bytes(b"")
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    monkeypatch.setattr(vm, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(vm, "build_image", lambda kernel: image)
    monkeypatch.setattr(vm, "kvm_works", lambda: True)
    monkeypatch.setattr(sys, "argv", ["vm-run", "--", "true"])
    assert vm.main() == 7
    out = capsys.readouterr()
    assert "hello from the guest" in out.out
    assert "vm-run: KVM guest did not come up (qemu exited before the guest came up:" in out.err
    assert "vm-run: guest up (TCG): 6.1.0-fake" in out.err
    assert [("-enable-kvm" in c, "tcg,thread=multi" in c) for c in calls.read_text().splitlines()] == \
        [(True, False), (False, True)]
    assert (tmp_path / "cache" / "accel").read_text() == "tcg"
