"""Python mirror of ebpf/agentprobe.h and ebpf/knobs.h (the contract headers).

tests/test_abi.py keeps the two in step: every struct's size and offsets, and every #define,
named here without its AP_ prefix or listed in KERNEL_ONLY with the reason user space needs none."""

from __future__ import annotations

import ctypes as ct

# ---- knobs.h: record sizes and how much of a record is filled ----
COMM_LEN = 16
FILENAME_LEN = 256
ARG_LEN = 256
ARGS_LEN = 4096
MAX_ARGS = 64
MAX_ARGS_SCAN = 1024
SOCKADDR_LEN = 112
MAX_CGROUP_LEVEL = 32
PAYLOAD_LEN = 64
PACKET_LEN = 128
CGROUP_PATH_LEN = 256
EXEC_NAME_LEN = 16  # key of the exec name maps: a basename, zero-padded (up to 15 bytes kept)

# ---- knobs.h: rates and windows ----
RATE_WINDOW_NS = 1_000_000_000  # the window of the per-second budgets
PACKETS_PER_SEC = 20
CONN_RECORDS_PER_SEC = 256
CONN_WINDOW_NS = 1_000_000_000  # repeats of a recorded connect within it are only counted

# ---- agentprobe.h ----
EV_EXEC, EV_CONNECT, EV_GPU, EV_FORK, EV_EXIT, EV_PAYLOAD, EV_DENY, EV_MOVE = 1, 2, 3, 4, 5, 6, 7, 8
EV_SOCKET, EV_BIND, EV_PACKET, EV_MKDIR = 9, 10, 11, 12
EV_LISTEN = 13  # a BindRecord: listen() on a non-loopback address
EV_TYPES = 14

EXEC_EXECVEAT = 1 << 0
EXEC_ARGS_TRUNC = 1 << 1
EXEC_ARG_TRUNC = 1 << 2
EXEC_FILENAME_TRUNC = 1 << 3
EXEC_ARGV_FAULT = 1 << 4
EXEC_ARGV_RAW = 1 << 5
EXEC_KILLED = 1 << 6

CONNECT_ADDR_FAULT = 1 << 0
CONNECT_AT_HOOK = 1 << 1
CONNECT_SENDMSG = 1 << 2

GPU_FIRST_DEVICE = 1 << 0
GPU_FIRST_CMD = 1 << 1
GPU_XFER = 1 << 2
GPU_OPEN = 1 << 3

GPU_DEV_NVIDIA, GPU_DEV_UVM, GPU_DEV_CAPS = 1, 2, 3

DENY_PORT, DENY_HOST = 1, 2

# deny_conf[0]: on, which tries hold entries, and a generation in bits 8-31
DENY_CONF_ON = 1 << 0
DENY_CONF_HOSTS4 = 1 << 1
DENY_CONF_HOSTS6 = 1 << 2
DENY_CONF_GEN_SHIFT = 8

# ConnKey.kind
CONN_KIND_DENIED = 1 << 0
CONN_KIND_SENDMSG = 1 << 1

# #defines of the contract headers that user space has no use for, and why
_CAPACITY = "a map's capacity: user space reads what the map holds, whatever its size"
KERNEL_ONLY: dict[str, str] = {
    "AP_AFTER_CONNECT": "how many segments after an HTTP CONNECT become records: each is a record of its own",
    "AP_RINGBUF_PAGES": "a default only: the loader always passes its own (--ringbuf-pages)",
    "AP_MAX_WATCHED": _CAPACITY,
    "AP_MAX_AGENT_PIDS": _CAPACITY,
    "AP_MAX_PENDING": _CAPACITY,
    "AP_MAX_CONN_KEYS": _CAPACITY,
    "AP_MAX_SWEEP_PIDS": _CAPACITY,
    "AP_MAX_ALWAYS_PORTS": _CAPACITY,
    "AP_MAX_SOCK_OWNERS": _CAPACITY,
    "AP_MAX_FLOWS": _CAPACITY,
    "AP_MAX_BUDGET_PIDS": _CAPACITY,
    "AP_MAX_PAYLOAD_SOCKS": _CAPACITY,
    "AP_MAX_DENY_PORTS": _CAPACITY,
    "AP_MAX_DENY_NETS": _CAPACITY,
    "AP_MAX_EXEC_NAMES": _CAPACITY,
    "AP_MAX_GPU_KEYS": _CAPACITY,
    "AP_MAX_MAJOR": "the gpu_majors array covers every 12-bit major: user space writes the ones it found",
}


