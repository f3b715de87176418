/* numbers.h - numbers fixed by Linux, by the network protocols and by the
 * NVIDIA driver, named. Not knobs: nothing here may be overridden.
 *
 * The programs include no kernel header for them (the installed headers may
 * not be the running kernel's), hence the AP_ prefix: no clash when BCC's own
 * includes define the same names. tests/test_abi.py checks them against
 * Python's socket, errno, signal and agentprobe/nvidia.py.
 */
#ifndef AGENTPROBE_NUMBERS_H
#define AGENTPROBE_NUMBERS_H

/* ---- sockets ---- */
#define AP_AF_INET 2
#define AP_AF_INET6 10
#define AP_SOCK_STREAM 1
#define AP_SOCK_DGRAM 2
#define AP_SOCK_RAW 3
#define AP_IPPROTO_ICMP 1
#define AP_IPPROTO_TCP 6
#define AP_IPPROTO_UDP 17
#define AP_IPPROTO_ICMPV6 58
#define AP_TCP_LISTEN 10         /* enum of TCP states (include/net/tcp_states.h) */
#define AP_DNS_PORT 53
#define AP_IPV4_LOOPBACK_NET 127 /* first byte of 127.0.0.0/8 */
#define AP_IPV6_V4MAPPED_WORD 0xffff /* ::ffff:a.b.c.d: third 32-bit word, host order */
#define AP_SOCKADDR_IN_LEN 16    /* sizeof(struct sockaddr_in) */
#define AP_SOCKADDR_IN6_LEN 28   /* sizeof(struct sockaddr_in6) */
#define AP_SIN_ADDR_OFF 4        /* offsetof(struct sockaddr_in, sin_addr) */
#define AP_SIN6_ADDR_OFF 8       /* offsetof(struct sockaddr_in6, sin6_addr) */

/* ---- packets, as the cgroup egress hook sees them (from the IP header on) ---- */
#define AP_ETH_P_IP 0x0800
#define AP_ETH_P_IPV6 0x86DD
#define AP_IPV4_HDR_LEN 20       /* without options: IHL says how long it is */
#define AP_IPV4_PROTO_OFF 9
#define AP_IPV4_SADDR_OFF 12
#define AP_IPV4_DADDR_OFF 16
#define AP_IPV6_HDR_LEN 40
#define AP_IPV6_NEXTHDR_OFF 6
#define AP_IPV6_SADDR_OFF 8
#define AP_IPV6_DADDR_OFF 24
#define AP_TCP_HDR_LEN 20        /* without options: the data offset says how long it is */
#define AP_TCP_DOFF_OFF 12       /* data offset, in 32-bit words, in the high nibble */
#define AP_UDP_HDR_LEN 8
#define AP_ICMP_HDR_LEN 8        /* type, code, checksum, identifier, sequence */
#define AP_L4_SPORT_OFF 0        /* TCP and UDP alike */
#define AP_L4_DPORT_OFF 2

/* ---- processes and files ---- */
#define AP_EPERM 1
#define AP_SIGKILL 9
#define AP_AT_FDCWD -100
#define AP_MINORBITS 20          /* the kernel's dev_t: major << 20 | minor */
#define AP_MINORMASK ((1U << AP_MINORBITS) - 1)
#define AP_IOC_NRMASK 0xff       /* _IOC_NR of an ioctl request */
#define AP_DATA_LOC_OFF_MASK 0xffff /* a tracepoint's __data_loc field: offset in the low half */

/* ---- cgroup device hook (include/uapi/linux/bpf.h) ---- */
#define AP_DEVCG_TYPE_MASK 0xffff /* access_type: device type in the low half, */
#define AP_DEVCG_ACCESS_SHIFT 16  /* access bits in the high half */
#define AP_DEVCG_DEV_CHAR 2
#define AP_DEVCG_ACC_READ 2
#define AP_DEVCG_ACC_WRITE 4

/* ---- NVIDIA frontend escapes and the argument fields read ---- */
#define AP_NV_ESC_IOCTL_XFER_CMD 211
#define AP_NV_ESC_RM_CONTROL 0x2A
#define AP_NV_ESC_RM_ALLOC 0x2B
#define AP_NV_XFER_PTR_OFF 8     /* NV_IOCTL_XFER: cmd, size, then the pointer to the real argument */
#define AP_NVOS54_CMD_OFF 8      /* RM_CONTROL's argument: the control command */
#define AP_NVOS21_HCLASS_OFF 12  /* RM_ALLOC's argument: the class allocated */

#endif /* AGENTPROBE_NUMBERS_H */
