/* inet.bpf.h - IPv4 and IPv6 addresses as the cgroup hooks and tracepoints
 * see them: one helper per question, shared by both families. */
#ifndef AGENTPROBE_INET_BPF_H
#define AGENTPROBE_INET_BPF_H

/* The address of a sock_addr hook (destination or bound) into addr, network
 * byte order: one word for AF_INET, four for AF_INET6. family must be a
 * constant at the call: a connect4 program may not touch user_ip6 (nor a
 * connect6 one user_ip4), and inlining drops the other family's branch. */
static __always_inline void ap_ctx_addr(struct bpf_sock_addr *ctx, u16 family, u32 *addr)
{
	if (family == AP_AF_INET) {
		addr[0] = ctx->user_ip4;
		return;
	}
	addr[0] = ctx->user_ip6[0];
	addr[1] = ctx->user_ip6[1];
	addr[2] = ctx->user_ip6[2];
	addr[3] = ctx->user_ip6[3];
}

/* The port of a sock_addr hook, host byte order. */
static __always_inline u16 ap_ctx_port(struct bpf_sock_addr *ctx)
{
	return bpf_ntohs((u16)ctx->user_port);
}

/* ::ffff:a.b.c.d, an IPv4 address written as IPv6 (a.b.c.d in ip6[3]) */
static __always_inline int ap_ip6_v4mapped(const u32 *ip6)
{
	return ip6[0] == 0 && ip6[1] == 0 && ip6[2] == bpf_htonl(AP_IPV6_V4MAPPED_WORD);
}

static __always_inline int ap_ip4_loopback(u32 ip_be)
{
	return (bpf_ntohl(ip_be) >> 24) == AP_IPV4_LOOPBACK_NET;
}

/* ::1, or 127.0.0.0/8 IPv4-mapped */
static __always_inline int ap_ip6_loopback(const u32 *ip6)
{
	if ((ip6[0] | ip6[1] | ip6[2]) == 0 && ip6[3] == bpf_htonl(1))
		return 1;
	return ap_ip6_v4mapped(ip6) && ap_ip4_loopback(ip6[3]);
}

/* addr: one word for AF_INET, four for AF_INET6 */
static __always_inline int ap_addr_loopback(u16 family, const u32 *addr)
{
	return family == AP_AF_INET ? ap_ip4_loopback(addr[0]) : ap_ip6_loopback(addr);
}

#endif /* AGENTPROBE_INET_BPF_H */
