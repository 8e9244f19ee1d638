// SPDX-License-Identifier: GPL-2.0
/*
 * ferrolb L4 load-balancer datapath, TC ingress.
 *
 * Per packet: parse (parse: IPv4 or IPv6) -> conntrack lookup -> on a miss,
 * service lookup and endpoint selection (svc_lookup, select_ep) and creation
 * of both conntrack entries (ct_create) -> translation (xlate) -> forward
 * (fwd: FIB lookup and redirect, so a rewritten source address that is
 * local to this node is never seen by the stack's martian-source check).
 * These steps are separate inline functions so an XDP entry can reuse them.
 *
 * Both families share one code path: addresses are four words (IPv4 uses
 * word 0), and ICMPv6 is keyed as IPPROTO_ICMP with family 6, so services,
 * conntrack and sync treat "ICMP" alike. No NAT46/64: a flow keeps its family.
 *
 * Traffic that is neither tracked nor addressed to a service passes
 * untouched (TC_ACT_OK). Fragments addressed to a service VIP are dropped
 * and counted (FLB_CNT_DROP_FRAGMENT): only the first fragment carries
 * ports, so they cannot be balanced consistently. ICMP errors about a
 * tracked flow are translated back (inner and outer headers).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "ferrolb.h"

/* <linux/icmp.h> drags in libc socket headers that do not build for BPF. */
struct icmphdr {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	union {
		struct {
			__be16 id;
			__be16 sequence;
		} echo;
		__be32 gateway;
	} un;
};
#define ICMP_ECHOREPLY 0
#define ICMP_DEST_UNREACH 3
#define ICMP_ECHO 8
#define ICMP_TIME_EXCEEDED 11
#define ICMP_PARAMETERPROB 12
#define ICMPV6_DEST_UNREACH 1
#define ICMPV6_PKT_TOOBIG 2
#define ICMPV6_TIME_EXCEED 3
#define ICMPV6_PARAMPROB 4
#define ICMPV6_ECHO_REQUEST 128
#define ICMPV6_ECHO_REPLY 129
#define ND_NS 135
#define ND_NA 136
#define ND_NA_SOLICITED_OVERRIDE 0x60000000

#ifndef IPPROTO_ICMPV6
#define IPPROTO_ICMPV6 58
#endif
#ifndef IPPROTO_SCTP
#define IPPROTO_SCTP 132
#endif
/* SCTP chunk types (RFC 9260 section 3.2). */
#define SCTP_DATA 0
#define SCTP_INIT 1
#define SCTP_INIT_ACK 2
#define SCTP_SACK 3
#define SCTP_ABORT 6
#define SCTP_SHUTDOWN 7
#define SCTP_SHUTDOWN_ACK 8
#define SCTP_COOKIE_ECHO 10
#define SCTP_COOKIE_ACK 11
#define SCTP_SHUTDOWN_COMPLETE 14
/* ABORT and SHUTDOWN COMPLETE: the T bit (the tag is the sender's own, reflected). */
#define SCTP_CHUNK_T 0x01
/* The common header (ports, verification tag, CRC32c) and the first chunk's header. */
#define SCTP_HDR 12
#define SCTP_CRC_OFF 8
#define NEXTHDR_HOP 0
#define NEXTHDR_ROUTING 43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_DEST 60

/* <linux/ipv6.h> drags in libc headers too. */
struct ip6hdr_ {
	__u8 vtc;
	__u8 flow[3];
	__be16 payload_len;
	__u8 nexthdr;
	__u8 hop_limit;
	__u32 saddr[4];
	__u32 daddr[4];
};

/* bpf_l4_csum_replace: the packet is IPv6 (kernel >= 6.16; older kernels refuse the flag
 * and the call is repeated without it). */
#ifndef BPF_F_IPV6
#define BPF_F_IPV6 (1ULL << 7)
#endif

char _license[] SEC("license") = "GPL";

/* Patched at load time by the agent. */
volatile const __u16 NODE_ID = 0;
/* The source address of this node's full-NAT flows, per family (words as in flow keys); all
 * zero: the VIP. A cluster gives each node its own (--node-snat), advertised by that node, so a
 * flow's replies return to the node that holds it whatever the ToR's hash does. */
volatile const __u32 FULLNAT_SRC4[4] = {0, 0, 0, 0};
volatile const __u32 FULLNAT_SRC6[4] = {0, 0, 0, 0};
/* 1 when bpf_l4_csum_replace takes BPF_F_IPV6 (Linux 6.16 and later), set by the loader from
 * the kernel's release: older kernels refuse the flag, and probing it per packet cost a failing
 * helper call on every rewritten IPv6 packet. */
volatile const __u8 CSUM_IPV6 = 1;
/* 1 when something reads the flow events (a node that syncs its flows to peers): without a
 * reader, a connection's events (created, established, closed, removed) are work for nobody;
 * the datapath's counters count the same things. NAT-pressure signals are always sent. */
volatile const __u8 FLOW_EVENTS = 1;
/* How many half-open TCP flows may be made in conntrack itself (0: none, every one goes
 * through ct_new). While fewer than this are, a SYN's flow is made in conntrack, not in
 * ct_new, and its handshake completes in place: no move of both entries between the tables
 * at its end (two inserts and two deletes, the larger part of what a connection cost). Past
 * it (a SYN flood, or a slow trickle of spoofed SYNs keeping it full) flows are made in ct_new
 * as before, whose LRU churns them. conntrack is sized for it (two entries a flow beyond
 * --max-conntrack), so established flows keep their room. See decision 0007. */
volatile const __u32 HALFOPEN_INPLACE = 0;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct flb_svc_key);
	__type(value, struct flb_svc);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct flb_range_key);
	__type(value, struct flb_ranges);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} ranges SEC(".maps");

/* Allowed source prefixes of the rules that restrict their sources (FLB_SVCF_SOURCES). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct flb_src_key);
	__type(value, __u8);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} src_ranges SEC(".maps");

/* Per rule: first packets dropped because their source is not allowed. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 4096);
} src_drops SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct flb_backends);
	__uint(max_entries, 8192);
} backends SEC(".maps");

/* Flows live in two tables (docs/decisions/0007-conntrack-tables.md). `conntrack` holds
 * confirmed flows: a plain hash that never evicts, so no flood can push a live flow out; when
 * it is full a flow cannot be confirmed (a TCP handshake's last segment is dropped, counted).
 * `ct_new` holds flows until they are confirmed: TCP and SCTP until their handshake completes,
 * DNAT pick-ups until the endpoint's side answers, UDP and ICMP echo flows until the endpoint
 * has answered and the client sent again. It is an LRU of its own, so a flood (of SYNs, or of
 * spoofed datagrams nobody continues) evicts only unconfirmed flows. Both entries of a flow
 * are in the same table; a key is in one of them. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct flb_ct_key);
	__type(value, struct flb_ct);
	__uint(max_entries, 1048576);
} conntrack SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct flb_ct_key);
	__type(value, struct flb_ct);
	__uint(max_entries, 262144);
	__uint(map_flags, FLB_CT_NEW_MAP_FLAGS);
} ct_new SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct flb_affinity_key);
	__type(value, struct flb_affinity);
	__uint(max_entries, 65536);
} affinity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 4096);
} rr_state SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 4096 * FLB_MAX_ENDPOINTS);
} ep_conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct flb_stats);
	__uint(max_entries, 4096);
} svc_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct flb_stats);
	__uint(max_entries, 4096 * FLB_MAX_ENDPOINTS);
} ep_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, FLB_CNT_MAX);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} events SEC(".maps");

/* ifindex -> MAC address of each interface the agent attached to (IPv6 neighbour
 * advertisements for VIPs carry it). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct flb_mac);
	__uint(max_entries, 256);
} if_macs SEC(".maps");

/* Interfaces forwarded out of with bpf_redirect_peer (struct flb_if_out). Not pinned: the
 * agent fills it after loading. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct flb_if_out);
	__uint(max_entries, FLB_IF_OUT_SLOTS);
} if_out SEC(".maps");

/* HA state the agent sets (FLB_HA_* bits at index 0). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 1);
} ha_flags SEC(".maps");

/* Per-CPU scratch for the entry a new flow is built in (the BPF stack is 512 bytes, shared
 * with the bpf_loop callback of the port search). Not pinned. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct flb_ct);
	__uint(max_entries, 1);
} ct_scratch SEC(".maps");

/* Per-CPU parameters of the FIB lookup (fwd, xlate_fwd) and the snapshot of a flow's
 * translation (xlate_fwd), off the stack. Not pinned. */
struct fib_scratch {
	struct bpf_fib_lookup f;
	__u32 ns[4]; /* translated source and destination address */
	__u32 nd[4];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct fib_scratch);
	__uint(max_entries, 1);
} fib_scratch SEC(".maps");

/* The FIB's forwarding answers for translated packets, cached per CPU for FLB_FIB_TTL_NS: a
 * bpf_fib_lookup was ~18 % of the datapath's time in the lab (issue 16), and a flow's packets
 * ask it the same question over and over. Direct-mapped by a hash of everything the lookup is
 * given (ingress interface, family, addresses, protocol, ports; the ports left out where the
 * agent proved they cannot change an answer: fib_gen), compared in full on a hit: a hit is
 * the answer the lookup gave for the same question at most FLB_FIB_TTL_NS ago. Only
 * forwarding answers with a known next-hop MAC are kept; a packet longer than any the answer
 * was given for asks again (the route's MTU). Not pinned (a cache: a restart starts empty). */
#define FLB_FIB_BITS 10
#define FLB_FIB_TTL_NS (50ULL * 1000 * 1000)
struct flb_fib_slot {
	__u32 src[4];
	__u32 dst[4];
	__u32 iif;
	__u32 oif;
	__u64 expires_ns;
	__u16 sport;
	__u16 dport;
	__u16 max_len; /* the longest packet (L3 length) this answer was given for */
	__u8 family;   /* AF_INET or AF_INET6; 0: empty */
	__u8 proto;
	__u8 smac[6];
	__u8 dmac[6];
	__u32 gen; /* fib_gen when the question was asked */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct flb_fib_slot);
	__uint(max_entries, 1 << FLB_FIB_BITS);
} fib_cache SEC(".maps");

/* The FIB's generation (index 0): the agent bumps it when the kernel reports a route, rule,
 * neighbour or link change (rtnetlink), and a cached answer of another generation is not
 * used, so a change reaches flowing packets as soon as the agent hears of it; FLB_FIB_TTL_NS
 * bounds what it does not hear (the agent down, a lost notification). Not pinned.
 *
 * `flags` (FLB_FIB_PORTS_FREE_*, set by the agent, 0 at load): for that family no answer of
 * the FIB depends on the ports (no policy rule selects on ports or protocol, and multipath
 * hashes addresses only: fib_multipath_hash_policy 0), so the cache keys its questions
 * without them and a new connection between two addresses already seen is answered from it.
 * Only until `ports_free_until_ns` (CLOCK_MONOTONIC), a lease the agent renews every second
 * while it watches the rules: an agent that stopped cannot vouch for rules added since, and
 * the ports come back into the key within the lease. The lookup itself is still given the
 * ports. A slot keyed without ports holds 0 ports, so once the flag is cleared no question
 * with ports matches it. */
#define FLB_FIB_PORTS_FREE_V4 1
#define FLB_FIB_PORTS_FREE_V6 2
struct flb_fib_gen {
	__u32 gen;
	__u32 flags;
	__u64 ports_free_until_ns;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct flb_fib_gen);
	__uint(max_entries, 1);
} fib_gen SEC(".maps");

/* Half-open flows made in conntrack itself (struct flb_budget; HALFOPEN_INPLACE). Pinned
 * with conntrack. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct flb_budget);
	__uint(max_entries, 2);
} ct_budget SEC(".maps");

/* When the datapath last told the agent of source-NAT port pressure (index 0, ns). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
} nat_signal SEC(".maps");

#define IP_MF 0x2000
#define IP_OFFSET 0x1fff
#define ETH_HLEN_ 14
#define IP_CSUM_OFF (ETH_HLEN_ + offsetof(struct iphdr, check))
#define IP_DST_OFF (ETH_HLEN_ + offsetof(struct iphdr, daddr))
#define IP_TTL_OFF (ETH_HLEN_ + offsetof(struct iphdr, ttl))
#define IP6_DST_OFF (ETH_HLEN_ + offsetof(struct ip6hdr_, daddr))
#define IP6_HOP_OFF (ETH_HLEN_ + offsetof(struct ip6hdr_, hop_limit))
/* Extension headers walked before giving up on finding the L4 header. */
#define IP6_MAX_EXT 4

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

struct pkt {
	__u32 l4off;
	__u32 len;
	__u32 saddr[4];
	__u32 daddr[4];
	__u16 sport;
	__u16 dport;
	__u8 proto;  /* IPPROTO_ICMP for ICMPv6 too (see the file comment) */
	__u8 family; /* FLB_FAMILY_V4 / FLB_FAMILY_V6 */
	__u8 tcp_flags; /* FIN 0x01 SYN 0x02 RST 0x04 ACK 0x10 */
	__u8 echo_req;  /* ICMP(v6) echo request */
	__u8 is_icmp_err;
	__u8 frag;
	__u8 nd_solicit; /* an ICMPv6 neighbour solicitation (not balanced; see nd_vip) */
	__u8 bad;        /* FLB_CNT_DROP_* of a malformed packet (0: well formed) */
	__u8 l4ok;       /* sport/dport were read (a malformed packet may still have them) */
	__u8 untracked;  /* the flow's entry is a copy (the one just inserted, or one evicted at
			  * once): not tracked, not counted again */
	__u32 l3end;     /* end of the IP packet (offset from the frame start) */
	__u32 seq;       /* TCP, host order */
	__u32 ack;       /* TCP, host order */
	__u32 plen;      /* TCP payload length */
	__u8 chunk;      /* SCTP: the first chunk's type (seq: the verification tag; ack: an
			  * INIT or INIT ACK's initiate tag) */
	__u8 chunk_flags;
};

static __always_inline void addr_cp(__u32 *d, const __u32 *s)
{
	d[0] = s[0];
	d[1] = s[1];
	d[2] = s[2];
	d[3] = s[3];
}

static __always_inline int addr_eq(const __u32 *a, const __u32 *b)
{
	return ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3])) == 0;
}

static __always_inline void count(__u32 idx)
{
	__u64 *c = bpf_map_lookup_elem(&counters, &idx);
	if (c)
		*c += 1;
}

static __always_inline void stats_add(void *map, __u32 idx, __u32 len)
{
	struct flb_stats *s = bpf_map_lookup_elem(map, &idx);
	if (s) {
		s->packets += 1;
		s->bytes += len;
	}
}

static __always_inline __u32 l4_csum_off(__u8 proto)
{
	if (proto == IPPROTO_TCP)
		return offsetof(struct tcphdr, check);
	if (proto == IPPROTO_UDP)
		return offsetof(struct udphdr, check);
	return offsetof(struct icmphdr, checksum);
}

/* Flag combinations a TCP sends, as the kernel's conntrack lists them (tcp_valid_flags),
 * after masking PSH and the ECN bits: SYN, SYN+URG, SYN+ACK, RST, RST+ACK, FIN+ACK,
 * FIN+ACK+URG, ACK, ACK+URG. Everything else (null, SYN+FIN, SYN+RST, FIN alone, all flags,
 * ...) is a scan or a forgery. */
static __always_inline int tcp_flags_valid(__u8 f)
{
	f &= 0x37; /* FIN SYN RST ACK URG */
	switch (f) {
	case 0x02:
	case 0x22:
	case 0x12:
	case 0x04:
	case 0x14:
	case 0x11:
	case 0x31:
	case 0x10:
	case 0x30:
		return 1;
	default:
		return 0;
	}
}

/* The first reason a packet is malformed is the one counted. */
static __always_inline void set_bad(struct pkt *p, __u8 reason)
{
	if (!p->bad)
		p->bad = reason;
}

/* The L4 header fields we need, at p->l4off. Returns 0 or -1 to pass the packet; a
 * malformed header returns 0 with p->bad set. */
