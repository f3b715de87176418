/* gpu.bpf.c - NVIDIA driver ioctls, aggregated in the kernel, and device opens.
 *
 * The device is recognised by the char-device major of the fd's inode (read
 * through BTF offsets), never by a path. Every ioctl bumps a counter keyed by
 * (process, device, command, detail); only the first use of a device and the
 * first use of each command by a process become records. User space reads
 * the counters periodically.
 *
 * Where the ioctls are seen (the loader picks, `watch` says which):
 *   AP_GPU_FENTRY   fentry on the ioctl syscall function: only ioctl pays, and
 *                   only a trampoline and the scope check (kernels that allow it);
 *   otherwise       syscalls:sys_enter_ioctl, which puts every syscall on the
 *                   slow path: user space attaches it only while an agent holds
 *                   an NVIDIA device open, as the device hook below reports.
 * The cgroup device hook runs only for the watched cgroups' tasks.
 */

/* major -> AP_GPU_DEV_* (0: not a GPU), filled from /proc/devices by user space;
 * an array indexed by the 12-bit major: no hashing on every ioctl */
BPF_ARRAY(gpu_majors, u32, AP_MAX_MAJOR);
BPF_TABLE("lru_hash", struct ap_gpu_key, struct ap_gpu_count, gpu_counts, AP_MAX_GPU_KEYS);
/* (pid, dev) pairs already reported */
BPF_TABLE("lru_hash", u64, u8, gpu_seen, AP_MAX_GPU_KEYS);

/* The GPU device kind (AP_GPU_DEV_*) behind descriptor fd, its dev_t in *rdev; 0: not a GPU. */
static __always_inline u32 ap_fd_gpu(int fd, u32 *rdev)
{
	void *file = ap_fd_file(fd);
	void *inode = file ? (void *)ap_read_ptr(file, AP_OFF_FILE_F_INODE) : 0;
	if (!inode)
		return 0;
	*rdev = ap_read_u32(inode, AP_OFF_INODE_I_RDEV);
	u32 major = *rdev >> AP_MINORBITS;
	u32 *kind = gpu_majors.lookup(&major);
	return kind ? *kind : 0;
}

/* The driver command in key->nr and its detail (the class allocated, the
 * control command); returns AP_GPU_XFER when the command came wrapped. */
static __always_inline u32 ap_gpu_command(struct ap_gpu_key *key, u32 kind, u32 cmd, u64 argp)
{
	u32 flags = 0;
	if (kind != AP_GPU_DEV_NVIDIA) {
		key->nr = cmd; /* UVM and caps use raw command numbers */
		return 0;
	}
	key->nr = cmd & AP_IOC_NRMASK; /* the driver looks only at _IOC_NR and _IOC_SIZE */
	if (key->nr == AP_NV_ESC_IOCTL_XFER_CMD) {
		u32 inner = 0;
		bpf_probe_read_user(&inner, sizeof(inner), (void *)argp);
		u64 inner_ptr = 0;
		bpf_probe_read_user(&inner_ptr, sizeof(inner_ptr), (char *)argp + AP_NV_XFER_PTR_OFF);
		key->nr = inner & AP_IOC_NRMASK;
		argp = inner_ptr;
		flags |= AP_GPU_XFER;
	}
	if (key->nr == AP_NV_ESC_RM_ALLOC)
		bpf_probe_read_user(&key->detail, 4, (char *)argp + AP_NVOS21_HCLASS_OFF);
	else if (key->nr == AP_NV_ESC_RM_CONTROL)
		bpf_probe_read_user(&key->detail, 4, (char *)argp + AP_NVOS54_CMD_OFF);
	return flags;
}

/* Counted; a first use (of this command, of this device) also returns its
 * AP_GPU_FIRST_* flags, 0 otherwise: no record. */
