"""scripts/vm-run's answers to bad input (the VM runs themselves are scripts/vm-test's job)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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
    fake_guest_qemu(tmp_path / "bin")
    calls = tmp_path / "calls"
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("FAKE_KVM", "dies")
    monkeypatch.setenv("FAKE_QEMU_CALLS", str(calls))
    monkeypatch.setattr(vm, "CACHE", tmp_path / "cache")
    image = cached_image(tmp_path / "cache")
    monkeypatch.setattr(vm, "build_image", lambda kernel: image)
    monkeypatch.setattr(vm, "kvm_works", lambda: True)
    monkeypatch.setattr(sys, "argv", ["vm-run", "--", "sh", "-c", "echo hello from the guest; exit 7"])
    assert vm.main() == 7
    out = capsys.readouterr()
    assert out.out == "hello from the guest\n"
    assert out.err.splitlines()[0] == ("vm-run: KVM guest did not come up (qemu exited before the guest came up: "
                                       "kvm.c:3183: kvm_buf_set_msrs: Assertion failed.); using TCG")
    assert "vm-run: guest up (TCG): 6.1.0-fake lsm=lockdown,capability,bpf" in out.err
    assert [("-enable-kvm" in c, "tcg,thread=multi" in c) for c in calls.read_text().splitlines()] == \
        [(True, False), (False, True)]
    assert (tmp_path / "cache" / "accel").read_text() == "tcg"


# A qemu that plays the guest: it reads the work disk vm-run built (debugfs, no mount), runs the
# command from it with the disk's own launcher (.vm/run.py) in the copied checkout and prints what
# the guest's init prints.
FAKE_GUEST = r'''#!PYTHON
import ctypes, os, shutil, signal, subprocess, sys, tempfile
args = sys.argv[1:]
if os.environ.get("FAKE_QEMU_CALLS"):
    with open(os.environ["FAKE_QEMU_CALLS"], "a") as f:
        f.write(" ".join(args) + "\n")
if "-enable-kvm" in args and os.environ.get("FAKE_KVM") == "hangs":
    os.execvp("sleep", ["sleep", "600"])  # nested KVM: stuck before the kernel prints anything
if "-enable-kvm" in args and os.environ.get("FAKE_KVM") == "dies":  # an MSR the host will not set
    print("qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69")
    print("kvm.c:3183: kvm_buf_set_msrs: Assertion failed.", flush=True)
    sys.exit(134)
work = [a for i, a in enumerate(args) if i and args[i - 1] == "-drive"][1].split(",")[0][len("file="):]
top = tempfile.mkdtemp(prefix="fake-guest-")
try:
    subprocess.run(["debugfs", "-R", f"rdump /src /.vm {top}", work], check=True, capture_output=True)
    argv = open(f"{top}/.vm/argv", "rb").read().split(b"\0")[:-1]
    nonce = open(f"{top}/.vm/nonce").read()
    print("INIT_MARK 6.1.0-fake lsm=lockdown,capability,bpf", flush=True)
    if os.environ.get("FAKE_GUEST_OUTPUT"):  # a canned run: record the command, print what it would have
        open(os.environ["FAKE_GUEST_ARGV"], "wb").write(b"\0".join(argv))
        sys.stdout.write(open(os.environ["FAKE_GUEST_OUTPUT"]).read())
        rc = int(os.environ["FAKE_GUEST_RC"])
    else:
        # the command dies with this "VM" when vm-run kills it, as it would with a real one
        die_with_vm = lambda: ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        # the guest's own launcher from the work disk, reading the argv file where the guest has it
        run_py = open(f"{top}/.vm/run.py").read().replace("/work/.vm/", f"{top}/.vm/")
        rc = subprocess.run([sys.executable, "-c", run_py], cwd=f"{top}/src", preexec_fn=die_with_vm).returncode
finally:
    shutil.rmtree(top, ignore_errors=True)  # before the marker: vm-run kills the VM once it has that
print(f"EXIT_MARK{nonce}={rc}", flush=True)
'''


def fake_guest_qemu(bin_dir: Path) -> None:
    vm = _vm_run_module()
    bin_dir.mkdir(exist_ok=True)
    q = bin_dir / "qemu-system-x86_64"
    q.write_text(FAKE_GUEST.replace("PYTHON", sys.executable).replace("INIT_MARK", vm.INIT_MARK)
                 .replace("EXIT_MARK", vm.EXIT_MARK))
    q.chmod(0o755)


def cached_image(cache: Path) -> Path:
    """An image in the cache where vm-run looks for it (the fake qemu never reads it)."""
    vm = _vm_run_module()
    vm.CACHE = cache
    image = vm.image_dir("6.1")
    image.mkdir(parents=True)
    for name in ("root.img", "vmlinuz", "initrd.img"):
        (image / name).write_bytes(b"")
    return image


@pytest.fixture
def fake_vm(tmp_path):
    """Environment for vm-run with a fake guest qemu and an image in a cache of the test's own."""
    if os.geteuid() != 0:
        pytest.fail("needs root: vm-run checks for root")
    fake_guest_qemu(tmp_path / "bin")
    cached_image(tmp_path / "cache")
    return {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
            "AGENTPROBE_VM_CACHE": str(tmp_path / "cache"), "TMPDIR": str(tmp_path)}


