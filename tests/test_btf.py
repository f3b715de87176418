"""Offsets from our BTF reader agree with bpftool's view of the running kernel."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agentprobe.btf import FIELDS, Btf, BtfError, kernel_offsets

VMLINUX = Path("/sys/kernel/btf/vmlinux")
pytestmark = pytest.mark.kernel


def _bpftool_struct(name: str) -> dict[str, int]:
    out = subprocess.run(["bpftool", "btf", "dump", "file", str(VMLINUX), "format", "raw"],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(rf"^\[\d+\] STRUCT '{name}' size=\d+ vlen=\d+\n((?:\t.*\n)*)", out, re.M)
    assert m, name
    return {mm[0]: int(mm[1]) // 8 for mm in re.findall(r"'(\w+)' type_id=\d+ bits_offset=(\d+)", m.group(1))}


def test_offsets_match_bpftool():
    if shutil.which("bpftool") is None:
        pytest.fail("bpftool is needed (apt-get install bpftool)")
    offs = kernel_offsets()
    for (struct, member), const in FIELDS.items():
        direct = _bpftool_struct(struct)
        # "a|b": a member renamed across kernels, the first this kernel has
        present = [m for m in member.split("|") if m in direct]
        if present:
            assert offs[const] == direct[present[0]], f"{struct}.{member}"
    # a member inside an anonymous struct is found too (task_struct fields vary by config)
    assert offs["AP_OFF_TASK_STRUCT_TGID"] > 0


def test_bad_blob_and_unknown_names():
    with pytest.raises(BtfError, match="bad magic"):
        Btf(b"\0" * 64)
    btf = Btf.from_file(VMLINUX)
    with pytest.raises(BtfError, match="no member"):
        btf.offset("task_struct", "no_such_member")
    with pytest.raises(BtfError, match="not found"):
        btf.offset("no_such_struct_xyz", "x")
    # renamed members: the first alternative the kernel has, an error naming the last when none is
    assert btf.offset_of_any("task_struct", "no_such_member|tgid") == btf.offset("task_struct", "tgid")
    with pytest.raises(BtfError, match="no member also_missing"):
        btf.offset_of_any("task_struct", "no_such_member|also_missing")
    with pytest.raises(BtfError, match="no BTF"):
        Btf.from_file(Path("/nonexistent/vmlinux"))
