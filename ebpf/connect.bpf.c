/* connect.bpf.c - connect(2) destinations (IPv4, IPv6, AF_UNIX) and results.
 *
 * The raw sockaddr is copied as the process passed it and decoded in user
 * space; the result comes from sys_exit_connect (-EINPROGRESS for a
 * non-blocking connect).
 */

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
