/* payload.bpf.c - the first bytes every agent socket sends, whatever the port.
 *
 * The cgroup egress hook, attached to the watched cgroups themselves, so
 * processes outside them never run this code. ICMP packets and DNS queries go
 * to ap_packet_sample (sock.bpf.c); of TCP and UDP, the first AP_PAYLOAD_LEN
 * bytes of each socket's first segment or datagram that carries data are
 * reported; after an HTTP CONNECT, the next few segments too (up to
 * AP_AFTER_CONNECT), since there the tunnelled protocol (SSH through a proxy
 * to port 443, stratum) shows. The process comes from the connect hooks (by
 * socket cookie, sock.bpf.c). It returns 1: it observes, never blocks.
 */

_Static_assert(AP_PAYLOAD_LEN == 64, "the length mask in ap_payload_record assumes 64");

/* by socket cookie: 1 = reported; 2.. = a CONNECT was sent, that many - 1 segments still reported */
BPF_TABLE("lru_hash", u64, u8, payload_seen, AP_MAX_PAYLOAD_SOCKS);

/* An outgoing packet's IP header: family, protocol, where the L4 header starts. */
struct ap_ip {
	u8 hdr[AP_IPV6_HDR_LEN];
	u32 l4_off;
	u8 proto;
	u16 family;
};

static __always_inline int ap_ip_parse(struct __sk_buff *skb, struct ap_ip *ip)
{
	if (skb->protocol == bpf_htons(AP_ETH_P_IP)) {
		if (bpf_skb_load_bytes(skb, 0, ip->hdr, AP_IPV4_HDR_LEN) < 0)
			return 0;
		ip->l4_off = (ip->hdr[0] & 0x0f) * 4; /* IHL, in 32-bit words */
		ip->proto = ip->hdr[AP_IPV4_PROTO_OFF];
		ip->family = AP_AF_INET;
		return 1;
	}
	if (skb->protocol == bpf_htons(AP_ETH_P_IPV6)) {
		if (bpf_skb_load_bytes(skb, 0, ip->hdr, AP_IPV6_HDR_LEN) < 0)
			return 0;
		ip->l4_off = AP_IPV6_HDR_LEN;
		ip->proto = ip->hdr[AP_IPV6_NEXTHDR_OFF];
		ip->family = AP_AF_INET6;
		return 1;
	}
	return 0;
}

static __always_inline const u8 *ap_ip_daddr(const struct ap_ip *ip)
{
	return ip->family == AP_AF_INET ? &ip->hdr[AP_IPV4_DADDR_OFF] : &ip->hdr[AP_IPV6_DADDR_OFF];
}

static __always_inline int ap_ip_icmp(const struct ap_ip *ip)
{
	return (ip->proto == AP_IPPROTO_ICMP && ip->family == AP_AF_INET) ||
	       (ip->proto == AP_IPPROTO_ICMPV6 && ip->family == AP_AF_INET6);
}

/* The TCP or UDP header's first bytes into l4 (ports first) and where the
 * payload starts: 1, or 0 for any other protocol. */
static __always_inline int ap_l4_parse(struct __sk_buff *skb, const struct ap_ip *ip, u8 *l4, u32 *payload_off)
{
	if (ip->proto == AP_IPPROTO_TCP) {
		if (bpf_skb_load_bytes(skb, ip->l4_off, l4, AP_TCP_HDR_LEN) < 0)
			return 0;
		*payload_off = ip->l4_off + (l4[AP_TCP_DOFF_OFF] >> 4) * 4;
		return 1;
	}
	if (ip->proto == AP_IPPROTO_UDP) {
		if (bpf_skb_load_bytes(skb, ip->l4_off, l4, AP_UDP_HDR_LEN) < 0)
			return 0;
		*payload_off = ip->l4_off + AP_UDP_HDR_LEN;
		return 1;
	}
	return 0;
}

static __always_inline u16 ap_be16(const u8 *p)
{
	return ((u16)p[0] << 8) | p[1];
}

/* Where this socket stands before this segment (0: nothing reported yet,
 * 1: reported, 2..: segments after a CONNECT), the next state saved. */
static __always_inline u8 ap_payload_turn(u64 cookie)
{
	u8 *seen = payload_seen.lookup(&cookie);
	u8 state = seen ? *seen : 0;
	if (state == 1)
		return 1;
	u8 next = state > 1 ? state - 1 : 1;
	payload_seen.update(&cookie, &next);
	return state;
}