static __always_inline u32 ap_gpu_count(struct ap_gpu_key *key, u64 now)
{
	struct ap_gpu_count *c = gpu_counts.lookup(key);
	if (c) {
		__sync_fetch_and_add(&c->count, 1);
		c->last_ns = now;
		return 0;
	}
	struct ap_gpu_count init = {.count = 1, .first_ns = now, .last_ns = now};
	gpu_counts.update(key, &init);
	u32 flags = AP_GPU_FIRST_CMD;
	u64 seen_key = ((u64)key->pid << 32) | key->dev;
	if (!gpu_seen.lookup(&seen_key)) {
		u8 one = 1;
		gpu_seen.update(&seen_key, &one);
		flags |= AP_GPU_FIRST_DEVICE;
	}
	return flags;
}

/* A GPU record of the current task (command fields left to the caller), or 0. */
static __always_inline struct ap_gpu_event *ap_gpu_begin(u32 major, u32 minor, u32 kind, u32 flags, s32 fd)
{
	struct ap_gpu_event *e = ap_scratch();
	if (!e)
		return 0;
	ap_fill_header(&e->h, AP_EV_GPU);
	e->major = major;
	e->minor = minor;
	e->dev_kind = kind;
	e->flags = flags;
	e->fd = fd;
	return e;
}

static __always_inline int ap_gpu_ioctl(void *ctx, int fd, u32 cmd, u64 arg)
{
	if (!ap_in_scope())
		return 0;
	u32 rdev = 0;
	u32 kind = ap_fd_gpu(fd, &rdev);
	if (!kind)
		return 0;
	struct ap_gpu_key key = {};
	key.pid = bpf_get_current_pid_tgid() >> 32;
	key.dev = rdev;
	u32 flags = ap_gpu_command(&key, kind, cmd, arg);
	u64 now = bpf_ktime_get_ns();
	u32 first = ap_gpu_count(&key, now);
	if (!first)
		return 0;
	struct ap_gpu_event *e = ap_gpu_begin(rdev >> AP_MINORBITS, rdev & AP_MINORMASK, kind, flags | first, fd);
	if (!e)
		return 0;
	e->h.ktime_ns = now; /* the count's first_ns */
	e->cmd = cmd;
	e->nr = key.nr;
	e->detail = key.detail;
	ap_submit(ctx, e, sizeof(*e), AP_EV_GPU);
	return 0;
}

#ifdef AP_GPU_FENTRY
/* AP_GPU_FENTRY names the arch's syscall function (__x64_sys_ioctl), whose
 * one argument is the user's registers */
#define AP_KFUNC_PROBE(fn, args...) KFUNC_PROBE(fn, args) /* expands AP_GPU_FENTRY first */
AP_KFUNC_PROBE(AP_GPU_FENTRY, void *regs)
{
	int fd = (int)ap_read_ptr(regs, AP_OFF_PT_REGS_DI);
	u32 cmd = (u32)ap_read_ptr(regs, AP_OFF_PT_REGS_SI);
	u64 arg = ap_read_ptr(regs, AP_OFF_PT_REGS_DX);
	return ap_gpu_ioctl(ctx, fd, cmd, arg);
}
#else
TRACEPOINT_PROBE(syscalls, sys_enter_ioctl)
{
	return ap_gpu_ioctl(args, args->fd, args->cmd, args->arg);
}
#endif

/* cgroup device hook: an agent task opens (or mknods) a GPU device node.
 * Always allows: it reports, the rules decide. */
int ap_device(struct bpf_cgroup_dev_ctx *ctx)
{
	u32 type = ctx->access_type & AP_DEVCG_TYPE_MASK;
	u32 access = ctx->access_type >> AP_DEVCG_ACCESS_SHIFT;
	if (type != AP_DEVCG_DEV_CHAR || !(access & (AP_DEVCG_ACC_READ | AP_DEVCG_ACC_WRITE)))
		return 1;
	u32 major = ctx->major;
	u32 *kind = gpu_majors.lookup(&major);
	if (!kind || !*kind)
		return 1;
	struct ap_gpu_event *e = ap_gpu_begin(major, ctx->minor, *kind, AP_GPU_OPEN, -1);
	if (!e)
		return 1;
	e->cmd = access; /* AP_DEVCG_ACC_* */
	e->nr = 0;
	e->detail = 0;
	ap_submit(ctx, e, sizeof(*e), AP_EV_GPU);
	return 1;
}
