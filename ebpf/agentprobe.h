/* agentprobe.h - the contract between the eBPF programs and user space.
 *
 * Every record the kernel side emits starts with struct ap_header. The Python
 * mirror lives in agentprobe/abi.py; tests/test_abi.py compiles this header
 * with the host compiler and checks that sizes and offsets agree, and that
 * every #define here and in knobs.h has its equal there, so the two sides
 * cannot drift apart silently.
 *
 * Only fixed-width types are used so the header compiles both under BCC and
 * with a plain C compiler in the ABI test.
 */
#ifndef AGENTPROBE_H
#define AGENTPROBE_H

#ifndef __KERNEL__
#include <stdint.h>
typedef uint8_t __u8;
typedef uint16_t __u16;
typedef uint32_t __u32;
typedef int32_t __s32;
typedef uint64_t __u64;
#endif

/* every size, limit and window, each overridable with -D */
#include "knobs.h"

/* ---- record types ---- */
#define AP_EV_EXEC 1
#define AP_EV_CONNECT 2
#define AP_EV_GPU 3
#define AP_EV_FORK 4
#define AP_EV_EXIT 5
#define AP_EV_PAYLOAD 6
#define AP_EV_DENY 7
#define AP_EV_MOVE 8
#define AP_EV_SOCKET 9
#define AP_EV_BIND 10
#define AP_EV_PACKET 11
#define AP_EV_MKDIR 12
#define AP_EV_LISTEN 13 /* struct ap_bind_event: listen() on a non-loopback address (sock:inet_sock_set_state) */
#define AP_EV_TYPES 14 /* size of the per-type loss counter array */

/* ---- exec flags ---- */
#define AP_EXEC_EXECVEAT (1u << 0)      /* came from execveat(2) */
#define AP_EXEC_ARGS_TRUNC (1u << 1)    /* more argv elements than copied */
#define AP_EXEC_ARG_TRUNC (1u << 2)     /* at least one element cut at AP_ARG_LEN */
#define AP_EXEC_FILENAME_TRUNC (1u << 3)
#define AP_EXEC_ARGV_FAULT (1u << 4)    /* argv could not be read completely */
#define AP_EXEC_KILLED (1u << 6)        /* a denied name: SIGKILL sent before its first instruction */
#define AP_EXEC_ARGV_RAW (1u << 5)      /* args is the new image's argument area (sched_process_exec):
                                         * user space counts the elements */

/* ---- connect flags ---- */
#define AP_CONNECT_ADDR_FAULT (1u << 0) /* sockaddr could not be read */
#define AP_CONNECT_AT_HOOK (1u << 1)    /* seen by the cgroup connect hook, before the
                                         * connect completes: retval is 0 (attempted) or -EPERM (refused) */
#define AP_CONNECT_SENDMSG (1u << 2)    /* a UDP sendto/sendmsg with a destination, not a connect */

/* ---- gpu flags ---- */
#define AP_GPU_FIRST_DEVICE (1u << 0)   /* first ioctl of this process on this device */
#define AP_GPU_FIRST_CMD (1u << 1)      /* first ioctl of this process with this command */
#define AP_GPU_XFER (1u << 2)           /* command came wrapped in NV_ESC_IOCTL_XFER_CMD */
#define AP_GPU_OPEN (1u << 3)           /* an open of the device (cgroup device hook); cmd holds the
                                         * access bits: 1 mknod, 2 read, 4 write */

/* ---- kinds of GPU device majors (value of the gpu_majors map) ---- */
#define AP_GPU_DEV_NVIDIA 1 /* major 195: /dev/nvidiaN, nvidiactl, nvidia-modeset */
#define AP_GPU_DEV_UVM 2    /* dynamic major "nvidia-uvm" */
#define AP_GPU_DEV_CAPS 3   /* dynamic major "nvidia-caps" */

struct ap_header {
	__u32 type;
	__u32 pid;      /* tgid */
	__u32 tid;
	__u32 ppid;     /* tgid of real_parent */
	__u32 uid;
	__u32 gid;
	__u64 ktime_ns; /* bpf_ktime_get_ns() at the syscall's entry */
	__u64 cgroup_id;/* cgroup v2 id (inode number) of the task */
	char comm[AP_COMM_LEN];
};

struct ap_exec_event {
	struct ap_header h;
	__s32 retval;   /* 0 or -errno from sys_exit_execve(at) */
	__u32 flags;
	__u32 argc;     /* argv elements copied into args */
	__u32 argc_total; /* argv elements seen (<= AP_MAX_ARGS_SCAN) */
	__u32 args_size;/* bytes used in args: NUL-separated elements */
	__s32 dirfd;    /* execveat dirfd */
	__u32 at_flags; /* execveat flags */
	__u32 _pad;
	char filename[AP_FILENAME_LEN];
	char args[AP_ARGS_LEN];
};

