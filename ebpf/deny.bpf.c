/* deny.bpf.c - refuse agent connections to mining pools and configured bad
 * destinations in the kernel, before a packet leaves.
 *
 * Asked by the cgroup connect and sendmsg hooks (connect.bpf.c), so only
 * agent processes ever reach it. User space fills the maps from the rule lists
 * (mining_pool_ports, allowed_networks, mining_pool_hosts) and switches it on
 * in deny_conf[0] (AP_DENY_CONF_*, agentprobe.h); the rules then see the
 * refused connect and freeze.
 */

BPF_ARRAY(deny_conf, u32, 1);
BPF_HASH(deny_ports, u16, u8, AP_MAX_DENY_PORTS);
BPF_LPM_TRIE(allow4, struct ap_lpm_v4, u8, AP_MAX_DENY_NETS);
BPF_LPM_TRIE(allow6, struct ap_lpm_v6, u8, AP_MAX_DENY_NETS);
BPF_LPM_TRIE(deny4, struct ap_lpm_v4, u8, AP_MAX_DENY_NETS);
BPF_LPM_TRIE(deny6, struct ap_lpm_v6, u8, AP_MAX_DENY_NETS);

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
	if ((conf & AP_DENY_CONF_HOSTS4) && deny4.lookup(&key))
		return AP_DENY_HOST;
	if (deny_ports.lookup(&port) && !allow4.lookup(&key))
		return AP_DENY_PORT;
	return 0;
}

static __always_inline u32 ap_deny_v6(u32 conf, const u32 *ip6_be, u16 port)
{
	struct ap_lpm_v6 key = {.prefixlen = 128};
	__builtin_memcpy(key.addr, ip6_be, 16);
	if ((conf & AP_DENY_CONF_HOSTS6) && deny6.lookup(&key))
		return AP_DENY_HOST;
	if (deny_ports.lookup(&port) && !allow6.lookup(&key))
		return AP_DENY_PORT;
	return 0;
}

/* Why to refuse this connect (AP_DENY_*), or 0 to let it go on (family a
 * constant: see ap_ctx_addr). IPv4-mapped destinations are IPv4 ones. */
static __always_inline u32 ap_connect_deny(struct bpf_sock_addr *ctx, u16 family, u32 conf)
{
	if (!(conf & AP_DENY_CONF_ON))
		return 0;
	u32 addr[4] = {};
	ap_ctx_addr(ctx, family, addr);
	u16 port = ap_ctx_port(ctx);
	if (family == AP_AF_INET)
		return ap_deny_v4(conf, addr[0], port);
	if (ap_ip6_v4mapped(addr))
		return ap_deny_v4(conf, addr[3], port);
	return ap_deny_v6(conf, addr, port);
}

/* addr: 4 bytes for AF_INET, 16 for AF_INET6 */
static __always_inline void ap_report_deny(void *ctx, u16 family, u16 port, u32 reason, const void *addr)
{
	struct ap_deny_event *e = ap_scratch();
	if (!e)
		return;
	__builtin_memset(e, 0, sizeof(*e));
	ap_fill_task_header(&e->h, AP_EV_DENY);
	e->family = family;
	e->port = port;
	e->reason = reason;
	if (family == AP_AF_INET)
		__builtin_memcpy(e->addr, addr, 4);
	else
		__builtin_memcpy(e->addr, addr, 16);
	ap_submit(ctx, e, sizeof(*e), AP_EV_DENY);
}

/* The deny record, written after the connect record (ap_destination). */
static __always_inline void ap_connect_report_deny(struct bpf_sock_addr *ctx, u16 family, u32 reason)
{
	u32 addr[4] = {};
	ap_ctx_addr(ctx, family, addr);
	u16 port = ap_ctx_port(ctx);
	if (family == AP_AF_INET)
		ap_report_deny(ctx, AP_AF_INET, port, reason, &addr[0]);
	else if (ap_ip6_v4mapped(addr))
		ap_report_deny(ctx, AP_AF_INET, port, reason, &addr[3]); /* reported as AF_INET */
	else
		ap_report_deny(ctx, AP_AF_INET6, port, reason, addr);
}
