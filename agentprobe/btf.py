"""Struct field offsets from the running kernel's BTF (/sys/kernel/btf/vmlinux).

Installed kernel headers may not match the running kernel, so the eBPF programs
never dereference kernel structs through them: the loader passes the offsets
found here as -D constants.
"""

from __future__ import annotations

import struct
from pathlib import Path

from .errors import AgentprobeError

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")

_KIND_INT, _KIND_ARRAY, _KIND_STRUCT, _KIND_UNION, _KIND_ENUM = 1, 3, 4, 5, 6
_KIND_TYPEDEF, _KIND_VOLATILE, _KIND_CONST, _KIND_RESTRICT = 8, 9, 10, 11
_KIND_FUNC_PROTO, _KIND_VAR, _KIND_DATASEC, _KIND_DECL_TAG, _KIND_TYPE_TAG = 13, 14, 15, 17, 18
_KIND_ENUM64 = 19
_MODIFIERS = {_KIND_TYPEDEF, _KIND_VOLATILE, _KIND_CONST, _KIND_RESTRICT, _KIND_TYPE_TAG}

# (struct, dotted member path) -> name of the -D constant the C code uses
FIELDS: dict[tuple[str, str], str] = {
    ("task_struct", "real_parent"): "AP_OFF_TASK_STRUCT_REAL_PARENT",
    ("task_struct", "tgid"): "AP_OFF_TASK_STRUCT_TGID",
    ("task_struct", "files"): "AP_OFF_TASK_STRUCT_FILES",
    ("task_struct", "signal"): "AP_OFF_TASK_STRUCT_SIGNAL",
    ("task_struct", "exit_code"): "AP_OFF_TASK_STRUCT_EXIT_CODE",
    ("signal_struct", "live"): "AP_OFF_SIGNAL_STRUCT_LIVE",
    ("files_struct", "fdt"): "AP_OFF_FILES_STRUCT_FDT",
    ("fdtable", "max_fds"): "AP_OFF_FDTABLE_MAX_FDS",
    ("fdtable", "fd"): "AP_OFF_FDTABLE_FD",
    ("file", "f_inode"): "AP_OFF_FILE_F_INODE",
    ("file", "private_data"): "AP_OFF_FILE_PRIVATE_DATA",
    ("inode", "i_rdev"): "AP_OFF_INODE_I_RDEV",
    ("socket", "type"): "AP_OFF_SOCKET_TYPE",
    ("linux_binprm", "file"): "AP_OFF_LINUX_BINPRM_FILE",
    ("file", "f_path.dentry"): "AP_OFF_FILE_F_PATH_DENTRY",
    ("dentry", "d_name.name"): "AP_OFF_DENTRY_D_NAME_NAME",
    ("task_struct", "mm"): "AP_OFF_TASK_STRUCT_MM",
    ("mm_struct", "arg_start"): "AP_OFF_MM_STRUCT_ARG_START",
    ("mm_struct", "arg_end"): "AP_OFF_MM_STRUCT_ARG_END",
    ("linux_binprm", "filename"): "AP_OFF_LINUX_BINPRM_FILENAME",
    ("linux_binprm", "argc"): "AP_OFF_LINUX_BINPRM_ARGC",
    # a child's v2 cgroup at fork: task->cgroups->dfl_cgrp->kn->id (clone3 CLONE_INTO_CGROUP)
    ("task_struct", "cgroups"): "AP_OFF_TASK_STRUCT_CGROUPS",
    ("css_set", "dfl_cgrp"): "AP_OFF_CSS_SET_DFL_CGRP",
    ("cgroup", "kn"): "AP_OFF_CGROUP_KN",
    ("cgroup", "level"): "AP_OFF_CGROUP_LEVEL",
    ("kernfs_node", "id"): "AP_OFF_KERNFS_NODE_ID",
    # a move's destination, walked up to the watched levels (a move into an agent cgroup from
    # outside); the member is `__parent` since 6.15 ("a|b": the first that exists)
    ("kernfs_node", "__parent|parent"): "AP_OFF_KERNFS_NODE_PARENT",
    ("task_struct", "pid"): "AP_OFF_TASK_STRUCT_PID",
}
# read only by the fentry ioctl probe, which is built only where these exist (x86-64)
OPTIONAL_FIELDS = {
    ("pt_regs", "di"): "AP_OFF_PT_REGS_DI",
    ("pt_regs", "si"): "AP_OFF_PT_REGS_SI",
    ("pt_regs", "dx"): "AP_OFF_PT_REGS_DX",
}


class BtfError(AgentprobeError):
    pass


