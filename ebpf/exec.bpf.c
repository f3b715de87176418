/* exec.bpf.c - execve(2) and execveat(2) with argv.
 *
 * Default: sched_process_exec, a raw tracepoint that runs only on successful
 * execs and costs other syscalls nothing; argv is the new image's argument
 * area (mm->arg_start..arg_end), copied whole. With AP_SYSCALL_PROBES (the
 * fallback, or to see failed execs): sys_enter stashes filename and argv per
 * thread, sys_exit completes the record with the return value. Those syscall
 * tracepoints put every syscall of every task on the slow path.
 */

#ifndef AP_SYSCALL_PROBES
_Static_assert(AP_ARGS_LEN == 4096, "the size mask in ap_copy_arg_area assumes 4096");

/* Basenames killed at exec where BPF-LSM cannot refuse them: the signal is
 * pending before the new image runs its first instruction. Empty: off. */
BPF_HASH(kill_exec_names, struct ap_exec_name, u8, AP_MAX_EXEC_NAMES);

static __always_inline int ap_exec_denied(void *bprm)
{
	struct ap_exec_name key = {};
	return ap_bprm_name(bprm, &key) && kill_exec_names.lookup(&key) != 0;
}

/* The new image's argument area (mm->arg_start..arg_end), whole or its first
 * AP_ARGS_LEN bytes: user space counts the elements. */
static __always_inline void ap_copy_arg_area(struct ap_exec_event *e)
{
	void *task = (void *)bpf_get_current_task();
	void *mm = (void *)ap_read_ptr(task, AP_OFF_TASK_STRUCT_MM);
	u64 start = mm ? ap_read_ptr(mm, AP_OFF_MM_STRUCT_ARG_START) : 0;
	u64 end = mm ? ap_read_ptr(mm, AP_OFF_MM_STRUCT_ARG_END) : 0;
	u64 len = end > start ? end - start : 0;
	if (len >= AP_ARGS_LEN) {
		if (len > AP_ARGS_LEN)
			e->flags |= AP_EXEC_ARGS_TRUNC;
		if (bpf_probe_read_user(e->args, AP_ARGS_LEN, (void *)start) == 0)
			e->args_size = AP_ARGS_LEN;
		else
			e->flags |= AP_EXEC_ARGV_FAULT;
	} else if (len > 0) {
		/* the verifier wants the size bounded on the register itself */
		u64 sz = len - 1;
		asm volatile("%[sz] &= 4095" : [sz] "+r"(sz));
		sz += 1;
		if (bpf_probe_read_user(e->args, sz, (void *)start) == 0)
			e->args_size = sz;
		else
			e->flags |= AP_EXEC_ARGV_FAULT;
	}
}

RAW_TRACEPOINT_PROBE(sched_process_exec)
{
	if (!ap_in_scope())
		return 0;
	void *bprm = (void *)ctx->args[2];
	struct ap_exec_event *e = ap_exec_of_bprm(bprm, 0);
	if (!e)
		return 0;
	ap_remember_agent(e->h.pid);
	if (ap_exec_denied(bprm) && bpf_send_signal(AP_SIGKILL) == 0)
		e->flags |= AP_EXEC_KILLED;
	e->argc_total = ap_read_u32(bprm, AP_OFF_LINUX_BINPRM_ARGC); /* all of them, copied or not */
	ap_copy_arg_area(e);
	ap_submit(ctx, e, sizeof(*e), AP_EV_EXEC);
	return 0;
}
#else

BPF_HASH(exec_pending, u32, struct ap_exec_event, AP_MAX_PENDING);

/* Copy up to AP_MAX_ARGS elements; returns 1 when argv goes on beyond them. */
static __always_inline int ap_copy_argv(struct ap_exec_event *e,
					const char *const *argv)
{
	/* the write offset lives in the record, not in a register: re-reading it
	 * each round keeps the verifier's state small enough to prune */
	for (u32 i = 0; i < AP_MAX_ARGS; i++) {
		const char *p = 0;
		if (bpf_probe_read_user(&p, sizeof(p), &argv[i]) != 0) {
			e->flags |= AP_EXEC_ARGV_FAULT;
			return 0;
		}
		if (!p)
			return 0;
		u32 off = e->args_size;
		if (off > AP_ARGS_LEN - AP_ARG_LEN)
			return 1;
		long n = bpf_probe_read_user_str(&e->args[off], AP_ARG_LEN, p);
		if (n < 0) {
			e->flags |= AP_EXEC_ARGV_FAULT;
			return 0;
		}
		if (n == AP_ARG_LEN)
			e->flags |= AP_EXEC_ARG_TRUNC;
		e->args_size = off + (u32)n;
		e->argc = i + 1;
		e->argc_total = i + 1;
	}
	return 1;
}

/* Count the elements that were not copied, up to AP_MAX_ARGS_SCAN. The start
 * index is re-read from the record so the verifier checks this loop once. */
static __always_inline void ap_count_rest(struct ap_exec_event *e,
					  const char *const *argv)
{
	u32 start = e->argc;
	u32 n = 0;

	for (u32 j = 0; j < AP_MAX_ARGS_SCAN; j++) {
		const char *p = 0;
		if (bpf_probe_read_user(&p, sizeof(p), &argv[start + j]) != 0 || !p)
			break;
		n++;
	}
	if (n) {
		e->flags |= AP_EXEC_ARGS_TRUNC;
		e->argc_total = start + n;
	}
}

static __always_inline int ap_exec_enter(const char *filename,
					 const char *const *argv, int dirfd,
					 u32 at_flags, u32 flags)
{
	if (!ap_in_scope())
		return 0;
	struct ap_exec_event *e = ap_exec_begin(0, flags, dirfd, at_flags);
	if (!e)
		return 0;
	long n = bpf_probe_read_user_str(e->filename, sizeof(e->filename), filename);
	if (n == sizeof(e->filename))
		e->flags |= AP_EXEC_FILENAME_TRUNC;
	if (ap_copy_argv(e, argv))
		ap_count_rest(e, argv);
	u32 tid = e->h.tid;
	if (exec_pending.update(&tid, e) != 0)
		ap_count_lost(AP_EV_EXEC);
	return 0;
}

static __always_inline int ap_exec_exit(void *ctx, long ret)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	struct ap_exec_event *e = exec_pending.lookup(&tid);
	if (!e)
		return 0;
	e->retval = ret;
	if (ret == 0)
		ap_remember_agent(e->h.pid);
	/* after a successful exec the task carries its new name */
	bpf_get_current_comm(&e->h.comm, sizeof(e->h.comm));
	ap_submit(ctx, e, sizeof(*e), AP_EV_EXEC);
	exec_pending.delete(&tid);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_execve)
{
	return ap_exec_enter(args->filename, args->argv, AP_AT_FDCWD, 0, 0);
}

TRACEPOINT_PROBE(syscalls, sys_exit_execve)
{
	return ap_exec_exit(args, args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_enter_execveat)
{
	return ap_exec_enter(args->filename, args->argv, args->fd, args->flags,
			     AP_EXEC_EXECVEAT);
}

TRACEPOINT_PROBE(syscalls, sys_exit_execveat)
{
	return ap_exec_exit(args, args->ret);
}
#endif /* AP_SYSCALL_PROBES */
