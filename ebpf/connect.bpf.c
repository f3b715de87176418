/* connect.bpf.c - connect(2) destinations, and UDP sendto/sendmsg ones.
 *
 * Default: the record comes from the cgroup connect4/6 hooks (payload.bpf.c
 * calls ap_connect4/6_record), which run only for tasks of the watched cgroups,
 * so the training job pays nothing. They also see connects that never call
 * connect(2): io_uring, TCP Fast Open sendto. They run before the connect
 * completes: the record says "attempted", or refused (-EPERM) when the
 * in-kernel deny refused it. AF_UNIX connects are not seen on this path.
 *
 * With AP_SYSCALL_PROBES: sys_enter/exit_connect, with the raw sockaddr (also
 * AF_UNIX) and the result (-EINPROGRESS for a non-blocking connect), at the
 * cost of putting every syscall of every task on the slow path.
 */

#ifndef AP_CONN_WINDOW_NS
#define AP_CONN_WINDOW_NS 1000000000ULL
#endif
#ifndef AP_MAX_CONN_KEYS
#define AP_MAX_CONN_KEYS 65536
#endif
BPF_TABLE("lru_hash", struct ap_conn_key, struct ap_conn_count, conn_repeats, AP_MAX_CONN_KEYS);

BPF_TABLE("lru_hash", u32, struct ap_conn_sweep, conn_sweeps, 16384);
BPF_HASH(conn_always_ports, u16, u8, 4096); /* host byte order: never counted as part of a sweep */

/* 1 when this connect repeats one recorded less than a window ago: counted, no
 * record. Decided from the hook's context alone, before any record is built:
 * a connect flood to one destination costs a map lookup per connect. */
static __always_inline int ap_connect_repeat(struct ap_conn_key *k, u64 now, u32 conf)
{
	struct ap_conn_count *c = conn_repeats.lookup(k);
	if (c && now - c->first_ns < AP_CONN_WINDOW_NS) {
		__sync_fetch_and_add(&c->count, 1);
		c->last_ns = now;
		c->deny_conf = conf;
		return 1;
	}
	return 0;
}

/* The window of a destination whose connect is recorded now. */
static __always_inline void ap_connect_window(struct ap_conn_key *k, u64 now, u32 conf)
{
	struct ap_conn_count init = {.count = 0, .first_ns = now, .last_ns = now, .deny_conf = conf};
	struct ap_conn_count *c = conn_repeats.lookup(k);
	if (c) /* a new window: the repeats of the last one stay for user space */
		init.count = c->count;
	conn_repeats.update(k, &init);
}

/* 1 when this connect to a new destination is one too many for the process's
 * record budget in this second (a port or host sweep): counted in conn_sweeps,
 * no record, no per-destination state. Ports the rules name are always
 * recorded. */
static __always_inline int ap_connect_swept(struct ap_conn_key *k, u64 now)
{
	u16 port = bpf_ntohs(k->port);
	if (conn_always_ports.lookup(&port))
		return 0;
	struct ap_conn_sweep *s = conn_sweeps.lookup(&k->pid);
	if (!s) {
		struct ap_conn_sweep init = {.window_ns = now, .recorded = 1, .min_port = 0xffff};
		conn_sweeps.update(&k->pid, &init);
		return 0;
	}
	if (now - s->window_ns >= 1000000000ULL) {
		s->window_ns = now;
		s->recorded = 1;
		return 0;
	}
	if (s->recorded < AP_CONN_RECORDS_PER_SEC) {
		s->recorded++;
		return 0;
	}
	if (!s->first_ns)
		s->first_ns = now;
	s->last_ns = now;
	s->cgroup_id = bpf_get_current_cgroup_id();
	s->family = k->family;
	s->port = port;
	if (port < s->min_port)
		s->min_port = port;
	if (port > s->max_port)
		s->max_port = port;
	__builtin_memcpy(s->addr, k->addr, 16);
	__sync_fetch_and_add(&s->count, 1);
	return 1;
}

