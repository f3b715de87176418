/* common.bpf.h - maps and helpers shared by every agentprobe program.
 *
 * Knobs (sizes, limits, windows) are in knobs.h, each overridable with -D.
 * The loader (agentprobe/loader.py) also passes:
 *   AP_USE_RINGBUF      use BPF_RINGBUF_OUTPUT (5.8+), else BPF_PERF_OUTPUT
 *   AP_TASK_BTF         bpf_get_current_task_btf (5.11+) for the fd walk
 *   AP_OFF_<STRUCT>_<FIELD>  byte offsets taken from the running kernel's BTF;
 *                       the installed headers may not match the kernel, so no
 *                       kernel struct is ever dereferenced through them.
 */
#ifndef AGENTPROBE_COMMON_BPF_H
#define AGENTPROBE_COMMON_BPF_H

#include "agentprobe.h"
#include "numbers.h"
#include "scope.bpf.h"
#include "inet.bpf.h"

/* events that could not be written, per record type */
BPF_PERCPU_ARRAY(lost, u64, AP_EV_TYPES);
/* one scratch record per CPU: records are larger than the 512-byte stack */
BPF_PERCPU_ARRAY(scratch, struct ap_exec_event, 1);

#ifdef AP_USE_RINGBUF
BPF_RINGBUF_OUTPUT(events, AP_RINGBUF_PAGES);
#else
BPF_PERF_OUTPUT(events);
#endif

/* Agent processes (tgid -> cgroup id where last seen in scope), so that one
 * moved out of the watched cgroups is still known for what it is. */
BPF_TABLE("lru_hash", u32, u64, agent_pids, AP_MAX_AGENT_PIDS);

static __always_inline void ap_remember_agent(u32 tgid)
{
	u64 cid = bpf_get_current_cgroup_id();
	agent_pids.update(&tgid, &cid);
}

static __always_inline void ap_count_lost(u32 type)
{
	u64 *n = lost.lookup(&type);
	if (n)
		(*n)++;
}

#ifdef AP_USE_RINGBUF
/* [0]: 1 once a record that woke nobody was written, until a record wakes the watcher */
BPF_ARRAY(quiet_written, u32, 1);
/* [0]: 1 while the watcher reads the ring on its own, every millisecond (set and cleared by
 * the watcher: while agents are busy); records then wake nobody */
BPF_ARRAY(watcher_polling, u32, 1);
#endif

/* Write one record; a failed write is counted, never silent.
 *
 * Wake-ups: waking the watcher is an interrupt (tens of µs of the agent's time
 * in a VM: 24 of an exec's 27 µs in our programs here). While agents are busy
 * the watcher reads the ring every millisecond on its own and says so in
 * watcher_polling: no record wakes it then. Otherwise fork and exit records,
 * which never trigger a response, never wake it: they wait, in order, for the
 * next record that may, or for the watcher's poll timeout (100 ms). Any other
 * record wakes it where it may be asleep: the ring was drained (the kernel's
 * own rule), or quiet records were written since the last wake-up (a forced
 * one; the kernel's rule alone would not wake for a record queued behind them). */
static __always_inline void ap_submit(void *ctx, void *rec, u32 size, u32 type)
{
#ifdef AP_USE_RINGBUF
	u64 flags = 0;
	u32 zero = 0;
	u32 *quiet = quiet_written.lookup(&zero);
	u32 *polling = watcher_polling.lookup(&zero);
	if (type == AP_EV_FORK || type == AP_EV_EXIT || (polling && *polling))
		flags = BPF_RB_NO_WAKEUP;
	else if (quiet && *quiet)
		flags = BPF_RB_FORCE_WAKEUP;
	if (events.ringbuf_output(rec, size, flags) != 0) {
		ap_count_lost(type);
		return;
	}
	if (quiet)
		*quiet = (flags == BPF_RB_NO_WAKEUP);
#else
	if (events.perf_submit(ctx, rec, size) != 0)
		ap_count_lost(type);
#endif
}

static __always_inline u64 ap_read_ptr(const void *base, u64 off)
{
	u64 v = 0;
	bpf_probe_read_kernel(&v, sizeof(v), (const char *)base + off);
	return v;
}

static __always_inline u32 ap_read_u32(const void *base, u64 off)
{
	u32 v = 0;
	bpf_probe_read_kernel(&v, sizeof(v), (const char *)base + off);
	return v;
}

/* The header of a record of the current task, its parent's pid aside. */
static __always_inline void ap_fill_task_header(struct ap_header *h, u32 type)
{
	u64 pid_tgid = bpf_get_current_pid_tgid();
	u64 uid_gid = bpf_get_current_uid_gid();

	h->type = type;
	h->pid = pid_tgid >> 32;
	h->tid = (u32)pid_tgid;
	h->uid = (u32)uid_gid;
	h->gid = uid_gid >> 32;
	h->ktime_ns = bpf_ktime_get_ns();
	h->cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(&h->comm, sizeof(h->comm));
}

