/* lsm.bpf.c - in-kernel deny of known miner binaries, through BPF-LSM.
 *
 * Loaded as a program of its own, only where the kernel allows BPF-LSM
 * (lsm=...,bpf and no lockdown refusal); elsewhere the user-space rules and
 * the freeze stand alone. bprm_check_security runs before the new image
 * replaces the old one: returning -EPERM makes execve fail, and the exec
 * tracepoint reports the failed exec like any other.
 */
#include "agentprobe.h"
#include "scope.bpf.h"

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
	if (deny_exec_names.lookup(&key))
		return -AP_EPERM;
	return 0;
}
