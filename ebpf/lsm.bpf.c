/* lsm.bpf.c - in-kernel deny of known miner binaries, through BPF-LSM.
 *
 * Loaded as a program of its own, only where the kernel allows BPF-LSM
 * (lsm=...,bpf and no lockdown refusal); elsewhere the user-space rules and
 * the freeze stand alone, and exec.bpf.c kills the same names at exec.
 * bprm_check_security runs before the new image replaces the old one:
 * returning -EPERM makes execve fail. With the syscall exec probes the exec
 * tracepoint reports the failed exec; otherwise (failed execs never reach
 * sched_process_exec) this program writes that exec record itself, to its own
 * buffer: filename, retval -EPERM, no argv (the new image's arguments are not
 * readable yet).
 */
#include "common.bpf.h"

/* basenames refused for agent processes (struct ap_exec_name, agentprobe.h) */
BPF_HASH(deny_exec_names, struct ap_exec_name, u8, AP_MAX_EXEC_NAMES);

LSM_PROBE(bprm_check_security, void *bprm)
{
	if (!ap_in_scope())
		return 0;
	struct ap_exec_name key = {};
	if (!ap_bprm_name(bprm, &key) || !deny_exec_names.lookup(&key))
		return 0;
#ifndef AP_SYSCALL_PROBES
	struct ap_exec_event *e = ap_exec_of_bprm(bprm, -AP_EPERM);
	if (e)
		ap_submit(ctx, e, sizeof(*e), AP_EV_EXEC);
#endif
	return -AP_EPERM;
}
