/* lsm.bpf.c - in-kernel deny of known miner binaries, through BPF-LSM.
 *
 * Loaded as a program of its own, only where the kernel allows BPF-LSM
 * (lsm=...,bpf and no lockdown refusal); elsewhere the user-space rules and
 * the freeze stand alone. bprm_check_security runs before the new image
 * replaces the old one: returning -EPERM makes execve fail. With the syscall
 * exec probes the exec tracepoint reports the failed exec; otherwise (failed
 * execs never reach sched_process_exec) this program writes that exec record
 * itself, to its own buffer: filename, retval -EPERM, no argv (the new
 * image's arguments are not readable yet).
 */
#include "common.bpf.h"

#define AP_EPERM 1
#define AP_NAME_LEN 16

struct ap_name {
	char name[AP_NAME_LEN];
};

/* basenames refused for agent processes: up to 15 bytes, zero-padded (longer
 * names are compared on their first 15 bytes) */
BPF_HASH(deny_exec_names, struct ap_name, u8, 1024);

LSM_PROBE(bprm_check_security, void *bprm)
{
	if (!ap_in_scope())
		return 0;
	/* the name of the file being executed, from its dentry: no path walking */
	void *file = 0;
	bpf_probe_read_kernel(&file, sizeof(file), (char *)bprm + AP_OFF_LINUX_BINPRM_FILE);
	if (!file)
		return 0;
	void *dentry = 0;
	bpf_probe_read_kernel(&dentry, sizeof(dentry), (char *)file + AP_OFF_FILE_F_PATH_DENTRY);
	if (!dentry)
		return 0;
	const char *name = 0;
	bpf_probe_read_kernel(&name, sizeof(name), (char *)dentry + AP_OFF_DENTRY_D_NAME_NAME);
	if (!name)
		return 0;
	struct ap_name key = {};
	if (bpf_probe_read_kernel_str(key.name, sizeof(key.name), name) <= 1)
		return 0;
	if (!deny_exec_names.lookup(&key))
		return 0;
#ifndef AP_SYSCALL_PROBES
	struct ap_exec_event *e = ap_exec_begin(-AP_EPERM, AP_EXEC_ARGV_RAW, -100, 0);
	if (e) {
		const char *fname = (const char *)ap_read_ptr(bprm, AP_OFF_LINUX_BINPRM_FILENAME);
		bpf_probe_read_kernel_str(e->filename, sizeof(e->filename), fname);
		ap_submit(ctx, e, sizeof(*e), AP_EV_EXEC);
	}
#endif
	return -AP_EPERM;
}
