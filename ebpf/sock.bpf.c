/* sock.bpf.c - agent sockets beyond connect: who owns a socket, raw and ICMP
 * socket creation, binds to and listens on non-loopback addresses, UDP sends
 * with a destination, and sampled ICMP and DNS packets.
 *
 * All of it runs in cgroup hooks attached to the watched cgroups (processes
 * outside never run it). Every hook returns 1 unless the in-kernel deny
 * refuses a destination: it observes.
 */

#define AP_SOCK_STREAM 1
#define AP_SOCK_DGRAM 2
#define AP_SOCK_RAW 3
#define AP_IPPROTO_ICMP 1
#define AP_IPPROTO_UDP 17
#define AP_IPPROTO_ICMPV6 58
#define AP_DNS_PORT 53

_Static_assert(AP_PACKET_LEN == 128, "the length mask in ap_packet_sample assumes 128");

/* who owns a socket, by cookie: the egress hook has no task */
BPF_TABLE("lru_hash", u64, struct ap_sock_owner, sock_owner, 65536);
BPF_TABLE("lru_hash", struct ap_flow_key, struct ap_flow_count, flow_counts, 65536);

struct ap_budget {
	u64 window_ns;
	u32 used;
	u32 _pad;
};
/* sampled packets per process in the current second */
BPF_TABLE("lru_hash", u32, struct ap_budget, packet_budget, 16384);

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
	u32 zero = 0;
	struct ap_socket_event *e = (struct ap_socket_event *)scratch.lookup(&zero);
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
static __always_inline void ap_bind_record(struct bpf_sock_addr *ctx, u16 family, const void *addr, u32 len)
{
	u32 zero = 0;
	struct ap_bind_event *e = (struct ap_bind_event *)scratch.lookup(&zero);
	if (!e)
		return;
	ap_fill_header(&e->h, AP_EV_BIND);
	e->family = family;
	e->port = bpf_ntohs((u16)ctx->user_port);
	e->type = ctx->type;
	e->protocol = ctx->protocol;
	__builtin_memset(e->addr, 0, sizeof(e->addr));
	if (len == 4)
		__builtin_memcpy(e->addr, addr, 4);
	else
		__builtin_memcpy(e->addr, addr, 16);
	ap_submit(ctx, e, sizeof(*e), AP_EV_BIND);
}

int ap_bind4(struct bpf_sock_addr *ctx)
{
	u32 ip = ctx->user_ip4;
	if ((bpf_ntohl(ip) >> 24) != 127)
		ap_bind_record(ctx, 2, &ip, 4);
	return 1;
}

int ap_bind6(struct bpf_sock_addr *ctx)
{
	u32 ip6[4];
	ip6[0] = ctx->user_ip6[0];
	ip6[1] = ctx->user_ip6[1];
	ip6[2] = ctx->user_ip6[2];
	ip6[3] = ctx->user_ip6[3];
	int loopback = (ip6[0] | ip6[1] | ip6[2]) == 0 && ip6[3] == bpf_htonl(1);
	int mapped_loopback = ip6[0] == 0 && ip6[1] == 0 && ip6[2] == bpf_htonl(0xffff) &&
			      (bpf_ntohl(ip6[3]) >> 24) == 127;
	if (!loopback && !mapped_loopback)
		ap_bind_record(ctx, 10, ip6, 16);
	return 1;
}

/* ---- listen() on an address other than loopback ----
 * Not a syscall tracepoint: it fires on TCP state changes only, and returns at
 * once unless the new state is TCP_LISTEN, which listen() sets in the caller's
 * context (so the cgroup check applies). It catches what the bind hook cannot
 * call a listener: bind to port 0 then listen, and listen without bind (the
 * kernel picks the port after this tracepoint: port 0 in the record). */
#define AP_TCP_LISTEN 10

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
	if (args->newstate != AP_TCP_LISTEN || !ap_in_scope())
		return 0;
	u32 zero = 0;
	struct ap_bind_event *e = (struct ap_bind_event *)scratch.lookup(&zero);
	if (!e)
		return 0;
	__builtin_memset(e->addr, 0, sizeof(e->addr));
	if (args->family == 2) {
		if (args->saddr[0] == 127)
			return 0;
		__builtin_memcpy(e->addr, args->saddr, 4);
	} else {
		__builtin_memcpy(e->addr, args->saddr_v6, 16);
		u32 w0, w1, w2, w3;
		__builtin_memcpy(&w0, &e->addr[0], 4);
		__builtin_memcpy(&w1, &e->addr[4], 4);
		__builtin_memcpy(&w2, &e->addr[8], 4);
		__builtin_memcpy(&w3, &e->addr[12], 4);
		if ((w0 | w1 | w2) == 0 && w3 == bpf_htonl(1))
			return 0;
		if (w0 == 0 && w1 == 0 && w2 == bpf_htonl(0xffff) && e->addr[12] == 127)
			return 0;
	}
	ap_fill_header(&e->h, AP_EV_LISTEN);
	e->family = args->family;
	e->port = args->sport;
	e->type = AP_SOCK_STREAM;
	e->protocol = args->protocol;
	ap_submit(args, e, sizeof(*e), AP_EV_LISTEN);
	return 0;
}