/* first bytes asking a proxy for a tunnel */
static __always_inline int ap_http_connect(const struct ap_payload_event *e)
{
	const u8 *d = e->data;
	return e->captured >= 8 && d[0] == 'C' && d[1] == 'O' && d[2] == 'N' && d[3] == 'N' && d[4] == 'E' &&
	       d[5] == 'C' && d[6] == 'T' && d[7] == ' ';
}

static __always_inline void ap_payload_record(struct __sk_buff *skb, const struct ap_ip *ip, const u8 *l4,
					      u32 payload_off, u64 cookie, u8 state)
{
	struct ap_payload_event *e = ap_scratch();
	if (!e)
		return;
	__builtin_memset(e, 0, sizeof(*e));
	ap_skb_header(&e->h, AP_EV_PAYLOAD, bpf_ktime_get_ns(), skb, sock_owner.lookup(&cookie));
	e->cookie = cookie;
	e->family = ip->family;
	e->protocol = ip->proto;
	e->sport = ap_be16(&l4[AP_L4_SPORT_OFF]);
	e->dport = ap_be16(&l4[AP_L4_DPORT_OFF]);
	if (ip->family == AP_AF_INET) {
		__builtin_memcpy(e->saddr, &ip->hdr[AP_IPV4_SADDR_OFF], 4);
		__builtin_memcpy(e->daddr, &ip->hdr[AP_IPV4_DADDR_OFF], 4);
	} else {
		__builtin_memcpy(e->saddr, &ip->hdr[AP_IPV6_SADDR_OFF], 16);
		__builtin_memcpy(e->daddr, &ip->hdr[AP_IPV6_DADDR_OFF], 16);
	}
	u32 len = skb->len - payload_off;
	e->len = len;
	if (len >= AP_PAYLOAD_LEN) {
		if (bpf_skb_load_bytes(skb, payload_off, e->data, AP_PAYLOAD_LEN) == 0)
			e->captured = AP_PAYLOAD_LEN;
	} else {
		/* 1 <= len < 64 here. The verifier must see that bound on the
		 * length register itself, with a minimum of 1 (older kernels want
		 * a non-zero size): mask in asm, where clang cannot drop it as
		 * redundant, then add the 1 back. */
		u64 n = len - 1;
		asm volatile("%[n] &= 63" : [n] "+r"(n));
		n += 1;
		if (bpf_skb_load_bytes(skb, payload_off, e->data, n) == 0)
			e->captured = n;
	}
	/* after a CONNECT, the tunnel's next segments are reported too */
	if (state == 0 && ip->proto == AP_IPPROTO_TCP && ap_http_connect(e)) {
		u8 more = AP_AFTER_CONNECT + 1;
		payload_seen.update(&cookie, &more);
	}
	ap_submit(skb, e, sizeof(*e), AP_EV_PAYLOAD);
}

int ap_egress(struct __sk_buff *skb)
{
	struct ap_ip ip;
	if (!ap_ip_parse(skb, &ip))
		return 1;
	if (ap_ip_icmp(&ip)) {
		u8 icmp_type = 0;
		bpf_skb_load_bytes(skb, ip.l4_off, &icmp_type, 1);
		ap_packet_sample(skb, ip.family, ip.proto, icmp_type, 0, ap_ip_daddr(&ip), ip.l4_off + AP_ICMP_HDR_LEN);
		return 1;
	}
	u8 l4[AP_TCP_HDR_LEN];
	u32 payload_off;
	if (!ap_l4_parse(skb, &ip, l4, &payload_off))
		return 1;
	u16 dport = ap_be16(&l4[AP_L4_DPORT_OFF]);
	if (ip.proto == AP_IPPROTO_UDP && dport == AP_DNS_PORT) { /* every DNS query counts; a sample is kept */
		ap_packet_sample(skb, ip.family, ip.proto, 0, dport, ap_ip_daddr(&ip), payload_off);
		return 1;
	}
	if (skb->len <= payload_off)
		return 1; /* no data: SYN, ACK, ... */
	u64 cookie = bpf_get_socket_cookie(skb);
	u8 state = ap_payload_turn(cookie);
	if (state != 1)
		ap_payload_record(skb, &ip, l4, payload_off, cookie, state);
	return 1;
}