class Header(ct.Structure):
    _fields_ = [
        ("type", ct.c_uint32),
        ("pid", ct.c_uint32),
        ("tid", ct.c_uint32),
        ("ppid", ct.c_uint32),
        ("uid", ct.c_uint32),
        ("gid", ct.c_uint32),
        ("ktime_ns", ct.c_uint64),
        ("cgroup_id", ct.c_uint64),
        ("comm", ct.c_char * COMM_LEN),
    ]


class ExecRecord(ct.Structure):
    _fields_ = [
        ("h", Header),
        ("retval", ct.c_int32),
        ("flags", ct.c_uint32),
        ("argc", ct.c_uint32),
        ("argc_total", ct.c_uint32),
        ("args_size", ct.c_uint32),
        ("dirfd", ct.c_int32),
        ("at_flags", ct.c_uint32),
        ("_pad", ct.c_uint32),
        ("filename", ct.c_char * FILENAME_LEN),
        ("args", ct.c_uint8 * ARGS_LEN),
    ]


class ConnectRecord(ct.Structure):
    _fields_ = [
        ("h", Header),
        ("retval", ct.c_int32),
        ("fd", ct.c_int32),
        ("flags", ct.c_uint32),
        ("addrlen", ct.c_uint32),
        ("sock_type", ct.c_uint16),
        ("family", ct.c_uint16),
        ("_pad", ct.c_uint32),
        ("addr", ct.c_uint8 * SOCKADDR_LEN),
        ("cookie", ct.c_uint64),
    ]


class GpuRecord(ct.Structure):
    _fields_ = [
        ("h", Header),
        ("major", ct.c_uint32),
        ("minor", ct.c_uint32),
        ("dev_kind", ct.c_uint32),
        ("flags", ct.c_uint32),
        ("cmd", ct.c_uint32),
        ("nr", ct.c_uint32),
        ("detail", ct.c_uint32),
        ("fd", ct.c_int32),
    ]


class ForkRecord(ct.Structure):
    _fields_ = [("h", Header), ("child_pid", ct.c_uint32), ("_pad", ct.c_uint32)]


class ExitRecord(ct.Structure):
    _fields_ = [("h", Header), ("exit_code", ct.c_int32), ("_pad", ct.c_uint32)]


class MoveRecord(ct.Structure):
    _fields_ = [("h", Header), ("moved_pid", ct.c_uint32), ("dst_level", ct.c_uint32),
                ("dst_cgroup_id", ct.c_uint64), ("src_cgroup_id", ct.c_uint64)]


class MkdirRecord(ct.Structure):
    _fields_ = [("h", Header), ("cgroup_id", ct.c_uint64), ("level", ct.c_uint32), ("_pad", ct.c_uint32),
                ("path", ct.c_char * CGROUP_PATH_LEN)]


class SocketRecord(ct.Structure):
    _fields_ = [("h", Header), ("cookie", ct.c_uint64), ("family", ct.c_uint16), ("type", ct.c_uint16),
                ("protocol", ct.c_uint16), ("_pad", ct.c_uint16)]


class BindRecord(ct.Structure):
    _fields_ = [("h", Header), ("family", ct.c_uint16), ("port", ct.c_uint16), ("type", ct.c_uint16),
                ("protocol", ct.c_uint16), ("addr", ct.c_uint8 * 16)]


class PacketRecord(ct.Structure):
    _fields_ = [("h", Header), ("cookie", ct.c_uint64), ("family", ct.c_uint16), ("protocol", ct.c_uint8),
                ("icmp_type", ct.c_uint8), ("dport", ct.c_uint16), ("_pad", ct.c_uint16), ("len", ct.c_uint32),
                ("captured", ct.c_uint32), ("daddr", ct.c_uint8 * 16), ("data", ct.c_uint8 * PACKET_LEN)]


class FlowKey(ct.Structure):
    _fields_ = [("pid", ct.c_uint32), ("protocol", ct.c_uint8), ("v6", ct.c_uint8), ("dport", ct.c_uint16),
                ("daddr", ct.c_uint8 * 16)]


class FlowCount(ct.Structure):
    _fields_ = [("packets", ct.c_uint64), ("bytes", ct.c_uint64), ("first_ns", ct.c_uint64),
                ("last_ns", ct.c_uint64), ("max_len", ct.c_uint32), ("sampled", ct.c_uint32)]


class PayloadRecord(ct.Structure):
    _fields_ = [
        ("h", Header),
        ("cookie", ct.c_uint64),
        ("len", ct.c_uint32),
        ("captured", ct.c_uint32),
        ("family", ct.c_uint16),
        ("protocol", ct.c_uint8),
        ("_pad1", ct.c_uint8),
        ("sport", ct.c_uint16),
        ("dport", ct.c_uint16),
        ("saddr", ct.c_uint8 * 16),
        ("daddr", ct.c_uint8 * 16),
        ("data", ct.c_uint8 * PAYLOAD_LEN),
    ]