static __always_inline int parse_l4(struct __sk_buff *skb, struct pkt *p, __u8 l4proto)
{
	if (l4proto == IPPROTO_TCP) {
		struct tcphdr tcp;
		if (p->l4off + sizeof(tcp) > p->l3end) {
			set_bad(p, FLB_CNT_DROP_TCP_HEADER);
			return 0;
		}
		/* Read in place when the header is in the linear part (nearly always). */
		__u32 off = p->l4off & 0x1ff;
		void *data = (void *)(long)skb->data;
		void *end = (void *)(long)skb->data_end;
		if (off == p->l4off && data + off + sizeof(tcp) <= end)
			__builtin_memcpy(&tcp, data + off, sizeof(tcp));
		else if (bpf_skb_load_bytes(skb, p->l4off, &tcp, sizeof(tcp)) < 0) {
			set_bad(p, FLB_CNT_DROP_TCP_HEADER);
			return 0;
		}
		p->sport = tcp.source;
		p->dport = tcp.dest;
		p->l4ok = 1;
		p->tcp_flags = ((__u8 *)&tcp)[13];
		__u32 hl = (__u32)tcp.doff * 4;
		if (hl < sizeof(tcp) || p->l4off + hl > p->l3end) {
			set_bad(p, FLB_CNT_DROP_TCP_HEADER);
			return 0;
		}
		if (!tcp_flags_valid(p->tcp_flags)) {
			set_bad(p, FLB_CNT_DROP_TCP_FLAGS);
			return 0;
		}
		p->seq = bpf_ntohl(tcp.seq);
		p->ack = bpf_ntohl(tcp.ack_seq);
		p->plen = p->l3end - p->l4off - hl;
	} else if (l4proto == IPPROTO_UDP) {
		struct udphdr udp;
		if (p->l4off + sizeof(udp) > p->l3end ||
		    bpf_skb_load_bytes(skb, p->l4off, &udp, sizeof(udp)) < 0) {
			set_bad(p, FLB_CNT_DROP_UDP_LENGTH);
			return 0;
		}
		p->sport = udp.source;
		p->dport = udp.dest;
		p->l4ok = 1;
		__u32 ulen = bpf_ntohs(udp.len);
		if (ulen < sizeof(udp) || p->l4off + ulen > p->l3end) {
			set_bad(p, FLB_CNT_DROP_UDP_LENGTH);
			return 0;
		}
	} else if (l4proto == IPPROTO_SCTP) {
		/* Common header, first chunk header, and an INIT's initiate tag. */
		struct {
			__u16 sport, dport;
			__u32 vtag, crc;
			__u8 type, flags;
			__u16 len;
			__u32 itag;
		} h;
		if (p->l4off + SCTP_HDR + 4 > p->l3end ||
		    bpf_skb_load_bytes(skb, p->l4off, &h, SCTP_HDR + 4) < 0) {
			set_bad(p, FLB_CNT_DROP_SCTP_HEADER);
			return 0;
		}
		p->sport = h.sport;
		p->dport = h.dport;
		p->l4ok = 1;
		p->chunk = h.type;
		p->chunk_flags = h.flags;
		p->seq = bpf_ntohl(h.vtag);
		__u32 clen = bpf_ntohs(h.len);
		if (clen < 4 || p->l4off + SCTP_HDR + clen > p->l3end) {
			set_bad(p, FLB_CNT_DROP_SCTP_HEADER);
			return 0;
		}
		if (h.type == SCTP_INIT || h.type == SCTP_INIT_ACK) {
			/* An INIT is alone in its packet and carries tag 0 (RFC 9260 8.5.1). */
			if (clen < 8 || p->l4off + SCTP_HDR + 8 > p->l3end ||
			    bpf_skb_load_bytes(skb, p->l4off + SCTP_HDR + 4, &h.itag, 4) < 0 ||
			    (h.type == SCTP_INIT &&
			     (h.vtag != 0 || p->l4off + SCTP_HDR + ((clen + 3) & ~3u) < p->l3end))) {
				set_bad(p, FLB_CNT_DROP_SCTP_HEADER);
				return 0;
			}
			p->ack = bpf_ntohl(h.itag);
		}
	} else if (l4proto == IPPROTO_ICMP || l4proto == IPPROTO_ICMPV6) {
		struct icmphdr icmp;
		if (bpf_skb_load_bytes(skb, p->l4off, &icmp, sizeof(icmp)) < 0)
			return -1;
		int v6 = l4proto == IPPROTO_ICMPV6;
		__u8 req = v6 ? ICMPV6_ECHO_REQUEST : ICMP_ECHO;
		__u8 rep = v6 ? ICMPV6_ECHO_REPLY : ICMP_ECHOREPLY;
		if (icmp.type == req || icmp.type == rep) {
			p->echo_req = icmp.type == req;
			p->sport = icmp.un.echo.id;
			p->dport = 0;
		} else if ((!v6 && (icmp.type == ICMP_DEST_UNREACH || icmp.type == ICMP_TIME_EXCEEDED ||
				    icmp.type == ICMP_PARAMETERPROB)) ||
			   (v6 && icmp.type >= ICMPV6_DEST_UNREACH && icmp.type <= ICMPV6_PARAMPROB)) {
			p->is_icmp_err = 1;
		} else {
			/* Neighbour discovery, router advertisements, ...: not balanced. A
			 * solicitation may be for a VIP (nd_vip). */
			p->nd_solicit = v6 && icmp.type == ND_NS;
			return -1;
		}
		p->proto = IPPROTO_ICMP;
		p->l4ok = 1;
	} else {
		return -1;
	}
	return 0;
}

/* Parse Ethernet + IPv4 or IPv6 + the L4 header fields we need. Returns 0 when the packet
 * has a parsable L4 header (or is a fragment, or is malformed: p->bad), -1 to pass it
 * untouched.
 *
 * A global function: the verifier checks it once, on its own, and the caller continues with
 * the fields of *p as unknown values, instead of re-verifying the rest of the program for
 * every path through the parser (that took the program past the verifier's 1M-instruction
 * budget; with it the whole program verifies in ~0.27M). */
__noinline int parse(struct __sk_buff *skb, struct pkt *p)
{
	if (!p)
		return -1;
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return -1;
	p->len = skb->len;
	/* The stack has moved an 802.1Q tag into the skb by now. VLAN 0 is a priority tag (the
	 * kernel treats such a frame as untagged); any other VLAN does not belong to the
	 * untagged interface this program is attached to, and the kernel would drop it. */
	if (skb->vlan_present && (skb->vlan_tci & 0x0fff) != 0)
		p->bad = FLB_CNT_DROP_VLAN;
	/* A tag still in the frame (a stack that did not move it into the skb, a test run): the
	 * same, judged by the inner header's destination. */
	if (eth->h_proto == bpf_htons(ETH_P_8021Q) || eth->h_proto == bpf_htons(ETH_P_8021AD)) {
		__u16 inner;
		if (bpf_skb_load_bytes(skb, ETH_HLEN_ + 2, &inner, sizeof(inner)) < 0)
			return -1;
		if (inner == bpf_htons(ETH_P_IP)) {
			struct iphdr ih;
			if (bpf_skb_load_bytes(skb, ETH_HLEN_ + 4, &ih, sizeof(ih)) < 0)
				return -1;
			p->family = FLB_FAMILY_V4;
			p->daddr[0] = ih.daddr;
			p->proto = ih.protocol;
		} else if (inner == bpf_htons(ETH_P_IPV6)) {
			struct ip6hdr_ ih6;
			if (bpf_skb_load_bytes(skb, ETH_HLEN_ + 4, &ih6, sizeof(ih6)) < 0)
				return -1;
			p->family = FLB_FAMILY_V6;
			addr_cp(p->daddr, ih6.daddr);
			p->proto = ih6.nexthdr == IPPROTO_ICMPV6 ? IPPROTO_ICMP : ih6.nexthdr;
		} else {
			return -1;
		}
		p->bad = FLB_CNT_DROP_VLAN;
		return 0;
	}
	/* A GSO packet built by GRO may have a zero IP length (BIG TCP): it ends with the skb. */
	int big = skb->gso_size != 0;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > end)
			return -1;
		p->family = FLB_FAMILY_V4;
		p->saddr[0] = ip->saddr;
		p->daddr[0] = ip->daddr;
		p->proto = ip->protocol;
		if (ip->ihl < 5 || ip->version != 4) {
			set_bad(p, FLB_CNT_DROP_IP_HEADER);
			return 0;
		}
		p->l4off = ETH_HLEN_ + ip->ihl * 4;
		__u32 tot = bpf_ntohs(ip->tot_len);
		__u32 avail = skb->len - ETH_HLEN_;
		if (tot == 0 && big)
			tot = avail;
		if (tot < (__u32)ip->ihl * 4 || tot > avail) {
			set_bad(p, FLB_CNT_DROP_IP_LENGTH);
			return 0;
		}
		p->l3end = ETH_HLEN_ + tot;
		if (ip->ttl == 0)
			set_bad(p, FLB_CNT_DROP_TTL);
		p->frag = (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET)) != 0;
		if (p->frag)
			return 0;
		/* With a bad IP header, the ports are still read to find the flow it claims. */
		int rc = parse_l4(skb, p, ip->protocol);
		return p->bad ? 0 : rc;
	}
	if (eth->h_proto != bpf_htons(ETH_P_IPV6))
		return -1;
	struct ip6hdr_ ip6;
	if (bpf_skb_load_bytes(skb, ETH_HLEN_, &ip6, sizeof(ip6)) < 0)
		return -1;
	if ((ip6.vtc >> 4) != 6)
		return -1;
	p->family = FLB_FAMILY_V6;
	addr_cp(p->saddr, ip6.saddr);
	addr_cp(p->daddr, ip6.daddr);
	__u32 plen6 = bpf_ntohs(ip6.payload_len);
	__u32 avail6 = skb->len - ETH_HLEN_ - sizeof(ip6);
	if (plen6 == 0 && big)
		plen6 = avail6;
	if (plen6 > avail6) {
		set_bad(p, FLB_CNT_DROP_IP_LENGTH);
		p->proto = ip6.nexthdr == IPPROTO_ICMPV6 ? IPPROTO_ICMP : ip6.nexthdr;
		return 0;
	}
	p->l3end = ETH_HLEN_ + sizeof(ip6) + plen6;
	if (ip6.hop_limit == 0)
		set_bad(p, FLB_CNT_DROP_TTL);
	__u8 nh = ip6.nexthdr;
	__u32 off = ETH_HLEN_ + sizeof(ip6);
	for (int i = 0; i < IP6_MAX_EXT; i++) {
		if (nh == NEXTHDR_FRAGMENT) {
			__u8 fh[2];
			if (bpf_skb_load_bytes(skb, off, fh, sizeof(fh)) < 0)
				return -1;
			p->frag = 1;
			p->proto = fh[0] == IPPROTO_ICMPV6 ? IPPROTO_ICMP : fh[0];
			return 0;
		}
		if (nh != NEXTHDR_HOP && nh != NEXTHDR_ROUTING && nh != NEXTHDR_DEST)
			break;
		__u8 eh[2];
		if (bpf_skb_load_bytes(skb, off, eh, sizeof(eh)) < 0)
			return -1;
		nh = eh[0];
		off += ((__u32)eh[1] + 1) * 8;
	}
	p->l4off = off;
	p->proto = nh == IPPROTO_ICMPV6 ? IPPROTO_ICMP : nh;
	int rc = parse_l4(skb, p, nh);
	return p->bad ? 0 : rc;
}

static __always_inline void ct_key(struct flb_ct_key *k, const __u32 *s, const __u32 *d, __u16 sp,
				   __u16 dp, __u8 proto, __u8 family)
{
	__builtin_memset(k, 0, sizeof(*k));
	addr_cp(k->saddr, s);
	addr_cp(k->daddr, d);
	k->sport = sp;
	k->dport = dp;
	k->proto = proto;
	k->family = family;
}

/* The key of the other direction of the flow an entry belongs to. */
static __always_inline void ct_peer_key(struct flb_ct_key *pk, const struct flb_ct_key *k,
					const struct flb_ct *v)
{
	__builtin_memset(pk, 0, sizeof(*pk));
	addr_cp(pk->saddr, v->nat_daddr);
	addr_cp(pk->daddr, v->nat_saddr);
	pk->proto = k->proto;
	pk->family = k->family;
	if (k->proto == IPPROTO_ICMP) {
		pk->sport = v->nat_sport;
		pk->dport = 0;
	} else {
		pk->sport = v->nat_dport;
		pk->dport = v->nat_sport;
	}
}

/* The state in force: both FINs seen is TIME_WAIT even if a racing writer stored FIN_WAIT
 * after the packet that completed the close stored TIME_WAIT. */
static __always_inline __u8 eff_state(const struct flb_ct *v)
{
	if (v->state < FLB_CT_TIME_WAIT && (v->fin & FLB_FIN_BOTH) == FLB_FIN_BOTH)
		return FLB_CT_TIME_WAIT;
	return v->state;
}

static __always_inline __u64 ct_timeout_ns(const struct flb_ct *v, __u8 proto)
{
	__u32 s = v->timeout_s;
	if (proto == IPPROTO_TCP || proto == IPPROTO_SCTP) {
		__u8 st = eff_state(v);
		if (st == FLB_CT_EST && (v->flags & FLB_CTF_PICKUP))
			return (__u64)FLB_TO_PICKUP_S * 1000000000ULL;
		switch (st) {
		case FLB_CT_SYN_SENT:
		case FLB_CT_SYN_RECV:
			s = FLB_TO_SYN_S;
			break;
		case FLB_CT_FIN_WAIT:
			s = FLB_TO_FIN_WAIT_S;
			break;
		case FLB_CT_TIME_WAIT:
			s = FLB_TO_TIME_WAIT_S;
			break;
		case FLB_CT_CLOSE:
			s = FLB_TO_CLOSE_S;
			break;
		default:
			break;
		}
	}
	return (__u64)s * 1000000000ULL;
}

/* The datapath's clock, read once per packet: CLOCK_MONOTONIC at the last tick
 * (bpf_ktime_get_coarse_ns reads a stored time; bpf_ktime_get_ns reads the clock source, and
 * on this project's VMs that read was ~0.7 % of all CPU in the new-connection benchmark, ~50 ns
 * a packet). Every time kept per packet (last_ns, affinity, the NAT signal's pacing) serves a
 * timeout of seconds, so a tick's lag (1-10 ms) does not matter, and the agent's clock may be
 * that far ahead (a last_ns in the future counts as fresh: fresh_since). A flow's created_ns is
 * read from the clock source (ct_plan, once per flow): the agent compares it with its own
 * clock to tell flows created before a rule change from those after. */
static __always_inline __u64 flb_now(void)
{
	return bpf_ktime_get_coarse_ns();
}

/* Was something last used at `last` still within its timeout at `now`? (ct_alive: an entry.)
 *
 * The difference is signed, and this is the fix for flows whose translation changed
 * mid-stream (issue 12). `now` is read once per packet, before the lookup; meanwhile another
 * CPU handling the same flow (a bulk TCP flow's data and its ACKs run on two CPUs) stores a
 * later time in last_ns. Unsigned, now - last_ns then wrapped to ~2^64, the live flow looked
 * expired (its peer entry too, for the same reason), and ct_create replaced it with a new
 * flow and a new source-NAT port: the backend saw segments of a connection it did not know
 * and reset it. A last_ns in our future means "alive". */
static __always_inline int fresh_since(__u64 now, __u64 last, __u64 timeout_ns)
{
	return (__s64)(now - last) <= (__s64)timeout_ns;
}

static __always_inline int ct_alive(const struct flb_ct *v, __u8 proto, __u64 now)
{
	return fresh_since(now, v->last_ns, ct_timeout_ns(v, proto));
}

/* Is k the key of the other direction of v's flow? */
static __always_inline int ct_points_to(const struct flb_ct *v, const struct flb_ct_key *k)
{
	if (!addr_eq(v->nat_daddr, k->saddr) || !addr_eq(v->nat_saddr, k->daddr))
		return 0;
	if (k->proto == IPPROTO_ICMP)
		return v->nat_sport == k->sport && k->dport == 0;
	return v->nat_dport == k->sport && v->nat_sport == k->dport;
}

static __always_inline void emit(__u32 type, const struct flb_ct_key *k, const struct flb_ct *v)
{
	if (!FLOW_EVENTS && type != FLB_EV_NAT_PRESSURE)
		return;
	struct flb_ct_event *ev = bpf_ringbuf_reserve(&events, sizeof(*ev), 0);
	if (!ev) {
		count(FLB_CNT_EVENTS_LOST);
		return;
	}
	ev->type = type;
	ev->pad = 0;
	__builtin_memcpy(&ev->key, k, sizeof(*k));
	__builtin_memcpy(&ev->val, v, sizeof(*v));
	/* Waking the reader per event costs a context switch per connection; the agent drains
	 * the ring on a short timer and is woken only when its backlog (this record included)
	 * crosses a multiple of FLB_EVENTS_WAKEUP_BYTES: at most three times until the ring is
	 * full. Not at every event past the mark, as before: a wakeup is an interrupt this CPU
	 * sends itself (irq_work), ~7 us on this project's VMs (cycles benchmark), so a reader
	 * that had fallen behind made every event's packet cost ten times more, just when the
	 * node was busiest. A crossing two CPUs miss by racing is caught at the next mark; the
	 * timer drains the ring anyway. */
	__u64 avail = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA);
	__u64 before = avail > FLB_EV_RECORD_BYTES ? avail - FLB_EV_RECORD_BYTES : 0;
	int wake = avail / FLB_EVENTS_WAKEUP_BYTES != before / FLB_EVENTS_WAKEUP_BYTES;
	bpf_ringbuf_submit(ev, wake ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
}

/* A flow's event, carried by its original-direction entry when the packet's own entry is the
 * reply's and the original is at hand (`pe` under `pkey`): the agent publishes the original
 * entry to the peers, and would otherwise read it from the table, a system call per event. */
