/* sock.bpf.c - agent sockets beyond connect: who owns a socket, raw and ICMP
 * socket creation, binds to and listens on non-loopback addresses, and
 * sampled ICMP and DNS packets (the egress hook, payload.bpf.c, hands them
 * here).
 *
 * All of it but the listen tracepoint runs in cgroup hooks attached to the
 * watched cgroups (processes outside never run it). Every hook returns 1: it
 * observes.
 */

_Static_assert(AP_PACKET_LEN == 128, "the length mask in ap_packet_record assumes 128");

/* who owns a socket, by cookie: the egress hook has no task */
BPF_TABLE("lru_hash", u64, struct ap_sock_owner, sock_owner, AP_MAX_SOCK_OWNERS);
BPF_TABLE("lru_hash", struct ap_flow_key, struct ap_flow_count, flow_counts, AP_MAX_FLOWS);

struct ap_budget {
	u64 window_ns;
	u32 used;
	u32 _pad;
};
/* sampled packets per process in the current second */
BPF_TABLE("lru_hash", u32, struct ap_budget, packet_budget, AP_MAX_BUDGET_PIDS);

static __always_inline void ap_owner_now(u64 cookie)
{
	u64 pid_tgid = bpf_get_current_pid_tgid();
	u64 uid_gid = bpf_get_current_uid_gid();
	struct ap_sock_owner o = {};
	o.pid = pid_tgid >> 32;
	o.tid = (u32)pid_tgid;
	o.uid = (u32)uid_gid;
	o.gid = uid_gid >> 32;
	o.cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(&o.comm, sizeof(o.comm));
	sock_owner.update(&cookie, &o);
}

/* The header of a record written from the egress hook, where there is no
 * task: the socket's owner as the hooks with a task saw it (pid 0: unknown). */
static __always_inline void ap_skb_header(struct ap_header *h, u32 type, u64 now, struct __sk_buff *skb,
					  const struct ap_sock_owner *o)
{
	h->type = type;
	h->ktime_ns = now;
	h->cgroup_id = bpf_skb_cgroup_id(skb);
	if (o) {
		h->pid = o->pid;
		h->tid = o->tid;
		h->uid = o->uid;
		h->gid = o->gid;
		__builtin_memcpy(h->comm, o->comm, sizeof(h->comm));
	} else {
		h->uid = bpf_get_socket_uid(skb);
	}
}

/* A TCP socket's owner: with the ring buffer, the connect record (written in
 * order before any packet of the socket) carries the socket cookie and user
 * space keeps the owner, so a connect costs no map insert (the most costly
 * thing it did, ~0.4 µs). From the syscall tracepoints (no cookie in the
 * record) or through the perf buffer (no order across CPUs) the kernel
 * remembers it, and always for other sockets: the egress hook keys its UDP and
 * ICMP packet counts by owner. */
static __always_inline int ap_remember_owner(struct bpf_sock_addr *ctx)
{
#if defined(AP_SYSCALL_PROBES) || !defined(AP_USE_RINGBUF)
	ap_owner_now(bpf_get_socket_cookie(ctx));
#else
	if (ctx->type != AP_SOCK_STREAM)
		ap_owner_now(bpf_get_socket_cookie(ctx));
#endif
	return 1;
}

/* ---- socket creation: raw sockets and ICMP "ping" sockets ---- */
int ap_sock_create(struct bpf_sock *sk)
{
	u32 type = sk->type;
	u32 proto = sk->protocol;
	if (type != AP_SOCK_RAW &&
	    !(type == AP_SOCK_DGRAM && (proto == AP_IPPROTO_ICMP || proto == AP_IPPROTO_ICMPV6)))
		return 1;
	u64 cookie = bpf_get_socket_cookie(sk);
	ap_owner_now(cookie);
	struct ap_socket_event *e = ap_scratch();
	if (!e)
		return 1;
	ap_fill_header(&e->h, AP_EV_SOCKET);
	e->cookie = cookie;
	e->family = sk->family;
	e->type = type;
	e->protocol = proto;
	e->_pad = 0;
	ap_submit(sk, e, sizeof(*e), AP_EV_SOCKET);
	return 1;
}

/* ---- binds to addresses other than loopback ---- */
/* A bind or listen record of the current task; addr: one word for AF_INET, four for AF_INET6. */
static __always_inline void ap_bind_record(void *ctx, u32 type, u16 family, u16 port, u16 sock_type,
					   u16 protocol, const u32 *addr)
{
	struct ap_bind_event *e = ap_scratch();
	if (!e)
		return;
	ap_fill_header(&e->h, type);
	e->family = family;
	e->port = port;
	e->type = sock_type;
	e->protocol = protocol;
	__builtin_memset(e->addr, 0, sizeof(e->addr));
	if (family == AP_AF_INET)
		__builtin_memcpy(e->addr, addr, 4);
	else
		__builtin_memcpy(e->addr, addr, 16);
	ap_submit(ctx, e, sizeof(*e), type);
}

/* family a constant: see ap_ctx_addr */
static __always_inline int ap_bind(struct bpf_sock_addr *ctx, u16 family)
{
	u32 addr[4] = {};
	ap_ctx_addr(ctx, family, addr);
	if (!ap_addr_loopback(family, addr))
		ap_bind_record(ctx, AP_EV_BIND, family, ap_ctx_port(ctx), ctx->type, ctx->protocol, addr);
	return 1;
}