static __always_inline void ap_fill_header(struct ap_header *h, u32 type)
{
	void *task = (void *)bpf_get_current_task();
	void *parent = (void *)ap_read_ptr(task, AP_OFF_TASK_STRUCT_REAL_PARENT);

	ap_fill_task_header(h, type);
	h->ppid = parent ? ap_read_u32(parent, AP_OFF_TASK_STRUCT_TGID) : 0;
}

/* The per-CPU scratch record, for any record type (all fit in the exec one), or 0. */
static __always_inline void *ap_scratch(void)
{
	u32 zero = 0;
	return scratch.lookup(&zero);
}

/* The per-CPU scratch record as a fresh exec record of the current task
 * (filename and args left to the caller), or 0. */
static __always_inline struct ap_exec_event *ap_exec_begin(s32 retval, u32 flags, s32 dirfd, u32 at_flags)
{
	struct ap_exec_event *e = ap_scratch();
	if (!e)
		return 0;
	ap_fill_header(&e->h, AP_EV_EXEC);
	e->retval = retval;
	e->flags = flags;
	e->argc = 0;
	e->argc_total = 0;
	e->args_size = 0;
	e->dirfd = dirfd;
	e->at_flags = at_flags;
	return e;
}

/* The basename of the file a linux_binprm executes, from its dentry (no path
 * walking) into key: 1, or 0 when there is none. Shared by the exec kill
 * (exec.bpf.c) and the BPF-LSM refusal (lsm.bpf.c). */
static __always_inline int ap_bprm_name(void *bprm, struct ap_exec_name *key)
{
	void *file = (void *)ap_read_ptr(bprm, AP_OFF_LINUX_BINPRM_FILE);
	void *dentry = file ? (void *)ap_read_ptr(file, AP_OFF_FILE_F_PATH_DENTRY) : 0;
	const char *name = dentry ? (const char *)ap_read_ptr(dentry, AP_OFF_DENTRY_D_NAME_NAME) : 0;
	if (!name)
		return 0;
	return bpf_probe_read_kernel_str(key->name, sizeof(key->name), name) > 1;
}

/* An exec record of the image a linux_binprm loads, argv aside (read by the
 * caller, where it can be): its filename, as the exec path names it. */
static __always_inline struct ap_exec_event *ap_exec_of_bprm(void *bprm, s32 retval)
{
	struct ap_exec_event *e = ap_exec_begin(retval, AP_EXEC_ARGV_RAW, AP_AT_FDCWD, 0);
	if (!e)
		return 0;
	const char *fname = (const char *)ap_read_ptr(bprm, AP_OFF_LINUX_BINPRM_FILENAME);
	long n = bpf_probe_read_kernel_str(e->filename, sizeof(e->filename), fname);
	if (n == sizeof(e->filename))
		e->flags |= AP_EXEC_FILENAME_TRUNC;
	return e;
}

/* struct file * of descriptor fd of the current task, or 0. Only for tracing
 * programs (tracepoints, fentry), not for the cgroup hooks. */
#ifdef AP_TASK_BTF
/* Linux 5.11+: the task through its BTF pointer (bpf_get_current_task_btf).
 * Members the BTF types as struct pointers are plain loads the verifier
 * checks against the BTF, with a fault fix-up: no helper call each (about
 * 35 ns apiece in a paravirtualised guest). The fd array is no struct
 * pointer: it and what lies past it are read with bpf_probe_read_kernel. */
static __always_inline void *ap_fd_file(int fd)
{
	if (fd < 0)
		return 0;
	char *task = (char *)bpf_get_current_task_btf();
	char *files = *(char *volatile *)(task + AP_OFF_TASK_STRUCT_FILES);
	if (!files)
		return 0;
	char *fdt = *(char *volatile *)(files + AP_OFF_FILES_STRUCT_FDT);
	if (!fdt)
		return 0;
	u32 max_fds = *(volatile u32 *)(fdt + AP_OFF_FDTABLE_MAX_FDS);
	if ((u32)fd >= max_fds)
		return 0;
	u64 fdarr = *(volatile u64 *)(fdt + AP_OFF_FDTABLE_FD);
	if (!fdarr)
		return 0;
	return (void *)ap_read_ptr((void *)fdarr, (u64)fd * sizeof(void *));
}
#else
static __always_inline void *ap_fd_file(int fd)
{
	if (fd < 0)
		return 0;
	void *task = (void *)bpf_get_current_task();
	void *files = (void *)ap_read_ptr(task, AP_OFF_TASK_STRUCT_FILES);
	if (!files)
		return 0;
	void *fdt = (void *)ap_read_ptr(files, AP_OFF_FILES_STRUCT_FDT);
	if (!fdt)
		return 0;
	u32 max_fds = ap_read_u32(fdt, AP_OFF_FDTABLE_MAX_FDS);
	if ((u32)fd >= max_fds)
		return 0;
	void *fdarr = (void *)ap_read_ptr(fdt, AP_OFF_FDTABLE_FD);
	if (!fdarr)
		return 0;
	return (void *)ap_read_ptr(fdarr, (u64)fd * sizeof(void *));
}
#endif

#endif /* AGENTPROBE_COMMON_BPF_H */