static __always_inline void emit_flow(__u32 type, const struct flb_ct_key *key,
				      const struct flb_ct *e, const struct flb_ct_key *pkey,
				      const struct flb_ct *pe)
{
	if (!FLOW_EVENTS)
		return;
	if (e->dir != 0 && pe && pe->dir == 0 && ct_points_to(pe, key))
		emit(type, pkey, pe);
	else
		emit(type, key, e);
}

/* Is there room in the in-place budget for one more half-open flow in conntrack? Racing
 * CPUs may each take the last place: the budget is exceeded by at most one flow a CPU. */
static __always_inline int inplace_room(void)
{
	if (!HALFOPEN_INPLACE)
		return 0;
	__u32 dp = 0, ag = 1;
	struct flb_budget *d = bpf_map_lookup_elem(&ct_budget, &dp);
	struct flb_budget *a = bpf_map_lookup_elem(&ct_budget, &ag);
	if (!d || !a)
		return 0;
	return (__s64)(d->made - d->settled - a->settled) < (__s64)HALFOPEN_INPLACE;
}

/* One more flow made (settled 0) or settled (1) in the datapath's half of the budget. */
static __always_inline void inplace_add(int settled)
{
	__u32 dp = 0;
	struct flb_budget *d = bpf_map_lookup_elem(&ct_budget, &dp);
	if (!d)
		return;
	if (settled)
		__sync_fetch_and_add(&d->settled, 1);
	else
		__sync_fetch_and_add(&d->made, 1);
}

/* Is `o` a new flow being made half-open in conntrack itself (ct_plan found room)? SCTP and
 * every flow made in ct_new carry FLB_CTF_NEW. */
static __always_inline int inplace_flow(const struct flb_ct *o)
{
	return !(o->flags & FLB_CTF_NEW) && o->state == FLB_CT_SYN_SENT;
}

/* The half-open flow whose original-direction entry is `o` leaves the in-place budget
 * (established, or removed): once, whichever CPU clears the bit. Returns 1 for that CPU. */
static __always_inline int inplace_settle(struct flb_ct *o)
{
	if (!o || !(o->fin & FLB_FIN_HALFOPEN))
		return 0;
	if (!(__sync_fetch_and_and(&o->fin, ~FLB_FIN_HALFOPEN) & FLB_FIN_HALFOPEN))
		return 0;
	inplace_add(1);
	return 1;
}

static __always_inline void lc_dec(const struct flb_ct *v)
{
	if (!(v->flags & FLB_CTF_LC))
		return;
	__u32 idx = v->svc_id * FLB_MAX_ENDPOINTS + (v->ep_idx & (FLB_MAX_ENDPOINTS - 1));
	__u32 *c = bpf_map_lookup_elem(&ep_conns, &idx);
	if (c && *c > 0)
		__sync_fetch_and_add(c, -1);
}

/* Sequence tracking of one direction (the entry of the packet's key), on every TCP segment
 * of a tracked flow. The first segment seen in a direction sets what is tracked (a SYN, or
 * the first segment after a pick-up, a sync or an adoption). After that, a segment is in the
 * window when its end is within FLB_SEQ_WINDOW of the highest end seen and, since a blind
 * forger must guess it too, its acknowledgment within FLB_SEQ_WINDOW of the highest seen;
 * only in-window segments with ACK move what is tracked (an RST never does). Returns 1 for a
 * segment in the window. Out-of-window segments are forwarded all the same: the end host
 * judges them (RFC 5961); they only cannot change the flow's state. */
static __always_inline int seq_track(struct flb_ct *e, const struct pkt *p)
{
	__u8 f = p->tcp_flags;
	__u32 end = p->seq + p->plen + ((f & 0x02) ? 1 : 0) + ((f & 0x01) ? 1 : 0);
	/* A SYN or SYN-ACK while the handshake is still going starts tracking over: a client
	 * retrying from the same port with a new initial sequence number. */
	if (!(e->flags & FLB_CTF_SEQ) || ((f & 0x06) == 0x02 && e->state < FLB_CT_EST)) {
		if (f & 0x04)
			return 0;
		e->seq_next = end;
		e->ack_seen = p->ack;
		e->flags |= FLB_CTF_SEQ | ((f & 0x10) ? FLB_CTF_ACK : 0);
		return 1;
	}
	__s32 d = (__s32)(end - e->seq_next);
	if (d > FLB_SEQ_WINDOW || d < -FLB_SEQ_WINDOW)
		goto out;
	if (f & 0x10) {
		if (e->flags & FLB_CTF_ACK) {
			__s32 da = (__s32)(p->ack - e->ack_seen);
			if (da > FLB_SEQ_WINDOW || da < -FLB_SEQ_WINDOW)
				goto out;
			if (da > 0 && !(f & 0x04))
				e->ack_seen = p->ack;
		} else if (!(f & 0x04)) {
			e->ack_seen = p->ack;
			e->flags |= FLB_CTF_ACK;
		}
		if (d > 0 && !(f & 0x04))
			e->seq_next = end;
	}
	return 1;
out:
	count(FLB_CNT_TCP_OUT_OF_WINDOW);
	return 0;
}

/* The entry under k, in whichever table holds it (established flows first: the common
 * case costs one lookup). */
static __always_inline struct flb_ct *ct_lookup(const struct flb_ct_key *k)
{
	struct flb_ct *e = bpf_map_lookup_elem(&conntrack, k);
	if (!e)
		e = bpf_map_lookup_elem(&ct_new, k);
	return e;
}

/* The entry under k of the flow `e` belongs to (its other direction): looked for first in the
 * table `e` lives in, since both entries of a flow share a table (the other table too, for a
 * flow moved meanwhile). A half-open flow's peer costs one lookup instead of two. */
static __always_inline struct flb_ct *ct_lookup_near(const struct flb_ct_key *k,
						     const struct flb_ct *e)
{
	if (!(e->flags & FLB_CTF_NEW))
		return ct_lookup(k);
	struct flb_ct *pe = bpf_map_lookup_elem(&ct_new, k);
	if (!pe)
		pe = bpf_map_lookup_elem(&conntrack, k);
	return pe;
}

/* Insert v under k into the table its FLB_CTF_NEW flag names. */
static __always_inline long ct_insert(const struct flb_ct_key *k, const struct flb_ct *v,
				      __u64 flags)
{
	if (v->flags & FLB_CTF_NEW)
		return bpf_map_update_elem(&ct_new, k, v, flags);
	return bpf_map_update_elem(&conntrack, k, v, flags);
}

static __always_inline void ct_delete(const struct flb_ct_key *k)
{
	if (bpf_map_delete_elem(&conntrack, k) != 0)
		bpf_map_delete_elem(&ct_new, k);
}

#define E2BIG_ 7

/* A flow in ct_new is confirmed (its handshake completed, a pick-up confirmed by the
 * endpoint's side, a UDP or ICMP echo flow answered and continued): both entries move from
 * ct_new to conntrack, reply first. `seen`: the other direction's entry as tcp_track found it
 * (0: look it up); used when it is still in ct_new. Returns the entry now under `key`, or 0
 * when conntrack is full: the flow stays in ct_new (it will expire there unless a later packet
 * moves it) and `e` stays valid; the caller decides about the packet. Another CPU moving the
 * same flow at once is fine (its copy is the one kept). */
static __always_inline struct flb_ct *ct_promote(const struct flb_ct_key *key, struct flb_ct *e,
						 struct flb_ct *seen)
{
	struct flb_ct_key pk;
	ct_peer_key(&pk, key, e);
	/* Entries in conntrack never carry FLB_CTF_NEW: a flagged one is the ct_new copy. */
	struct flb_ct *pe = seen && (seen->flags & FLB_CTF_NEW) ? seen
							     : bpf_map_lookup_elem(&ct_new, &pk);
	if (pe && !ct_points_to(pe, key))
		pe = 0;
	/* Moved, an entry is confirmed: neither flag of the half-open table goes along (both are
	 * given back if it cannot move). */
	const __u8 half = FLB_CTF_NEW | FLB_CTF_REPLIED;
	__u8 ef = e->flags & half, pf = pe ? pe->flags & half : 0;
	e->flags &= ~(FLB_CTF_NEW | FLB_CTF_REPLIED);
	if (pe)
		pe->flags &= ~(FLB_CTF_NEW | FLB_CTF_REPLIED);
	long rc = 0;
	if (pe)
		rc = bpf_map_update_elem(&conntrack, &pk, pe, BPF_NOEXIST);
	if (rc == 0 || rc == -17 /* EEXIST */) {
		long ro = bpf_map_update_elem(&conntrack, key, e, BPF_NOEXIST);
		if (ro == 0 || ro == -17) {
			if (pe)
				bpf_map_delete_elem(&ct_new, &pk);
			bpf_map_delete_elem(&ct_new, key);
			count(FLB_CNT_CT_PROMOTED);
			struct flb_ct *m = bpf_map_lookup_elem(&conntrack, key);
			if (m && ro == 0) {
				struct flb_ct *po = FLOW_EVENTS && m->dir != 0
							    ? bpf_map_lookup_elem(&conntrack, &pk)
							    : 0;
				emit_flow(FLB_EV_ESTABLISHED, key, m, &pk, po);
			}
			return m;
		}
		if (pe && rc == 0)
			bpf_map_delete_elem(&conntrack, &pk);
	}
	e->flags |= ef;
	if (pe)
		pe->flags |= pf;
	return 0;
}

/* May this RST change the flow's state? Its sequence number must be within FLB_RST_WINDOW of
 * the next one its sender is known to send. A direction never seen before (an endpoint
 * refusing the connection) qualifies with an RST+ACK acknowledging exactly what the other
 * direction sent (RFC 793: an RST in SYN-SENT is acceptable if it acknowledges the SYN). A
 * flow whose sequence numbers are not tracked (synced, adopted) is not closed by an RST: the
 * RST is still forwarded, and the entry times out. */
static __always_inline int rst_acceptable(const struct flb_ct *e, const struct flb_ct *pe,
					  const struct pkt *p)
{
	if (e->flags & FLB_CTF_SEQ) {
		__s32 d = (__s32)(p->seq - e->seq_next);
		return d <= FLB_RST_WINDOW && d >= -FLB_RST_WINDOW;
	}
	return (p->tcp_flags & 0x10) && pe && (pe->flags & FLB_CTF_SEQ) && p->ack == pe->seq_next;
}

/* A tracked flow's state moves from `st` to `next` (TCP or SCTP): stored in both entries;
 * reported when it becomes established (a half-open flow once it has moved to conntrack:
 * ct_promote); and when `close`, counted closed exactly once (the CLOSED bit is the claim:
 * both directions may close at once on two CPUs). `pe` is the entry under `pkey` (the other
 * direction's key), when there is one; events carry the original direction's entry. */
static __always_inline void ct_set_state(const struct flb_ct_key *key, struct flb_ct *e,
					 const struct flb_ct_key *pkey, struct flb_ct *pe, __u8 st,
					 __u8 next, int close, __u64 now)
{
	if (next != e->state) {
		e->state = next;
		if (pe) {
			pe->state = next;
			pe->last_ns = now;
		}
	}
	if (next == FLB_CT_EST && st < FLB_CT_EST && !(e->flags & FLB_CTF_NEW)) {
		/* A flow made half-open in conntrack completes in place, and leaves the budget. */
		if (inplace_settle(e->dir == 0 ? e : pe))
			count(FLB_CNT_CT_PROMOTED);
		emit_flow(FLB_EV_ESTABLISHED, key, e, pkey, pe);
	}
	if (close) {
		struct flb_ct *o = e->dir == 0 ? e : pe;
		if (!o)
			o = e;
		__u32 old = __sync_fetch_and_or(&o->fin, FLB_FIN_CLOSED);
		if (!(old & FLB_FIN_CLOSED)) {
			lc_dec(o);
			emit_flow(FLB_EV_CLOSED, key, e, pkey, pe);
		}
	}
}

/* TCP tracking for a segment with SYN, FIN or RST, of a flow not yet established, or of a
 * pick-up not yet confirmed. Both entries of a flow carry the state (stored in both on a
 * change). The two directions may be processed at once on two CPUs at close time, so FIN bits
 * are set with atomic or in both entries: whichever packet sees both bits closes the flow, and
 * a CLOSED bit makes the close counted (event, least-connections) exactly once. `inwin`: the
 * segment is in the tracked window (seq_track); an RST or FIN outside it changes nothing.
 * Returns the other direction's entry (0 if none), for ct_promote. */
static __always_inline struct flb_ct *tcp_track(const struct flb_ct_key *key, struct flb_ct *e,
						 const struct pkt *p, int inwin, __u64 now)
{
	__u8 flags = p->tcp_flags;
	__u8 st = eff_state(e);
	__u8 next = st;
	int close = 0;
	struct flb_ct_key pk;
	ct_peer_key(&pk, key, e);
	struct flb_ct *pe = ct_lookup_near(&pk, e);

	if (flags & 0x04) { /* RST */
		if (!rst_acceptable(e, pe, p)) {
			count(FLB_CNT_TCP_STATE_IGNORED);
			return pe;
		}
		next = FLB_CT_CLOSE;
		close = 1;
	} else if (!inwin) {
		if (flags & 0x01)
			count(FLB_CNT_TCP_STATE_IGNORED);
		return pe;
	} else if (flags & 0x01) { /* FIN */
		__u32 bit = e->dir ? FLB_FIN_REPLY : FLB_FIN_ORIG;
		__u32 seen = __sync_fetch_and_or(&e->fin, bit) | bit;
		if (pe)
			seen |= __sync_fetch_and_or(&pe->fin, bit);
		if ((seen & FLB_FIN_BOTH) == FLB_FIN_BOTH) {
			if (st < FLB_CT_TIME_WAIT)
				next = FLB_CT_TIME_WAIT;
			close = 1;
		} else if (st < FLB_CT_FIN_WAIT) {
			next = FLB_CT_FIN_WAIT;
		}
	} else if (st == FLB_CT_SYN_SENT && e->dir == 1) {
		if ((flags & 0x12) == 0x12)
			next = FLB_CT_SYN_RECV;
		else if (flags & 0x10)
			next = FLB_CT_EST; /* a reply ACK without SYN-ACK: we joined late */
	} else if (st == FLB_CT_SYN_RECV && e->dir == 0 && (flags & 0x12) == 0x10) {
		next = FLB_CT_EST;
	}
	/* A pick-up is confirmed by the endpoint's side answering with an ACK. */
	if ((e->flags & FLB_CTF_PICKUP) && e->dir == 1 && (flags & 0x14) == 0x10) {
		e->flags &= ~FLB_CTF_PICKUP;
		if (pe)
			pe->flags &= ~FLB_CTF_PICKUP;
	}
	ct_set_state(key, e, &pk, pe, st, next, close, now);
	return pe;
}

/* Does an SCTP packet carry the association's tag for its direction? Its own tag, or for an
 * ABORT or SHUTDOWN COMPLETE with the T bit the other direction's (RFC 9260 8.5.1). A tag not
 * known yet (a synced or adopted flow) is learnt from the first packet that carries one. */
static __always_inline int sctp_tag_ok(struct flb_ct *e, const struct flb_ct *pe,
				       const struct pkt *p)
{
	if ((p->chunk == SCTP_ABORT || p->chunk == SCTP_SHUTDOWN_COMPLETE) &&
	    (p->chunk_flags & SCTP_CHUNK_T))
		return pe && (pe->flags & FLB_CTF_SEQ) && p->seq == pe->seq_next;
	if (!(e->flags & FLB_CTF_SEQ)) {
		if (p->seq == 0)
			return 0;
		e->seq_next = p->seq;
		e->flags |= FLB_CTF_SEQ;
		return 1;
	}
	return p->seq == e->seq_next;
}

/* SCTP association tracking, by the packet's first chunk (bundled control chunks after a
 * DATA chunk are not looked at: the entry then times out as an idle one does). Both entries
 * carry the state, as for TCP; a chunk with the wrong tag changes nothing. */
static __always_inline void sctp_track(const struct flb_ct_key *key, struct flb_ct *e,
				       const struct pkt *p, __u64 now)
{
	__u8 st = eff_state(e);
	__u8 c = p->chunk;
	/* Data and acknowledgments of an established association: nothing to do (no peer
	 * lookup on the fast path). */
	if (st == FLB_CT_EST && (c == SCTP_DATA || c == SCTP_SACK))
		return;
	if (c == SCTP_INIT || c == SCTP_COOKIE_ECHO)
		return; /* a retransmitted INIT, or the cookie: no state of ours changes */
	struct flb_ct_key pk;
	ct_peer_key(&pk, key, e);
	struct flb_ct *pe = ct_lookup(&pk);
	if (!sctp_tag_ok(e, pe, p)) {
		count(FLB_CNT_SCTP_TAG_IGNORED);
		return;
	}
	__u8 next = st;
	int close = 0;
	if (c == SCTP_INIT_ACK) {
		/* The endpoint's initiate tag is the one the client's packets carry from now. */
		if (e->dir == 1 && pe) {
			pe->seq_next = p->ack;
			pe->flags |= FLB_CTF_SEQ;
		}
		if (st == FLB_CT_SYN_SENT)
			next = FLB_CT_SYN_RECV;
	} else if (c == SCTP_ABORT) {
		next = FLB_CT_CLOSE;
		close = 1;
	} else if (c == SCTP_SHUTDOWN_COMPLETE) {
		next = FLB_CT_TIME_WAIT;
		close = 1;
	} else if (c == SCTP_SHUTDOWN || c == SCTP_SHUTDOWN_ACK) {
		if (st < FLB_CT_FIN_WAIT)
			next = FLB_CT_FIN_WAIT;
	} else if (st < FLB_CT_EST) {
		/* COOKIE ACK, or anything else with the right tag: the association is up. */
		next = FLB_CT_EST;
	}
	ct_set_state(key, e, &pk, pe, st, next, close, now);
}

