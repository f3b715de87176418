/* payload.bpf.c - the first bytes every agent socket sends, whatever the port.
 *
 * Attached to the watched cgroups themselves (cgroup connect and egress
 * hooks), so processes outside them never run this code. The connect hooks
 * remember which process owns a socket (by socket cookie, sock.bpf.c); ICMP
 * packets and DNS queries go to ap_packet_sample (sock.bpf.c); the egress hook
 * copies the first AP_PAYLOAD_LEN bytes of each socket's first TCP segment or
 * UDP datagram that carries data; after an HTTP CONNECT, the next few segments
 * too (up to AP_AFTER_CONNECT), since there the tunnelled protocol (SSH
 * through a proxy to port 443, stratum) shows. Every hook returns 1: it
 * observes, never blocks.
 */

_Static_assert(AP_PAYLOAD_LEN == 64, "the length mask in ap_egress assumes 64");

#define AP_ETH_P_IP 0x0800
#define AP_ETH_P_IPV6 0x86DD

/* segments after a CONNECT request whose first bytes are reported: the rest of
 * the request's headers may come first, as writes of their own */
#define AP_AFTER_CONNECT 3

/* by socket cookie: 1 = reported; 2.. = a CONNECT was sent, that many - 1 segments still reported */
BPF_TABLE("lru_hash", u64, u8, payload_seen, 65536);

int ap_connect4(struct bpf_sock_addr *ctx)
{
	ap_remember_owner(ctx);
	u32 conf = ap_deny_conf();
#ifndef AP_SYSCALL_PROBES
	if (ap_connect4_allowed_repeat(ctx, 0, conf))
		return 1;
#endif
	u32 deny = ap_connect4_deny(ctx, conf);
#ifndef AP_SYSCALL_PROBES
	ap_connect4_record(ctx, !deny, 0, conf);
#endif
	if (deny)
		ap_connect4_report(ctx, deny);
	return !deny;
}

int ap_connect6(struct bpf_sock_addr *ctx)
{
	ap_remember_owner(ctx);
	u32 conf = ap_deny_conf();
#ifndef AP_SYSCALL_PROBES
	if (ap_connect6_allowed_repeat(ctx, 0, conf))
		return 1;
#endif
	u32 deny = ap_connect6_deny(ctx, conf);
#ifndef AP_SYSCALL_PROBES
	ap_connect6_record(ctx, !deny, 0, conf);
#endif
	if (deny)
		ap_connect6_report(ctx, deny);
	return !deny;
}

int ap_egress(struct __sk_buff *skb)
{
	u8 hdr[40];
	u32 l4_off;
	u8 proto;
	u16 family;

	if (skb->protocol == bpf_htons(AP_ETH_P_IP)) {
		if (bpf_skb_load_bytes(skb, 0, hdr, 20) < 0)
			return 1;
		l4_off = (hdr[0] & 0x0f) * 4;
		proto = hdr[9];
		family = 2;
	} else if (skb->protocol == bpf_htons(AP_ETH_P_IPV6)) {
		if (bpf_skb_load_bytes(skb, 0, hdr, 40) < 0)
			return 1;
		l4_off = 40;
		proto = hdr[6];
		family = 10;
	} else {
		return 1;
	}
	if ((proto == AP_IPPROTO_ICMP && family == 2) || (proto == AP_IPPROTO_ICMPV6 && family == 10)) {
		u8 icmp_type = 0;
		bpf_skb_load_bytes(skb, l4_off, &icmp_type, 1);
		ap_packet_sample(skb, family, proto, icmp_type, 0, family == 2 ? &hdr[16] : &hdr[24], l4_off + 8);
		return 1;
	}
	if (proto != 6 && proto != 17)
		return 1;

	u8 l4[20];
	u32 payload_off;
	if (proto == 6) {
		if (bpf_skb_load_bytes(skb, l4_off, l4, 20) < 0)
			return 1;
		payload_off = l4_off + (l4[12] >> 4) * 4;
	} else {
		if (bpf_skb_load_bytes(skb, l4_off, l4, 8) < 0)
			return 1;
		payload_off = l4_off + 8;
		u16 udp_dport = ((u16)l4[2] << 8) | l4[3];
		if (udp_dport == AP_DNS_PORT) { /* every DNS query counts; a sample of them is kept */
			ap_packet_sample(skb, family, proto, 0, udp_dport, family == 2 ? &hdr[16] : &hdr[24],
					 payload_off);
			return 1;
		}
	}
	if (skb->len <= payload_off)
		return 1; /* no data: SYN, ACK, ... */

	u64 cookie = bpf_get_socket_cookie(skb);
	u8 *seen = payload_seen.lookup(&cookie);
	u8 state = seen ? *seen : 0;
	if (state == 1)
		return 1;
	if (state > 1) { /* one of the segments after a CONNECT */
		u8 left = state - 1;
		payload_seen.update(&cookie, &left);
	} else {
		u8 one = 1;
		payload_seen.update(&cookie, &one);
	}

	u32 zero = 0;
	struct ap_payload_event *e = (struct ap_payload_event *)scratch.lookup(&zero);
	if (!e)
		return 1;
	__builtin_memset(e, 0, sizeof(*e));
	ap_skb_header(&e->h, AP_EV_PAYLOAD, bpf_ktime_get_ns(), skb, sock_owner.lookup(&cookie));
	e->cookie = cookie;
	e->family = family;
	e->protocol = proto;
	e->sport = ((u16)l4[0] << 8) | l4[1];
	e->dport = ((u16)l4[2] << 8) | l4[3];
	if (family == 2) {
		__builtin_memcpy(e->saddr, &hdr[12], 4);
		__builtin_memcpy(e->daddr, &hdr[16], 4);
	} else {
		__builtin_memcpy(e->saddr, &hdr[8], 16);
		__builtin_memcpy(e->daddr, &hdr[24], 16);
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
	/* a socket's first bytes asking a proxy for a tunnel: its next segments are reported too */
	if (state == 0 && proto == 6 && e->captured >= 8 && e->data[0] == 'C' && e->data[1] == 'O' &&
	    e->data[2] == 'N' && e->data[3] == 'N' && e->data[4] == 'E' && e->data[5] == 'C' &&
	    e->data[6] == 'T' && e->data[7] == ' ') {
		u8 more = AP_AFTER_CONNECT + 1;
		payload_seen.update(&cookie, &more);
	}
	ap_submit(skb, e, sizeof(*e), AP_EV_PAYLOAD);
	return 1;
}
