/* scope.bpf.h - which tasks agentprobe looks at: those inside a watched
 * cgroup subtree. Shared by every program, the LSM one included. */
#ifndef AGENTPROBE_SCOPE_BPF_H
#define AGENTPROBE_SCOPE_BPF_H

/* cgroup v2 ids of watched cgroups; their whole subtrees are in scope */
BPF_HASH(watched, u64, u8, AP_MAX_WATCHED);
/* [0]: bit L set when some watched cgroup sits at level L */
BPF_ARRAY(watched_levels, u64, 1);
/* Is the current task inside a watched cgroup subtree? This is the first thing
 * every probe does: for tasks outside it costs one array lookup plus one
 * ancestor lookup per level that holds a watched cgroup. */
static __always_inline int ap_in_scope(void)
{
	u32 zero = 0;
	u64 *levels = watched_levels.lookup(&zero);
	if (!levels || *levels == 0)
		return 0;
	u64 mask = *levels;
	for (int level = 0; level < AP_MAX_CGROUP_LEVEL; level++) {
		if (!(mask & (1ULL << level)))
			continue;
		u64 id = bpf_get_current_ancestor_cgroup_id(level);
		if (id && watched.lookup(&id))
			return 1;
	}
	return 0;
}

#endif /* AGENTPROBE_SCOPE_BPF_H */