struct ap_connect_event {
	struct ap_header h;
	__s32 retval;   /* 0, -EINPROGRESS (non-blocking) or -errno */
	__s32 fd;
	__u32 flags;
	__u32 addrlen;  /* as passed to connect(2) */
	__u16 sock_type;/* SOCK_STREAM, SOCK_DGRAM, ... (0 if unknown) */
	__u16 family;   /* first field of the sockaddr */
	__u32 _pad;
	__u8 addr[AP_SOCKADDR_LEN]; /* raw sockaddr as the process passed it */
	__u64 cookie;   /* the socket's cookie (cgroup hooks; 0 from the syscall tracepoints) */
};

struct ap_gpu_event {
	struct ap_header h;
	__u32 major;
	__u32 minor;
	__u32 dev_kind; /* AP_GPU_DEV_* */
	__u32 flags;
	__u32 cmd;      /* raw ioctl request */
	__u32 nr;       /* driver command: _IOC_NR, the wrapped one for XFER, raw for UVM */
	__u32 detail;   /* RM_ALLOC: hClass, RM_CONTROL: control cmd, else 0 */
	__s32 fd;
};

struct ap_fork_event {
	struct ap_header h;  /* the parent */
	__u32 child_pid;
	__u32 _pad;
};

struct ap_exit_event {
	struct ap_header h;
	__s32 exit_code;     /* raw wait status: code << 8 | signal */
	__u32 _pad;
};

/* The first payload an agent socket sends (cgroup egress hook). The process
 * comes from the connect hook (by socket cookie); pid is 0 when the socket was
 * never connected through connect(2) (accepted, TCP Fast Open). */
struct ap_payload_event {
	struct ap_header h;
	__u64 cookie;   /* socket cookie */
	__u32 len;      /* payload bytes in this packet */
	__u32 captured; /* bytes copied into data */
	__u16 family;   /* AF_INET or AF_INET6 */
	__u8 protocol;  /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 _pad1;
	__u16 sport;    /* host byte order */
	__u16 dport;
	__u8 saddr[16]; /* 4 bytes used for AF_INET */
	__u8 daddr[16];
	__u8 data[AP_PAYLOAD_LEN];
};

/* A connect(2) refused in the kernel (the cgroup connect hook returned 0:
 * the caller got EPERM before any packet left). */
#define AP_DENY_PORT 1  /* destination port in deny_ports, address not in the allow tries */
#define AP_DENY_HOST 2  /* destination address in the deny tries */

/* deny_conf[0], written by user space: bit 0 on; bits 1 and 2: the deny4 and
 * deny6 tries hold entries (a trie lookup is the dearest step of a connect:
 * skipped when there is nothing to find); bits 8-31: a generation bumped at
 * each change, so that a verdict remembered with a destination (conn_repeats)
 * is known to be current */
#define AP_DENY_CONF_ON (1u << 0)
#define AP_DENY_CONF_HOSTS4 (1u << 1)
#define AP_DENY_CONF_HOSTS6 (1u << 2)
#define AP_DENY_CONF_GEN_SHIFT 8

struct ap_deny_event {
	struct ap_header h;
	__u16 family;   /* AF_INET or AF_INET6 (v4-mapped destinations are reported as AF_INET) */
	__u16 port;     /* host byte order */
	__u32 reason;   /* AP_DENY_* */
	__u8 addr[16];
};

/* An agent process was moved to another cgroup (cgroup v2): written into
 * another cgroup's cgroup.procs by itself or by someone else. The header is
 * the task that moved it. */
struct ap_move_event {
	struct ap_header h;
	__u32 moved_pid;     /* the agent process (thread group leader) */
	__u32 dst_level;
	__u64 dst_cgroup_id;
	__u64 src_cgroup_id; /* where the kernel last saw it in scope */
};

/* A cgroup was created in the v2 hierarchy (only with --cgroup-glob): user
 * space watches it at once when it matches, instead of at the next rescan. */
struct ap_mkdir_event {
	struct ap_header h;  /* the task that created it */
	__u64 cgroup_id;
	__u32 level;
	__u32 _pad;
	char path[AP_CGROUP_PATH_LEN]; /* from the hierarchy's root, "/a/b" */
};

/* An agent created a raw socket or an ICMP ("ping") socket (cgroup
 * sock_create hook; inet families only). */
struct ap_socket_event {
	struct ap_header h;
	__u64 cookie;
	__u16 family;
	__u16 type;     /* SOCK_RAW, SOCK_DGRAM (ping) */
	__u16 protocol;
	__u16 _pad;
};

/* An agent bound a socket to an address other than loopback (cgroup bind
 * hooks): reachable from outside once it listens or receives. */