/* ---- UDP sends with a destination (sendto/sendmsg without connect) ---- */
int ap_sendmsg4(struct bpf_sock_addr *ctx)
{
	ap_remember_owner(ctx);
	u32 conf = ap_deny_conf();
	if (ap_connect4_allowed_repeat(ctx, AP_CONNECT_SENDMSG, conf))
		return 1;
	u32 deny = ap_connect4_deny(ctx, conf);
	ap_connect4_record(ctx, !deny, AP_CONNECT_SENDMSG, conf);
	if (deny)
		ap_connect4_report(ctx, deny);
	return !deny;
}

int ap_sendmsg6(struct bpf_sock_addr *ctx)
{
	ap_remember_owner(ctx);
	u32 conf = ap_deny_conf();
	if (ap_connect6_allowed_repeat(ctx, AP_CONNECT_SENDMSG, conf))
		return 1;
	u32 deny = ap_connect6_deny(ctx, conf);
	ap_connect6_record(ctx, !deny, AP_CONNECT_SENDMSG, conf);
	if (deny)
		ap_connect6_report(ctx, deny);
	return !deny;
}

/* ---- ICMP packets and DNS queries: counted, and sampled ---- */
static __always_inline int ap_packet_budget(u32 pid, u64 now)
{
	struct ap_budget *b = packet_budget.lookup(&pid);
	if (!b || now - b->window_ns >= 1000000000ULL) {
		struct ap_budget fresh = {.window_ns = now, .used = 1};
		packet_budget.update(&pid, &fresh);
		return 1;
	}
	if (b->used >= AP_PACKETS_PER_SEC)
		return 0;
	__sync_fetch_and_add(&b->used, 1);
	return 1;
}

/* daddr: 4 or 16 bytes at hdr[daddr_off]; payload_off: first byte after the ICMP/UDP header */
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
	k.v6 = family == 10;
	k.dport = dport;
	if (family == 2)
		__builtin_memcpy(k.daddr, daddr, 4);
	else
		__builtin_memcpy(k.daddr, daddr, 16);
	int sample = ap_packet_budget(k.pid, now);
	struct ap_flow_count *c = flow_counts.lookup(&k);
	if (c) {
		__sync_fetch_and_add(&c->packets, 1);
		__sync_fetch_and_add(&c->bytes, len);
		if (len > c->max_len)
			c->max_len = len;
		if (sample)
			__sync_fetch_and_add(&c->sampled, 1);
		c->last_ns = now;
	} else {
		struct ap_flow_count init = {.packets = 1, .bytes = len, .first_ns = now, .last_ns = now,
					     .max_len = len, .sampled = sample ? 1 : 0};
		flow_counts.update(&k, &init);
	}
	if (!sample)
		return;

	u32 zero = 0;
	struct ap_packet_event *e = (struct ap_packet_event *)scratch.lookup(&zero);
	if (!e)
		return;
	__builtin_memset(e, 0, sizeof(*e));
	ap_skb_header(&e->h, AP_EV_PACKET, now, skb, o);
	e->cookie = cookie;
	e->family = family;
	e->protocol = proto;
	e->icmp_type = icmp_type;
	e->dport = dport;
	e->len = len;
	__builtin_memcpy(e->daddr, k.daddr, 16);
	if (len >= AP_PACKET_LEN) {
		if (bpf_skb_load_bytes(skb, payload_off, e->data, AP_PACKET_LEN) == 0)
			e->captured = AP_PACKET_LEN;
	} else if (len > 0) {
		u64 n = len - 1; /* bounded on the register itself, minimum 1: see ap_egress */
		asm volatile("%[n] &= 127" : [n] "+r"(n));
		n += 1;
		if (bpf_skb_load_bytes(skb, payload_off, e->data, n) == 0)
			e->captured = n;
	}
	ap_submit(skb, e, sizeof(*e), AP_EV_PACKET);
}