class DenyRecord(ct.Structure):
    _fields_ = [
        ("h", Header),
        ("family", ct.c_uint16),
        ("port", ct.c_uint16),
        ("reason", ct.c_uint32),
        ("addr", ct.c_uint8 * 16),
    ]


class LpmV4(ct.Structure):
    _fields_ = [("prefixlen", ct.c_uint32), ("addr", ct.c_uint8 * 4)]


class LpmV6(ct.Structure):
    _fields_ = [("prefixlen", ct.c_uint32), ("addr", ct.c_uint8 * 16)]


class SockOwner(ct.Structure):
    _fields_ = [
        ("pid", ct.c_uint32),
        ("tid", ct.c_uint32),
        ("uid", ct.c_uint32),
        ("gid", ct.c_uint32),
        ("cgroup_id", ct.c_uint64),
        ("comm", ct.c_char * COMM_LEN),
    ]


class ExecName(ct.Structure):
    _fields_ = [("name", ct.c_char * EXEC_NAME_LEN)]


class GpuKey(ct.Structure):
    _fields_ = [
        ("pid", ct.c_uint32),
        ("dev", ct.c_uint32),
        ("nr", ct.c_uint32),
        ("detail", ct.c_uint32),
    ]


class GpuCount(ct.Structure):
    _fields_ = [("count", ct.c_uint64), ("first_ns", ct.c_uint64), ("last_ns", ct.c_uint64)]


class ConnKey(ct.Structure):
    _fields_ = [
        ("pid", ct.c_uint32),
        ("family", ct.c_uint16),
        ("port", ct.c_uint16),
        ("addr", ct.c_uint8 * 16),
        ("sock_type", ct.c_uint16),
        ("kind", ct.c_uint16),
    ]


class ConnCount(ct.Structure):
    _fields_ = [("count", ct.c_uint64), ("first_ns", ct.c_uint64), ("last_ns", ct.c_uint64),
                ("deny_conf", ct.c_uint32), ("_pad", ct.c_uint32)]


class ConnSweep(ct.Structure):
    _fields_ = [("window_ns", ct.c_uint64), ("count", ct.c_uint64), ("first_ns", ct.c_uint64),
                ("last_ns", ct.c_uint64), ("cgroup_id", ct.c_uint64), ("recorded", ct.c_uint32),
                ("family", ct.c_uint16), ("port", ct.c_uint16), ("min_port", ct.c_uint16),
                ("max_port", ct.c_uint16), ("_pad", ct.c_uint32), ("addr", ct.c_uint8 * 16)]


RECORDS: dict[int, type[ct.Structure]] = {
    EV_EXEC: ExecRecord,
    EV_CONNECT: ConnectRecord,
    EV_GPU: GpuRecord,
    EV_FORK: ForkRecord,
    EV_EXIT: ExitRecord,
    EV_PAYLOAD: PayloadRecord,
    EV_DENY: DenyRecord,
    EV_MOVE: MoveRecord,
    EV_SOCKET: SocketRecord,
    EV_BIND: BindRecord,
    EV_LISTEN: BindRecord,
    EV_PACKET: PacketRecord,
    EV_MKDIR: MkdirRecord,
}

# C struct name -> Python mirror, for the ABI test
C_STRUCTS: dict[str, type[ct.Structure]] = {
    "ap_header": Header,
    "ap_exec_event": ExecRecord,
    "ap_connect_event": ConnectRecord,
    "ap_gpu_event": GpuRecord,
    "ap_fork_event": ForkRecord,
    "ap_exit_event": ExitRecord,
    "ap_payload_event": PayloadRecord,
    "ap_sock_owner": SockOwner,
    "ap_deny_event": DenyRecord,
    "ap_move_event": MoveRecord,
    "ap_mkdir_event": MkdirRecord,
    "ap_socket_event": SocketRecord,
    "ap_bind_event": BindRecord,
    "ap_packet_event": PacketRecord,
    "ap_flow_key": FlowKey,
    "ap_flow_count": FlowCount,
    "ap_lpm_v4": LpmV4,
    "ap_lpm_v6": LpmV6,
    "ap_gpu_key": GpuKey,
    "ap_gpu_count": GpuCount,
    "ap_conn_key": ConnKey,
    "ap_conn_count": ConnCount,
    "ap_conn_sweep": ConnSweep,
    "ap_exec_name": ExecName,
}
