/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * ferrolb datapath: the one header shared by the eBPF program (lb.bpf.c) and
 * the Rust mirror (bpf/src/maps.rs). Every struct here has a #[repr(C)] twin
 * with compile-time size and offset checks. Bump FLB_LAYOUT_VERSION whenever a
 * struct or map definition changes: pinned maps live under .../v<layout>/ and
 * aya does not check key/value sizes of a reused pin.
 *
 * Addresses are stored as four 32-bit words in network byte order. IPv4 uses
 * word 0 and leaves words 1..3 zero, so IPv6 fits without a layout change.
 */
#ifndef FERROLB_H
#define FERROLB_H

#define FLB_LAYOUT_VERSION 8

#define FLB_MAX_ENDPOINTS 32
/* Lookup-table length per endpoint set: a prime, >= 100 x FLB_MAX_ENDPOINTS
 * so Maglev spreads within about 1 % (Maglev paper, section 5.3). */
#define FLB_LUT_SIZE 4099
#define FLB_LUT_NONE 0xff
#define FLB_MAX_RANGES 8

#define FLB_FAMILY_V4 4
#define FLB_FAMILY_V6 6

/* NAT modes, loxilb numbering. */
#define FLB_MODE_DNAT 0
#define FLB_MODE_ONEARM 1
#define FLB_MODE_FULLNAT 2

/* Endpoint selection, loxilb numbering. */
#define FLB_SEL_RR 0
#define FLB_SEL_HASH 1
#define FLB_SEL_PRIO 2
#define FLB_SEL_PERSIST 3
#define FLB_SEL_LC 4

/* Conntrack TCP states (also used for UDP/ICMP: NONE then EST). SCTP maps its association
 * states on them: INIT sent = SYN_SENT, INIT ACK / COOKIE ECHO = SYN_RECV, COOKIE ACK (or
 * data with the right tag) = EST, SHUTDOWN / SHUTDOWN ACK = FIN_WAIT, SHUTDOWN COMPLETE =
 * TIME_WAIT, ABORT = CLOSE; timeouts as TCP's. In an SCTP entry seq_next holds the
 * verification tag this direction's packets carry (FLB_CTF_SEQ once known). */
#define FLB_CT_NONE 0
#define FLB_CT_SYN_SENT 1
#define FLB_CT_SYN_RECV 2
#define FLB_CT_EST 3
#define FLB_CT_FIN_WAIT 4
#define FLB_CT_TIME_WAIT 5
#define FLB_CT_CLOSE 6

/* Conntrack timeouts that do not come from the rule, in seconds. */
#define FLB_TO_SYN_S 60
#define FLB_TO_FIN_WAIT_S 120
#define FLB_TO_TIME_WAIT_S 10
#define FLB_TO_CLOSE_S 10
/* A DNAT flow picked up mid-stream (no SYN seen) until a reply segment confirms it. */
#define FLB_TO_PICKUP_S 10

/* Source-NAT pools under pressure: a half-open flow (SYN_SENT, SYN_RECV or an unconfirmed
 * pick-up) idle this long gives its port up to a new flow. Probes past FLB_NAT_EASY_PROBES
 * take half-open occupants idle FLB_HALFOPEN_IDLE_NS; probes past FLB_HALFOPEN_HARD_PROBE,
 * idle FLB_HALFOPEN_IDLE_HARD_NS: the oldest go first. */
#define FLB_HALFOPEN_IDLE_NS 3000000000ULL
#define FLB_HALFOPEN_HARD_PROBE 64
#define FLB_HALFOPEN_IDLE_HARD_NS 1000000000ULL

/* TCP sequence tracking (flb_ct.seq_next / ack_seen, per direction). A segment changes what
 * is tracked only if its end is within FLB_SEQ_WINDOW of the direction's highest end seen and
 * its acknowledgment within FLB_SEQ_WINDOW of the highest seen; an RST changes the flow's
 * state only if its sequence number is within FLB_RST_WINDOW of the sender's next sequence
 * number (RFC 5961 section 3: the end host answers an in-window one with a challenge ACK). */
