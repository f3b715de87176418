"""ebpf/agentprobe.h (with knobs.h) and agentprobe/abi.py describe the same bytes and the same numbers."""

from __future__ import annotations

import ctypes as ct
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agentprobe import abi
from agentprobe.loader import ebpf_dir

HEADER = ebpf_dir() / "agentprobe.h"


def _c_layout(tmp_path) -> dict[str, dict]:
    cc = _cc()
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


CONTRACT = ("agentprobe.h", "knobs.h")  # the headers user space is written against
GUARD = re.compile(r"AGENTPROBE_(\w+_)?H")  # include guards: defined, no value


def _cc() -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("a C compiler is needed to check the ABI")
    return cc


def header_defines(root: Path, names: tuple[str, ...] = CONTRACT) -> list[str]:
    """Every name #define'd in the headers, in order (include guards too)."""
    found: list[str] = []
    for name in names:
        found += re.findall(r"^[ \t]*#[ \t]*define[ \t]+(\w+)", (root / name).read_text(), re.M)
    return found


def c_values(root: Path, header: str, names: list[str], tmp_path: Path, cflags: tuple[str, ...] = ()) -> dict[str, int]:
    """The value of each macro as the C compiler sees it, whatever its form (1u << 3, 1000000000ULL)."""
    lines = ["#include <stdio.h>", f'#include "{root / header}"', "int main(void) {"]
    lines += [f'printf("{n} %lld\\n", (long long)({n}));' for n in names]
    lines.append("return 0; }")
    src = tmp_path / "defines.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "defines"
    subprocess.run([_cc(), *cflags, "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {name: int(value) for name, value in (line.split() for line in out.splitlines())}


def define_mismatches(root: Path, tmp_path: Path) -> list[str]:
    """What keeps the contract headers' #defines and agentprobe/abi.py apart: each AP_X has its
    equal abi.X, or is listed in abi.KERNEL_ONLY with a reason; nothing else is defined."""
    names = header_defines(root)
    valued = [n for n in names if not GUARD.fullmatch(n)]
    values = c_values(root, "agentprobe.h", valued, tmp_path)
    problems = []
    for name in valued:
        if name in abi.KERNEL_ONLY:
            continue
        mirror = name.removeprefix("AP_")
        if mirror == name or not hasattr(abi, mirror):
            problems.append(f"{name} = {values[name]}: no abi.{mirror} (nor an abi.KERNEL_ONLY entry)")
        elif getattr(abi, mirror) != values[name]:
            problems.append(f"{name} = {values[name]} in C, abi.{mirror} = {getattr(abi, mirror)}")
    for name, why in abi.KERNEL_ONLY.items():
        if name not in valued:
            problems.append(f"abi.KERNEL_ONLY lists {name}, which no contract header defines")
        elif not why.strip():
            problems.append(f"abi.KERNEL_ONLY gives no reason for {name}")
    return problems


def test_every_define_of_the_contract_headers_has_its_mirror(tmp_path):
    names = header_defines(HEADER.parent)
    assert len(names) > 60 and "AP_EV_EXEC" in names and "AP_MAX_FLOWS" in names  # the parse saw them
    assert define_mismatches(HEADER.parent, tmp_path) == []


def test_the_define_check_catches_a_drift(tmp_path):
    """A value changed on one side, or a #define without a mirror, is caught."""
    root = tmp_path / "ebpf"
    root.mkdir()
    for name in CONTRACT:
        (root / name).write_text((HEADER.parent / name).read_text())
    knobs = (root / "knobs.h").read_text()
    assert "#define AP_PACKETS_PER_SEC 20 " in knobs
    (root / "knobs.h").write_text(knobs.replace("#define AP_PACKETS_PER_SEC 20 ", "#define AP_PACKETS_PER_SEC 21 "))
    contract = (root / "agentprobe.h").read_text()
    assert "#define AP_DENY_CONF_HOSTS6 (1u << 2)" in contract
    contract = contract.replace("#define AP_DENY_CONF_HOSTS6 (1u << 2)", "#define AP_DENY_CONF_HOSTS6 (1u << 3)")
    (root / "agentprobe.h").write_text(contract.replace("#endif /* AGENTPROBE_H */",
                                                         "#define AP_EV_NEW 99\n#endif /* AGENTPROBE_H */"))
    problems = define_mismatches(root, tmp_path)
    assert sorted(problems) == ["AP_DENY_CONF_HOSTS6 = 8 in C, abi.DENY_CONF_HOSTS6 = 4",
                                "AP_EV_NEW = 99: no abi.EV_NEW (nor an abi.KERNEL_ONLY entry)",
                                "AP_PACKETS_PER_SEC = 21 in C, abi.PACKETS_PER_SEC = 20"]


def test_every_knob_can_be_overridden_with_a_cflag(tmp_path):
    """knobs.h: each #define sits in its own #ifndef, so -D wins over the default."""
    root = HEADER.parent
    text = (root / "knobs.h").read_text()
    knobs = [n for n in header_defines(root, ("knobs.h",)) if not GUARD.fullmatch(n)]
    for name in knobs:
        assert re.search(rf"^#ifndef {name}\n#define {name} ", text, re.M), name
    defaults = c_values(root, "knobs.h", knobs, tmp_path)
    flags = tuple(f"-D{n}={defaults[n] + 1}" for n in knobs)
    assert c_values(root, "knobs.h", knobs, tmp_path, flags) == {n: v + 1 for n, v in defaults.items()}


def test_named_numbers_are_linux_and_the_driver_s(tmp_path):
    """numbers.h names what Linux and the NVIDIA driver fix: the same numbers Python knows them by."""
    import errno
    import signal
    import socket

    from agentprobe import nvidia

    root = HEADER.parent
    names = header_defines(root, ("numbers.h",))
    values = c_values(root, "numbers.h", [n for n in names if not GUARD.fullmatch(n)], tmp_path)
    expect = {
        "AP_AF_INET": socket.AF_INET, "AP_AF_INET6": socket.AF_INET6, "AP_SOCK_STREAM": socket.SOCK_STREAM,
        "AP_SOCK_DGRAM": socket.SOCK_DGRAM, "AP_SOCK_RAW": socket.SOCK_RAW,
        "AP_IPPROTO_ICMP": socket.IPPROTO_ICMP, "AP_IPPROTO_TCP": socket.IPPROTO_TCP,
        "AP_IPPROTO_UDP": socket.IPPROTO_UDP, "AP_IPPROTO_ICMPV6": socket.IPPROTO_ICMPV6,
        "AP_EPERM": errno.EPERM, "AP_SIGKILL": signal.SIGKILL,
        "AP_SOCKADDR_IN_LEN": 16, "AP_SOCKADDR_IN6_LEN": 28,
    }
    assert {n: values[n] for n in expect} == expect
    mapped = socket.inet_pton(socket.AF_INET6, "::ffff:0.0.0.0")
    assert mapped[8:12] == values["AP_IPV6_V4MAPPED_WORD"].to_bytes(4, "big")
    driver = {"AP_NV_ESC_IOCTL_XFER_CMD": "IOCTL_XFER_CMD", "AP_NV_ESC_RM_CONTROL": "RM_CONTROL",
              "AP_NV_ESC_RM_ALLOC": "RM_ALLOC"}
    assert {n: nvidia.FRONTEND[values[n]] for n in driver} == driver


def test_every_record_type_has_a_name_for_its_losses():
    """Losses are reported by record type name: a type without one would show as a bare number."""
    from agentprobe.events import RECORD_NAMES  # the decoder owns the record type names

    assert sorted(RECORD_NAMES) == list(range(1, abi.EV_TYPES))
    assert len(set(RECORD_NAMES.values())) == abi.EV_TYPES - 1