static __always_inline __u32 flow_hash(const struct pkt *p)
{
	/* Deterministic (no per-node seed): every node maps a flow to the
	 * same lookup-table slot. murmur3 finaliser over the 5-tuple; IPv6
	 * addresses are folded to 32 bits first (IPv4's extra words are 0). */
	__u32 sa = p->saddr[0] ^ p->saddr[1] ^ p->saddr[2] ^ p->saddr[3];
	__u32 da = p->daddr[0] ^ p->daddr[1] ^ p->daddr[2] ^ p->daddr[3];
	__u32 h = sa * 0x9e3779b1u;
	h ^= da + 0x7f4a7c15u + (h << 6) + (h >> 2);
	h ^= (((__u32)p->sport << 16) | p->dport) + 0x165667b1u + (h << 6) + (h >> 2);
	h ^= p->proto;
	h ^= h >> 16;
	h *= 0x85ebca6bu;
	h ^= h >> 13;
	h *= 0xc2b2ae35u;
	h ^= h >> 16;
	return h;
}

static __always_inline int ep_ok(const struct flb_backends *be, __u32 i)
{
	if (i >= FLB_MAX_ENDPOINTS || i >= be->count)
		return 0;
	return be->ep[i].active;
}

static __always_inline __u32 pick_lut(const struct flb_backends *be, __u32 n)
{
	__u32 len = be->lut_len;
	if (len == 0 || len > FLB_LUT_SIZE)
		return FLB_LUT_NONE;
	__u32 slot = n % len;
	/* Keep the bound check: clang proves it redundant, the verifier cannot. */
	asm volatile("" : "+r"(slot));
	if (slot >= FLB_LUT_SIZE)
		return FLB_LUT_NONE;
	return be->lut[slot];
}

static __always_inline __u32 rr_next(__u32 svc_id)
{
	__u32 *c = bpf_map_lookup_elem(&rr_state, &svc_id);
	if (!c)
		return 0;
	return __sync_fetch_and_add(c, 1);
}

struct lc_ctx {
	const struct flb_backends *be;
	__u32 base;
	__u32 best;
	__u32 best_n;
};

static long lc_step(__u32 k, void *arg)
{
	struct lc_ctx *c = arg;
	if (!ep_ok(c->be, k))
		return 0;
	__u32 idx = c->base + k;
	__u32 *n = bpf_map_lookup_elem(&ep_conns, &idx);
	__u32 v = n ? *n : 0;
	if (v < c->best_n) {
		c->best_n = v;
		c->best = k;
	}
	return 0;
}

/* Returns an endpoint index or FLB_LUT_NONE. */
static __always_inline __u32 select_ep(const struct flb_svc *svc, const struct flb_backends *be,
				       const struct pkt *p, __u8 *lc_counted)
{
	__u32 i = FLB_LUT_NONE;

	switch (svc->sel) {
	case FLB_SEL_HASH:
		i = pick_lut(be, flow_hash(p));
		break;
	case FLB_SEL_PERSIST: {
		__u64 now = flb_now();
		struct flb_affinity_key ak = {};
		ak.svc_id = svc->id;
		addr_cp(ak.addr, p->saddr);
		struct flb_affinity *a = bpf_map_lookup_elem(&affinity, &ak);
		if (a && fresh_since(now, a->last_ns, (__u64)svc->timeout_s * 1000000000ULL) &&
		    ep_ok(be, a->ep_idx)) {
			a->last_ns = now;
			return a->ep_idx;
		}
		i = pick_lut(be, rr_next(svc->id));
		if (i != FLB_LUT_NONE) {
			struct flb_affinity na = {.ep_idx = i, .last_ns = now};
			bpf_map_update_elem(&affinity, &ak, &na, BPF_ANY);
		}
		break;
	}
	case FLB_SEL_LC: {
		struct lc_ctx c = {
			.be = be, .base = svc->id * FLB_MAX_ENDPOINTS, .best = FLB_LUT_NONE,
			.best_n = 0xffffffff};
		/* bpf_loop: the verifier checks the body once, not 32 times. */
		bpf_loop(FLB_MAX_ENDPOINTS, lc_step, &c, 0);
		if (c.best != FLB_LUT_NONE) {
			__u32 idx = c.base + c.best;
			__u32 *n = bpf_map_lookup_elem(&ep_conns, &idx);
			if (n) {
				__sync_fetch_and_add(n, 1);
				*lc_counted = 1;
			}
		}
		return c.best;
	}
	default: /* FLB_SEL_RR and FLB_SEL_PRIO: the table holds the sequence */
		i = pick_lut(be, rr_next(svc->id));
		break;
	}
	if (!ep_ok(be, i))
		return FLB_LUT_NONE;
	return i;
}

static __always_inline struct flb_svc *svc_lookup(const struct pkt *p)
{
	struct flb_svc_key k = {};
	addr_cp(k.addr, p->daddr);
	k.port = p->proto == IPPROTO_ICMP ? 0 : p->dport;
	k.proto = p->proto;
	k.family = p->family;
	struct flb_svc *s = bpf_map_lookup_elem(&services, &k);
	if (s || p->proto == IPPROTO_ICMP)
		return s;
	struct flb_range_key rk = {};
	addr_cp(rk.addr, p->daddr);
	rk.proto = p->proto;
	rk.family = p->family;
	struct flb_ranges *r = bpf_map_lookup_elem(&ranges, &rk);
	if (!r)
		return 0;
	__u16 port = bpf_ntohs(p->dport);
	for (int j = 0; j < FLB_MAX_RANGES; j++) {
		if (r->r[j].hi != 0 && port >= r->r[j].lo && port <= r->r[j].hi)
			return &r->r[j].svc;
	}
	return 0;
}

/* May this packet's source open a flow of this rule? Every source may, unless the rule lists
 * the prefixes allowed (a longest-prefix match in src_ranges under the rule's id). */
static __always_inline int source_allowed(const struct flb_svc *svc, const struct pkt *p)
{
	if (!(svc->flags & FLB_SVCF_SOURCES))
		return 1;
	struct flb_src_key k = {};
	k.prefixlen = 32 + (p->family == FLB_FAMILY_V6 ? 128 : 32);
	k.svc_id = bpf_htonl(svc->id);
	addr_cp(k.addr, p->saddr);
	if (bpf_map_lookup_elem(&src_ranges, &k))
		return 1;
	__u32 id = svc->id;
	__u64 *c = bpf_map_lookup_elem(&src_drops, &id);
	if (c)
		*c += 1;
	count(FLB_CNT_DROP_SOURCE);
	return 0;
}

/* Is this address a VIP of any service (for the fragment and unknown-flow rules)? */
static __always_inline int is_vip(const __u32 *daddr, __u8 family, __u8 proto)
{
	struct flb_range_key rk = {};
	addr_cp(rk.addr, daddr);
	rk.proto = proto;
	rk.family = family;
	/* The agent keeps one (possibly empty) ranges entry per VIP and
	 * protocol, so this is a single lookup. */
	return bpf_map_lookup_elem(&ranges, &rk) != 0;
}

/* Is a malformed packet ours to drop: addressed to a VIP (any of its protocols), or
 * claiming a tracked flow? Anything else is the stack's business (it drops such packets
 * too, or they belong to an interface we do not serve). */
static __always_inline int malformed_ours(const struct pkt *p)
{
	if (is_vip(p->daddr, p->family, p->proto) || is_vip(p->daddr, p->family, IPPROTO_TCP) ||
	    is_vip(p->daddr, p->family, IPPROTO_UDP))
		return 1;
	if (!p->l4ok)
		return 0;
	struct flb_ct_key k;
	ct_key(&k, p->saddr, p->daddr, p->sport, p->dport, p->proto, p->family);
	return ct_lookup(&k) != 0;
}

/* A TCP segment other than a connection-opening SYN, to a VIP, for which the kernel has no
 * socket: the stack would answer it with a reset. Such a segment belongs to a flow this node
 * does not know (yet): the backend side of a full-NAT flow after a takeover, or a flow whose
 * sync is still in flight. Dropping it lets TCP retransmit instead of dying. */
__noinline int unknown_tcp_to_vip(struct __sk_buff *skb, const struct pkt *p)
{
	if (!p)
		return 0;
	if (p->proto != IPPROTO_TCP || (p->tcp_flags & 0x12) == 0x02)
		return 0;
	if (!is_vip(p->daddr, p->family, IPPROTO_TCP))
		return 0;
	struct bpf_sock_tuple t = {};
	__u32 tlen = sizeof(t.ipv4);
	if (p->family == FLB_FAMILY_V6) {
		addr_cp(t.ipv6.saddr, p->saddr);
		addr_cp(t.ipv6.daddr, p->daddr);
		t.ipv6.sport = p->sport;
		t.ipv6.dport = p->dport;
		tlen = sizeof(t.ipv6);
	} else {
		t.ipv4.saddr = p->saddr[0];
		t.ipv4.daddr = p->daddr[0];
		t.ipv4.sport = p->sport;
		t.ipv4.dport = p->dport;
	}
	struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &t, tlen, BPF_F_CURRENT_NETNS, 0);
	if (sk) {
		bpf_sk_release(sk);
		return 0;
	}
	return 1;
}

/* Is this the packet that opens a connection (a TCP SYN, an SCTP INIT)? */
static __always_inline int opens_flow(const struct pkt *p)
{
	if (p->proto == IPPROTO_TCP)
		return (p->tcp_flags & 0x12) == 0x02;
	return p->proto == IPPROTO_SCTP && p->chunk == SCTP_INIT;
}

/* Does the entry found under a packet's key carry that packet's flow? A synced entry lives
 * as long as its origin says; otherwise the flow is alive while either direction is (one-way
 * UDP keeps only one fresh). A new SYN on a closed original entry starts a new flow. */
static __always_inline int ct_live(const struct flb_ct_key *key, const struct flb_ct *e,
				   const struct pkt *p, __u64 now)
{
	if (e->dir == 0 && opens_flow(p) && eff_state(e) >= FLB_CT_TIME_WAIT)
		return 0;
	if ((e->flags & FLB_CTF_SYNCED) || ct_alive(e, p->proto, now))
		return 1;
	struct flb_ct_key pk;
	ct_peer_key(&pk, key, e);
	struct flb_ct *pe = ct_lookup(&pk);
	return pe && ct_alive(pe, p->proto, now);
}

/* An entry the datapath is about to delete because a new flow takes its key or its NAT
 * port. Its flow's least-connections count is released once (the CLOSED bit is the claim,
 * as at a close), and an original-direction entry is reported so peers drop it too. */
static __always_inline void ct_retire(const struct flb_ct_key *k, struct flb_ct *v)
{
	if (v->dir != 0)
		return;
	inplace_settle(v);
	__u32 old = __sync_fetch_and_or(&v->fin, FLB_FIN_CLOSED);
	if (!(old & FLB_FIN_CLOSED))
		lc_dec(v);
	emit(FLB_EV_REMOVED, k, v);
}

/* Claim an entry this CPU is about to remove or rewrite (FLB_FIN_CLAIMED). Returns 1 when
 * this CPU holds it now, 0 when another one does (it is removing or rewriting the entry at
 * this moment; leave the entry to it). A holder always deletes the entry, writes over it, or
 * releases it (ct_unclaim): a claim never outlives the packet that took it. */
static __always_inline int ct_claim(struct flb_ct *v)
{
	return !(__sync_fetch_and_or(&v->fin, FLB_FIN_CLAIMED) & FLB_FIN_CLAIMED);
}

static __always_inline void ct_unclaim(struct flb_ct *v)
{
	__sync_fetch_and_and(&v->fin, ~FLB_FIN_CLAIMED);
}

/* The other direction of the flow whose entry `v` (at k) this CPU holds: *pe, the entry found
 * under that direction's key, is kept and claimed when it belongs to the same flow (points
 * back at k and was created with it), else set to 0. Returns 0 when another CPU holds it: that
 * CPU is removing or rewriting the flow; the caller releases `v` and leaves the flow to it, so
 * that no flow is ever removed or rewritten by halves from two sides. */
static __always_inline int ct_claim_peer(const struct flb_ct_key *k, const struct flb_ct *v,
					 struct flb_ct **pe)
{
	struct flb_ct *e = *pe;
	if (e && !(ct_points_to(e, k) && e->created_ns == v->created_ns)) {
		*pe = 0;
		return 1;
	}
	return !e || ct_claim(e);
}

/* Remove a dead flow whose entry `v` sits at `k`; `pk` is the key of its other direction and
 * `pe` the entry of the same flow there, or 0 if none. The caller holds both (ct_claim,
 * ct_claim_peer): no other CPU retires or rewrites them at the same time. The other direction
 * goes first, then k itself. Global (checked once, on its own). */
__noinline int ct_remove_flow(const struct flb_ct_key *k, struct flb_ct *v,
			      const struct flb_ct_key *pk, struct flb_ct *pe)
{
	if (!k || !v || !pk)
		return 0;
	if (pe) {
		ct_retire(pk, pe);
		ct_delete(pk);
	}
	ct_retire(k, v);
	ct_delete(k);
	return 1;
}

/* May a new flow take the key k that `occ` holds? A local entry past its timeout whose
 * flow's other direction is gone or past its timeout too; or, when `halfopen_idle_ns` is not
 * 0 (a pool under pressure), a local half-open flow (SYN_SENT, SYN_RECV, a pick-up not yet
 * confirmed, an unconfirmed UDP or ICMP echo flow) whose two entries have been idle that long.
 * Both entries claimed, so of several CPUs wanting the same port, or the flow, one acts on
 * it. */
static __always_inline int ct_take_over(const struct flb_ct_key *k, struct flb_ct *occ, __u64 now,
					__u64 halfopen_idle_ns)
{
	if (occ->flags & FLB_CTF_SYNCED)
		return 0;
	__u64 last = occ->last_ns; /* the value the claim below compares against */
	__u64 idle = ct_timeout_ns(occ, k->proto);
	int half = 0;
	if (halfopen_idle_ns && k->proto == IPPROTO_TCP) {
		__u8 st = eff_state(occ);
		if (st == FLB_CT_SYN_SENT || st == FLB_CT_SYN_RECV ||
		    (st == FLB_CT_EST && (occ->flags & FLB_CTF_PICKUP))) {
			idle = halfopen_idle_ns;
			half = 1;
		}
	} else if (halfopen_idle_ns && (k->proto == IPPROTO_UDP || k->proto == IPPROTO_ICMP) &&
		   (occ->flags & FLB_CTF_NEW)) {
		/* An unconfirmed datagram flow: a lone query long answered, or a spoofed one. */
		idle = halfopen_idle_ns;
		half = 1;
	}
	if (fresh_since(now, last, idle))
		return 0;
	struct flb_ct_key pk;
	ct_peer_key(&pk, k, occ);
	struct flb_ct *pe = ct_lookup(&pk);
	if (pe && ct_points_to(pe, k) &&
	    ((pe->flags & FLB_CTF_SYNCED) ||
	     (half ? fresh_since(now, pe->last_ns, idle) : ct_alive(pe, k->proto, now))))
		return 0;
	/* Claimed, both entries (another CPU taking the same port over, or reopening or removing
	 * the flow from its other side, holds one of them: leave it to that CPU); and not taken if
	 * a packet of the flow made it fresh since it was read (the swap). */
	if (!ct_claim(occ))
		return 0;
	if (!ct_claim_peer(k, occ, &pe)) {
		ct_unclaim(occ);
		return 0;
	}
	if (__sync_val_compare_and_swap(&occ->last_ns, last, now) != last) {
		ct_unclaim(occ);
		if (pe)
			ct_unclaim(pe);
		return 0;
	}
	ct_remove_flow(k, occ, &pk, pe);
	count(half ? FLB_CNT_HALFOPEN_TAKEOVER : FLB_CNT_NAT_TAKEOVER);
	return 1;
}

/* A flow about to be made half-open in conntrack (no FLB_CTF_NEW, SYN_SENT) found conntrack
 * full: it is made in ct_new instead, as without the in-place budget (a full conntrack then
 * refuses the handshake's end, not its start). Returns 1 when `o` was such a flow. */
static __always_inline int inplace_spill(struct flb_ct *o)
{
	if (!inplace_flow(o))
		return 0;
	o->flags |= FLB_CTF_NEW;
	return 1;
}

