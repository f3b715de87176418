/* deny.bpf.c - refuse agent connections to mining pools and configured bad
 * destinations in the kernel, before a packet leaves.
 *
 * Called from the cgroup connect hooks (payload.bpf.c), so only agent
 * processes ever reach it. User space fills the maps from the rule lists
 * (mining_pool_ports, allowed_networks, mining_pool_hosts) and switches it on
 * with deny_conf[0] = 1; the rules then see the refused connect and freeze.
 */

BPF_ARRAY(deny_conf, u32, 1);
BPF_HASH(deny_ports, u16, u8, 1024);
BPF_LPM_TRIE(allow4, struct ap_lpm_v4, u8, 1024);
BPF_LPM_TRIE(allow6, struct ap_lpm_v6, u8, 1024);
BPF_LPM_TRIE(deny4, struct ap_lpm_v4, u8, 1024);
BPF_LPM_TRIE(deny6, struct ap_lpm_v6, u8, 1024);

/* deny_conf[0]: bit 0 on; bits 1 and 2: deny4 and deny6 hold entries (a trie
 * lookup is the dearest step of a connect here: skipped when there is nothing
 * to find); bits 8-31: a generation user space bumps at each change, so that a
 * verdict remembered with a destination (conn_repeats) is known to be current */
#define AP_DENY_ON 1
#define AP_DENY_HOSTS4 2
#define AP_DENY_HOSTS6 4

static __always_inline u32 ap_deny_conf(void)
{
	u32 zero = 0;
	u32 *conf = deny_conf.lookup(&zero);
	return conf ? *conf : 0;
}

static __always_inline u32 ap_deny_v4(u32 conf, u32 ip_be, u16 port)
{
	struct ap_lpm_v4 key = {.prefixlen = 32};
	__builtin_memcpy(key.addr, &ip_be, 4);
	if ((conf & AP_DENY_HOSTS4) && deny4.lookup(&key))
		return AP_DENY_HOST;
	if (deny_ports.lookup(&port) && !allow4.lookup(&key))
		return AP_DENY_PORT;
	return 0;
}

static __always_inline u32 ap_deny_v6(u32 conf, const u32 *ip6_be, u16 port)
{
	struct ap_lpm_v6 key = {.prefixlen = 128};
	__builtin_memcpy(key.addr, ip6_be, 16);
	if ((conf & AP_DENY_HOSTS6) && deny6.lookup(&key))
		return AP_DENY_HOST;
	if (deny_ports.lookup(&port) && !allow6.lookup(&key))
		return AP_DENY_PORT;
	return 0;
}

static __always_inline void ap_report_deny(void *ctx, u16 family, u16 port, u32 reason, const void *addr, u32 len)
{
	u32 zero = 0;
	struct ap_deny_event *e = (struct ap_deny_event *)scratch.lookup(&zero);
	if (!e)
		return;
	__builtin_memset(e, 0, sizeof(*e));
	u64 pid_tgid = bpf_get_current_pid_tgid();
	u64 uid_gid = bpf_get_current_uid_gid();
	e->h.type = AP_EV_DENY;
	e->h.pid = pid_tgid >> 32;
	e->h.tid = (u32)pid_tgid;
	e->h.uid = (u32)uid_gid;
	e->h.gid = uid_gid >> 32;
	e->h.ktime_ns = bpf_ktime_get_ns();
	e->h.cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(&e->h.comm, sizeof(e->h.comm));
	e->family = family;
	e->port = port;
	e->reason = reason;
	if (len == 4)
		__builtin_memcpy(e->addr, addr, 4);
	else
		__builtin_memcpy(e->addr, addr, 16);
	ap_submit(ctx, e, sizeof(*e), AP_EV_DENY);
}

/* Why to refuse this connect (AP_DENY_*), or 0 to let it go on. The hooks
 * write the connect record first and the deny record after it (ap_connect4/6_
 * report): the rules act on the connect record, read first. */
static __always_inline u32 ap_connect4_deny(struct bpf_sock_addr *ctx, u32 conf)
{
	if (!(conf & AP_DENY_ON))
		return 0;
	return ap_deny_v4(conf, ctx->user_ip4, bpf_ntohs((u16)ctx->user_port));
}

static __always_inline void ap_connect4_report(struct bpf_sock_addr *ctx, u32 reason)
{
	u32 ip = ctx->user_ip4;
	ap_report_deny(ctx, 2, bpf_ntohs((u16)ctx->user_port), reason, &ip, 4);
}

static __always_inline int ap_v4mapped(const u32 *ip6)
{
	return ip6[0] == 0 && ip6[1] == 0 && ip6[2] == bpf_htonl(0xffff);
}

static __always_inline u32 ap_connect6_deny(struct bpf_sock_addr *ctx, u32 conf)
{
	if (!(conf & AP_DENY_ON))
		return 0;
	u32 ip6[4];
	ap_ctx_ip6(ctx, ip6);
	u16 port = bpf_ntohs((u16)ctx->user_port);
	if (ap_v4mapped(ip6))
		return ap_deny_v4(conf, ip6[3], port);
	return ap_deny_v6(conf, ip6, port);
}

static __always_inline void ap_connect6_report(struct bpf_sock_addr *ctx, u32 reason)
{
	u32 ip6[4];
	ap_ctx_ip6(ctx, ip6);
	u16 port = bpf_ntohs((u16)ctx->user_port);
	if (ap_v4mapped(ip6))
		ap_report_deny(ctx, 2, port, reason, &ip6[3], 4); /* IPv4-mapped */
	else
		ap_report_deny(ctx, 10, port, reason, ip6, 16);
}
