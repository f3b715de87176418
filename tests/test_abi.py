"""ebpf/agentprobe.h and agentprobe/abi.py describe the same bytes."""

from __future__ import annotations

import ctypes as ct
import re
import shutil
import subprocess

import pytest

from agentprobe import abi
from agentprobe.loader import ebpf_dir

HEADER = ebpf_dir() / "agentprobe.h"


def _c_layout(tmp_path) -> dict[str, dict]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("a C compiler is needed to check the ABI")
    lines = ['#include <stdio.h>', '#include <stddef.h>', f'#include "{HEADER}"', "int main(void) {"]
    for cname, py in abi.C_STRUCTS.items():
        lines.append(f'printf("{cname} size %zu\\n", sizeof(struct {cname}));')
        for fname, *_ in py._fields_:
            lines.append(f'printf("{cname} {fname} %zu\\n", offsetof(struct {cname}, {fname}));')
    lines.append("return 0; }")
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "layout"
    subprocess.run([cc, "-o", str(exe), str(src)], check=True)
    out: dict[str, dict] = {}
    for line in subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines():
        struct, field, value = line.split()
        out.setdefault(struct, {})[field] = int(value)
    return out


def test_struct_sizes_and_offsets_match(tmp_path):
    c = _c_layout(tmp_path)
    for cname, py in abi.C_STRUCTS.items():
        assert c[cname]["size"] == ct.sizeof(py), cname
        for fname, *_ in py._fields_:
            assert c[cname][fname] == getattr(py, fname).offset, f"{cname}.{fname}"


def test_constants_match():
    text = HEADER.read_text() + (ebpf_dir() / "knobs.h").read_text()
    defines = {m[0]: int(m[1], 0) for m in re.findall(r"#define (AP_\w+) \(?(\d+|0x[0-9a-f]+)", text)}
    shifts = {m[0]: 1 << int(m[1]) for m in re.findall(r"#define (AP_\w+) \(1u << (\d+)\)", text)}
    defines.update(shifts)
    expect = {
        "AP_COMM_LEN": abi.COMM_LEN, "AP_FILENAME_LEN": abi.FILENAME_LEN, "AP_ARG_LEN": abi.ARG_LEN,
        "AP_ARGS_LEN": abi.ARGS_LEN, "AP_MAX_ARGS": abi.MAX_ARGS, "AP_MAX_ARGS_SCAN": abi.MAX_ARGS_SCAN,
        "AP_SOCKADDR_LEN": abi.SOCKADDR_LEN, "AP_MAX_CGROUP_LEVEL": abi.MAX_CGROUP_LEVEL,
        "AP_EV_EXEC": abi.EV_EXEC, "AP_EV_CONNECT": abi.EV_CONNECT, "AP_EV_GPU": abi.EV_GPU,
        "AP_EV_FORK": abi.EV_FORK, "AP_EV_EXIT": abi.EV_EXIT, "AP_EV_PAYLOAD": abi.EV_PAYLOAD,
        "AP_EV_TYPES": abi.EV_TYPES, "AP_EV_MOVE": abi.EV_MOVE, "AP_EV_SOCKET": abi.EV_SOCKET,
        "AP_EV_BIND": abi.EV_BIND, "AP_EV_PACKET": abi.EV_PACKET, "AP_EV_LISTEN": abi.EV_LISTEN,
        "AP_PACKET_LEN": abi.PACKET_LEN,
        "AP_PACKETS_PER_SEC": abi.PACKETS_PER_SEC,
        "AP_CONN_RECORDS_PER_SEC": abi.CONN_RECORDS_PER_SEC, "AP_EV_DENY": abi.EV_DENY,
        "AP_DENY_PORT": abi.DENY_PORT,
        "AP_DENY_HOST": abi.DENY_HOST,
        "AP_PAYLOAD_LEN": abi.PAYLOAD_LEN,
        "AP_EXEC_EXECVEAT": abi.EXEC_EXECVEAT, "AP_EXEC_ARGS_TRUNC": abi.EXEC_ARGS_TRUNC,
        "AP_EXEC_ARG_TRUNC": abi.EXEC_ARG_TRUNC, "AP_EXEC_FILENAME_TRUNC": abi.EXEC_FILENAME_TRUNC,
        "AP_EXEC_ARGV_FAULT": abi.EXEC_ARGV_FAULT, "AP_CONNECT_ADDR_FAULT": abi.CONNECT_ADDR_FAULT,
        "AP_GPU_FIRST_DEVICE": abi.GPU_FIRST_DEVICE, "AP_GPU_FIRST_CMD": abi.GPU_FIRST_CMD,
        "AP_GPU_XFER": abi.GPU_XFER, "AP_GPU_OPEN": abi.GPU_OPEN, "AP_EXEC_ARGV_RAW": abi.EXEC_ARGV_RAW,
        "AP_EXEC_KILLED": abi.EXEC_KILLED,
        "AP_CONNECT_AT_HOOK": abi.CONNECT_AT_HOOK, "AP_CONNECT_SENDMSG": abi.CONNECT_SENDMSG,
        "AP_GPU_DEV_NVIDIA": abi.GPU_DEV_NVIDIA,
        "AP_GPU_DEV_UVM": abi.GPU_DEV_UVM, "AP_GPU_DEV_CAPS": abi.GPU_DEV_CAPS,
    }
    assert {k: defines.get(k) for k in expect} == expect


def test_every_record_type_has_a_name_for_its_losses():
    """Losses are reported by record type name: a type without one would show as a bare number."""
    from agentprobe.watch import EV_NAMES

    assert sorted(EV_NAMES) == list(range(1, abi.EV_TYPES)) and len(set(EV_NAMES.values())) == abi.EV_TYPES - 1