/* bpf_loop state for the source-NAT port search. */
struct nat_search {
	struct flb_ct_key rkey; /* the reply key; its translated port is filled per probe */
	struct flb_ct *reply;   /* the reply entry to insert (the caller's stack) */
	__u64 now;
	__u32 probes;
	__u16 first; /* the client's own port (network order), 0 = none */
	__u16 port;  /* the port found (network order) */
	__u8 icmp;
	__u8 found;
	__u8 full;
};

static long nat_probe(__u32 i, void *arg)
{
	struct nat_search *c = arg;
	__u16 port;
	if (i == 0 && c->first)
		port = c->first;
	else
		port = bpf_htons(FLB_NAT_PORT_LO + bpf_get_prandom_u32() % FLB_NAT_PORTS);
	c->probes = i + 1;
	if (c->icmp)
		c->rkey.sport = port;
	else
		c->rkey.dport = port;
	/* A port is taken wherever its flow lives: conntrack is looked at first. A refused
	 * BPF_NOEXIST insert into an LRU map (ct_new) still takes a free node first, which in
	 * a full table evicts its least recently used entry, so past the first probe ct_new is
	 * looked at before inserting too. The first probe nearly always finds its port free and
	 * inserts at once (one hash lookup fewer per new flow); a refusal there costs at most
	 * one eviction, of the oldest half-open flow, and only when ct_new is full. */
	struct flb_ct *occ = bpf_map_lookup_elem(&conntrack, &c->rkey);
	if (!occ && i == 0) {
		long rc = ct_insert(&c->rkey, c->reply, BPF_NOEXIST);
		if (rc == 0) {
			c->port = port;
			c->found = 1;
			return 1;
		}
		if (rc == -E2BIG_) {
			if (inplace_spill(c->reply))
				return 0; /* conntrack is full: the flow goes to ct_new */
			c->full = 1; /* conntrack is full: no port helps */
			return 1;
		}
		occ = ct_lookup(&c->rkey);
		if (!occ)
			return 0; /* gone since the refusal: the next probe */
	} else if (!occ) {
		occ = bpf_map_lookup_elem(&ct_new, &c->rkey);
	}
	/* Past the easy probes the pool is under pressure: half-open flows give their ports up
	 * too, those idle longest first. */
	__u64 half = 0;
	if (i >= FLB_NAT_EASY_PROBES)
		half = i < FLB_HALFOPEN_HARD_PROBE ? FLB_HALFOPEN_IDLE_NS : FLB_HALFOPEN_IDLE_HARD_NS;
	if (occ && !ct_take_over(&c->rkey, occ, c->now, half))
		return 0;
	long rc = ct_insert(&c->rkey, c->reply, BPF_NOEXIST);
	if (rc == -E2BIG_) {
		if (inplace_spill(c->reply))
			return 0; /* conntrack is full: the flow goes to ct_new */
		c->full = 1; /* conntrack is full: no port helps */
		return 1;
	}
	if (rc != 0)
		return 0; /* another CPU took it since the lookup */
	c->port = port;
	c->found = 1;
	return 1;
}

/* Tell the agent (at most every FLB_NAT_SIGNAL_NS) that a NAT pool is filling up. */
static __always_inline void nat_signal_pressure(const struct flb_ct_key *rkey,
						const struct flb_ct *reply, __u64 now)
{
	__u32 zero = 0;
	__u64 *last = bpf_map_lookup_elem(&nat_signal, &zero);
	if (!last)
		return;
	__u64 l = *last;
	if (now - l < FLB_NAT_SIGNAL_NS && l != 0)
		return;
	if (__sync_val_compare_and_swap(last, l, now) != l)
		return;
	emit(FLB_EV_NAT_PRESSURE, rkey, reply);
}

/* Does the packet that opens a flow need no TCP tracking beyond its entry's creation (a bare
 * SYN, or UDP or ICMP)? Then ct_create counts it and tracks its sequence in the entry it
 * inserts, and it is forwarded from that copy. A mid-stream pick-up is tracked on the entry
 * (it may carry a FIN or RST). */
static __always_inline int first_packet_untracked(const struct pkt *p)
{
	return p->proto != IPPROTO_TCP || (p->tcp_flags & 0x17) == 0x02;
}

/* The new flow's endpoint (counted for least-connections when its rule balances that way: the
 * entry's FLB_CTF_LC), its reply entry built in `o`, and its reply key in `rkey`: from the
 * endpoint to the new source, with the client's own port as that source's port (DNAT keeps
 * it; source NAT tries it first). Returns -1 when the rule has no endpoint to give (counted).
 * Global: checked once on its own, not on every path of ct_create that follows. */
__noinline int ct_plan(const struct pkt *p, const struct flb_svc *svc, struct flb_ct *o,
		       struct flb_ct_key *rkey)
{
	if (!p || !svc || !o || !rkey)
		return -1;
	__u32 slot = svc->be_slot;
	struct flb_backends *be = bpf_map_lookup_elem(&backends, &slot);
	if (!be) {
		count(FLB_CNT_DROP_NO_ENDPOINT);
		return -1;
	}
	__u8 lc = 0;
	__u32 i = select_ep(svc, be, p, &lc);
	if (i >= FLB_MAX_ENDPOINTS) {
		count(FLB_CNT_DROP_NO_ENDPOINT);
		return -1;
	}
	const struct flb_ep *ep = &be->ep[i];

	__u16 eport = p->dport;
	if (p->proto != IPPROTO_ICMP && ep->port != 0)
		eport = bpf_htons(ep->port + (bpf_ntohs(p->dport) - svc->port_base));

	const __u32 *snat = p->saddr;
	if (svc->mode == FLB_MODE_FULLNAT) {
		const volatile __u32 *own = p->family == FLB_FAMILY_V6 ? FULLNAT_SRC6 : FULLNAT_SRC4;
		snat = p->daddr;
		if (own[0] | own[1] | own[2] | own[3])
			snat = (const __u32 *)own;
	} else if (svc->mode == FLB_MODE_ONEARM)
		snat = ep->snat_addr;

	__builtin_memset(o, 0, sizeof(*o));
	o->svc_id = svc->id;
	o->timeout_s = svc->timeout_s;
	o->ep_idx = i;
	o->origin = NODE_ID;
	o->flags = FLB_CTF_LOCAL | (lc ? FLB_CTF_LC : 0);
	o->mode = svc->mode;
	o->created_ns = bpf_ktime_get_ns(); /* the clock source: see flb_now */
	/* last_ns: set by ct_create */
	if (p->proto == IPPROTO_TCP && (p->tcp_flags & 0x12) != 0x02) {
		/* Picked up mid-stream (DNAT only: the caller refuses it in the other modes),
		 * on a short timeout until the endpoint's side answers. */
		o->state = FLB_CT_EST;
		o->flags |= FLB_CTF_PICKUP | FLB_CTF_NEW;
	} else if (p->proto == IPPROTO_TCP || p->proto == IPPROTO_SCTP) {
		/* A SYN, or an SCTP INIT (the only chunk that opens a flow): half-open in
		 * ct_new until the handshake completes; a SYN in conntrack itself while the
		 * in-place budget has room (ct_create counts it there). */
		o->state = FLB_CT_SYN_SENT;
		if (p->proto != IPPROTO_TCP || !inplace_room())
			o->flags |= FLB_CTF_NEW;
	} else {
		/* UDP, ICMP echo: unconfirmed in ct_new until answered and continued
		 * (dgram_track). */
		o->state = FLB_CT_EST;
		o->flags |= FLB_CTF_NEW;
	}

	/* The reply entry: back to the VIP and the client. */
	addr_cp(o->nat_saddr, p->daddr);
	addr_cp(o->nat_daddr, p->saddr);
	o->nat_sport = p->proto == IPPROTO_ICMP ? p->sport : p->dport;
	o->nat_dport = p->proto == IPPROTO_ICMP ? 0 : p->sport;
	o->dir = 1;
	/* SCTP: the endpoint's packets carry the tag the INIT asked for. */
	if (p->proto == IPPROTO_SCTP) {
		o->seq_next = p->ack;
		o->flags |= FLB_CTF_SEQ;
	}
	int icmp = p->proto == IPPROTO_ICMP;
	ct_key(rkey, ep->addr, snat, icmp ? p->sport : eport, icmp ? 0 : p->sport, p->proto,
	       p->family);
	return 0;
}

/* Turns `o`, a new flow's reply entry, into its original-direction entry, translated to
 * (nsa, nsp) -> (nda, ndp). The client's SCTP tag is learnt from the INIT ACK. When the opening
 * packet needs no tracking beyond the entry's creation, the entry carries that packet's share,
 * as flow_packet adds it: the caller forwards the packet from `o` without looking the new entry
 * up again. */
static __always_inline void ct_make_original(struct flb_ct *o, const struct pkt *p,
					     const __u32 *nsa, const __u32 *nda, __u16 nsp,
					     __u16 ndp)
{
	addr_cp(o->nat_saddr, nsa);
	addr_cp(o->nat_daddr, nda);
	o->nat_sport = nsp;
	o->nat_dport = ndp;
	o->dir = 0;
	o->seq_next = 0;
	o->flags &= ~FLB_CTF_SEQ;
	if (first_packet_untracked(p)) {
		o->packets = 1;
		o->bytes = p->len;
		if (p->proto == IPPROTO_TCP)
			seq_track(o, p);
	}
}

/* May a new flow reuse the two entries of the dead flow `prev` (claimed by the caller; `pe`
 * the entry of the same flow under its reply key, claimed too, or 0)? Both in conntrack and
 * made by this node for the same rule, and the packet one that needs no tracking beyond the
 * entry's creation. Whether the new flow's translation is the same is decided once it is
 * chosen (ct_create). */
static __always_inline int ct_reusable(const struct flb_ct *prev, const struct flb_ct *pe,
				       const struct pkt *p, const struct flb_svc *svc)
{
	return pe && first_packet_untracked(p) &&
	       !((prev->flags | pe->flags) & (FLB_CTF_NEW | FLB_CTF_SYNCED)) &&
	       prev->svc_id == svc->id && prev->mode == svc->mode;
}

/* A new flow takes over the two conntrack entries of the dead flow `prev` (under `okey`; `pe`
 * its reply entry; the caller holds the claim on both) whose translation it has both ways
 * (ct_create checked it): `o`, the new flow's reply entry, is written over `pe`, then turned
 * into the original-direction entry (the translation `prev` holds) and written over `prev`;
 * `o` keeps that copy, from which the caller forwards the packet. The dead flow is retired first (its least-connections count,
 * its removal for the peers). Both entries stay in conntrack: a half-open TCP flow here
 * carries no FLB_CTF_NEW and completes in place (reported then, by ct_set_state). Returns 1
 * when done. Global: its own frame, checked by the verifier once. */
__noinline int ct_reopen(const struct pkt *p, const struct flb_ct_key *okey, struct flb_ct *prev,
			 struct flb_ct *pe, struct flb_ct *o)
{
	if (!p || !okey || !prev || !pe || !o)
		return 0;
	ct_retire(okey, prev);
	o->flags &= ~FLB_CTF_NEW;
	/* Written with the claim held (a CPU that reads an entry half-written sees the claim and
	 * leaves it), released once both are whole. */
	o->fin = FLB_FIN_CLAIMED;
	*pe = *o;
	ct_make_original(o, p, prev->nat_saddr, prev->nat_daddr, prev->nat_sport, prev->nat_dport);
	*prev = *o;
	o->fin = 0;
	ct_unclaim(pe);
	ct_unclaim(prev);
	/* (No counter of its own: one more would change the pinned layout of `counters`. A
	 * reopened flow is one not counted in ferrolb_conntrack_handshakes_completed_total.) */
	count(FLB_CNT_CT_CREATED);
	/* A half-open flow is reported when it completes; UDP and ICMP at once. */
	if (o->state >= FLB_CT_EST)
		emit(FLB_EV_CREATED, okey, o);
	return 1;
}

/* A packet that would replace a dead flow another CPU is replacing or removing at this moment
 * (for a packet of the same 4-tuple: a duplicate SYN, a retransmission, a spoofer's copy):
 * dropped, counted as a segment that changed no state; the other CPU's packet goes on. */
static __always_inline int ct_busy(struct flb_ct *o)
{
	lc_dec(o); /* the endpoint ct_plan counted is not used */
	count(FLB_CNT_TCP_STATE_IGNORED);
	return -1;
}

/* Create both conntrack entries for a new flow whose key `okey` held no live entry when the
 * caller looked. Fills *out with the original-direction entry and returns 1 when this call
 * inserted it (with this packet counted and, for TCP, its sequence tracked), 0 when it is a
 * copy of the entry another CPU made meanwhile; a negative value to drop.
 *
 * A global function, like `flow_packet`: the verifier checks it once, on its own, instead of
 * once for every path of flb_ingress that reaches it. */
__noinline int ct_create(const struct pkt *p, const struct flb_svc *svc, struct flb_ct_key *okey,
			 struct flb_ct *out, struct flb_ct *prev)
{
	if (!p || !svc || !okey || !out)
		return -1;
	__u64 now = flb_now(); /* (at most five arguments) */
	/* Built in the caller's buffer (the BPF stack is 512 bytes): first as the reply entry,
	 * then turned into the original-direction entry. */
	struct flb_ct *o = out;
	struct nat_search c;
	__builtin_memset(&c, 0, sizeof(c));
	if (ct_plan(p, svc, o, &c.rkey) < 0)
		return -1;
	o->last_ns = now;
	int icmp = p->proto == IPPROTO_ICMP;

	/* `prev`: the dead entry the caller's lookup found under our key (expired, or closed
	 * and this is a new SYN). Live again (another CPU's duplicate SYN revived it since):
	 * use it, so both packets go to one endpoint. Still dead: claimed, then either reused
	 * or removed with its reply entry, which still holds a NAT port. An entry another CPU
	 * creates after the caller's lookup is met at the insert below.
	 *
	 * Reused: a client reconnecting from the same address and port (a 4-tuple reused after
	 * TIME_WAIT) to the same endpoint through the same source gets the same translation
	 * both ways, so the dead flow's two entries are rewritten where they are (ct_reopen):
	 * no delete and no insert (four hash-table updates fewer on this packet), and the
	 * handshake then completes in conntrack, with no move out of ct_new. This takes no
	 * room from anyone (the slots are the dead flow's), and a stranger cannot open flows
	 * this way (it needs the 4-tuple of a flow that lived here). c.rkey is the reply key
	 * with the client's own port as the new source: DNAT keeps it, and source NAT tries it
	 * first unless it is below the NAT range. */
	if (prev) {
		/* Claimed before anything else is read from it (a compare-and-swap of last_ns would
		 * not do: a closed flow's SYN is no less dead for a fresh last_ns, so a second CPU
		 * would claim it again). Acting on a dead flow from two CPUs would retire it twice
		 * or delete the entries the other CPU is writing. */
		if (!ct_claim(prev))
			return ct_busy(o);
		/* Read under the claim: a CPU that rewrote both entries for a duplicate of this
		 * packet released its claim only once they were whole. Live again: use it, so that
		 * both packets go to one endpoint. Synced entries are replaced too: a new SYN on a
		 * closed flow starts a new one wherever the old one was created. */
		if (ct_live(okey, prev, p, now)) {
			ct_unclaim(prev);
			lc_dec(o); /* the endpoint ct_plan counted is not used */
			*out = *prev;
			return 0;
		}
		/* The reply entry too. Another CPU holding it is taking the dead flow's NAT port
		 * over for another client, and removes the flow itself: the same. */
		struct flb_ct_key pk;
		ct_peer_key(&pk, okey, prev);
		struct flb_ct *pe = ct_lookup(&pk);
		if (!ct_claim_peer(okey, prev, &pe)) {
			ct_unclaim(prev);
			return ct_busy(o);
		}
		if (ct_reusable(prev, pe, p, svc) &&
		    (icmp || addr_eq(c.rkey.daddr, p->saddr) ||
		     bpf_ntohs(p->sport) >= FLB_NAT_PORT_LO) &&
		    ct_points_to(prev, &c.rkey) && ct_reopen(p, okey, prev, pe, o))
			return 1;
		ct_remove_flow(okey, prev, &pk, pe);
	}

	int ok = -1;
	__u16 nport = p->sport;
	if (addr_eq(c.rkey.daddr, p->saddr)) {
		/* Client address kept: the reply key cannot collide with
		 * another client's flow. */
		ok = ct_insert(&c.rkey, o, BPF_ANY);
		if (ok == -E2BIG_ && inplace_spill(o))
			ok = ct_insert(&c.rkey, o, BPF_ANY);
		if (ok == -E2BIG_)
			c.full = 1;
	} else {
		/* Source rewritten: find a free source port (ICMP: echo id) so that two
		 * clients never share a translated 5-tuple. The client's own port first
		 * (clients mostly use distinct ports), then random probes, each independent (a fixed
		 * stride correlates with structured occupancy, e.g. a client's contiguous
		 * ephemeral range). */
		c.reply = o;
		c.now = now;
		c.icmp = icmp;
		if (icmp || bpf_ntohs(p->sport) >= FLB_NAT_PORT_LO)
			c.first = p->sport;
		bpf_loop(FLB_NAT_PROBES, nat_probe, &c, 0);
		if (c.found) {
			ok = 0;
			nport = c.port;
		}
		if (!c.full && (!c.found || c.probes > FLB_NAT_EASY_PROBES)) {
			count(FLB_CNT_NAT_HARD);
			nat_signal_pressure(&c.rkey, o, now);
		}
	}