def test_arguments_arrive_exactly(fake_vm):
    """Quotes, newlines, glob and shell characters, an empty argument, non-ASCII and a script of
    tens of KB reach the guest's command as the same argv."""
    script = "# a long script\n" + "".join(f"x{i} = {i!r}  # 'quoted' \"twice\" $HOME `id`\n" for i in range(1500))
    assert len(script) > 40_000
    given = ["a b", "it's", 'say "hi"', "line1\nline2\n", "", "$HOME", "*", "\\n", "tab\there", "é ü 漢", "-x",
             script]
    prog = "import json, sys; print(json.dumps(sys.argv[1:]))"
    r = run("--accel", "tcg", "--", "python3", "-c", prog, *given, env=fake_vm)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == given
    assert "vm-run: guest up (TCG): 6.1.0-fake lsm=lockdown,capability,bpf" in r.stderr


def test_output_with_exit_markers_does_not_end_the_run(fake_vm):
    """`cat scripts/vm-run` prints marker-like lines (the image init's fixed one among them); only
    this run's nonce ends the run, and the command's status is the exit status."""
    vm = _vm_run_module()
    # the guest's init prints the marker as the fake guest does
    assert f'echo "{vm.EXIT_MARK}$(cat /work/.vm/nonce)=$rc"' in vm.GUEST_INIT
    text = (REPO / "scripts" / "vm-run").read_text()
    assert "AGENTPROBE-VM-EXIT=125" in text
    r = run("--accel", "tcg", "--", "cat", "scripts/vm-run", env=fake_vm)
    assert r.returncode == 0, r.stderr
    assert r.stdout == text
    fake = "AGENTPROBE-VM-EXIT-0123456789abcdef0123456789abcdef=3"
    r = run("--accel", "tcg", "--", "sh", "-c", f"echo {fake}; echo AGENTPROBE-VM-EXIT=4; printf tail; exit 5",
            env=fake_vm)
    assert r.returncode == 5, r.stderr
    assert r.stdout == f"{fake}\nAGENTPROBE-VM-EXIT=4\ntail"


def test_hanging_command_is_killed_with_the_last_console_lines(fake_vm):
    start = time.monotonic()
    r = run("--accel", "tcg", "--timeout", "2", "--", "sh", "-c",
            "for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 "
            "35 36 37 38 39 40 41 42 43 44 45; do echo line $i; done; exec sleep 600", env=fake_vm)
    assert time.monotonic() - start < 30
    assert r.returncode == 124
    err = r.stderr.strip().splitlines()
    assert err[1] == "vm-run: timed out; last console lines:"
    assert err[2:] == [f"  | line {i}" for i in range(6, 46)]  # the last 40


