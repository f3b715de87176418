/* proc.bpf.c - process creation and exit, for the user-space process tree.
 *
 * sched:* raw tracepoints do not put syscalls on the slow path. Threads are
 * skipped: a fork record is a new process, an exit record the end of the
 * whole thread group.
 */

/* A child born in another cgroup than its parent's: clone3(CLONE_INTO_CGROUP)
 * places it there without any cgroup_attach_task. Reported as a move of the
 * child, made by the parent, from the parent's cgroup. */
static __always_inline void ap_fork_into_cgroup(void *ctx, void *child, u32 child_tgid)
{
	void *cset = (void *)ap_read_ptr(child, AP_OFF_TASK_STRUCT_CGROUPS);
	void *cgrp = cset ? (void *)ap_read_ptr(cset, AP_OFF_CSS_SET_DFL_CGRP) : 0;
	void *kn = cgrp ? (void *)ap_read_ptr(cgrp, AP_OFF_CGROUP_KN) : 0;
	u64 dst = kn ? ap_read_ptr(kn, AP_OFF_KERNFS_NODE_ID) : 0;
	u64 src = bpf_get_current_cgroup_id();
	if (!dst || dst == src)
		return; /* another v1 controller only: same v2 cgroup */
	struct ap_move_event *e = ap_scratch();
	if (!e)
		return;
	ap_fill_header(&e->h, AP_EV_MOVE);
	e->moved_pid = child_tgid;
	e->dst_level = ap_read_u32(cgrp, AP_OFF_CGROUP_LEVEL);
	e->dst_cgroup_id = dst;
	e->src_cgroup_id = src;
	ap_submit(ctx, e, sizeof(*e), AP_EV_MOVE);
	agent_pids.update(&child_tgid, &dst);
}

RAW_TRACEPOINT_PROBE(sched_process_fork)
{
	if (!ap_in_scope())
		return 0;
	void *parent = (void *)ctx->args[0];
	void *child = (void *)ctx->args[1];
	u32 child_tgid = ap_read_u32(child, AP_OFF_TASK_STRUCT_TGID);
	if (child_tgid == ap_read_u32(parent, AP_OFF_TASK_STRUCT_TGID))
		return 0; /* a new thread */
	ap_remember_agent(child_tgid);
	struct ap_fork_event *e = ap_scratch();
	if (!e)
		return 0;
	ap_fill_header(&e->h, AP_EV_FORK);
	e->child_pid = child_tgid;
	e->_pad = 0;
	ap_submit(ctx, e, sizeof(*e), AP_EV_FORK);
	/* a plain fork shares its parent's css_set: one compare, no walk */
	if (ap_read_ptr(child, AP_OFF_TASK_STRUCT_CGROUPS) !=
	    ap_read_ptr(parent, AP_OFF_TASK_STRUCT_CGROUPS))
		ap_fork_into_cgroup(ctx, child, child_tgid);
	return 0;
}

RAW_TRACEPOINT_PROBE(sched_process_exit)
{
	if (!ap_in_scope())
		return 0;
	void *task = (void *)bpf_get_current_task();
	void *signal = (void *)ap_read_ptr(task, AP_OFF_TASK_STRUCT_SIGNAL);
	/* signal->live reaches 0 when the last thread of the group exits */
	if (signal && ap_read_u32(signal, AP_OFF_SIGNAL_STRUCT_LIVE) != 0)
		return 0;
	struct ap_exit_event *e = ap_scratch();
	if (!e)
		return 0;
	ap_fill_header(&e->h, AP_EV_EXIT);
	e->exit_code = ap_read_u32(task, AP_OFF_TASK_STRUCT_EXIT_CODE);
	e->_pad = 0;
	ap_submit(ctx, e, sizeof(*e), AP_EV_EXIT);
	u32 tgid = e->h.pid;
	agent_pids.delete(&tgid);
	return 0;
}

/* Is the cgroup whose kernfs node is kn, at this level, inside a watched
 * subtree? The node and its ancestors, walked up, are looked up at the levels
 * that hold a watched cgroup. Only for moves: rare, whoever makes them. */