	/* The original-direction entry: to the endpoint, from the chosen source (the reply key's
	 * addresses; its source port is the endpoint's, which the NAT search leaves). */
	ct_make_original(o, p, c.rkey.daddr, c.rkey.saddr, nport, icmp ? 0 : c.rkey.sport);
	if (ok != 0) {
		lc_dec(o);
		count(c.full ? FLB_CNT_DROP_CT_FULL : FLB_CNT_DROP_NAT_PORTS);
		return -1;
	}
	/* Half-open in conntrack itself: counted in the in-place budget until it is established
	 * or removed. */
	int inplace = inplace_flow(o);
	if (inplace)
		o->fin |= FLB_FIN_HALFOPEN;
	for (int t = 0; t < 2; t++) {
		long rc = ct_insert(okey, o, BPF_NOEXIST);
		if (rc == 0) {
			count(FLB_CNT_CT_CREATED);
			if (inplace)
				inplace_add(0);
			/* A half-open flow is reported when it is established (ct_promote,
			 * ct_set_state): peers never hold unconfirmed flows, so a flood here does
			 * not fill their tables. */
			if (!(o->flags & FLB_CTF_NEW) && o->state >= FLB_CT_EST)
				emit(FLB_EV_CREATED, okey, o);
			return 1;
		}
		if (rc == -E2BIG_) {
			c.full = 1;
			break;
		}
		/* Another CPU created this flow since we looked (a duplicate SYN): use its
		 * entry, and drop our reply entry unless it is the same key as theirs. */
		struct flb_ct *cur = ct_lookup(okey);
		if (cur) {
			if (!ct_points_to(cur, &c.rkey))
				ct_delete(&c.rkey);
			lc_dec(o);
			*out = *cur;
			return 0;
		}
	}
	ct_delete(&c.rkey);
	lc_dec(o);
	count(c.full ? FLB_CNT_DROP_CT_FULL : FLB_CNT_DROP_NAT_PORTS);
	return -1;
}

/* Rewrite one 32-bit address field of the IPv4 header (and the L4 pseudo
 * header checksum for TCP/UDP). */
static __always_inline int set_addr(struct __sk_buff *skb, const struct pkt *p, __u32 off,
				    __u32 old, __u32 new)
{
	if (old == new)
		return 0;
	if (p->proto != IPPROTO_ICMP) {
		__u64 f = BPF_F_PSEUDO_HDR | sizeof(new);
		if (p->proto == IPPROTO_UDP)
			f |= BPF_F_MARK_MANGLED_0;
		if (bpf_l4_csum_replace(skb, p->l4off + l4_csum_off(p->proto), old, new, f) < 0)
			return -1;
	}
	if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old, new, sizeof(new)) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, off, &new, sizeof(new), 0);
}

/* Fold a checksum difference (bpf_csum_diff) into the L4 checksum at `csum_off`. `pseudo`:
 * the change is to the IPv6 pseudo header (an address), which ICMPv6 covers too. */
static __always_inline int l4_csum_diff6(struct __sk_buff *skb, __u32 csum_off, __s64 diff,
					 __u8 proto, int pseudo)
{
	if (diff < 0)
		return -1;
	__u64 f = pseudo ? BPF_F_PSEUDO_HDR : 0;
	if (proto == IPPROTO_UDP)
		f |= BPF_F_MARK_MANGLED_0;
	long rc = bpf_l4_csum_replace(skb, csum_off, 0, diff, f | (CSUM_IPV6 ? BPF_F_IPV6 : 0));
	if (rc == -22 && CSUM_IPV6) /* -EINVAL: the release said yes, the kernel no */
		rc = bpf_l4_csum_replace(skb, csum_off, 0, diff, f);
	return rc < 0 ? -1 : 0;
}

/* Rewrite one 128-bit address of the IPv6 header; TCP, UDP and ICMPv6 checksums all cover
 * it through the pseudo header. `old` and `new` must be stack or map memory. */
static __always_inline int set_addr6(struct __sk_buff *skb, const struct pkt *p, __u32 off,
				     __u32 *old, __u32 *new)
{
	if (addr_eq(old, new))
		return 0;
	__s64 diff = bpf_csum_diff(old, 16, new, 16, 0);
	if (l4_csum_diff6(skb, p->l4off + l4_csum_off(p->proto), diff, p->proto, 1) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, off, new, 16, 0);
}

/* One's complement partial sums (the kernel's __wsum) of field changes, so that several
 * changed fields cost one checksum helper call: `~old + new` per 32-bit word, folded. The
 * helpers take such a sum with size 0 and keep skb->csum right (CHECKSUM_COMPLETE) or leave a
 * CHECKSUM_PARTIAL packet's pseudo-header sum as the offload expects, which a direct write
 * could not. */
static __always_inline __u64 wsum_change(__u64 s, __u32 old, __u32 new)
{
	return s + (__u32)~old + new;
}

static __always_inline __u32 wsum_fold(__u64 s)
{
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffffffff) + (s >> 32);
	return (__u32)s;
}

/* The counter for a FIB answer that is not a forwarding decision (FLB_CNT_FALLBACK_*). */
static __always_inline __u32 fib_fallback(int rc)
{
	switch (rc) {
	case BPF_FIB_LKUP_RET_NOT_FWDED:
		return FLB_CNT_FALLBACK_NO_ROUTE;
	case BPF_FIB_LKUP_RET_FWD_DISABLED:
		return FLB_CNT_FALLBACK_FWD_DISABLED;
	case BPF_FIB_LKUP_RET_BLACKHOLE:
	case BPF_FIB_LKUP_RET_UNREACHABLE:
	case BPF_FIB_LKUP_RET_PROHIBIT:
	case BPF_FIB_LKUP_RET_NO_SRC_ADDR:
		return FLB_CNT_FALLBACK_UNREACHABLE;
	case BPF_FIB_LKUP_RET_FRAG_NEEDED:
		return FLB_CNT_FALLBACK_FRAG_NEEDED;
	default:
		return FLB_CNT_FALLBACK_OTHER;
	}
}

/* Out through the FIB's interface. A veth whose other end is in another namespace (marked by
 * the agent) hands the packet straight to that end's ingress, as the veth would after its
 * transmit path and a trip through the backlog. The mark counts only while the interface
 * still has the MAC it was marked with (the FIB's source MAC): an index reused by another
 * device after a deletion, before the agent's next pass, gets a plain redirect. */
static __always_inline long redirect_out(const struct bpf_fib_lookup *f)
{
	__u32 ifindex = f->ifindex;
	__u32 slot = ifindex & (FLB_IF_OUT_SLOTS - 1);
	struct flb_if_out *o = bpf_map_lookup_elem(&if_out, &slot);
	if (o && o->ifindex == ifindex && (o->flags & FLB_IFF_PEER) &&
	    ((o->mac[0] ^ f->smac[0]) | (o->mac[1] ^ f->smac[1]) | (o->mac[2] ^ f->smac[2]) |
	     (o->mac[3] ^ f->smac[3]) | (o->mac[4] ^ f->smac[4]) | (o->mac[5] ^ f->smac[5])) == 0)
		return bpf_redirect_peer(ifindex, 0);
	return bpf_redirect(ifindex, 0);
}

/* The fib_cache slot of a lookup's question (f as filled for bpf_fib_lookup; an IPv4
 * question's other address words are 0), with the ports it is keyed by (0 when they do not
 * matter to the FIB). */
static __always_inline __u32 fib_slot_of(const struct bpf_fib_lookup *f, __u16 sport,
					 __u16 dport)
{
	__u32 h = f->ifindex * 0x9e3779b1u;
	for (int i = 0; i < 4; i++)
		h = (h ^ f->ipv6_src[i]) * 0x85ebca6bu ^ f->ipv6_dst[i] * 0xc2b2ae35u;
	h = (h ^ ((__u32)sport << 16 | dport) ^ (__u32)f->l4_protocol << 8) * 0x9e3779b1u;
	return h >> (32 - FLB_FIB_BITS);
}

/* Does slot `c` hold the answer to question `f` (keyed by ports sport, dport; asked with `len`
 * bytes at `now`, in FIB generation `gen`)? */
static __always_inline int fib_cached(const struct flb_fib_slot *c,
				      const struct bpf_fib_lookup *f, __u16 sport, __u16 dport,
				      __u16 len, __u64 now, __u32 gen)
{
	return c->family == f->family && c->iif == f->ifindex && c->proto == f->l4_protocol &&
	       c->sport == sport && c->dport == dport && len <= c->max_len &&
	       c->gen == gen && (__s64)(c->expires_ns - now) > 0 &&
	       ((c->src[0] ^ f->ipv6_src[0]) | (c->src[1] ^ f->ipv6_src[1]) |
		(c->src[2] ^ f->ipv6_src[2]) | (c->src[3] ^ f->ipv6_src[3]) |
		(c->dst[0] ^ f->ipv6_dst[0]) | (c->dst[1] ^ f->ipv6_dst[1]) |
		(c->dst[2] ^ f->ipv6_dst[2]) | (c->dst[3] ^ f->ipv6_dst[3])) == 0;
}

/* bpf_fib_lookup for the question in f (ingress interface in f->ifindex, L3 length in
 * f->tot_len), answered from fib_cache when it can be (f then holds the egress interface and
 * MAC addresses, as the lookup would leave them). */
static __always_inline int fib_lookup_cached(struct __sk_buff *skb, struct bpf_fib_lookup *f,
					     __u64 now)
{
	__u16 len = f->tot_len;
	__u32 iif = f->ifindex;
	/* Read before the lookup: an answer given before a change the agent reports is stored
	 * with the generation that change ends. */
	__u32 zero = 0;
	struct flb_fib_gen *g = bpf_map_lookup_elem(&fib_gen, &zero);
	__u32 gen = 0, ports_free = 0;
	if (g) {
		gen = *(volatile __u32 *)&g->gen;
		if ((__s64)(*(volatile __u64 *)&g->ports_free_until_ns - now) > 0)
			ports_free = *(volatile __u32 *)&g->flags &
				     (f->family == AF_INET6 ? FLB_FIB_PORTS_FREE_V6
							    : FLB_FIB_PORTS_FREE_V4);
	}
	__u16 sport = ports_free ? 0 : f->sport, dport = ports_free ? 0 : f->dport;
	__u32 slot = fib_slot_of(f, sport, dport);
	struct flb_fib_slot *c = bpf_map_lookup_elem(&fib_cache, &slot);
	if (c && fib_cached(c, f, sport, dport, len, now, gen)) {
		f->ifindex = c->oif;
		__builtin_memcpy(f->smac, c->smac, ETH_ALEN);
		__builtin_memcpy(f->dmac, c->dmac, ETH_ALEN);
		return BPF_FIB_LKUP_RET_SUCCESS;
	}
	int rc = bpf_fib_lookup(skb, f, sizeof(*f), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS || !c)
		return rc;
	addr_cp(c->src, f->ipv6_src);
	addr_cp(c->dst, f->ipv6_dst);
	c->iif = iif;
	c->oif = f->ifindex;
	c->expires_ns = now + FLB_FIB_TTL_NS;
	c->gen = gen;
	c->sport = sport;
	c->dport = dport;
	c->max_len = len;
	c->family = f->family;
	c->proto = f->l4_protocol;
	__builtin_memcpy(c->smac, f->smac, ETH_ALEN);
	__builtin_memcpy(c->dmac, f->dmac, ETH_ALEN);
	return rc;
}

/* Forward a rewritten packet ourselves: the stack would drop a forwarded
 * packet whose source is one of our own addresses (the VIP in full-NAT, the
 * interface address in one-arm). Falls back to the stack when the FIB has
 * no forwarding answer (local delivery, no route, forwarding disabled), and
 * counts why; `*served` says whether the datapath forwarded it. */
static __always_inline int fwd(struct __sk_buff *skb, __u8 family, int *served)
{
	/* The lookup's parameters live in a per-CPU map, not on the 512-byte stack. */
	__u32 zero = 0;
	struct fib_scratch *fs = bpf_map_lookup_elem(&fib_scratch, &zero);
	*served = 0;
	if (!fs) {
		count(FLB_CNT_FALLBACK_OTHER);
		return TC_ACT_OK;
	}
	struct bpf_fib_lookup *f = &fs->f;
	__builtin_memset(f, 0, sizeof(*f));
	/* From the header read below: IPv4 TTL and protocol as one 16-bit word (for the
	 * incremental checksum), or IPv6 hop limit in the first byte. */
	__u8 ttl_proto[2];
	if (family == FLB_FAMILY_V6) {
		struct ip6hdr_ ip6;
		if (bpf_skb_load_bytes(skb, ETH_HLEN_, &ip6, sizeof(ip6)) < 0) {
			count(FLB_CNT_FALLBACK_OTHER);
			return TC_ACT_OK;
		}
		if (ip6.hop_limit <= 1) {
			count(FLB_CNT_FALLBACK_TTL);
			return TC_ACT_OK; /* let the stack send time-exceeded */
		}
		f->family = AF_INET6;
		addr_cp(f->ipv6_src, ip6.saddr);
		addr_cp(f->ipv6_dst, ip6.daddr);
		f->l4_protocol = ip6.nexthdr;
		f->tot_len = bpf_ntohs(ip6.payload_len) + sizeof(ip6);
		ttl_proto[0] = ip6.hop_limit;
		ttl_proto[1] = 0;
	} else {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, ETH_HLEN_, &ip, sizeof(ip)) < 0) {
			count(FLB_CNT_FALLBACK_OTHER);
			return TC_ACT_OK;
		}
		if (ip.ttl <= 1) {
			count(FLB_CNT_FALLBACK_TTL);
			return TC_ACT_OK; /* let the stack send time-exceeded */
		}
		f->family = AF_INET;
		f->ipv4_src = ip.saddr;
		f->ipv4_dst = ip.daddr;
		f->l4_protocol = ip.protocol;
		f->tot_len = bpf_ntohs(ip.tot_len);
		ttl_proto[0] = ip.ttl;
		ttl_proto[1] = ip.protocol;
	}
	f->ifindex = skb->ingress_ifindex;
	int rc = bpf_fib_lookup(skb, f, sizeof(*f), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH) {
		count(fib_fallback(rc));
		return TC_ACT_OK;
	}
	if (family == FLB_FAMILY_V6) {
		/* Decrement the hop limit like a router (no header checksum in IPv6). */
		ttl_proto[0] -= 1;
		bpf_skb_store_bytes(skb, IP6_HOP_OFF, ttl_proto, 1, 0);
	} else {
		/* Decrement TTL like a router (RFC 1812 incremental checksum). */
		__u16 old = *(__u16 *)ttl_proto;
		ttl_proto[0] -= 1;
		__u16 new = *(__u16 *)ttl_proto;
		bpf_l3_csum_replace(skb, IP_CSUM_OFF, old, new, sizeof(new));
		bpf_skb_store_bytes(skb, IP_TTL_OFF, ttl_proto, 1, 0);
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		count(FLB_CNT_REDIRECTED);
		*served = 1;
		return bpf_redirect_neigh(f->ifindex, 0, 0, 0);
	}
	if (bpf_skb_store_bytes(skb, 0, f->dmac, ETH_ALEN, 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_ALEN, f->smac, ETH_ALEN, 0) < 0) {
		count(FLB_CNT_FALLBACK_OTHER);
		return TC_ACT_OK;
	}
	count(FLB_CNT_REDIRECTED);
	*served = 1;
	return redirect_out(f);
}

static __always_inline __u16 csum_fold32(__u32 c)
{
	c = (c & 0xffff) + (c >> 16);
	c = (c & 0xffff) + (c >> 16);
	return (__u16)c;
}

/* The translation of a flow's packet fused with its forwarding (issue 16). The FIB lookup is
 * made first, from the translated addresses (the entry's), so that every header field is then
 * written once and directly: IPv4 addresses, TTL and header checksum (computed here; a correct
 * header checksum keeps the packet's one's complement sum, so skb->csum needs no change, as
 * with bpf_l3_csum_replace), the ports, the MAC addresses. Only the L4 checksum goes through a
 * helper (one call for the addresses, one for the ports): it alone knows whether the packet's
 * checksum is complete or a partial one an offload finishes. The helpers run before any
 * direct write (they may move the packet's data). When the FIB has no forwarding answer, the
 * packet is translated all the same and handed to the stack, counted (as fwd does). */
#define FLB_FAST_L4OFF_MAX 500

/* SCTP's CRC32c (Castagnoli, reflected) is linear: changing bytes of a packet of a given
 * length changes its CRC by the CRC (zero initial value, no final xor) of the changed bits
 * followed by as many zero bytes as follow them in the packet. So a port change costs the
 * CRC of 4 bytes and a multiplication by x^(8 n) modulo the polynomial (n: the bytes after
 * the ports), found by square-and-multiply from the table below: O(log n) however long the
 * packet, instead of a pass over every byte. (zlib's crc32_combine does the same.) */