struct ap_bind_event {
	struct ap_header h;
	__u16 family;
	__u16 port;     /* host byte order; 0: an ephemeral port */
	__u16 type;
	__u16 protocol;
	__u8 addr[16];  /* network byte order; 4 bytes used for AF_INET */
};

/* One outgoing ICMP packet or DNS query (UDP to port 53) of an agent socket
 * (cgroup egress hook). At most AP_PACKETS_PER_SEC per process and second
 * become records; every one is counted in flow_counts. */
struct ap_packet_event {
	struct ap_header h;   /* the socket's owner, from the connect/sendmsg/sock_create hooks; pid 0 if unknown */
	__u64 cookie;
	__u16 family;
	__u8 protocol;  /* 1 ICMP, 58 ICMPv6, 17 UDP */
	__u8 icmp_type; /* 8 / 128: echo request */
	__u16 dport;    /* host byte order (UDP) */
	__u16 _pad;
	__u32 len;      /* payload bytes after the ICMP or UDP header */
	__u32 captured; /* bytes copied into data */
	__u8 daddr[16];
	__u8 data[AP_PACKET_LEN];
};

/* key and value of the in-kernel ICMP/DNS packet counts (flow_counts map) */
struct ap_flow_key {
	__u32 pid;
	__u8 protocol;
	__u8 v6;        /* 1: daddr is IPv6 */
	__u16 dport;
	__u8 daddr[16];
};

struct ap_flow_count {
	__u64 packets;
	__u64 bytes;    /* payload bytes */
	__u64 first_ns;
	__u64 last_ns;
	__u32 max_len;  /* largest payload */
	__u32 sampled;  /* packets that became records */
};

/* LPM trie keys of the allow/deny tries: addr in network byte order */
struct ap_lpm_v4 {
	__u32 prefixlen;
	__u8 addr[4];
};

struct ap_lpm_v6 {
	__u32 prefixlen;
	__u8 addr[16];
};

/* who connected a socket, by cookie (written by the connect hooks) */
struct ap_sock_owner {
	__u32 pid;
	__u32 tid;
	__u32 uid;
	__u32 gid;
	__u64 cgroup_id;
	char comm[AP_COMM_LEN];
};

/* key and value of the in-kernel aggregation of repeated connects (conn_repeats
 * map): the first connect of a process to a destination in a window is a record,
 * the repeats within it are only counted */
struct ap_conn_key {
	__u32 pid;
	__u16 family;
	__u16 port;     /* network byte order, as in the sockaddr */
	__u8 addr[16];  /* 4 bytes used for AF_INET */
	__u16 sock_type;
	__u16 kind;     /* AP_CONN_KIND_* */
};
#define AP_CONN_KIND_DENIED (1u << 0)  /* refused by the in-kernel deny */
#define AP_CONN_KIND_SENDMSG (1u << 1) /* a UDP sendto/sendmsg, not a connect */

struct ap_conn_count {
	__u64 count;    /* repeats after the recorded connect */
	__u64 first_ns; /* the recorded connect: the window starts here */
	__u64 last_ns;
	__u32 deny_conf; /* deny_conf[0] when the deny verdict was last taken for this key */
	__u32 _pad;
};

/* per process (conn_sweeps map): connect records to new destinations in the
 * current one-second window; beyond AP_CONN_RECORDS_PER_SEC, a sweep (a port or
 * host scan) is counted here instead of recorded, except to the ports the rules
 * name (conn_always_ports) */
struct ap_conn_sweep {
	__u64 window_ns; /* the window's start */
	__u64 count;     /* connects counted instead of recorded (all windows) */
	__u64 first_ns;  /* first counted one */
	__u64 last_ns;   /* last counted one */
	__u64 cgroup_id; /* of the last counted one */
	__u32 recorded;  /* records in this window */
	__u16 family;    /* of the last counted one */
	__u16 port;      /* of the last counted one (host byte order) */
	__u16 min_port;  /* over all counted ones */
	__u16 max_port;
	__u32 _pad;
	__u8 addr[16];   /* of the last counted one */
};

/* key of the exec name maps (kill_exec_names, deny_exec_names): a basename,
 * zero-padded; longer names are compared on their first AP_EXEC_NAME_LEN - 1 bytes */
struct ap_exec_name {
	char name[AP_EXEC_NAME_LEN];
};

/* key and value of the in-kernel GPU ioctl aggregation (gpu_counts map) */
struct ap_gpu_key {
	__u32 pid;
	__u32 dev;      /* kernel dev_t: major << 20 | minor */
	__u32 nr;
	__u32 detail;
};

struct ap_gpu_count {
	__u64 count;
	__u64 first_ns;
	__u64 last_ns;
};

#endif /* AGENTPROBE_H */
