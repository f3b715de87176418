"""What the loader builds, decided without BCC: the eBPF sources and their text, the loader's
options and their checks, the -D flags from the kernel's BTF offsets and those options, the GPU
ioctl probe chosen, and the cgroup programs to attach. loader.py hands the result to BCC.
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import abi
from .errors import AgentprobeError

NVIDIA_MAJOR = 195


class LoaderError(AgentprobeError):
    exit_code = 3


def ebpf_dir() -> Path:
    """Directory of the C sources: installed as agentprobe/ebpf, or ebpf/ in a checkout."""
    pkg = Path(__file__).resolve().parent
    for candidate in (pkg / "ebpf", pkg.parent / "ebpf"):
        if (candidate / "agentprobe.bpf.c").exists():
            return candidate
    raise LoaderError("eBPF sources not found (reinstall agentprobe)")


_INCLUDE = re.compile(r'^#include "([a-z_]+\.bpf\.[ch])"\s*$', re.M)


def program_text(main: str = "agentprobe.bpf.c") -> str:
    """A program with its per-concern files inlined: BCC rewrites map calls and
    generates tracepoint argument structs only in the main text."""
    root = ebpf_dir()

    def inline(m: re.Match) -> str:
        return _INCLUDE.sub(inline, (root / m.group(1)).read_text())

    return _INCLUDE.sub(inline, (root / main).read_text())


def gpu_majors(proc_devices: str = "/proc/devices") -> dict[int, int]:
    """Char-device majors of the NVIDIA driver: 195 is fixed, UVM and caps are dynamic."""
    majors = {NVIDIA_MAJOR: abi.GPU_DEV_NVIDIA}
    names = {"nvidia-uvm": abi.GPU_DEV_UVM, "nvidia-caps": abi.GPU_DEV_CAPS,
             "nvidia-frontend": abi.GPU_DEV_NVIDIA, "nvidia": abi.GPU_DEV_NVIDIA}
    try:
        with open(proc_devices) as f:
            in_char = False
            for line in f:
                line = line.strip()
                if line.startswith("Character devices"):
                    in_char = True
                elif line.startswith("Block devices"):
                    in_char = False
                elif in_char and line:
                    num, _, name = line.partition(" ")
                    if name.strip() in names and num.isdigit():
                        majors[int(num)] = names[name.strip()]
    except OSError:
        pass
    return majors


def with_extra_majors(found: dict[int, int], extra: tuple[int, ...]) -> dict[int, int]:
    """The driver's majors and the user's (--gpu-major, taken as NVIDIA's), each checked."""
    majors = dict(found)
    for m in extra:
        majors.setdefault(m, abi.GPU_DEV_NVIDIA)
    for major in majors:
        if not 0 <= major < 4096:
            raise LoaderError(f"GPU device major {major}: a device major is 0-4095")
    return majors


# programs attached to the watched cgroups themselves: (function, program type, attach type)
CGROUP_PROGRAMS = (
    ("ap_connect4", 18, 10),  # BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_CONNECT
    ("ap_connect6", 18, 11),  # BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET6_CONNECT
    ("ap_egress", 8, 1),      # BPF_PROG_TYPE_CGROUP_SKB, BPF_CGROUP_INET_EGRESS
    ("ap_sock_create", 9, 2), # BPF_PROG_TYPE_CGROUP_SOCK, BPF_CGROUP_INET_SOCK_CREATE
    ("ap_bind4", 18, 8),      # BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_BIND
    ("ap_bind6", 18, 9),      # BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET6_BIND
    ("ap_sendmsg4", 18, 14),  # BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_UDP4_SENDMSG
    ("ap_sendmsg6", 18, 15),  # BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_UDP6_SENDMSG
    ("ap_device", 15, 6),     # BPF_PROG_TYPE_CGROUP_DEVICE, BPF_CGROUP_DEVICE
)
BPF_F_ALLOW_MULTI = 2

IOCTL_TRACEPOINT = b"syscalls:sys_enter_ioctl"
IOCTL_TP_FN = b"tracepoint__syscalls__sys_enter_ioctl"
# the syscall function whose fentry sees every ioctl, per architecture (its argument: the user's pt_regs)
IOCTL_SYSCALL_FN = {"x86_64": "__x64_sys_ioctl"}
PROBE_MODES = ("auto", "syscalls")
GPU_PROBES = ("auto", "fentry", "on-demand", "always")
BUFFERS = ("auto", "ringbuf", "perf")


@dataclass
class LoaderOptions:
    buffer: str = "auto"  # auto | ringbuf | perf
    ringbuf_pages: int = 1024  # 4 MiB
    perf_pages: int = 256  # per CPU
    extra_gpu_majors: tuple[int, ...] = ()
    deny_exec_names: tuple[str, ...] = ()  # basenames refused in the kernel where BPF-LSM is allowed
    # auto: exec on sched_process_exec, connect on the cgroup hooks (no syscall tracepoint);
    # syscalls: sys_enter/exit tracepoints (also failed execs, AF_UNIX connects, connect results)
    probe_mode: str = "auto"
    # auto: fentry where the kernel allows it, else on-demand; on-demand: sys_enter_ioctl attached
    # only while an agent holds an NVIDIA device open; always: sys_enter_ioctl attached throughout
    gpu_probe: str = "auto"
    # report cgroup creations in the v2 hierarchy (cgroup:cgroup_mkdir), for --cgroup-glob
    watch_mkdir: bool = False
    # while agents are busy, read the ring this often instead of being woken per record (0: always
    # be woken; a wake-up costs the agent an interrupt, a poll adds at most this to detection)
    busy_poll_ms: int = 1

    def check(self) -> None:
        """LoaderError for a value no loader takes, before anything is compiled."""
        if self.buffer not in BUFFERS:
            raise LoaderError(f"unknown buffer type {self.buffer!r} (auto, ringbuf or perf)")
        if self.probe_mode not in PROBE_MODES:
            raise LoaderError(f"unknown probe mode {self.probe_mode!r} ({', '.join(PROBE_MODES)})")
        if self.gpu_probe not in GPU_PROBES:
            raise LoaderError(f"unknown GPU probe {self.gpu_probe!r} ({', '.join(GPU_PROBES)})")


def kernel_at_least(major: int, minor: int, release: str | None = None) -> bool:
    """The running kernel (or `release`) is at least major.minor; an unreadable release is taken as new."""
    try:
        parts = (release if release is not None else platform.release()).split(".")
        return (int(parts[0]), int(parts[1].split("-")[0])) >= (major, minor)
    except (ValueError, IndexError):
        return True


def base_cflags(offsets: dict[str, int], options: LoaderOptions, ringbuf: bool, task_btf: bool) -> list[str]:
    """Flags of every program: the sources, the kernel's struct offsets from BTF, the buffer, and
    bpf_get_current_task_btf (Linux 5.11: direct loads in the fd walk)."""
    flags = [f"-I{ebpf_dir()}", "-Wno-macro-redefined"]
    flags += [f"-D{k}={v}" for k, v in offsets.items()]
    if ringbuf:
        flags += ["-DAP_USE_RINGBUF", f"-DAP_RINGBUF_PAGES={options.ringbuf_pages}"]
    if task_btf:
        flags.append("-DAP_TASK_BTF")
    return flags


def main_cflags(offsets: dict[str, int], options: LoaderOptions, ringbuf: bool, task_btf: bool,
                gpu_fentry_fn: str = "") -> list[str]:
    """Flags of the main program: the base ones, the probe mode, the fentry ioctl probe when chosen
    (`gpu_fentry_fn`), the cgroup_mkdir report."""
    flags = base_cflags(offsets, options, ringbuf, task_btf)
    if options.probe_mode == "syscalls":
        flags.append("-DAP_SYSCALL_PROBES")
    if gpu_fentry_fn:
        flags.append(f"-DAP_GPU_FENTRY={gpu_fentry_fn}")
    if options.watch_mkdir:
        flags.append("-DAP_WATCH_MKDIR")
    return flags


def lsm_cflags(offsets: dict[str, int], options: LoaderOptions, task_btf: bool) -> list[str]:
    """Flags of the BPF-LSM program: its own (perf) buffer, polled beside the main one."""
    flags = base_cflags(offsets, options, False, task_btf)
    if options.probe_mode == "syscalls":
        flags.append("-DAP_SYSCALL_PROBES")
    return flags


@dataclass
class GpuProbeChoice:
    probe: str  # fentry | on-demand | always
    why: str  # why not fentry, when it was wanted and refused
    ioctl_fn: str  # the syscall function fentry attaches to ("" on an architecture without one)


def choose_gpu_probe(want: str, offsets: dict[str, int], refusal: Callable[[str], str | None],
                     machine: str | None = None) -> GpuProbeChoice:
    """The GPU ioctl probe for option `want`: fentry where `refusal(fn)` (None: the kernel loads an
    fentry program on fn) allows it, else on-demand; --gpu-probe fentry refused is an error."""
    if want not in GPU_PROBES:
        raise LoaderError(f"unknown GPU probe {want!r} ({', '.join(GPU_PROBES)})")
    machine = machine if machine is not None else platform.machine()
    ioctl_fn = IOCTL_SYSCALL_FN.get(machine, "")
    why = ""
    if want in ("auto", "fentry"):
        if not ioctl_fn or "AP_OFF_PT_REGS_DI" not in offsets:
            refused = f"no fentry ioctl probe for {machine}"
        else:
            refused = refusal(ioctl_fn)
        if refused is None:
            return GpuProbeChoice("fentry", "", ioctl_fn)
        if want == "fentry":
            raise LoaderError(f"--gpu-probe fentry: the kernel refused fentry on {ioctl_fn}: {refused}")
        why = f"fentry refused: {refused}"
        want = "on-demand"
    return GpuProbeChoice(want, why, ioctl_fn)


def describe_paths(options: LoaderOptions, gpu: GpuProbeChoice, device_hook: str) -> dict[str, str]:
    """Which mechanism each probe took on this kernel (the start record carries it)."""
    syscalls = options.probe_mode == "syscalls"
    why = f" ({gpu.why})" if gpu.why else ""
    paths = {
        "exec": ("tracepoint syscalls:sys_enter/exit_execve(at)" if syscalls
                 else "raw_tracepoint sched_process_exec"),
        "connect": ("tracepoint syscalls:sys_enter/exit_connect" if syscalls
                    else "cgroup connect4/6 hooks on the watched cgroups"),
        "gpu_ioctl": {
            "fentry": f"fentry {gpu.ioctl_fn}",
            "on-demand": "tracepoint syscalls:sys_enter_ioctl, attached while an agent holds a GPU device" + why,
            "always": "tracepoint syscalls:sys_enter_ioctl" + why,
        }[gpu.probe],
        "gpu_open": device_hook,
    }
    if options.watch_mkdir:
        paths["cgroup_mkdir"] = "tracepoint cgroup:cgroup_mkdir (new cgroups matching --cgroup-glob)"
    return paths


def name_key(name: str) -> bytes:
    """A basename as the kernel's name maps key it: the first 15 bytes (the key is zero-padded)."""
    return name.encode()[: abi.EXEC_NAME_LEN - 1]