static __always_inline int ap_cgroup_in_scope(void *kn, int level)
{
	u32 zero = 0;
	u64 *levels = watched_levels.lookup(&zero);
	if (!levels || *levels == 0)
		return 0;
	u64 mask = *levels;
	for (int i = 0; i < AP_MAX_CGROUP_LEVEL; i++) {
		if (!kn || level < 0 || level >= AP_MAX_CGROUP_LEVEL)
			return 0;
		if (mask & (1ULL << level)) {
			u64 id = ap_read_ptr(kn, AP_OFF_KERNFS_NODE_ID);
			if (watched.lookup(&id))
				return 1;
		}
		kn = (void *)ap_read_ptr(kn, AP_OFF_KERNFS_NODE_PARENT);
		level--;
	}
	return 0;
}

/* A task moved to a cgroup of the v2 hierarchy (the moved task's default
 * cgroup is now the destination; v1 controllers' moves are skipped). A move
 * of an agent process is reported, wherever it goes and whoever moves it; the
 * rules decide whether the destination is still an agent cgroup. A process
 * moved into a watched subtree from outside (a trainer writing its agent's
 * pid into the episode's cgroup.procs) is an agent from now on: the kernel
 * learns it here, at once, not at the watcher's next look at cgroup.procs. */
RAW_TRACEPOINT_PROBE(cgroup_attach_task)
{
	void *cgrp = (void *)ctx->args[0];
	void *task = (void *)ctx->args[2];
	void *cset = (void *)ap_read_ptr(task, AP_OFF_TASK_STRUCT_CGROUPS);
	if (!cset || (void *)ap_read_ptr(cset, AP_OFF_CSS_SET_DFL_CGRP) != cgrp)
		return 0;
	u32 pid = ap_read_u32(task, AP_OFF_TASK_STRUCT_PID);
	void *kn = (void *)ap_read_ptr(cgrp, AP_OFF_CGROUP_KN);
	u64 dst = kn ? ap_read_ptr(kn, AP_OFF_KERNFS_NODE_ID) : 0;
	u32 level = ap_read_u32(cgrp, AP_OFF_CGROUP_LEVEL);
	u64 *src = agent_pids.lookup(&pid);
	if (!src) { /* not an agent process, or a thread: its leader is reported */
		if (pid == ap_read_u32(task, AP_OFF_TASK_STRUCT_TGID) && ap_cgroup_in_scope(kn, level))
			agent_pids.update(&pid, &dst);
		return 0;
	}
	struct ap_move_event *e = ap_scratch();
	if (!e)
		return 0;
	ap_fill_header(&e->h, AP_EV_MOVE);
	e->moved_pid = pid;
	e->dst_level = level;
	e->dst_cgroup_id = dst;
	e->src_cgroup_id = *src;
	ap_submit(ctx, e, sizeof(*e), AP_EV_MOVE);
	agent_pids.update(&pid, &dst);
	return 0;
}

#ifdef AP_WATCH_MKDIR
_Static_assert(sizeof(struct ap_mkdir_event) <= sizeof(struct ap_exec_event), "scratch record too small");

/* A cgroup created in the v2 hierarchy (root 0), whoever creates it: user
 * space matches the path against --cgroup-glob and watches a match at once,
 * before the runtime moves the first process in. Not a syscall tracepoint:
 * other tasks pay nothing, and cgroups are made rarely. */
TRACEPOINT_PROBE(cgroup, cgroup_mkdir)
{
	if (args->root != 0)
		return 0;
	struct ap_mkdir_event *e = ap_scratch();
	if (!e)
		return 0;
	ap_fill_header(&e->h, AP_EV_MKDIR);
	e->cgroup_id = args->id;
	e->level = args->level;
	e->_pad = 0;
	u16 off = args->data_loc_path & AP_DATA_LOC_OFF_MASK;
	if (bpf_probe_read_kernel_str(e->path, sizeof(e->path), (char *)args + off) < 0)
		e->path[0] = 0;
	ap_submit(args, e, sizeof(*e), AP_EV_MKDIR);
	return 0;
}
#endif