#define FLB_SEQ_WINDOW (1 << 24)
#define FLB_RST_WINDOW (1 << 17)

/* ct_new's LRU lists: one common list (docs/decisions/0007-conntrack-tables.md); the
 * benchmark builds the per-CPU variant with -DFLB_CT_NEW_MAP_FLAGS=2 (BPF_F_NO_COMMON_LRU). */
#ifndef FLB_CT_NEW_MAP_FLAGS
#define FLB_CT_NEW_MAP_FLAGS 0
#endif

/* flb_ct.flags */
#define FLB_CTF_LOCAL 0x01  /* created by this node's datapath */
#define FLB_CTF_SYNCED 0x02 /* installed from a peer's sync stream: never idle here (the
                             * agent removes it when its origin does, or adopts it) */
#define FLB_CTF_LC 0x04     /* counted in ep_conns (least-connections) */
#define FLB_CTF_PICKUP 0x08 /* DNAT TCP picked up mid-stream, no reply yet: FLB_TO_PICKUP_S */
#define FLB_CTF_SEQ 0x10    /* seq_next holds this direction's tracked next sequence number */
#define FLB_CTF_ACK 0x20    /* ack_seen holds this direction's highest acknowledgment */
#define FLB_CTF_NEW 0x40    /* lives in ct_new: a TCP or SCTP flow not yet established, a
                             * pick-up not yet confirmed, or a UDP or ICMP echo flow not yet
                             * confirmed (moved to conntrack when it is) */
#define FLB_CTF_REPLIED 0x80 /* an unconfirmed UDP or ICMP echo flow the endpoint has answered:
                              * the client's next packet confirms it */

/* flb_ct.fin */
#define FLB_FIN_ORIG 0x01
#define FLB_FIN_REPLY 0x02
#define FLB_FIN_BOTH (FLB_FIN_ORIG | FLB_FIN_REPLY)
#define FLB_FIN_CLOSED 0x04 /* the close was counted (event, least-connections) */
/* A CPU is removing or rewriting this entry (a new flow replaces its dead flow, or takes its
 * NAT port): set with atomic or, and only the CPU that set it deletes the entry, writes over
 * it (the new flow's entries carry the bit until both are whole, then it is cleared) or clears
 * it. The datapath's alone: the agent strips it from what it writes (it syncs FLB_FIN_BOTH
 * only), and its collector leaves a flow with either entry held. */
#define FLB_FIN_CLAIMED 0x08
/* On the original-direction entry of a TCP flow made half-open in conntrack itself (not in
 * ct_new, while the in-place budget has room: HALFOPEN_INPLACE): counted in `ct_budget` until
 * the flow is established or removed, whichever comes first (cleared with atomic and: one
 * CPU settles it). The agent strips it from what it syncs and installs. */
#define FLB_FIN_HALFOPEN 0x10

/* `ct_budget`: half-open TCP flows made in conntrack itself. Index 0 is the datapath's
 * (`made` and `settled`, atomic adds), index 1 the agent's (`settled` only: flows its collector
 * found gone, see Collector::pass). In conntrack now: made - both settled. */
struct flb_budget {
	__u64 made;
	__u64 settled;
};

/* Indexes of the per-CPU `counters` array. */
#define FLB_CNT_DROP_FRAGMENT 0
#define FLB_CNT_DROP_NO_ENDPOINT 1
#define FLB_CNT_DROP_NAT_PORTS 2
#define FLB_CNT_DROP_MALFORMED 3
#define FLB_CNT_CT_CREATED 4
#define FLB_CNT_EVENTS_LOST 5
#define FLB_CNT_ICMP_ERR_XLATED 6
#define FLB_CNT_REDIRECTED 7
/* A TCP segment (not a SYN) to a VIP that matches no flow, no service and no local socket:
 * dropped, because the kernel would answer it with a reset and kill a flow this node has
 * not learnt yet (HA takeover, sync lag). */