#define CRC32C_POLY 0x82f63b78u
/* x^(8 * 2^j) mod P, reflected: advancing a CRC state over 2^j zero bytes. */
static const __u32 crc32c_zeros[16] = {
	0x00800000, 0x00008000, 0x82f63b78, 0x6ea2d55c, 0x18b8ea18, 0x510ac59a,
	0xb82be955, 0xb8fdb1e7, 0x88e56f72, 0x74c360a4, 0xe4172b16, 0x0d65762a,
	0x35d73a62, 0x28461564, 0xbf455269, 0xe2ea32dc,
};

/* a * b mod P over GF(2), both reflected. A global function: verified once. */
__noinline __u32 crc32c_mulmod(__u32 a, __u32 b)
{
	__u32 r = 0;
	for (int i = 0; i < 32; i++) {
		if (a & 0x80000000u)
			r ^= b;
		a <<= 1;
		b = (b & 1) ? (b >> 1) ^ CRC32C_POLY : b >> 1;
	}
	return r;
}

/* The change of an SCTP packet's CRC32c when its first 4 bytes (the ports) change by `d`
 * (old ^ new, as loaded from the packet) and `after` bytes follow them. */
__noinline __u32 sctp_crc_delta(__u32 d, __u32 after)
{
	for (int i = 0; i < 32; i++)
		d = (d & 1) ? (d >> 1) ^ CRC32C_POLY : d >> 1;
	for (int j = 0; j < 16; j++) {
		if ((after >> j) & 1)
			d = crc32c_mulmod(crc32c_zeros[j], d);
	}
	return d;
}

static __always_inline int rewrite(struct __sk_buff *skb, const struct pkt *p, const __u32 *ns,
				   const __u32 *nd, __u16 nsp, __u16 ndp, int ttl_dec,
				   const struct bpf_fib_lookup *mac)
{
	int v6 = p->family == FLB_FAMILY_V6;
	__u32 l4off = p->l4off;
	if (l4off > FLB_FAST_L4OFF_MAX)
		return -1;
	__u32 csum_off = l4off + l4_csum_off(p->proto);
	__u64 mangled = p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	/* Addresses: one sum of changes for the pseudo header (TCP, UDP, ICMPv6) and the IPv4
	 * header checksum. */
	__u64 s = 0;
	int naddr = v6 ? 4 : 1;
	int addrs_changed = 0;
	for (int i = 0; i < 4; i++) {
		if (i >= naddr)
			break;
		s = wsum_change(s, p->saddr[i], ns[i]);
		s = wsum_change(s, p->daddr[i], nd[i]);
		addrs_changed |= (p->saddr[i] != ns[i]) | (p->daddr[i] != nd[i]);
	}
	__u32 adiff = wsum_fold(s);
	int sctp = p->proto == IPPROTO_SCTP;
	/* SCTP's CRC32c covers no address (no pseudo header). */
	if (addrs_changed && !sctp) {
		if (v6) {
			if (l4_csum_diff6(skb, csum_off, adiff, p->proto, 1) < 0)
				return -1;
		} else if (p->proto != IPPROTO_ICMP) {
			if (bpf_l4_csum_replace(skb, csum_off, 0, adiff, BPF_F_PSEUDO_HDR | mangled) < 0)
				return -1;
		}
	}
	/* Ports (both adjacent in TCP and UDP) or the ICMP echo identifier. */
	int icmp = p->proto == IPPROTO_ICMP;
	__u16 osp = p->sport, odp = icmp ? 0 : p->dport;
	if (icmp)
		ndp = 0;
	int ports_changed = osp != nsp || odp != ndp;
	__u32 crc_delta = 0;
	if (ports_changed && sctp) {
		/* The CRC32c covers the ports: its change, from the ports' change alone. */
		crc_delta = sctp_crc_delta(((__u32)osp | ((__u32)odp << 16)) ^
					   ((__u32)nsp | ((__u32)ndp << 16)),
					   p->l3end - p->l4off - 4);
	} else if (ports_changed) {
		__u32 pdiff = wsum_fold(wsum_change(0, (__u32)osp | ((__u32)odp << 16),
						    (__u32)nsp | ((__u32)ndp << 16)));
		if (bpf_l4_csum_replace(skb, csum_off, 0, pdiff, mangled) < 0)
			return -1;
	}
	/* Direct writes from here on (xlate_fwd made the headers linear). */
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	l4off &= 0x1ff;
	if (data + l4off + SCTP_HDR > end && (sctp || data + l4off + 8 > end))
		return -1;
	if (v6) {
		struct ip6hdr_ *ip6 = data + ETH_HLEN_;
		if ((void *)(ip6 + 1) > end)
			return -1;
		if (addrs_changed) {
			addr_cp(ip6->saddr, ns);
			addr_cp(ip6->daddr, nd);
		}
		if (ttl_dec)
			ip6->hop_limit -= 1;
	} else {
		struct iphdr *ip = data + ETH_HLEN_;
		if ((void *)(ip + 1) > end)
			return -1;
		__u64 h = s;
		if (ttl_dec) {
			__u16 old = *(__u16 *)&ip->ttl;
			ip->ttl -= 1;
			h += (__u16)~old + (__u32)*(__u16 *)&ip->ttl;
		}
		if (addrs_changed || ttl_dec) {
			ip->saddr = ns[0];
			ip->daddr = nd[0];
			__u64 c = (__u64)wsum_fold(h) + (__u32)~(__u32)ip->check;
			ip->check = (__u16)~csum_fold32(wsum_fold(c));
		}
	}
	if (ports_changed) {
		__u16 *pp = data + l4off + (icmp ? offsetof(struct icmphdr, un.echo.id) : 0);
		pp[0] = nsp;
		if (!icmp)
			pp[1] = ndp;
		if (sctp && data + l4off + SCTP_HDR <= end)
			*(__u32 *)(data + l4off + SCTP_CRC_OFF) ^= crc_delta;
	}
	if (mac) {
		struct ethhdr *eth = data;
		__builtin_memcpy(eth->h_dest, mac->dmac, ETH_ALEN);
		__builtin_memcpy(eth->h_source, mac->smac, ETH_ALEN);
	}
	return 0;
}

static __always_inline int xlate_fwd(struct __sk_buff *skb, const struct pkt *p,
				     const struct flb_ct *v, int *served, __u64 now)
{
	*served = 0;
	__u32 zero = 0;
	struct fib_scratch *fs = bpf_map_lookup_elem(&fib_scratch, &zero);
	if (!fs)
		return -1;
	/* One snapshot of the translation (v may be a map value a peer's sync rewrites), in
	 * the scratch map: the stack is spent. */
	__u32 *ns = fs->ns, *nd = fs->nd;
	addr_cp(ns, v->nat_saddr);
	addr_cp(nd, v->nat_daddr);
	__u16 nsp = v->nat_sport, ndp = v->nat_dport;
	int v6 = p->family == FLB_FAMILY_V6;
	struct bpf_fib_lookup *f = &fs->f;
	/* The headers this writes, in the linear part (they nearly always are). */
	__u32 need = p->l4off + (p->proto == IPPROTO_SCTP ? SCTP_HDR : 8);
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	if (data + need > end) {
		if (need > FLB_FAST_L4OFF_MAX + SCTP_HDR || bpf_skb_pull_data(skb, need) < 0)
			return -1;
		data = (void *)(long)skb->data;
		end = (void *)(long)skb->data_end;
	}
	__builtin_memset(f, 0, sizeof(*f));
	__u8 ttl;
	if (v6) {
		struct ip6hdr_ *ip6 = data + ETH_HLEN_;
		if ((void *)(ip6 + 1) > end)
			return -1;
		ttl = ip6->hop_limit;
		f->family = AF_INET6;
		addr_cp(f->ipv6_src, ns);
		addr_cp(f->ipv6_dst, nd);
		f->tot_len = bpf_ntohs(ip6->payload_len) + sizeof(*ip6);
	} else {
		struct iphdr *ip = data + ETH_HLEN_;
		if ((void *)(ip + 1) > end)
			return -1;
		ttl = ip->ttl;
		f->family = AF_INET;
		f->ipv4_src = ns[0];
		f->ipv4_dst = nd[0];
		f->tot_len = bpf_ntohs(ip->tot_len);
	}
	if (ttl <= 1) {
		if (rewrite(skb, p, ns, nd, nsp, ndp, 0, 0) < 0)
			return -1;
		count(FLB_CNT_FALLBACK_TTL);
		return TC_ACT_OK; /* let the stack send time-exceeded */
	}
	f->l4_protocol = v6 && p->proto == IPPROTO_ICMP ? IPPROTO_ICMPV6 : p->proto;
	if (p->proto != IPPROTO_ICMP) {
		f->sport = nsp;
		f->dport = ndp;
	}
	f->ifindex = skb->ingress_ifindex;
	int rc = fib_lookup_cached(skb, f, now);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH) {
		if (rewrite(skb, p, ns, nd, nsp, ndp, 0, 0) < 0)
			return -1;
		count(fib_fallback(rc));
		return TC_ACT_OK;
	}
	int neigh = rc == BPF_FIB_LKUP_RET_NO_NEIGH;
	if (rewrite(skb, p, ns, nd, nsp, ndp, 1, neigh ? 0 : f) < 0)
		return -1;
	count(FLB_CNT_REDIRECTED);
	*served = 1;
	if (neigh)
		return bpf_redirect_neigh(f->ifindex, 0, 0, 0);
	return redirect_out(f);
}

/* RFC 1624 eqn. 3 for a 32-bit field: HC' = ~(~HC + ~m + m'). */
static __always_inline __u16 csum_upd32(__u16 hc, __u32 old, __u32 new)
{
	__u32 s = (__u16)~hc;
	s += (__u16)~(old & 0xffff);
	s += (__u16)~(old >> 16);
	s += new & 0xffff;
	s += new >> 16;
	return ~csum_fold32(s);
}

/* Translate an ICMP error whose quoted packet belongs to a tracked flow:
 * the quoted header is put back as the receiver sent it, and the outer
 * destination becomes the receiver. Returns TC verdict or -1 when the error
 * is not about a tracked flow. */
static __always_inline int icmp_err_v4(struct __sk_buff *skb, const struct pkt *p)
{
	__u32 ioff = p->l4off + sizeof(struct icmphdr);
	struct iphdr in;
	if (bpf_skb_load_bytes(skb, ioff, &in, sizeof(in)) < 0)
		return -1;
	if (in.ihl != 5 || (in.protocol != IPPROTO_TCP && in.protocol != IPPROTO_UDP &&
			    in.protocol != IPPROTO_SCTP))
		return -1;
	__u32 poff = ioff + sizeof(in);
	__u16 ports[2];
	if (bpf_skb_load_bytes(skb, poff, ports, sizeof(ports)) < 0)
		return -1;
	/* The quoted packet went out as src -> dst; the entry of the other
	 * direction has the key dst -> src. */
	struct flb_ct_key k;
	__builtin_memset(&k, 0, sizeof(k));
	k.saddr[0] = in.daddr;
	k.daddr[0] = in.saddr;
	k.sport = ports[1];
	k.dport = ports[0];
	k.proto = in.protocol;
	k.family = FLB_FAMILY_V4;
	struct flb_ct *e = ct_lookup(&k);
	if (!e)
		return -1;
	__u32 nsrc = e->nat_daddr[0], ndst = e->nat_saddr[0];
	__u16 nsp = e->nat_dport, ndp = e->nat_sport;
	__u32 icsum = p->l4off + offsetof(struct icmphdr, checksum);

	/* Inner IP header checksum, then addresses; each changed 16/32-bit
	 * word is also folded into the ICMP checksum. */
	__u16 ncheck = csum_upd32(in.check, in.saddr, nsrc);
	ncheck = csum_upd32(ncheck, in.daddr, ndst);
	if (bpf_l4_csum_replace(skb, icsum, in.saddr, nsrc, 4) < 0 ||
	    bpf_l4_csum_replace(skb, icsum, in.daddr, ndst, 4) < 0 ||
	    bpf_l4_csum_replace(skb, icsum, in.check, ncheck, 2) < 0 ||
	    bpf_l4_csum_replace(skb, icsum, ports[0], nsp, 2) < 0 ||
	    bpf_l4_csum_replace(skb, icsum, ports[1], ndp, 2) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, ioff + offsetof(struct iphdr, check), &ncheck, 2, 0) < 0 ||
	    bpf_skb_store_bytes(skb, ioff + offsetof(struct iphdr, saddr), &nsrc, 4, 0) < 0 ||
	    bpf_skb_store_bytes(skb, ioff + offsetof(struct iphdr, daddr), &ndst, 4, 0) < 0 ||
	    bpf_skb_store_bytes(skb, poff, &nsp, 2, 0) < 0 ||
	    bpf_skb_store_bytes(skb, poff + 2, &ndp, 2, 0) < 0)
		return TC_ACT_SHOT;
	/* Outer destination: the host that sent the quoted packet. */
	if (set_addr(skb, p, IP_DST_OFF, p->daddr[0], nsrc) < 0)
		return TC_ACT_SHOT;
	count(FLB_CNT_ICMP_ERR_XLATED);
	int served;
	return fwd(skb, FLB_FAMILY_V4, &served);
}

/* The same for ICMPv6 errors (destination unreachable, packet too big, time exceeded,
 * parameter problem). ICMPv6's checksum covers the pseudo header and the whole quoted
 * packet, so every rewritten field is folded into it. */
static __always_inline int icmp_err_v6(struct __sk_buff *skb, struct pkt *p)
{
	__u32 ioff = p->l4off + sizeof(struct icmphdr);
	struct ip6hdr_ in;
	if (bpf_skb_load_bytes(skb, ioff, &in, sizeof(in)) < 0)
		return -1;
	if (in.nexthdr != IPPROTO_TCP && in.nexthdr != IPPROTO_UDP && in.nexthdr != IPPROTO_SCTP)
		return -1;
	__u32 poff = ioff + sizeof(in);
	__u16 ports[2];
	if (bpf_skb_load_bytes(skb, poff, ports, sizeof(ports)) < 0)
		return -1;
	struct flb_ct_key k;
	ct_key(&k, in.daddr, in.saddr, ports[1], ports[0], in.nexthdr, FLB_FAMILY_V6);
	struct flb_ct *e = ct_lookup(&k);
	if (!e)
		return -1;
	__u32 nsrc[4], ndst[4];
	addr_cp(nsrc, e->nat_daddr);
	addr_cp(ndst, e->nat_saddr);
	__u16 nsp = e->nat_dport, ndp = e->nat_sport;
	__u32 icsum = p->l4off + offsetof(struct icmphdr, checksum);
	if (l4_csum_diff6(skb, icsum, bpf_csum_diff(in.saddr, 16, nsrc, 16, 0), IPPROTO_ICMPV6,
			  0) < 0 ||
	    l4_csum_diff6(skb, icsum, bpf_csum_diff(in.daddr, 16, ndst, 16, 0), IPPROTO_ICMPV6,
			  0) < 0 ||
	    bpf_l4_csum_replace(skb, icsum, ports[0], nsp, 2) < 0 ||
	    bpf_l4_csum_replace(skb, icsum, ports[1], ndp, 2) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, ioff + offsetof(struct ip6hdr_, saddr), nsrc, 16, 0) < 0 ||
	    bpf_skb_store_bytes(skb, ioff + offsetof(struct ip6hdr_, daddr), ndst, 16, 0) < 0 ||
	    bpf_skb_store_bytes(skb, poff, &nsp, 2, 0) < 0 ||
	    bpf_skb_store_bytes(skb, poff + 2, &ndp, 2, 0) < 0)
		return TC_ACT_SHOT;
	if (set_addr6(skb, p, IP6_DST_OFF, p->daddr, nsrc) < 0)
		return TC_ACT_SHOT;
	count(FLB_CNT_ICMP_ERR_XLATED);
	int served;
	return fwd(skb, FLB_FAMILY_V6, &served);
}

/* L2 HA: a standby node keeps the VIPs on lo (so that taking over needs no address change)
 * but must not answer ARP for them, or clients and backends would send it the MASTER's
 * traffic. ARP requests for a VIP are dropped here while FLB_HA_L2_STANDBY is set. */
static __always_inline int arp_suppressed(struct __sk_buff *skb)
{
	__u32 zero = 0;
	__u32 *f = bpf_map_lookup_elem(&ha_flags, &zero);
	if (!f || !(*f & FLB_HA_L2_STANDBY))
		return 0;
	__u8 arp[28];
	if (bpf_skb_load_bytes(skb, ETH_HLEN_, arp, sizeof(arp)) < 0)
		return 0;
	/* Ethernet/IPv4 ARP request: htype 1, ptype 0x0800, hlen 6, plen 4, op 1. */
	if (arp[0] != 0 || arp[1] != 1 || arp[2] != 0x08 || arp[3] != 0 || arp[4] != 6 ||
	    arp[5] != 4 || arp[6] != 0 || arp[7] != 1)
		return 0;
	__u32 tpa;
	__builtin_memcpy(&tpa, &arp[24], 4);
	__u32 a[4] = {tpa, 0, 0, 0};
	return is_vip(a, FLB_FAMILY_V4, IPPROTO_TCP) || is_vip(a, FLB_FAMILY_V4, IPPROTO_UDP) ||
	       is_vip(a, FLB_FAMILY_V4, IPPROTO_ICMP);
}

