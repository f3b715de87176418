"""What the loader builds, decided without BCC: sources, options, -D flags, the GPU probe, paths."""

from __future__ import annotations

import pytest

from agentprobe import abi
from agentprobe.programs import (
    GpuProbeChoice,
    LoaderError,
    LoaderOptions,
    base_cflags,
    choose_gpu_probe,
    describe_paths,
    ebpf_dir,
    gpu_majors,
    kernel_at_least,
    lsm_cflags,
    main_cflags,
    name_key,
    program_text,
    with_extra_majors,
)

OFFSETS = {"AP_OFF_TASK_FILES": 2048, "AP_OFF_PT_REGS_DI": 112}


def test_the_sources_are_found_and_their_per_concern_files_inlined():
    import re

    root = ebpf_dir()
    assert (root / "agentprobe.bpf.c").exists()
    for main in ("agentprobe.bpf.c", "lsm.bpf.c"):
        text = program_text(main)
        assert not re.search(r'^#include "[a-z_]+\.bpf\.[ch]"', text, re.M)  # BCC sees one text
        assert len(text) > len((root / main).read_text())


def test_base_flags_carry_the_btf_offsets_the_buffer_and_task_btf():
    opts = LoaderOptions(ringbuf_pages=64)
    assert base_cflags(OFFSETS, opts, ringbuf=True, task_btf=True) == [
        f"-I{ebpf_dir()}", "-Wno-macro-redefined", "-DAP_OFF_TASK_FILES=2048", "-DAP_OFF_PT_REGS_DI=112",
        "-DAP_USE_RINGBUF", "-DAP_RINGBUF_PAGES=64", "-DAP_TASK_BTF"]
    assert base_cflags({}, opts, ringbuf=False, task_btf=False) == [f"-I{ebpf_dir()}", "-Wno-macro-redefined"]


def test_main_and_lsm_flags_follow_the_options():
    opts = LoaderOptions(probe_mode="syscalls", watch_mkdir=True)
    base = base_cflags(OFFSETS, opts, True, True)
    assert main_cflags(OFFSETS, opts, True, True, "__x64_sys_ioctl") == base + [
        "-DAP_SYSCALL_PROBES", "-DAP_GPU_FENTRY=__x64_sys_ioctl", "-DAP_WATCH_MKDIR"]
    assert main_cflags(OFFSETS, LoaderOptions(), True, True) == base_cflags(OFFSETS, LoaderOptions(), True, True)
    # the LSM program has its own perf buffer whatever the main one uses
    assert lsm_cflags(OFFSETS, opts, True) == base_cflags(OFFSETS, opts, False, True) + ["-DAP_SYSCALL_PROBES"]
    assert lsm_cflags(OFFSETS, LoaderOptions(), False) == base_cflags(OFFSETS, LoaderOptions(), False, False)


@pytest.mark.parametrize("options,msg", [
    (LoaderOptions(buffer="mmap"), "unknown buffer type 'mmap' (auto, ringbuf or perf)"),
    (LoaderOptions(probe_mode="kprobes"), "unknown probe mode 'kprobes' (auto, syscalls)"),
    (LoaderOptions(gpu_probe="kprobe"), "unknown GPU probe 'kprobe' (auto, fentry, on-demand, always)"),
    # checked in this order: the first bad value is the one named
    (LoaderOptions(buffer="x", probe_mode="y", gpu_probe="z"), "unknown buffer type 'x'"),
    (LoaderOptions(probe_mode="y", gpu_probe="z"), "unknown probe mode 'y'"),
])
def test_option_checks(options, msg):
    with pytest.raises(LoaderError) as e:
        options.check()
    assert str(e.value).startswith(msg) and e.value.exit_code == 3


def test_good_options_pass():
    for buffer in ("auto", "ringbuf", "perf"):
        for mode in ("auto", "syscalls"):
            for gpu in ("auto", "fentry", "on-demand", "always"):
                LoaderOptions(buffer=buffer, probe_mode=mode, gpu_probe=gpu).check()


def test_gpu_probe_fentry_where_the_kernel_allows_it():
    asked = []

    def allowed(fn):
        asked.append(fn)

    assert choose_gpu_probe("auto", OFFSETS, allowed, "x86_64") == GpuProbeChoice("fentry", "", "__x64_sys_ioctl")
    assert choose_gpu_probe("fentry", OFFSETS, allowed, "x86_64").probe == "fentry"
    assert asked == ["__x64_sys_ioctl"] * 2