def test_kvm_that_hangs_at_boot_falls_back_to_tcg(tmp_path, monkeypatch, capsys):
    """Nested KVM that never prints a line: after AGENTPROBE_VM_KVM_BOOT_TIMEOUT the run goes on
    under TCG and says so."""
    if os.geteuid() != 0:
        pytest.fail("needs root: vm-run checks for root")
    vm = _vm_run_module()
    fake_guest_qemu(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("FAKE_KVM", "hangs")
    monkeypatch.setenv("AGENTPROBE_VM_KVM_BOOT_TIMEOUT", "1.5")
    monkeypatch.setattr(vm, "CACHE", tmp_path / "cache")
    image = cached_image(tmp_path / "cache")
    monkeypatch.setattr(vm, "build_image", lambda kernel: image)
    monkeypatch.setattr(vm, "kvm_works", lambda: True)
    monkeypatch.setattr(sys, "argv", ["vm-run", "--", "sh", "-c", "echo up; exit 3"])
    start = time.monotonic()
    assert vm.main() == 3
    assert time.monotonic() - start < 20
    out = capsys.readouterr()
    assert out.out == "up\n"
    assert out.err.splitlines()[0] == ("vm-run: KVM guest did not come up (no sign of life from the guest: "
                                       "no output); using TCG")
    assert (tmp_path / "cache" / "accel").read_text() == "tcg"


def test_bad_kvm_boot_timeout(tmp_path, monkeypatch, fake_vm):
    r = run("--accel", "tcg", "--", "true", env={**fake_vm, "AGENTPROBE_VM_BOOT_TIMEOUT": "soon"})
    assert r.returncode == 2
    assert r.stderr.strip() == "vm-run: AGENTPROBE_VM_BOOT_TIMEOUT='soon': not a positive number of seconds"


def fake_mmdebstrap(bin_dir: Path, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "mmdebstrap").write_text("#!/bin/sh\n" + body)
    (bin_dir / "mmdebstrap").chmod(0o755)


@pytest.fixture
def roomy_cache(tmp_path):
    """An empty cache dir that reports enough free space for a build (a tmpfs: nothing is allocated)."""
    if os.geteuid() != 0:
        pytest.fail("needs root (a tmpfs mount)")
    cache = tmp_path / "cache"
    cache.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8g", "none", str(cache)], check=True)
    try:
        yield cache
    finally:
        subprocess.run(["umount", "-l", str(cache)], check=True)


def test_image_build_that_fails_leaves_no_image(tmp_path, roomy_cache):
    """Registry unreachable: mmdebstrap fails; one line says so, the exit is non-zero, and nothing
    is left in the cache that a later run could take for an image."""
    fake_mmdebstrap(tmp_path / "bin", 'mkdir -p "$4/etc"; echo "E: cannot reach deb.debian.org" >&2; exit 1\n')
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "AGENTPROBE_VM_CACHE": str(roomy_cache)}
    r = run("--kernel", "6.1", "--", "true", env=env)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == ("vm-run: image build failed (package registry unreachable?): "
                                                 "E: cannot reach deb.debian.org")
    assert list(roomy_cache.iterdir()) == []


