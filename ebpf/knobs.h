/* knobs.h - every size, limit and window of the eBPF programs, in one place.
 *
 * Each one can be overridden with -D (BCC cflags; the loader passes
 * AP_RINGBUF_PAGES today). Included by the contract header, agentprobe.h, so
 * user space and tests/test_abi.py see the same defaults: agentprobe/abi.py
 * mirrors those user space reads.
 *
 * Sizes marked "record" shape a record's bytes: override them only together
 * with agentprobe/abi.py. The others (map capacities, rates, windows) change
 * no layout.
 */
#ifndef AGENTPROBE_KNOBS_H
#define AGENTPROBE_KNOBS_H

/* ---- record sizes (documented in docs/events.md) ---- */
#ifndef AP_COMM_LEN
#define AP_COMM_LEN 16          /* record: the kernel's TASK_COMM_LEN */
#endif
#ifndef AP_FILENAME_LEN
#define AP_FILENAME_LEN 256     /* record: exec filename, bytes incl. NUL */
#endif
#ifndef AP_ARGS_LEN
#define AP_ARGS_LEN 4096        /* record: all argv elements copied, bytes */
#endif
#ifndef AP_SOCKADDR_LEN
#define AP_SOCKADDR_LEN 112     /* record: raw sockaddr bytes kept (fits sockaddr_un) */
#endif
#ifndef AP_PAYLOAD_LEN
#define AP_PAYLOAD_LEN 64       /* record: first bytes of a socket's first payload kept */
#endif
#ifndef AP_PACKET_LEN
#define AP_PACKET_LEN 128       /* record: bytes kept of a sampled ICMP echo or DNS query */
#endif
#ifndef AP_CGROUP_PATH_LEN
#define AP_CGROUP_PATH_LEN 256  /* record: a new cgroup's path, bytes incl. NUL */
#endif
#ifndef AP_EXEC_NAME_LEN
#define AP_EXEC_NAME_LEN 16     /* key of the exec name maps: a basename, zero-padded */
#endif

/* ---- how much of a record is filled ---- */
#ifndef AP_ARG_LEN
#define AP_ARG_LEN 256          /* one argv element, bytes incl. NUL (syscall exec probes) */
#endif
#ifndef AP_MAX_ARGS
#define AP_MAX_ARGS 64          /* argv elements copied at most (syscall exec probes) */
#endif
#ifndef AP_MAX_ARGS_SCAN
#define AP_MAX_ARGS_SCAN 1024   /* argv elements counted at most (syscall exec probes) */
#endif
#ifndef AP_MAX_CGROUP_LEVEL
#define AP_MAX_CGROUP_LEVEL 32  /* cgroup levels a watched cgroup may sit at */
#endif
#ifndef AP_AFTER_CONNECT
#define AP_AFTER_CONNECT 3      /* segments after an HTTP CONNECT whose first bytes are reported too */
#endif

/* ---- rates and windows ---- */
#ifndef AP_RATE_WINDOW_NS
#define AP_RATE_WINDOW_NS 1000000000ULL /* the window of the per-second budgets below */
#endif
#ifndef AP_PACKETS_PER_SEC
#define AP_PACKETS_PER_SEC 20   /* sampled packets per process and second; the rest only counted */
#endif
#ifndef AP_CONN_RECORDS_PER_SEC
#define AP_CONN_RECORDS_PER_SEC 256 /* connect records to new destinations per process and second */
#endif
#ifndef AP_CONN_WINDOW_NS
#define AP_CONN_WINDOW_NS 1000000000ULL /* repeats of a recorded connect within it are only counted */
#endif

/* ---- buffers and map capacities (entries) ---- */
#ifndef AP_RINGBUF_PAGES
#define AP_RINGBUF_PAGES 256    /* ring buffer size in pages (power of two) */
#endif
#ifndef AP_MAX_WATCHED
#define AP_MAX_WATCHED 4096     /* watched cgroups */
#endif
#ifndef AP_MAX_AGENT_PIDS
#define AP_MAX_AGENT_PIDS 65536 /* agent processes remembered (LRU) */
#endif
#ifndef AP_MAX_PENDING
#define AP_MAX_PENDING 10240    /* syscalls between enter and exit (syscall probes) */
#endif
#ifndef AP_MAX_CONN_KEYS
#define AP_MAX_CONN_KEYS 65536  /* (process, destination) connect windows (LRU) */
#endif
#ifndef AP_MAX_SWEEP_PIDS
#define AP_MAX_SWEEP_PIDS 16384 /* processes with a connect budget (LRU) */
#endif
#ifndef AP_MAX_ALWAYS_PORTS
#define AP_MAX_ALWAYS_PORTS 4096 /* ports always recorded, whatever the budget */
#endif
#ifndef AP_MAX_SOCK_OWNERS
#define AP_MAX_SOCK_OWNERS 65536 /* socket owners by cookie (LRU) */
#endif
#ifndef AP_MAX_FLOWS
#define AP_MAX_FLOWS 65536      /* ICMP and DNS flow counts (LRU) */
#endif
#ifndef AP_MAX_BUDGET_PIDS
#define AP_MAX_BUDGET_PIDS 16384 /* processes with a packet sample budget (LRU) */
#endif
#ifndef AP_MAX_PAYLOAD_SOCKS
#define AP_MAX_PAYLOAD_SOCKS 65536 /* sockets whose first bytes were reported (LRU) */
#endif
#ifndef AP_MAX_DENY_PORTS
#define AP_MAX_DENY_PORTS 1024  /* ports of the in-kernel deny */
#endif
#ifndef AP_MAX_DENY_NETS
#define AP_MAX_DENY_NETS 1024   /* networks in each allow / deny trie */
#endif
#ifndef AP_MAX_EXEC_NAMES
#define AP_MAX_EXEC_NAMES 1024  /* basenames refused or killed at exec */
#endif
#ifndef AP_MAX_GPU_KEYS
#define AP_MAX_GPU_KEYS 65536   /* (process, device, command) GPU ioctl counts (LRU) */
#endif
#ifndef AP_MAX_MAJOR
#define AP_MAX_MAJOR 4096       /* device majors looked up (12 bits: all of them) */
#endif

#endif /* AGENTPROBE_KNOBS_H */