static __always_inline void ap_conn_key_begin(struct ap_conn_key *k, struct bpf_sock_addr *ctx, int allowed,
					      u32 flags)
{
	k->pid = bpf_get_current_pid_tgid() >> 32;
	k->family = ctx->user_family;
	u16 port = (u16)ctx->user_port; /* network order */
	__builtin_memcpy(&k->port, &port, 2);
	k->sock_type = ctx->type;
	k->kind = (allowed ? 0 : 1) | ((flags & AP_CONNECT_SENDMSG) ? 2 : 0);
}

/* A connect4 program may not touch user_ip6 (nor connect6 user_ip4): the keys
 * and records are built per family. */
static __always_inline void ap_ctx_ip6(struct bpf_sock_addr *ctx, u32 *ip6)
{
	ip6[0] = ctx->user_ip6[0];
	ip6[1] = ctx->user_ip6[1];
	ip6[2] = ctx->user_ip6[2];
	ip6[3] = ctx->user_ip6[3];
}

static __always_inline void ap_conn_key4(struct ap_conn_key *k, struct bpf_sock_addr *ctx, int allowed, u32 flags)
{
	u32 ip = ctx->user_ip4;
	ap_conn_key_begin(k, ctx, allowed, flags);
	__builtin_memcpy(k->addr, &ip, 4);
}

static __always_inline void ap_conn_key6(struct ap_conn_key *k, struct bpf_sock_addr *ctx, int allowed, u32 flags)
{
	u32 ip6[4];
	ap_ctx_ip6(ctx, ip6);
	ap_conn_key_begin(k, ctx, allowed, flags);
	__builtin_memcpy(k->addr, ip6, 16);
}

/* The sockaddr the process passed, rebuilt from the hook's context (the
 * address is filled in per family by the caller). */
static __always_inline struct ap_connect_event *ap_connect_begin(struct bpf_sock_addr *ctx, int allowed,
								  u32 flags)
{
	u32 zero = 0;
	struct ap_connect_event *e = (struct ap_connect_event *)scratch.lookup(&zero);
	if (!e)
		return 0;
	ap_fill_header(&e->h, AP_EV_CONNECT);
	e->retval = allowed ? 0 : -1; /* -EPERM */
	e->fd = -1;
	e->flags = AP_CONNECT_AT_HOOK | flags;
	e->sock_type = ctx->type;
	e->_pad = 0;
	e->cookie = bpf_get_socket_cookie(ctx); /* user space learns the socket's owner from it */
	__builtin_memset(e->addr, 0, sizeof(e->addr));
	u16 family = ctx->user_family;
	u16 port = (u16)ctx->user_port; /* network order */
	e->family = family;
	__builtin_memcpy(&e->addr[0], &family, 2);
	__builtin_memcpy(&e->addr[2], &port, 2);
	return e;
}

/* The fast path of a repeated connect: an allowed connect to this destination
 * was recorded less than a window ago under the same deny configuration, so
 * its verdict holds. Counted, and nothing else to look up: 1. Otherwise 0, and
 * the connect takes the whole path (deny check, record or count). */
static __always_inline int ap_connect_allowed_repeat(struct ap_conn_key *k, u32 conf)
{
	struct ap_conn_count *c = conn_repeats.lookup(k);
	if (!c || c->deny_conf != conf)
		return 0;
	u64 now = bpf_ktime_get_ns();
	if (now - c->first_ns >= AP_CONN_WINDOW_NS)
		return 0;
	__sync_fetch_and_add(&c->count, 1);
	c->last_ns = now;
	return 1;
}

static __always_inline int ap_connect4_allowed_repeat(struct bpf_sock_addr *ctx, u32 flags, u32 conf)
{
	struct ap_conn_key k = {};
	ap_conn_key4(&k, ctx, 1, flags);
	return ap_connect_allowed_repeat(&k, conf);
}