int ap_bind4(struct bpf_sock_addr *ctx)
{
	return ap_bind(ctx, AP_AF_INET);
}

int ap_bind6(struct bpf_sock_addr *ctx)
{
	return ap_bind(ctx, AP_AF_INET6);
}

/* ---- listen() on an address other than loopback ----
 * Not a syscall tracepoint: it fires on TCP state changes only, and returns at
 * once unless the new state is TCP_LISTEN, which listen() sets in the caller's
 * context (so the cgroup check applies). It catches what the bind hook cannot
 * call a listener: bind to port 0 then listen, and listen without bind (the
 * kernel picks the port after this tracepoint: port 0 in the record). */
TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
	if (args->newstate != AP_TCP_LISTEN || !ap_in_scope())
		return 0;
	u16 family = args->family;
	u32 addr[4] = {};
	if (family == AP_AF_INET)
		__builtin_memcpy(addr, args->saddr, 4);
	else
		__builtin_memcpy(addr, args->saddr_v6, 16);
	if (!ap_addr_loopback(family, addr))
		ap_bind_record(args, AP_EV_LISTEN, family, args->sport, AP_SOCK_STREAM, args->protocol, addr);
	return 0;
}

/* ---- ICMP packets and DNS queries: counted, and sampled ---- */
static __always_inline int ap_packet_budget(u32 pid, u64 now)
{
	struct ap_budget *b = packet_budget.lookup(&pid);
	if (!b || now - b->window_ns >= AP_RATE_WINDOW_NS) {
		struct ap_budget fresh = {.window_ns = now, .used = 1};
		packet_budget.update(&pid, &fresh);
		return 1;
	}
	if (b->used >= AP_PACKETS_PER_SEC)
		return 0;
	__sync_fetch_and_add(&b->used, 1);
	return 1;
}

/* One more packet of a flow, of len payload bytes; sampled: it becomes a record. */
static __always_inline void ap_flow_count(struct ap_flow_key *k, u64 now, u32 len, int sampled)
{
	struct ap_flow_count *c = flow_counts.lookup(k);
	if (!c) {
		struct ap_flow_count init = {.packets = 1, .bytes = len, .first_ns = now, .last_ns = now,
					     .max_len = len, .sampled = sampled ? 1 : 0};
		flow_counts.update(k, &init);
		return;
	}
	__sync_fetch_and_add(&c->packets, 1);
	__sync_fetch_and_add(&c->bytes, len);
	if (len > c->max_len)
		c->max_len = len;
	if (sampled)
		__sync_fetch_and_add(&c->sampled, 1);
	c->last_ns = now;
}

/* The sampled packet's record, with its first AP_PACKET_LEN payload bytes. */
static __always_inline void ap_packet_record(struct __sk_buff *skb, const struct ap_flow_key *k, u16 family,
					     u8 icmp_type, u32 len, u32 payload_off, u64 now, u64 cookie,
					     const struct ap_sock_owner *o)
{
	struct ap_packet_event *e = ap_scratch();
	if (!e)
		return;
	__builtin_memset(e, 0, sizeof(*e));
	ap_skb_header(&e->h, AP_EV_PACKET, now, skb, o);
	e->cookie = cookie;
	e->family = family;
	e->protocol = k->protocol;
	e->icmp_type = icmp_type;
	e->dport = k->dport;
	e->len = len;
	__builtin_memcpy(e->daddr, k->daddr, 16);
	if (len >= AP_PACKET_LEN) {
		if (bpf_skb_load_bytes(skb, payload_off, e->data, AP_PACKET_LEN) == 0)
			e->captured = AP_PACKET_LEN;
	} else if (len > 0) {
		u64 n = len - 1; /* bounded on the register itself, minimum 1: see ap_payload_record */
		asm volatile("%[n] &= 127" : [n] "+r"(n));
		n += 1;
		if (bpf_skb_load_bytes(skb, payload_off, e->data, n) == 0)
			e->captured = n;
	}
	ap_submit(skb, e, sizeof(*e), AP_EV_PACKET);
}

/* daddr: 4 or 16 bytes by family; payload_off: first byte after the ICMP/UDP header */
static __always_inline void ap_packet_sample(struct __sk_buff *skb, u16 family, u8 proto, u8 icmp_type,
					     u16 dport, const u8 *daddr, u32 payload_off)
{
	u32 len = skb->len > payload_off ? skb->len - payload_off : 0;
	u64 now = bpf_ktime_get_ns();
	u64 cookie = bpf_get_socket_cookie(skb);
	struct ap_sock_owner *o = sock_owner.lookup(&cookie);

	struct ap_flow_key k = {};
	k.pid = o ? o->pid : 0;
	k.protocol = proto;
	k.v6 = family == AP_AF_INET6;
	k.dport = dport;
	if (family == AP_AF_INET)
		__builtin_memcpy(k.daddr, daddr, 4);
	else
		__builtin_memcpy(k.daddr, daddr, 16);
	int sampled = ap_packet_budget(k.pid, now);
	ap_flow_count(&k, now, len, sampled);
	if (sampled)
		ap_packet_record(skb, &k, family, icmp_type, len, payload_off, now, cookie, o);
}
