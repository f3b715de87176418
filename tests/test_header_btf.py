"""Kernel struct fields read through the installed headers' layout and through
offsets from the running kernel's BTF.

With headers that match the kernel (the distribution kernels in scripts/vm-test)
both paths give the same offsets and the same values (scripts/vm-test sets
AGENTPROBE_EXPECT_MATCHING_HEADERS=1, so there the match itself is asserted). On a kernel whose headers
do not match (this project's CI host) the BTF path is still right — which is why
the programs use it."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import pytest

from agentprobe.btf import FIELDS, kernel_offsets

pytestmark = pytest.mark.kernel

# (struct, member) pairs the C side compares, in the order of the out map
PAIRS = [("task_struct", "tgid"), ("task_struct", "real_parent"), ("task_struct", "files"),
         ("files_struct", "fdt"), ("fdtable", "fd"), ("file", "f_inode"), ("inode", "i_rdev")]

PROGRAM = r"""
#include <linux/sched.h>
#include <linux/fs.h>
#include <linux/fdtable.h>

BPF_ARRAY(offsets, u64, 16);
BPF_ARRAY(values, u64, 4);

TRACEPOINT_PROBE(syscalls, sys_enter_getppid)
{
    if ((bpf_get_current_pid_tgid() >> 32) != TARGET)
        return 0;
    u64 o[] = {OFFSETS};
    for (int i = 0; i < NOFFSETS; i++) {
        int k = i;
        u64 v = o[i];
        offsets.update(&k, &v);
    }
    struct task_struct *t = (struct task_struct *)bpf_get_current_task();
    u64 tgid_hdr = t->tgid;                    /* header layout */
    u64 ppid_hdr = t->real_parent->tgid;
    u32 tgid_btf = 0, ppid_btf = 0;
    void *parent = 0;
    bpf_probe_read_kernel(&tgid_btf, 4, (char *)t + BTF_TGID);   /* BTF layout */
    bpf_probe_read_kernel(&parent, 8, (char *)t + BTF_PARENT);
    bpf_probe_read_kernel(&ppid_btf, 4, (char *)parent + BTF_TGID);
    int k0 = 0, k1 = 1, k2 = 2, k3 = 3;
    u64 a = tgid_hdr, b = ppid_hdr, c = tgid_btf, d = ppid_btf;
    values.update(&k0, &a);
    values.update(&k1, &b);
    values.update(&k2, &c);
    values.update(&k3, &d);
    return 0;
}
"""


def headers_match_kernel() -> bool:
    """Do the headers BCC compiles against describe the running kernel?"""
    build = Path(f"/lib/modules/{platform.release()}/build")
    for rel in ("include/generated/utsrelease.h",):
        f = build / rel
        if f.exists():
            m = re.search(r'UTS_RELEASE "([^"]+)"', f.read_text())
            return bool(m) and m.group(1) == platform.release()
    return False


def test_header_and_btf_paths():
    from agentprobe.loader import import_bcc

    bcc = import_bcc()
    btf = kernel_offsets()
    consts = {(s, m): c for (s, m), c in FIELDS.items()}
    offs = ", ".join(f"__builtin_offsetof(struct {s}, {m})" for s, m in PAIRS)
    text = (PROGRAM.replace("NOFFSETS", str(len(PAIRS))).replace("OFFSETS", offs)
            .replace("TARGET", str(os.getpid()))
            .replace("BTF_TGID", str(btf[consts[("task_struct", "tgid")]]))
            .replace("BTF_PARENT", str(btf[consts[("task_struct", "real_parent")]])))
    b = bcc.BPF(text=text.encode())
    try:
        os.getppid()
        header_offsets = [b[b"offsets"][i].value for i in range(len(PAIRS))]
        tgid_hdr, ppid_hdr, tgid_btf, ppid_btf = (b[b"values"][i].value for i in range(4))
    finally:
        b.cleanup()
    btf_offsets = [btf[consts[p]] for p in PAIRS]
    # the BTF path is right on every kernel
    assert (tgid_btf, ppid_btf) == (os.getpid(), os.getppid())
    matching = headers_match_kernel()
    if os.environ.get("AGENTPROBE_EXPECT_MATCHING_HEADERS") == "1":
        # scripts/vm-test: the image carries the kernel's own headers; not finding them is a failure
        assert matching, f"no headers matching {platform.release()} under /lib/modules/{platform.release()}/build"
    if matching:
        assert header_offsets == btf_offsets
        assert (tgid_hdr, ppid_hdr) == (tgid_btf, ppid_btf)
    else:
        # mismatched headers: their layout is not this kernel's (the reason for BTF offsets)
        assert header_offsets != btf_offsets