#define FLB_CNT_DROP_NO_FLOW 8
/* ARP requests (and IPv6 neighbour solicitations) for a VIP dropped because this node is an
 * L2 standby (FLB_HA_L2_STANDBY). */
#define FLB_CNT_ARP_SUPPRESSED 9
/* Neighbour solicitations for an IPv6 VIP answered by the datapath. */
#define FLB_CNT_ND_ANSWERED 10
/* Source-NAT port allocations that needed more than FLB_NAT_EASY_PROBES probes (the pool
 * toward that endpoint is filling up), and expired occupants of a port taken over. */
#define FLB_CNT_NAT_HARD 11
#define FLB_CNT_NAT_TAKEOVER 12
/* Rewritten packets handed to the kernel stack instead of being forwarded by the datapath,
 * by the FIB's answer: no unicast route (none at all, or a local destination, which the
 * stack then delivers); forwarding is disabled on the ingress interface (the stack drops
 * them); an unreachable, blackhole or prohibit route or no source address; the egress MTU is
 * too small (the stack sends the ICMP error); the TTL / hop limit would expire (the stack
 * sends time-exceeded); anything else (lightweight tunnels, a failed header access, a
 * lookup error). Only forwarded packets count in the service and endpoint statistics. */
#define FLB_CNT_FALLBACK_NO_ROUTE 13
#define FLB_CNT_FALLBACK_FWD_DISABLED 14
#define FLB_CNT_FALLBACK_UNREACHABLE 15
#define FLB_CNT_FALLBACK_FRAG_NEEDED 16
#define FLB_CNT_FALLBACK_TTL 17
#define FLB_CNT_FALLBACK_OTHER 18
/* Malformed packets addressed to a VIP or to a tracked flow, dropped before any flow is
 * created (the kernel would drop them too): IPv4 version or header length wrong; IP total
 * or payload length shorter than the header or longer than the frame; TTL or hop limit 0;
 * TCP header truncated or its data offset out of bounds; a TCP flag combination no TCP
 * sends (the kernel conntrack's table: null, SYN+FIN, SYN+RST, FIN without ACK, ...); a
 * UDP length shorter than its header or longer than the packet; an 802.1Q-tagged frame
 * (VLAN id not 0) on the untagged interface the datapath is attached to. */
#define FLB_CNT_DROP_IP_HEADER 19
#define FLB_CNT_DROP_IP_LENGTH 20
#define FLB_CNT_DROP_TTL 21
#define FLB_CNT_DROP_TCP_HEADER 22
#define FLB_CNT_DROP_TCP_FLAGS 23
#define FLB_CNT_DROP_UDP_LENGTH 24
#define FLB_CNT_DROP_VLAN 25
/* A TCP segment that is not a SYN, matches no flow and is addressed to a one-arm or full-NAT
 * service: it never creates a flow (the endpoint could not know a new source port). */
#define FLB_CNT_DROP_NOT_SYN 26
/* An RST (or FIN) whose sequence number is outside the tracked window: forwarded, but the
 * flow's state is left as it was. Also a packet (a SYN, mostly) that would have replaced a
 * dead flow which another CPU was replacing or removing at that moment for a packet of the
 * same 4-tuple: dropped (FLB_FIN_CLAIMED). */
#define FLB_CNT_TCP_STATE_IGNORED 27
/* Segments outside the tracked window (not used to track the flow; forwarded). */
#define FLB_CNT_TCP_OUT_OF_WINDOW 28
/* Half-open flows whose source-NAT port a new flow took (pool under pressure). */
#define FLB_CNT_HALFOPEN_TAKEOVER 29
/* A TCP or SCTP flow that could not move out of ct_new because the conntrack table is full:
 * the packet that completed it dropped (a retransmission completes it once there is room).
 * (A UDP or ICMP flow that cannot move stays unconfirmed in ct_new, and is forwarded.) */