def test_gpu_probe_falls_back_to_on_demand_and_says_why():
    def refused(fn):
        return "EPERM (kernel lockdown: integrity)"

    assert choose_gpu_probe("auto", OFFSETS, refused, "x86_64") == GpuProbeChoice(
        "on-demand", "fentry refused: EPERM (kernel lockdown: integrity)", "__x64_sys_ioctl")
    assert choose_gpu_probe("auto", {}, refused, "x86_64").why == "fentry refused: no fentry ioctl probe for x86_64"
    assert choose_gpu_probe("auto", OFFSETS, refused, "aarch64") == GpuProbeChoice(
        "on-demand", "fentry refused: no fentry ioctl probe for aarch64", "")
    with pytest.raises(LoaderError, match=r"^--gpu-probe fentry: the kernel refused fentry on __x64_sys_ioctl: "
                                          r"EPERM \(kernel lockdown: integrity\)$"):
        choose_gpu_probe("fentry", OFFSETS, refused, "x86_64")


def test_gpu_probe_on_demand_and_always_never_try_fentry():
    def never(fn):
        raise AssertionError("fentry tried")

    assert choose_gpu_probe("on-demand", OFFSETS, never, "x86_64") == GpuProbeChoice("on-demand", "",
                                                                                      "__x64_sys_ioctl")
    assert choose_gpu_probe("always", OFFSETS, never, "x86_64").probe == "always"
    with pytest.raises(LoaderError, match="unknown GPU probe 'x'"):
        choose_gpu_probe("x", OFFSETS, never, "x86_64")


def test_paths_say_which_mechanism_each_probe_took():
    fentry = GpuProbeChoice("fentry", "", "__x64_sys_ioctl")
    assert describe_paths(LoaderOptions(), fentry, "cgroup device hook on the watched cgroups") == {
        "exec": "raw_tracepoint sched_process_exec",
        "connect": "cgroup connect4/6 hooks on the watched cgroups",
        "gpu_ioctl": "fentry __x64_sys_ioctl",
        "gpu_open": "cgroup device hook on the watched cgroups",
    }
    paths = describe_paths(LoaderOptions(probe_mode="syscalls", watch_mkdir=True),
                           GpuProbeChoice("always", "fentry refused: EPERM; no device hook", ""), "unavailable (x)")
    assert paths == {
        "exec": "tracepoint syscalls:sys_enter/exit_execve(at)",
        "connect": "tracepoint syscalls:sys_enter/exit_connect",
        "gpu_ioctl": "tracepoint syscalls:sys_enter_ioctl (fentry refused: EPERM; no device hook)",
        "gpu_open": "unavailable (x)",
        "cgroup_mkdir": "tracepoint cgroup:cgroup_mkdir (new cgroups matching --cgroup-glob)",
    }
    assert describe_paths(LoaderOptions(), GpuProbeChoice("on-demand", "", ""), "h")["gpu_ioctl"] == (
        "tracepoint syscalls:sys_enter_ioctl, attached while an agent holds a GPU device")


def test_gpu_majors_from_proc_devices(tmp_path):
    devices = tmp_path / "devices"
    devices.write_text("Character devices:\n  1 mem\n195 nvidia-frontend\n236 nvidia-caps\n511 nvidia-uvm\n"
                       "\nBlock devices:\n240 nvidia-uvm\n")
    assert gpu_majors(str(devices)) == {195: abi.GPU_DEV_NVIDIA, 236: abi.GPU_DEV_CAPS, 511: abi.GPU_DEV_UVM}
    assert gpu_majors(str(tmp_path / "missing")) == {195: abi.GPU_DEV_NVIDIA}


def test_extra_majors_are_nvidia_s_and_checked():
    found = {195: abi.GPU_DEV_NVIDIA, 511: abi.GPU_DEV_UVM}
    assert with_extra_majors(found, (240, 511)) == {195: 1, 511: abi.GPU_DEV_UVM, 240: abi.GPU_DEV_NVIDIA}
    assert found == {195: abi.GPU_DEV_NVIDIA, 511: abi.GPU_DEV_UVM}
    with pytest.raises(LoaderError, match=r"^GPU device major 4096: a device major is 0-4095$"):
        with_extra_majors(found, (240, 4096, -1))


def test_kernel_release_comparison():
    assert kernel_at_least(5, 8, "6.1.0-57-cloud-amd64") and kernel_at_least(5, 11, "5.11.0")
    assert not kernel_at_least(5, 11, "5.10.200-foo") and not kernel_at_least(5, 8, "4.19.0")
    assert kernel_at_least(5, 8, "garbage")  # unreadable: taken as new
    assert isinstance(kernel_at_least(5, 8), bool)


def test_name_keys_are_the_first_15_bytes():
    assert name_key("nc") == b"nc"
    assert name_key("a-very-long-program-name") == b"a-very-long-pro"
    assert name_key("é" * 10) == ("é" * 10).encode()[:15]
