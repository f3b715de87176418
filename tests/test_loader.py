"""The loader: the only module that imports BCC, its option errors, and what a loaded ProbeSet
reports. Tests that load programs carry the kernel mark."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import agentprobe
from agentprobe.loader import LoaderError, LoaderOptions, ProbeSet


def test_the_loader_is_the_only_module_that_imports_bcc():
    importers = []
    package = Path(agentprobe.__file__).parent
    for f in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            if any(n == "bcc" or n.startswith("bcc.") for n in names):
                importers.append(str(f.relative_to(package)))
    assert sorted(set(importers)) == ["loader.py"]


@pytest.mark.kernel
@pytest.mark.parametrize("options,msg", [
    (LoaderOptions(buffer="mmap"), "unknown buffer type 'mmap' (auto, ringbuf or perf)"),
    (LoaderOptions(probe_mode="kprobes"), "unknown probe mode 'kprobes' (auto, syscalls)"),
    (LoaderOptions(gpu_probe="kprobe"), "unknown GPU probe 'kprobe' (auto, fentry, on-demand, always)"),
    (LoaderOptions(extra_gpu_majors=(4096,)), "GPU device major 4096: a device major is 0-4095"),
])
def test_bad_options_are_loader_errors_and_nothing_stays_loaded(options, msg):
    with pytest.raises(LoaderError) as e:
        ProbeSet(options, lambda data: None)
    assert str(e.value) == msg and e.value.exit_code == 3


@pytest.mark.kernel
def test_a_loaded_probe_set_says_what_it_took():
    from agentprobe.programs import NVIDIA_MAJOR

    probes = ProbeSet(LoaderOptions(extra_gpu_majors=(240,)), lambda data: None)
    try:
        assert probes.buffer == "ringbuf"
        assert probes.gpu_probe in ("fentry", "on-demand", "always")
        assert set(probes.paths) == {"exec", "connect", "gpu_ioctl", "gpu_open"}
        assert probes.paths["exec"] == "raw_tracepoint sched_process_exec"
        assert probes.gpu_majors[NVIDIA_MAJOR] == 1 and probes.gpu_majors[240] == 1
        assert probes.lsm_status == "off"
        assert probes.conn_counts(0) == [] and probes.flow_counts(0) == [] and probes.gpu_counts() == []
    finally:
        probes.close()