#define FLB_CNT_DROP_CT_FULL 30
/* Flows that moved from ct_new to conntrack: TCP and SCTP handshakes completed, DNAT pick-ups
 * confirmed, UDP and ICMP echo flows confirmed. */
#define FLB_CNT_CT_PROMOTED 31
/* A flow's first packet from a source outside its rule's allowed prefixes (allowedSources):
 * dropped (also counted per rule in src_drops). */
#define FLB_CNT_DROP_SOURCE 32
/* An SCTP packet to a VIP or a tracked flow whose common header or first chunk header is
 * truncated, whose first chunk's length runs past the packet, or an INIT with a non-zero
 * verification tag or bundled with other chunks (RFC 9260 section 8.5.1: the receiver
 * discards it): dropped before any flow exists. */
#define FLB_CNT_DROP_SCTP_HEADER 33
/* An SCTP chunk that would change an association's state (ABORT, SHUTDOWN*, INIT ACK,
 * COOKIE ACK) with a verification tag other than the association's: forwarded, the flow's
 * state unchanged (the endpoint discards it too). */
#define FLB_CNT_SCTP_TAG_IGNORED 34
#define FLB_CNT_MAX 35

/* Source-NAT ports (one-arm, full NAT; ICMP: echo identifiers): 1024..65535. */
#define FLB_NAT_PORT_LO 1024
#define FLB_NAT_PORTS 64512
/* Probes per allocation: the client's own port first, then random ports. At 90 % occupancy
 * 128 probes all fail with probability 0.9^128 ~ 1e-6. */
#define FLB_NAT_PROBES 128
#define FLB_NAT_EASY_PROBES 8
/* The datapath tells the agent of a hard allocation at most this often (FLB_EV_NAT_PRESSURE). */
#define FLB_NAT_SIGNAL_NS 100000000ULL

/* Bits of ha_flags[0], set by the agent. */
#define FLB_HA_L2_STANDBY 0x01 /* L2 mode, not MASTER: do not answer ARP / NS for VIPs */

/* The event ring buffer wakes its reader only when its unread data crosses a multiple of
 * this (the ring is 1 MiB); the agent also drains it on a timer (EVENT_POLL_MS in the agent). */
#define FLB_EVENTS_WAKEUP_BYTES (256 * 1024)

/* Conntrack event types. */
#define FLB_EV_CREATED 1
#define FLB_EV_ESTABLISHED 2
#define FLB_EV_CLOSED 3
/* The datapath removed an entry (an expired flow whose NAT port or 4-tuple a new flow
 * took): key and value of the removed original-direction entry, so peers drop it too. */
#define FLB_EV_REMOVED 4
/* A source-NAT port allocation was hard or failed: key and value are the new flow's reply
 * entry (its pool: endpoint, translated source, endpoint port). The agent runs its
 * collector at once. */
#define FLB_EV_NAT_PRESSURE 5

struct flb_svc_key {
	__u32 addr[4];
	__u16 port; /* network order; 0 for ICMP */
	__u8 proto;
	__u8 family;
};

struct flb_svc {
	__u32 id;        /* index into svc_stats, rr_state; ep index base id*32 */
	__u32 be_slot;   /* index into backends (double-buffered by the agent) */
	__u32 timeout_s; /* inactivity timeout for EST TCP, UDP and ICMP */
	__u16 port_base; /* host order: first port of the rule */
	__u8 mode;
	__u8 sel;
	__u32 flags; /* FLB_SVCF_* */
};

/* flb_svc.flags */
#define FLB_SVCF_SOURCES 0x01 /* only sources in src_ranges under this id open flows */

/* src_ranges key: an allowed source prefix of one rule. prefixlen counts svc_id's 32 bits
 * plus the prefix's, so a lookup with prefixlen 32 + 128 matches only that rule's prefixes.
 * A rule forwards one family (the VIP's): IPv4 prefixes use addr[0]. */
struct flb_src_key {
	__u32 prefixlen;
	__u32 svc_id; /* network order (compared as bytes) */
	__u32 addr[4];
};

