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

/* basenames (first 16 bytes, zero-padded) refused for agent processes */
BPF_HASH(deny_exec_names, struct ap_name, u8, 1024);
BPF_PERCPU_ARRAY(lsm_path, struct ap_exec_event, 1);

LSM_PROBE(bprm_check_security, void *bprm)
{
	if (!ap_in_scope())
		return 0;
	u32 zero = 0;
	struct ap_exec_event *buf = lsm_path.lookup(&zero);
	if (!buf)
		return 0;
	const char *filename = 0;
	bpf_probe_read_kernel(&filename, sizeof(filename), (char *)bprm + AP_OFF_LINUX_BINPRM_FILENAME);
	if (!filename)
		return 0;
	long n = bpf_probe_read_kernel_str(buf->filename, sizeof(buf->filename), filename);
	if (n <= 1)
		return 0;
	u32 base = 0;
	for (u32 i = 0; i < AP_FILENAME_LEN; i++) {
		if (buf->filename[i] == 0)
			break;
		if (buf->filename[i] == '/')
			base = i + 1;
	}
	struct ap_name key = {};
	for (u32 i = 0; i < AP_NAME_LEN; i++) {
		u32 j = (base + i) & (AP_FILENAME_LEN - 1);
		char c = buf->filename[j];
		if (c == 0 || base + i >= AP_FILENAME_LEN)
			break;
		key.name[i] = c;
	}
	if (deny_exec_names.lookup(&key))
		return -AP_EPERM;
	return 0;
}