class Btf:
    """Just enough of a BTF reader to find member offsets of named structs."""

    def __init__(self, data: bytes) -> None:
        if len(data) < 24:
            raise BtfError("BTF blob too short")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != 0xEB9F:
            raise BtfError("not a BTF blob (bad magic)")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._strings = data[hdr_len + str_off : hdr_len + str_off + str_len]
        # type id -> (kind, name_off, size_or_type, members or None)
        self._types: list[tuple[int, int, int, list[tuple[int, int, int]] | None]] = [
            (0, 0, 0, None)
        ]
        self._structs: dict[str, int] = {}
        self._parse(data, hdr_len + type_off, hdr_len + type_off + type_len)

    @classmethod
    def from_file(cls, path: Path = VMLINUX_BTF) -> Btf:
        try:
            return cls(path.read_bytes())
        except FileNotFoundError:
            raise BtfError(
                f"{path} not found: the kernel has no BTF (CONFIG_DEBUG_INFO_BTF=y is required)"
            ) from None

    def _name(self, off: int) -> str:
        end = self._strings.index(b"\0", off)
        return self._strings[off:end].decode()

    def _parse(self, data: bytes, pos: int, end: int) -> None:
        unpack = struct.unpack_from
        types = self._types
        while pos < end:
            name_off, info, size_type = unpack("<III", data, pos)
            pos += 12
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            members = None
            if kind in (_KIND_STRUCT, _KIND_UNION):
                kflag = info >> 31
                members = []
                for _ in range(vlen):
                    m_name, m_type, m_off = unpack("<III", data, pos)
                    pos += 12
                    bit_off = m_off & 0xFFFFFF if kflag else m_off
                    members.append((m_name, m_type, bit_off))
                if kind == _KIND_STRUCT and name_off:
                    self._structs.setdefault(self._name(name_off), len(types))
            elif kind in (_KIND_INT, _KIND_VAR, _KIND_DECL_TAG):
                pos += 4
            elif kind == _KIND_ARRAY:
                pos += 12
            elif kind in (_KIND_ENUM, _KIND_FUNC_PROTO):
                pos += 8 * vlen
            elif kind in (_KIND_DATASEC, _KIND_ENUM64):
                pos += 12 * vlen
            types.append((kind, name_off, size_type, members))

    def _resolve(self, type_id: int) -> int:
        while self._types[type_id][0] in _MODIFIERS:
            type_id = self._types[type_id][2]
        return type_id

    def _find(self, type_id: int, name: str) -> int | None:
        """Bit offset of member `name` in the struct/union, looking into anonymous members."""
        members = self._types[type_id][3] or []
        for m_name, _m_type, bit_off in members:
            if m_name and self._name(m_name) == name:
                return bit_off
        for m_name, m_type, bit_off in members:
            if not m_name:
                inner = self._find(self._resolve(m_type), name)
                if inner is not None:
                    return bit_off + inner
        return None

    def offset(self, struct_name: str, member_path: str) -> int:
        """Byte offset of a (dotted) member of a struct."""
        type_id = self._structs.get(struct_name)
        if type_id is None:
            raise BtfError(f"struct {struct_name} not found in kernel BTF")
        total = 0
        parts = member_path.split(".")
        for i, part in enumerate(parts):
            bit_off = self._find(type_id, part)
            if bit_off is None:
                raise BtfError(f"struct {struct_name} has no member {member_path}")
            total += bit_off
            if i + 1 < len(parts):
                type_id = self._resolve(self._member_type(type_id, part))
        if total % 8:
            raise BtfError(f"{struct_name}.{member_path} is a bitfield")
        return total // 8

    def offset_of_any(self, struct_name: str, member_paths: str) -> int:
        """The offset of the first of "a|b|..." that the struct has (members renamed across kernels)."""
        *firsts, last = member_paths.split("|")
        for m in firsts:
            try:
                return self.offset(struct_name, m)
            except BtfError:
                continue
        return self.offset(struct_name, last)

    def _member_type(self, type_id: int, name: str) -> int:
        for m_name, m_type, _ in self._types[type_id][3] or []:
            if m_name and self._name(m_name) == name:
                return m_type
        for m_name, m_type, _ in self._types[type_id][3] or []:
            if not m_name:
                inner = self._resolve(m_type)
                if self._find(inner, name) is not None:
                    return self._member_type(inner, name)
        raise BtfError(f"no member {name}")


def kernel_offsets(path: Path = VMLINUX_BTF) -> dict[str, int]:
    """The -D constants for every field the eBPF programs read."""
    btf = Btf.from_file(path)
    out = {const: btf.offset_of_any(s, m) for (s, m), const in FIELDS.items()}
    for (s, m), const in OPTIONAL_FIELDS.items():
        try:
            out[const] = btf.offset(s, m)
        except BtfError:
            pass
    return out