def test_build_killed_midway_is_cleaned_up_by_the_next_run(tmp_path, roomy_cache):
    """vm-run killed during mmdebstrap leaves its building dir; the next run removes it (its builder
    is dead: the lock is free) but leaves a live build alone."""
    import fcntl
    import signal

    started = tmp_path / "started"
    fake_mmdebstrap(tmp_path / "bin", f'mkdir -p "$4/usr"; touch {started}; exec sleep 600\n')
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "AGENTPROBE_VM_CACHE": str(roomy_cache)}
    p = subprocess.Popen([*VM_RUN, "--kernel", "6.1", "--", "true"], env=env, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not started.exists():
            assert time.monotonic() < deadline and p.poll() is None, "the build did not start"
            time.sleep(0.05)
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # vm-run and the build under it, at once
        p.wait()
    dead = list(roomy_cache.glob("6.1.building-*"))
    assert len(dead) == 1 and (dead[0] / "root" / "usr").is_dir()
    live = roomy_cache / "6.12.building-live"
    live.mkdir()
    with open(live / "builder.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        fake_mmdebstrap(tmp_path / "bin", 'echo "E: no network" >&2; exit 1\n')
        r = run("--kernel", "6.1", "--", "true", env=env)
    assert r.returncode == 2
    assert f"vm-run: removing {dead[0]} (its build was stopped midway)" in r.stderr.splitlines()
    assert sorted(p.name for p in roomy_cache.iterdir()) == ["6.12.building-live"]


# ---- scripts/vm-test ----
def _vm_test_module():
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.SourceFileLoader("vm_test", str(REPO / "scripts" / "vm-test"))
    spec = importlib.util.spec_from_loader("vm_test", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


GUEST_UP = "vm-run: guest up (TCG): 6.1.0-57-cloud-amd64 lsm=lockdown,capability,landlock,yama,apparmor,bpf"
FEATURES_61 = {"exec": "raw_tracepoint sched_process_exec", "connect": "cgroup connect4/6 hooks on the watched cgroups",
               "gpu_ioctl": "fentry __x64_sys_ioctl", "gpu_open": "cgroup device hook on the watched cgroups",
               "fork_exit": "raw_tracepoint sched_process_fork/exit",
               "first_bytes": "cgroup_skb/egress + cgroup connect4/6 on the watched cgroups",
               "deny": "cgroup connect4/6 on the watched cgroups: EPERM before any packet",
               "exec_deny": "bpf-lsm bprm_check_security (43 names)", "freeze": "cgroup v2 cgroup.freeze: frozen",
               "kernel": "6.1.0-57-cloud-amd64"}


@pytest.mark.parametrize("rc, tail, good, summary", [
    (0, ["tests/test_a.py::test_x PASSED", "===== 3 passed, 12 deselected in 41.20s ====="], True,
     "3 passed, 12 deselected in 41.20s"),
    (1, ["tests/test_a.py::test_x FAILED", "===== 1 failed, 2 passed in 9.02s ====="], False,
     "1 failed, 2 passed in 9.02s"),
    # a skip in the VM is a failure, even with pytest's status 0
    (0, ["SKIPPED [1] tests/test_a.py:3: no BPF-LSM", "===== 2 passed, 1 skipped in 5.00s ====="], False,
     "2 passed, 1 skipped in 5.00s"),
    (1, ["===== 1 passed, 1 error in 5.00s ====="], False, "1 passed, 1 error in 5.00s"),
    (5, ["===== no tests ran in 0.01s ====="], False, "no tests ran in 0.01s"),
    # the run died before pytest summed up (a guest that hung, a crash): a failure, never a pass
    (0, ["tests/test_a.py::test_x PASSED"], False, "no pytest summary (exit 0)"),
    (124, ["vm-run: timed out; last console lines:"], False, "no pytest summary (exit 124)"),
])
def test_vm_test_result_parsing(rc, tail, good, summary):
    vm_test = _vm_test_module()
    r = vm_test.parse([GUEST_UP, "collected 15 items / 12 deselected / 3 selected", *tail], rc)
    assert (r["good"], r["summary"]) == (good, summary)
    assert (r["release"], r["accel"], r["bpf_lsm"]) == ("6.1.0-57-cloud-amd64", "TCG", True)
    assert r["features"] == {"error": "no features line"}


def test_vm_test_guest_side(tmp_path, monkeypatch, capsys):
    """Inside the VM: pytest's status is the exit status, and the features line follows the tests."""
    vm_test = _vm_test_module()
    (tmp_path / "test_one.py").write_text("def test_ok():\n    pass\n\ndef test_bad():\n    assert 0\n")
    monkeypatch.setattr(vm_test, "measure_features", lambda: FEATURES_61)
    assert vm_test.guest(["-q", "-p", "no:cacheprovider", str(tmp_path / "test_one.py"), "-k", "ok"]) == 0
    assert vm_test.guest(["-q", "-p", "no:cacheprovider", str(tmp_path / "test_one.py")]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines.count(vm_test.FEATURES_MARK + json.dumps(FEATURES_61, sort_keys=True)) == 2
    assert vm_test.parse(lines, 1)["features"] == FEATURES_61


def test_vm_test_through_vm_run(tmp_path, fake_vm):
    """vm-test -> vm-run -> a guest that prints a canned pytest run and features line: the command
    the guest gets (the guest side of vm-test, with the env the tests expect), the result table and
    the kernel x features table that the README shows."""
    (tmp_path / "cache" / "accel").write_text("tcg")
    out = tmp_path / "guest-output"
    out.write_text("tests/test_kernel_probes.py::test_exec PASSED\n"
                   "===== 1 passed, 40 deselected in 30.00s =====\n"
                   f"AGENTPROBE-VM-FEATURES {json.dumps(FEATURES_61)}\n")
    env = {**fake_vm, "FAKE_GUEST_OUTPUT": str(out), "FAKE_GUEST_ARGV": str(tmp_path / "argv"), "FAKE_GUEST_RC": "0"}
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "vm-test"), "--kernel", "6.1", "--", "-k", "exec",
                        "tests/test_kernel_probes.py"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    argv = (tmp_path / "argv").read_bytes().split(b"\0")
    assert argv == [b"env", b"AGENTPROBE_REQUIRE_KERNEL=1", b"AGENTPROBE_EXPECT_LSM=1", b"AGENTPROBE_EXPECT_FENTRY=1",
                    b"AGENTPROBE_EXPECT_MATCHING_HEADERS=1", b"AGENTPROBE_TIME_SCALE=4", b"python3", b"scripts/vm-test",
                    b"--guest", b"--", b"-v", b"-rs", b"--durations=15", b"-p", b"no:cacheprovider", b"--color=no",
                    b"-k", b"exec", b"tests/test_kernel_probes.py"]
    tables = r.stdout.split("\n\n")[-2:]
    assert tables[0].splitlines()[2].startswith(
        "| 6.1 | 6.1.0-fake | TCG | yes | PASS: 1 passed, 40 deselected in 30.00s | ")
    assert tables[1].splitlines() == [
        "| | 6.1: 6.1.0-fake |",
        "|---|---|",
        "| exec | raw_tracepoint sched_process_exec |",
        "| connect | cgroup connect4/6 hooks on the watched cgroups |",
        "| NVIDIA ioctls | fentry __x64_sys_ioctl |",
        "| GPU opens | cgroup device hook on the watched cgroups |",
        "| fork, exit | raw_tracepoint sched_process_fork/exit |",
        "| first bytes | cgroup_skb/egress + cgroup connect4/6 on the watched cgroups |",
        "| in-kernel connect deny | cgroup connect4/6 on the watched cgroups: EPERM before any packet |",
        "| in-kernel exec stop | BPF-LSM: bpf-lsm bprm_check_security |",
        "| freeze | cgroup v2 cgroup.freeze: frozen |",
    ]


def test_vm_test_run_without_features_fails(tmp_path, fake_vm):
    """Tests passed but the guest printed no features line: the table says so, with a '?'."""
    (tmp_path / "cache" / "accel").write_text("tcg")
    out = tmp_path / "guest-output"
    out.write_text("===== 1 skipped in 1.00s =====\n")
    env = {**fake_vm, "FAKE_GUEST_OUTPUT": str(out), "FAKE_GUEST_ARGV": str(tmp_path / "argv"), "FAKE_GUEST_RC": "0"}
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "vm-test"), "--kernel", "6.1"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 1
    assert "| 6.1 | 6.1.0-fake | TCG | yes | FAIL: 1 skipped in 1.00s |" in r.stdout
    assert "| exec | ? (no features line) |" in r.stdout.splitlines()


def test_vm_test_default_run_takes_userland_not_tools_and_a_timeout(monkeypatch, capsys):
    """With no pytest arguments a VM runs the kernel tests but the `tools` ones (their packages are not in
    the image) and the `userland` ones, under vm-run's --timeout (a hung VM fails inside CI's limit)."""
    vm_test = _vm_test_module()
    calls = []

    class Proc:
        def __init__(self, cmd, **_kw):
            calls.append(cmd)
            self.stdout = iter([GUEST_UP + "\n", "===== 1 passed in 1.00s =====\n"])

        def wait(self):
            return 0

    monkeypatch.setattr(vm_test.subprocess, "Popen", Proc)
    r = vm_test.run("6.12", [])
    assert r["good"] and r["summary"] == "1 passed in 1.00s"
    (cmd,) = calls
    assert cmd[1:5] == ["--kernel", "6.12", "--timeout", str(vm_test.VM_TIMEOUT)]
    assert cmd[-3:] == ["-m", "kernel and not tools and not userland", "tests"]
    vm_test.run("6.1", ["-k", "exec"], timeout=90)
    assert calls[1][1:5] == ["--kernel", "6.1", "--timeout", "90"] and calls[1][-2:] == ["-k", "exec"]
    capsys.readouterr()


def test_vm_selection_leaves_only_tools_and_userland_tests_to_the_host():
    """The VMs' marker expression against the real suite: every kernel test but the `tools` and `userland`
    ones is selected (and the host run, unfiltered, runs those)."""
    vm_test = _vm_test_module()

    def collect(*marks: str) -> set[str]:
        r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                            *marks, "tests"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        return {line for line in r.stdout.splitlines() if "::" in line}

    in_vm = collect("-m", vm_test.VM_TESTS)
    kernel, tools, userland = collect("-m", "kernel"), collect("-m", "tools"), collect("-m", "kernel and userland")
    assert in_vm and userland and tools and in_vm == kernel - tools - userland
