/* connect.bpf.c - connect(2) destinations, and UDP sendto/sendmsg ones.
 *
 * Default: the record comes from the cgroup connect4/6 and sendmsg4/6 hooks
 * below, which run only for tasks of the watched cgroups, so the training job
 * pays nothing. They also see connects that never call connect(2): io_uring,
 * TCP Fast Open sendto. They run before the connect completes: the record
 * says "attempted", or refused (-EPERM) when the in-kernel deny (deny.bpf.c)
 * refused it. AF_UNIX connects are not seen on this path.
 *
 * With AP_SYSCALL_PROBES: sys_enter/exit_connect, with the raw sockaddr (also
 * AF_UNIX) and the result (-EINPROGRESS for a non-blocking connect), at the
 * cost of putting every syscall of every task on the slow path. The hooks
 * then only remember owners and deny.
 */

BPF_TABLE("lru_hash", struct ap_conn_key, struct ap_conn_count, conn_repeats, AP_MAX_CONN_KEYS);
BPF_TABLE("lru_hash", u32, struct ap_conn_sweep, conn_sweeps, AP_MAX_SWEEP_PIDS);
BPF_HASH(conn_always_ports, u16, u8, AP_MAX_ALWAYS_PORTS); /* host byte order: never counted as part of a sweep */

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
	if (now - s->window_ns >= AP_RATE_WINDOW_NS) {
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
	__builtin_memcpy(s->addr, k->addr, sizeof(s->addr));
	__sync_fetch_and_add(&s->count, 1);
	return 1;
}

/* The key of a destination (family a constant: see ap_ctx_addr). */
static __always_inline void ap_conn_key(struct ap_conn_key *k, struct bpf_sock_addr *ctx, u16 family,
					int allowed, u32 flags)
{
	u32 addr[4] = {};
	ap_ctx_addr(ctx, family, addr);
	k->pid = bpf_get_current_pid_tgid() >> 32;
	k->family = ctx->user_family;
	u16 port = (u16)ctx->user_port; /* network order */
	__builtin_memcpy(&k->port, &port, 2);
	__builtin_memcpy(k->addr, addr, sizeof(k->addr));
	k->sock_type = ctx->type;
	k->kind = (allowed ? 0 : AP_CONN_KIND_DENIED) | ((flags & AP_CONNECT_SENDMSG) ? AP_CONN_KIND_SENDMSG : 0);
}

/* The fast path of a repeated connect: an allowed connect to this destination
 * was recorded less than a window ago under the same deny configuration, so
 * its verdict holds. Counted, and nothing else to look up: 1. Otherwise 0, and
 * the connect takes the whole path (deny check, record or count). */
static __always_inline int ap_connect_allowed_repeat(struct bpf_sock_addr *ctx, u16 family, u32 flags, u32 conf)
{
	struct ap_conn_key k = {};
	ap_conn_key(&k, ctx, family, 1, flags);
	struct ap_conn_count *c = conn_repeats.lookup(&k);
	if (!c || c->deny_conf != conf)
		return 0;
	u64 now = bpf_ktime_get_ns();
	if (now - c->first_ns >= AP_CONN_WINDOW_NS)
		return 0;
	__sync_fetch_and_add(&c->count, 1);
	c->last_ns = now;
	return 1;
}

/* The sockaddr the process passed, rebuilt from the hook's context. */
static __always_inline struct ap_connect_event *ap_connect_begin(struct bpf_sock_addr *ctx, u16 family,
								  const u8 *addr, int allowed, u32 flags)
{
	struct ap_connect_event *e = ap_scratch();
	if (!e)
		return 0;
	ap_fill_header(&e->h, AP_EV_CONNECT);
	e->retval = allowed ? 0 : -AP_EPERM;
	e->fd = -1;
	e->flags = AP_CONNECT_AT_HOOK | flags;
	e->sock_type = ctx->type;
	e->_pad = 0;
	e->cookie = bpf_get_socket_cookie(ctx); /* user space learns the socket's owner from it */
	__builtin_memset(e->addr, 0, sizeof(e->addr));
	u16 sa_family = ctx->user_family;
	u16 port = (u16)ctx->user_port; /* network order */
	e->family = sa_family;
	__builtin_memcpy(&e->addr[0], &sa_family, 2);
	__builtin_memcpy(&e->addr[2], &port, 2);
	if (family == AP_AF_INET) {
		__builtin_memcpy(&e->addr[AP_SIN_ADDR_OFF], addr, 4);
		e->addrlen = AP_SOCKADDR_IN_LEN;
	} else {
		__builtin_memcpy(&e->addr[AP_SIN6_ADDR_OFF], addr, 16);
		e->addrlen = AP_SOCKADDR_IN6_LEN;
	}
	return e;
}