/* A neighbour solicitation as it arrives (no extension headers: RFC 4861 packets carry none). */
struct nd_ns {
	struct ip6hdr_ ip6;
	__u8 type;
	__u8 code;
	__u16 csum;
	__u32 reserved;
	__u32 target[4];
};

/* The neighbour advertisement we answer with, IPv6 header on. */
struct nd_na {
	struct ip6hdr_ ip6;
	__u8 type;
	__u8 code;
	__u16 csum;
	__u32 flags;
	__u32 target[4];
	__u8 opt_type; /* 2: target link-layer address */
	__u8 opt_len;  /* in units of 8 bytes */
	__u8 mac[6];
};


/* IPv6 VIPs live on lo, and the kernel answers neighbour solicitations only for addresses of
 * the receiving interface: the datapath answers a solicitation for a VIP itself (RFC 4861
 * §7.2.4: solicited and override flags, our link-layer address, back to the sender), or drops
 * it while this node is an L2 standby, as it does ARP. Returns a TC verdict, or -1 when the
 * packet is not a solicitation for a VIP (or one we leave to the kernel: duplicate address
 * detection, an interface whose MAC the agent did not record). */
/* Global (its own frame, see icmp_err4). */
__noinline int nd_vip(struct __sk_buff *skb)
{
	struct nd_ns ns;
	if (bpf_skb_load_bytes(skb, ETH_HLEN_, &ns, sizeof(ns)) < 0)
		return -1;
	if ((ns.ip6.vtc >> 4) != 6 || ns.ip6.nexthdr != IPPROTO_ICMPV6 || ns.type != ND_NS ||
	    ns.code != 0 || ns.ip6.hop_limit != 255)
		return -1;
	if (!is_vip(ns.target, FLB_FAMILY_V6, IPPROTO_TCP) &&
	    !is_vip(ns.target, FLB_FAMILY_V6, IPPROTO_UDP) &&
	    !is_vip(ns.target, FLB_FAMILY_V6, IPPROTO_ICMP))
		return -1;
	__u32 zero = 0;
	__u32 *f = bpf_map_lookup_elem(&ha_flags, &zero);
	if (f && (*f & FLB_HA_L2_STANDBY)) {
		count(FLB_CNT_ARP_SUPPRESSED);
		return TC_ACT_SHOT;
	}
	if ((ns.ip6.saddr[0] | ns.ip6.saddr[1] | ns.ip6.saddr[2] | ns.ip6.saddr[3]) == 0)
		return -1;
	__u32 ifindex = skb->ifindex;
	struct flb_mac *mac = bpf_map_lookup_elem(&if_macs, &ifindex);
	if (!mac)
		return -1;
	__u8 eth[ETH_HLEN_];
	if (bpf_skb_load_bytes(skb, ETH_ALEN, eth, ETH_ALEN) < 0) /* the sender's MAC */
		return -1;
	__builtin_memcpy(eth + ETH_ALEN, mac->addr, ETH_ALEN);
	eth[12] = 0x86;
	eth[13] = 0xdd;

	struct nd_na na = {};
	na.ip6.vtc = 0x60;
	na.ip6.payload_len = bpf_htons(sizeof(na) - sizeof(na.ip6));
	na.ip6.nexthdr = IPPROTO_ICMPV6;
	na.ip6.hop_limit = 255;
	addr_cp(na.ip6.saddr, ns.target);
	addr_cp(na.ip6.daddr, ns.ip6.saddr);
	na.type = ND_NA;
	na.flags = bpf_htonl(ND_NA_SOLICITED_OVERRIDE);
	addr_cp(na.target, ns.target);
	na.opt_type = 2;
	na.opt_len = 1;
	__builtin_memcpy(na.mac, mac->addr, ETH_ALEN);
	/* Checksum over the pseudo header (addresses, length, next header) and the message. */
	__u32 ph[2] = {bpf_htonl(sizeof(na) - sizeof(na.ip6)), bpf_htonl(IPPROTO_ICMPV6)};
	__s64 s = bpf_csum_diff(0, 0, na.ip6.saddr, 32, 0);
	if (s < 0)
		return -1;
	s = bpf_csum_diff(0, 0, ph, sizeof(ph), (__u32)s);
	if (s < 0)
		return -1;
	s = bpf_csum_diff(0, 0, (__u32 *)&na.type, sizeof(na) - sizeof(na.ip6), (__u32)s);
	if (s < 0)
		return -1;
	na.csum = ~csum_fold32((__u32)s);

	if (bpf_skb_change_tail(skb, ETH_HLEN_ + sizeof(na), 0) < 0 ||
	    bpf_skb_store_bytes(skb, 0, eth, sizeof(eth), 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN_, &na, sizeof(na), 0) < 0)
		return TC_ACT_SHOT;
	count(FLB_CNT_ND_ANSWERED);
	return bpf_redirect(ifindex, 0);
}

/* ICMP and ICMPv6 errors about a tracked flow, translated back (icmp_err_v4, icmp_err_v6);
 * -1 when not about one. Global functions: their frames are not stacked on the main one's
 * for the rest of the program (the BPF stack is 512 bytes for a whole call chain). */
__noinline int icmp_err4(struct __sk_buff *skb, struct pkt *p)
{
	if (!p)
		return -1;
	return icmp_err_v4(skb, p);
}

__noinline int icmp_err6(struct __sk_buff *skb, struct pkt *p)
{
	if (!p)
		return -1;
	return icmp_err_v6(skb, p);
}

/* An unconfirmed UDP or ICMP echo flow (in ct_new): the endpoint's first answer marks both
 * entries answered (FLB_CTF_REPLIED: one lookup of the other entry, once per flow); the
 * client's next packet after it confirms the flow, which moves to conntrack (and is reported to
 * the peers then). Netfilter's "assured", for the same reason: a datagram from a spoofed
 * source is never continued, so a flood of them only churns ct_new and never fills conntrack,
 * which the flows that matter (established TCP, UDP streams) need. A flow only ever one way
 * (no answer), or a lone query and its answer, stays in ct_new until it expires. When
 * conntrack is full the flow stays unconfirmed and its packets are forwarded all the same.
 * Returns the entry to go on with (the moved one, or `e`). */
static __always_inline struct flb_ct *dgram_track(const struct flb_ct_key *key, struct flb_ct *e)
{
	if (e->dir != 0) {
		if (e->flags & FLB_CTF_REPLIED)
			return e;
		e->flags |= FLB_CTF_REPLIED;
		struct flb_ct_key pk;
		ct_peer_key(&pk, key, e);
		struct flb_ct *pe = bpf_map_lookup_elem(&ct_new, &pk);
		if (pe && ct_points_to(pe, key))
			pe->flags |= FLB_CTF_REPLIED;
		return e;
	}
	if (!(e->flags & FLB_CTF_REPLIED))
		return e;
	struct flb_ct *m = ct_promote(key, e, 0);
	return m ? m : e;
}

/* Everything after a packet found its flow (or made it): counters, TCP tracking (and the
 * move of a completed half-open flow from ct_new to conntrack), translation, forwarding,
 * statistics.
 *
 * A global function, like `parse`: the verifier checks it once with `e` as plain memory,
 * whichever table the entry lives in, instead of once per table for every path after the
 * lookup (two tables doubled the states past the 1M-instruction budget). */
__noinline int flow_packet(struct __sk_buff *skb, struct pkt *p, const struct flb_ct_key *key,
			   struct flb_ct *e, __u64 now)
{
	if (!p || !key || !e)
		return TC_ACT_SHOT;
	/* An untracked entry is a copy that already holds this packet's share. */
	if (!p->untracked) {
		e->last_ns = now;
		__sync_fetch_and_add(&e->packets, 1);
		__sync_fetch_and_add(&e->bytes, p->len);
	}
	/* Data segments of an established flow need no tracking (and no peer lookup). An
	 * entry that exists only on the stack (evicted at once) is not tracked. */
	if (p->proto == IPPROTO_TCP && !p->untracked) {
		int inwin = seq_track(e, p);
		struct flb_ct *pe = 0;
		/* A bare SYN changes no state (seq_track restarts a retried handshake), and most
		 * SYNs open a flow: no peer lookup for them. */
		if ((p->tcp_flags & 0x17) != 0x02 &&
		    ((p->tcp_flags & 0x07) || eff_state(e) < FLB_CT_EST ||
		     (e->flags & (FLB_CTF_PICKUP | FLB_CTF_NEW))))
			pe = tcp_track(key, e, p, inwin, now);
		/* Established (or a pick-up confirmed) in ct_new: it moves to conntrack now, or at
		 * a later segment if conntrack is full (this one is dropped). */
		if ((e->flags & (FLB_CTF_NEW | FLB_CTF_PICKUP)) == FLB_CTF_NEW &&
		    e->state == FLB_CT_EST) {
			e = ct_promote(key, e, pe);
			if (!e) {
				count(FLB_CNT_DROP_CT_FULL);
				return TC_ACT_SHOT;
			}
		}
	} else if (p->proto == IPPROTO_SCTP && !p->untracked) {
		sctp_track(key, e, p, now);
		if ((e->flags & FLB_CTF_NEW) && e->state == FLB_CT_EST) {
			e = ct_promote(key, e, 0);
			if (!e) {
				count(FLB_CNT_DROP_CT_FULL);
				return TC_ACT_SHOT;
			}
		}
	} else if ((e->flags & FLB_CTF_NEW) && !p->untracked) {
		e = dgram_track(key, e);
	}
	/* Read before the rewrite: `e` may be the stack copy or a map value a peer's sync
	 * rewrites meanwhile; the counters are charged only for what goes on its way. */
	__u32 svc_id = e->svc_id;
	__u32 ep_slot = svc_id * FLB_MAX_ENDPOINTS + (e->ep_idx & (FLB_MAX_ENDPOINTS - 1));

	int served;
	int verdict = xlate_fwd(skb, p, e, &served, now);
	if (verdict < 0) {
		count(FLB_CNT_DROP_MALFORMED);
		return TC_ACT_SHOT;
	}
	if (served) {
		stats_add(&svc_stats, svc_id, p->len);
		stats_add(&ep_stats, ep_slot, p->len);
	}
	return verdict;
}

SEC("classifier")
int flb_ingress(struct __sk_buff *skb)
{
	struct pkt p = {};
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) <= end && eth->h_proto == bpf_htons(ETH_P_ARP)) {
		if (arp_suppressed(skb)) {
			count(FLB_CNT_ARP_SUPPRESSED);
			return TC_ACT_SHOT;
		}
		return TC_ACT_OK;
	}
	if (parse(skb, &p) < 0) {
		if (p.nd_solicit) {
			int rc = nd_vip(skb);
			if (rc >= 0)
				return rc;
		}
		return TC_ACT_OK;
	}
	if (p.bad) {
		if (malformed_ours(&p)) {
			count(p.bad);
			return TC_ACT_SHOT;
		}
		return TC_ACT_OK;
	}
	if (p.frag) {
		if (is_vip(p.daddr, p.family, p.proto)) {
			count(FLB_CNT_DROP_FRAGMENT);
			return TC_ACT_SHOT;
		}
		return TC_ACT_OK;
	}
	if (p.is_icmp_err) {
		int rc = p.family == FLB_FAMILY_V6 ? icmp_err6(skb, &p) : icmp_err4(skb, &p);
		return rc < 0 ? TC_ACT_OK : rc;
	}
	/* Only echo requests start ICMP flows; replies match existing ones. */
	struct flb_ct_key key;
	ct_key(&key, p.saddr, p.daddr, p.sport, p.dport, p.proto, p.family);
	__u64 now = flb_now();
	struct flb_ct *e = ct_lookup(&key);
	struct flb_ct *ce = 0, *dead = 0;
	if (e && !ct_live(&key, e, &p, now)) {
		dead = e;
		e = 0;
	}
	if (!e) {
		if (p.proto == IPPROTO_ICMP && !p.echo_req)
			return TC_ACT_OK;
		struct flb_svc *svc = svc_lookup(&p);
		if (!svc) {
			/* SCTP to a VIP that matches no flow (the endpoint's side of a flow this node
			 * has not learnt yet): this node has no SCTP socket, and the stack's answer
			 * (an ABORT, or ICMP protocol unreachable, which SCTP treats as one) would
			 * end the association. */
			if (unknown_tcp_to_vip(skb, &p) ||
			    (p.proto == IPPROTO_SCTP && is_vip(p.daddr, p.family, IPPROTO_SCTP))) {
				count(FLB_CNT_DROP_NO_FLOW);
				return TC_ACT_SHOT;
			}
			return TC_ACT_OK;
		}
		/* A rule that lists its allowed sources: no flow from anywhere else. */
		if (!source_allowed(svc, &p))
			return TC_ACT_SHOT;
		/* Only a SYN opens a flow whose source this node chooses: a mid-stream segment
		 * would get a source port the endpoint never heard of, and a flood of them would
		 * hold the ports. DNAT keeps the client's source, so it picks flows up (a restart,
		 * a flow whose sync is in flight), on a short timeout until confirmed. */
		if (p.proto == IPPROTO_TCP && (p.tcp_flags & 0x12) != 0x02 &&
		    svc->mode != FLB_MODE_DNAT) {
			count(FLB_CNT_DROP_NOT_SYN);
			return TC_ACT_SHOT;
		}
		/* SCTP: only an INIT opens a flow, in every mode (no pick-up: an association's
		 * state lives in its tags, which a mid-stream packet does not tell). */
		if (p.proto == IPPROTO_SCTP && p.chunk != SCTP_INIT) {
			count(FLB_CNT_DROP_NOT_SYN);
			return TC_ACT_SHOT;
		}
		__u32 zero = 0;
		ce = bpf_map_lookup_elem(&ct_scratch, &zero);
		if (!ce)
			return TC_ACT_OK;
		int made = ct_create(&p, svc, &key, ce, dead);
		if (made < 0)
			return TC_ACT_SHOT;
		/* A flow this packet opened is forwarded from the copy that was inserted. */
		if (made && first_packet_untracked(&p)) {
			p.untracked = 1;
			return flow_packet(skb, &p, &key, ce, now);
		}
		/* The table the flags name first (the other one if the flow moved meanwhile). */
		if (ce->flags & FLB_CTF_NEW) {
			e = bpf_map_lookup_elem(&ct_new, &key);
			if (!e)
				e = bpf_map_lookup_elem(&conntrack, &key);
		} else {
			e = ct_lookup(&key);
		}
		if (!e)
			e = ce; /* evicted already: still translate this packet */
	}

	p.untracked = e == ce;
	return flow_packet(skb, &p, &key, e, now);
}

/* The benchmark's floor (bpf/benches/cycles.rs), never attached by the agent: the least a
 * forwarding program does per packet — read the IP header, bpf_fib_lookup, rewrite the MAC
 * addresses, bpf_redirect. flb_ingress's cost is reported as a ratio to this on the same
 * packet. */
SEC("classifier")
int flb_floor(struct __sk_buff *skb)
{
	struct bpf_fib_lookup fib = {};
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return TC_ACT_OK;
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ip6hdr_ ip6;
		if (bpf_skb_load_bytes(skb, ETH_HLEN_, &ip6, sizeof(ip6)) < 0)
			return TC_ACT_OK;
		fib.family = AF_INET6;
		addr_cp(fib.ipv6_src, ip6.saddr);
		addr_cp(fib.ipv6_dst, ip6.daddr);
		fib.l4_protocol = ip6.nexthdr;
		fib.tot_len = bpf_ntohs(ip6.payload_len) + sizeof(ip6);
	} else if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, ETH_HLEN_, &ip, sizeof(ip)) < 0)
			return TC_ACT_OK;
		fib.family = AF_INET;
		fib.ipv4_src = ip.saddr;
		fib.ipv4_dst = ip.daddr;
		fib.l4_protocol = ip.protocol;
		fib.tot_len = bpf_ntohs(ip.tot_len);
	} else {
		return TC_ACT_OK; /* ARP and the rest: the stack's */
	}
	fib.ifindex = skb->ingress_ifindex;
	if (bpf_fib_lookup(skb, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS)
		return TC_ACT_OK;
	if (bpf_skb_store_bytes(skb, 0, fib.dmac, ETH_ALEN, 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_ALEN, fib.smac, ETH_ALEN, 0) < 0)
		return TC_ACT_OK;
	return bpf_redirect(fib.ifindex, 0);
}

/* The benchmark's zero (bpf/benches/cycles.rs), never attached: it returns at once, so its
 * time is what BPF_PROG_TEST_RUN itself costs per call here (setting up the packet, the clock
 * reads), which both flb_ingress and flb_floor pay. */
SEC("classifier")
int flb_nop(struct __sk_buff *skb)
{
	return TC_ACT_OK;
}