static __always_inline int ap_connect6_allowed_repeat(struct bpf_sock_addr *ctx, u32 flags, u32 conf)
{
	struct ap_conn_key k = {};
	ap_conn_key6(&k, ctx, 1, flags);
	return ap_connect_allowed_repeat(&k, conf);
}

static __always_inline void ap_connect4_record(struct bpf_sock_addr *ctx, int allowed, u32 flags, u32 conf)
{
	struct ap_conn_key k = {};
	ap_conn_key4(&k, ctx, allowed, flags);
	u64 now = bpf_ktime_get_ns();
	if (ap_connect_repeat(&k, now, conf) || ap_connect_swept(&k, now))
		return;
	ap_connect_window(&k, now, conf);
	struct ap_connect_event *e = ap_connect_begin(ctx, allowed, flags);
	if (!e)
		return;
	__builtin_memcpy(&e->addr[4], k.addr, 4);
	e->addrlen = 16;
	ap_submit(ctx, e, sizeof(*e), AP_EV_CONNECT);
}

static __always_inline void ap_connect6_record(struct bpf_sock_addr *ctx, int allowed, u32 flags, u32 conf)
{
	struct ap_conn_key k = {};
	ap_conn_key6(&k, ctx, allowed, flags);
	u64 now = bpf_ktime_get_ns();
	if (ap_connect_repeat(&k, now, conf) || ap_connect_swept(&k, now))
		return;
	ap_connect_window(&k, now, conf);
	struct ap_connect_event *e = ap_connect_begin(ctx, allowed, flags);
	if (!e)
		return;
	__builtin_memcpy(&e->addr[8], k.addr, 16);
	e->addrlen = 28;
	ap_submit(ctx, e, sizeof(*e), AP_EV_CONNECT);
}

#ifdef AP_SYSCALL_PROBES

BPF_HASH(connect_pending, u32, struct ap_connect_event, AP_MAX_PENDING);

TRACEPOINT_PROBE(syscalls, sys_enter_connect)
{
	if (!ap_in_scope())
		return 0;
	u32 zero = 0;
	struct ap_connect_event *e = (struct ap_connect_event *)scratch.lookup(&zero);
	if (!e)
		return 0;
	ap_fill_header(&e->h, AP_EV_CONNECT);
	e->retval = 0;
	e->fd = args->fd;
	e->flags = 0;
	e->addrlen = args->addrlen;
	e->sock_type = 0;
	e->family = 0;
	e->cookie = 0;
	__builtin_memset(e->addr, 0, sizeof(e->addr));

	u32 len = args->addrlen;
	if (len > sizeof(e->addr))
		len = sizeof(e->addr);
	if (len < 2 || bpf_probe_read_user(e->addr, len & 0x7f, args->uservaddr) != 0)
		e->flags |= AP_CONNECT_ADDR_FAULT;
	else
		e->family = *(u16 *)e->addr;

	void *file = ap_fd_file(args->fd);
	if (file) {
		void *sock = (void *)ap_read_ptr(file, AP_OFF_FILE_PRIVATE_DATA);
		if (sock) {
			u16 type = 0;
			bpf_probe_read_kernel(&type, sizeof(type),
					      (char *)sock + AP_OFF_SOCKET_TYPE);
			e->sock_type = type;
		}
	}
	u32 tid = e->h.tid;
	if (connect_pending.update(&tid, e) != 0)
		ap_count_lost(AP_EV_CONNECT);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_connect)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	struct ap_connect_event *e = connect_pending.lookup(&tid);
	if (!e)
		return 0;
	e->retval = args->ret;
	ap_submit(args, e, sizeof(*e), AP_EV_CONNECT);
	connect_pending.delete(&tid);
	return 0;
}
#endif /* AP_SYSCALL_PROBES */