/* A connect record, unless it repeats a recent one or sweeps past the budget. */
static __always_inline void ap_connect_record(struct bpf_sock_addr *ctx, u16 family, int allowed, u32 flags,
					      u32 conf)
{
	struct ap_conn_key k = {};
	ap_conn_key(&k, ctx, family, allowed, flags);
	u64 now = bpf_ktime_get_ns();
	if (ap_connect_repeat(&k, now, conf) || ap_connect_swept(&k, now))
		return;
	ap_connect_window(&k, now, conf);
	struct ap_connect_event *e = ap_connect_begin(ctx, family, k.addr, allowed, flags);
	if (e)
		ap_submit(ctx, e, sizeof(*e), AP_EV_CONNECT);
}

/* ---- the cgroup connect and UDP sendmsg hooks ---- */
#ifdef AP_SYSCALL_PROBES
#define AP_HOOK_RECORDS_CONNECTS 0 /* sys_exit_connect records them, with the result */
#else
#define AP_HOOK_RECORDS_CONNECTS 1
#endif

/* A destination an agent socket is about to use (family a constant): its
 * owner remembered, the in-kernel deny asked, the connect recorded or counted,
 * then the refusal reported (the rules act on the connect record, read
 * first). 1 lets it go on; 0 refuses it with EPERM. */
static __always_inline int ap_destination(struct bpf_sock_addr *ctx, u16 family, u32 flags)
{
	ap_remember_owner(ctx);
	u32 conf = ap_deny_conf();
	int record = AP_HOOK_RECORDS_CONNECTS || (flags & AP_CONNECT_SENDMSG);
	if (record && ap_connect_allowed_repeat(ctx, family, flags, conf))
		return 1;
	u32 deny = ap_connect_deny(ctx, family, conf);
	if (record)
		ap_connect_record(ctx, family, !deny, flags, conf);
	if (deny)
		ap_connect_report_deny(ctx, family, deny);
	return !deny;
}

int ap_connect4(struct bpf_sock_addr *ctx)
{
	return ap_destination(ctx, AP_AF_INET, 0);
}

int ap_connect6(struct bpf_sock_addr *ctx)
{
	return ap_destination(ctx, AP_AF_INET6, 0);
}

/* UDP sends with a destination (sendto/sendmsg without connect) */
int ap_sendmsg4(struct bpf_sock_addr *ctx)
{
	return ap_destination(ctx, AP_AF_INET, AP_CONNECT_SENDMSG);
}

int ap_sendmsg6(struct bpf_sock_addr *ctx)
{
	return ap_destination(ctx, AP_AF_INET6, AP_CONNECT_SENDMSG);
}

#ifdef AP_SYSCALL_PROBES

_Static_assert(AP_SOCKADDR_LEN < 128, "the size mask in sys_enter_connect assumes < 128");

BPF_HASH(connect_pending, u32, struct ap_connect_event, AP_MAX_PENDING);

/* The type (SOCK_*) of the socket behind descriptor fd, or 0. */
static __always_inline u16 ap_fd_sock_type(int fd)
{
	void *file = ap_fd_file(fd);
	void *sock = file ? (void *)ap_read_ptr(file, AP_OFF_FILE_PRIVATE_DATA) : 0;
	u16 type = 0;
	if (sock)
		bpf_probe_read_kernel(&type, sizeof(type), (char *)sock + AP_OFF_SOCKET_TYPE);
	return type;
}

TRACEPOINT_PROBE(syscalls, sys_enter_connect)
{
	if (!ap_in_scope())
		return 0;
	struct ap_connect_event *e = ap_scratch();
	if (!e)
		return 0;
	ap_fill_header(&e->h, AP_EV_CONNECT);
	e->retval = 0;
	e->fd = args->fd;
	e->flags = 0;
	e->addrlen = args->addrlen;
	e->family = 0;
	e->cookie = 0;
	__builtin_memset(e->addr, 0, sizeof(e->addr));

	u32 len = args->addrlen;
	if (len > sizeof(e->addr))
		len = sizeof(e->addr);
	/* the verifier wants the size bounded on the register itself */
	if (len < 2 || bpf_probe_read_user(e->addr, len & 0x7f, args->uservaddr) != 0)
		e->flags |= AP_CONNECT_ADDR_FAULT;
	else
		e->family = *(u16 *)e->addr;
	e->sock_type = ap_fd_sock_type(args->fd);

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