struct flb_range {
	__u16 lo; /* host order, inclusive */
	__u16 hi;
	__u32 pad;
	struct flb_svc svc;
};

struct flb_range_key {
	__u32 addr[4];
	__u8 proto;
	__u8 family;
	__u16 pad;
};

struct flb_ranges {
	struct flb_range r[FLB_MAX_RANGES];
};

struct flb_ep {
	__u32 addr[4];
	__u32 snat_addr[4]; /* one-arm: source address toward this endpoint */
	__u16 port;         /* host order; 0 keeps the client's port */
	__u16 weight;
	__u8 active;
	__u8 pad[3];
};

struct flb_backends {
	__u32 count;   /* used entries of ep[] */
	__u32 lut_len; /* used entries of lut[] */
	struct flb_ep ep[FLB_MAX_ENDPOINTS];
	__u8 lut[FLB_LUT_SIZE]; /* endpoint indexes; FLB_LUT_NONE = empty */
	__u8 pad[5];
};

struct flb_ct_key {
	__u32 saddr[4];
	__u32 daddr[4];
	__u16 sport; /* network order; ICMP echo: identifier */
	__u16 dport; /* network order; ICMP echo: 0 */
	__u8 proto;
	__u8 family;
	__u16 zone;
};

/* One entry per direction. The entry alone describes the translation:
 * rewrite (saddr, sport, daddr, dport) of a packet matching the key to
 * (nat_saddr, nat_sport, nat_daddr, nat_dport). The other direction's key is
 * (nat_daddr, nat_dport) -> (nat_saddr, nat_sport) (ICMP: ports id, 0). */
struct flb_ct {
	__u32 nat_saddr[4];
	__u32 nat_daddr[4];
	__u16 nat_sport;
	__u16 nat_dport;
	__u32 svc_id;
	__u32 timeout_s;
	__u16 ep_idx;
	__u16 origin; /* node id that created the entry */
	__u8 dir;     /* 0 original (client -> VIP), 1 reply */
	__u8 state;
	__u8 flags;
	__u8 mode;
	__u32 fin; /* FLB_FIN_* bits, set with atomic or (both directions race at close) */
	__u32 seq_next; /* TCP, host order: the next sequence number this direction sends */
	__u32 ack_seen; /* TCP, host order: the highest acknowledgment this direction sent */
	__u64 created_ns; /* CLOCK_MONOTONIC */
	__u64 last_ns;
	__u64 packets;
	__u64 bytes;
};

struct flb_ct_event {
	__u32 type;
	__u32 pad;
	struct flb_ct_key key;
	struct flb_ct val;
};

/* The ring space one event takes: the record and the ring's 8-byte header, in 8-byte units. */
#define FLB_EV_RECORD_BYTES ((sizeof(struct flb_ct_event) + 8 + 7) / 8 * 8)

struct flb_affinity_key {
	__u32 svc_id;
	__u32 pad;
	__u32 addr[4];
};

struct flb_affinity {
	__u32 ep_idx;
	__u32 pad;
	__u64 last_ns;
};

/* if_macs value: the MAC address of an attached interface (for neighbour advertisements). */
struct flb_mac {
	__u8 addr[6];
	__u8 pad[2];
};

/* if_out slot (an array indexed by ifindex modulo FLB_IF_OUT_SLOTS, so the lookup is a few
 * inlined instructions on every forwarded packet): an interface the datapath forwards out of
 * with bpf_redirect_peer, a veth whose other end is in another network namespace, with its
 * MAC. Written by the agent (--no-peer-redirect: never); ifindex 0 is an empty slot. */
struct flb_if_out {
	__u32 ifindex;
	__u8 mac[6];
	__u8 flags; /* FLB_IFF_* */
	__u8 pad;
};

#define FLB_IF_OUT_SLOTS 256
/* Out of this interface with bpf_redirect_peer. */
#define FLB_IFF_PEER 0x01

struct flb_stats {
	__u64 packets;
	__u64 bytes;
};

#endif
