//! `#[repr(C)]` mirrors of `c/ferrolb.h`, byte for byte, with compile-time size and offset
//! checks. Addresses are four 32-bit words in network byte order (IPv4 in word 0); ports in
//! keys and translations are in network byte order, ports in endpoint and service values in
//! host order, exactly as in the header. Nothing here touches the kernel.

use std::mem::{offset_of, size_of};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The pinned-map layout version (`FLB_LAYOUT_VERSION`); part of the pin path.
pub const LAYOUT_VERSION: u32 = 8;
/// Endpoints per service (`FLB_MAX_ENDPOINTS`).
pub const MAX_ENDPOINTS: usize = 32;
/// Lookup-table length per endpoint set (`FLB_LUT_SIZE`, a prime).
pub const LUT_SIZE: usize = 4099;
/// Empty lookup-table slot (`FLB_LUT_NONE`).
pub const LUT_NONE: u8 = 0xff;
/// Port ranges per (VIP, protocol) (`FLB_MAX_RANGES`).
pub const MAX_RANGES: usize = 8;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// NAT modes (`FLB_MODE_*`, loxilb numbering).
pub const MODE_DNAT: u8 = 0;
pub const MODE_ONEARM: u8 = 1;
pub const MODE_FULLNAT: u8 = 2;

/// Source-NAT ports per pool (`FLB_NAT_PORTS`: 1024..65535).
pub const NAT_PORTS: u32 = 64512;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

/// Timeouts that do not come from the rule (seconds), as in the header.
pub const TO_SYN_S: u32 = 60;
pub const TO_FIN_WAIT_S: u32 = 120;
pub const TO_TIME_WAIT_S: u32 = 10;
pub const TO_CLOSE_S: u32 = 10;
/// A DNAT flow picked up mid-stream, until the endpoint's side confirms it.
pub const TO_PICKUP_S: u32 = 10;

/// Conntrack entry flags.
pub const CTF_LOCAL: u8 = 0x01;
pub const CTF_SYNCED: u8 = 0x02;
pub const CTF_LC: u8 = 0x04;
/// DNAT TCP picked up mid-stream and not yet confirmed by the endpoint's side.
pub const CTF_PICKUP: u8 = 0x08;
/// `seq_next` is tracked for this direction.
pub const CTF_SEQ: u8 = 0x10;
/// `ack_seen` is tracked for this direction.
pub const CTF_ACK: u8 = 0x20;
/// In `ct_new`: a flow not yet confirmed (moved to `conntrack` when it is; never synced): a
/// TCP or SCTP flow whose handshake has not completed, a pick-up not yet confirmed, a UDP or
/// ICMP echo flow not yet answered and continued.
pub const CTF_NEW: u8 = 0x40;
/// An unconfirmed UDP or ICMP echo flow its endpoint has answered: the client's next packet
/// confirms it.
pub const CTF_REPLIED: u8 = 0x80;
/// The flags that describe this node's own tracking of an entry (not carried by sync).
pub const CTF_TRACKING: u8 = CTF_PICKUP | CTF_SEQ | CTF_ACK | CTF_NEW | CTF_REPLIED;

/// `fin` bit (`FLB_FIN_CLAIMED`): a CPU is removing or rewriting the entry at this moment (a
/// new flow replacing its dead flow, or taking its NAT port). The datapath's alone: the
/// agent's writes strip it ([`crate::SyncTable::insert_many`], [`crate::SyncTable::update_batch`]), its
/// collector leaves a flow with either entry held, and sync carries only the two FIN bits.
pub const FIN_CLAIMED: u32 = 0x08;
/// `fin` bit (`FLB_FIN_HALFOPEN`), on the original-direction entry of a TCP flow made
/// half-open in `conntrack` itself: counted in the datapath's in-place budget until it is
/// established or removed. The datapath's alone, like [`FIN_CLAIMED`]: the agent's writes
/// strip it (a flow it wrote is not one the datapath counted).
pub const FIN_HALFOPEN: u32 = 0x10;
/// The `fin` bits only the datapath may set.
pub const FIN_DATAPATH: u32 = FIN_CLAIMED | FIN_HALFOPEN;

/// `ct_budget`: half-open TCP flows made in `conntrack` itself (`struct flb_budget`). Index 0
/// is the datapath's, index 1 the agent's (`settled` only).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Budget {
    pub made: u64,
    pub settled: u64,
}

// SAFETY: plain old data, `repr(C)`, no padding (two u64).
unsafe impl aya::Pod for Budget {}

/// `fib_gen`'s one value (`struct flb_fib_gen`): the FIB generation cached answers must carry,
/// for which families the FIB's answers do not depend on the ports ([`FIB_PORTS_FREE_V4`],
/// [`FIB_PORTS_FREE_V6`]), and until when (CLOCK_MONOTONIC ns) that holds.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FibGen {
    pub generation: u32,
    pub flags: u32,
    pub ports_free_until_ns: u64,
}

// SAFETY: plain old data, `repr(C)`, no padding (two u32, then a u64 at offset 8).
unsafe impl aya::Pod for FibGen {}

/// `FibGen::flags`: IPv4 questions are cached without their ports.
pub const FIB_PORTS_FREE_V4: u32 = 1;
/// `FibGen::flags`: IPv6 questions are cached without their ports.
pub const FIB_PORTS_FREE_V6: u32 = 2;

/// Conntrack state, shared by both entries of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CtState {
    None,
    SynSent,
    SynRecv,
    Established,
    FinWait,
    TimeWait,
    Close,
}

impl CtState {
    pub fn from_u8(v: u8) -> CtState {
        match v {
            1 => CtState::SynSent,
            2 => CtState::SynRecv,
            3 => CtState::Established,
            4 => CtState::FinWait,
            5 => CtState::TimeWait,
            6 => CtState::Close,
            _ => CtState::None,
        }
    }

    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// A stable lower-case name, used in metrics labels and the API.
    pub fn name(self) -> &'static str {
        match self {
            CtState::None => "none",
            CtState::SynSent => "syn_sent",
            CtState::SynRecv => "syn_recv",
            CtState::Established => "established",
            CtState::FinWait => "fin_wait",
            CtState::TimeWait => "time_wait",
            CtState::Close => "closed",
        }
    }

    pub const ALL: [CtState; 7] = [
        CtState::None,
        CtState::SynSent,
        CtState::SynRecv,
        CtState::Established,
        CtState::FinWait,
        CtState::TimeWait,
        CtState::Close,
    ];
}

/// Indexes of the per-CPU `counters` array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    DropFragment = 0,
    DropNoEndpoint = 1,
    DropNatPorts = 2,
    DropMalformed = 3,
    CtCreated = 4,
    EventsLost = 5,
    IcmpErrTranslated = 6,
    Redirected = 7,
    DropNoFlow = 8,
    ArpSuppressed = 9,
    /// Neighbour solicitations for an IPv6 VIP answered by the datapath.
    NdAnswered = 10,
    /// Source-NAT port allocations that needed more than a few probes (a pool filling up).
    NatHard = 11,
    /// Expired occupants of a source-NAT port (or of a reused 4-tuple's reply key) taken over.
    NatTakeover = 12,
    /// Rewritten packets handed to the stack because the FIB has no unicast route for them
    /// (none at all, or a local destination the stack then delivers).
    FallbackNoRoute = 13,
    /// ... because forwarding is disabled on the ingress interface: the stack drops them.
    FallbackFwdDisabled = 14,
    /// ... because of an unreachable, blackhole or prohibit route, or no source address.
    FallbackUnreachable = 15,
    /// ... because the egress MTU is smaller than the packet (the stack sends the ICMP error).
    FallbackFragNeeded = 16,
    /// ... because the TTL or hop limit would expire (the stack sends time-exceeded).
    FallbackTtl = 17,
    /// ... for any other reason (lightweight tunnels, a failed header access, lookup errors).
    FallbackOther = 18,
    /// Malformed packets to a VIP or a tracked flow, dropped before any flow is created:
    /// IPv4 version or header length wrong.
    DropIpHeader = 19,
    /// ... IP length shorter than the header or longer than the frame.
    DropIpLength = 20,
    /// ... TTL or hop limit 0.
    DropTtl = 21,
    /// ... TCP header truncated or its data offset out of bounds.
    DropTcpHeader = 22,
    /// ... a TCP flag combination no TCP sends (null, SYN+FIN, SYN+RST, FIN alone, ...).
    DropTcpFlags = 23,
    /// ... UDP length shorter than its header or longer than the packet.
    DropUdpLength = 24,
    /// ... an 802.1Q-tagged frame (VLAN not 0) on the untagged interface.
    DropVlan = 25,
    /// A TCP segment that is not a SYN, matches no flow, to a one-arm or full-NAT service.
    DropNotSyn = 26,
    /// An RST or FIN outside the tracked window: forwarded, the flow's state unchanged. Also a
    /// packet (a SYN, mostly) that would have replaced a dead flow another CPU was replacing
    /// or removing at that moment for a packet of the same 4-tuple: dropped.
    TcpStateIgnored = 27,
    /// Segments outside the tracked window (forwarded, not used for tracking).
    TcpOutOfWindow = 28,
    /// Half-open flows whose source-NAT port a new flow took (pool under pressure).
    HalfOpenTakeover = 29,
    /// A new flow refused because the conntrack table is full (a handshake that completed
    /// but could not move out of `ct_new`, or a new UDP or ICMP flow): dropped.
    DropCtFull = 30,
    /// Half-open flows that completed and moved from `ct_new` to `conntrack`.
    CtPromoted = 31,
    /// A flow's first packet from a source its rule does not allow (`allowedSources`):
    /// dropped (also counted per rule).
    DropSource = 32,
    /// A malformed SCTP packet to a VIP or a tracked flow (header or first chunk truncated,
    /// an INIT with a tag or bundled): dropped before any flow exists.
    DropSctpHeader = 33,
    /// An SCTP chunk that would change an association's state with the wrong verification
    /// tag: forwarded, the state unchanged.
    SctpTagIgnored = 34,
}

pub const COUNTERS: usize = 35;

/// `Svc::flags`: only the sources in `src_ranges` under the service's id open flows.
pub const SVCF_SOURCES: u32 = 0x01;

/// Bits of `SrcKey::prefix_len` taken by the service id before the address.
pub const SRC_ID_BITS: u32 = 32;

/// `src_ranges` key data (after the LPM trie's prefix length): one allowed source prefix of
/// one rule. The id is in network order (the trie compares bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SrcKey {
    pub svc_id_be: u32,
    pub addr: [u32; 4],
}

/// `ha_flags` bit: L2 mode, not MASTER (ARP requests for VIPs are dropped).
pub const HA_L2_STANDBY: u32 = 0x01;

/// `if_out` flag (`FLB_IFF_PEER`): a veth whose other end is in another network namespace;
/// the datapath forwards through it with `bpf_redirect_peer`.
pub const IFF_PEER: u8 = 0x01;

/// Slots of `if_out` (`FLB_IF_OUT_SLOTS`): an interface's slot is its index modulo this.
pub const IF_OUT_SLOTS: u32 = 256;

/// Conntrack event kinds (`FLB_EV_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Created,
    Established,
    Closed,
    /// The datapath removed an expired flow's original entry (a new flow took its key or
    /// its NAT port): peers drop it too.
    Removed,
    /// A source-NAT port allocation was hard or failed; the event carries the new flow's
    /// reply entry (its pool). The agent runs its collector at once.
    NatPressure,
}

/// An address in the datapath's layout.
pub fn addr_words(ip: IpAddr) -> ([u32; 4], u8) {
    match ip {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let mut w = [0u32; 4];
            for (i, c) in o.chunks_exact(4).enumerate() {
                w[i] = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
            }
            (w, FAMILY_V6)
        }
    }
}

/// The inverse of [`addr_words`].
pub fn words_addr(w: &[u32; 4], family: u8) -> IpAddr {
    if family == FAMILY_V6 {
        let mut o = [0u8; 16];
        for (i, x) in w.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&x.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(o))
    } else {
        IpAddr::V4(Ipv4Addr::from(w[0].to_ne_bytes()))
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvcKey {
    pub addr: [u32; 4],
    /// Network order; 0 for ICMP.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Svc {
    pub id: u32,
    pub be_slot: u32,
    pub timeout_s: u32,
    /// Host order.
    pub port_base: u16,
    pub mode: u8,
    pub sel: u8,
    /// `SVCF_*`.
    pub flags: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Range {
    pub lo: u16,
    pub hi: u16,
    pub pad: u32,
    pub svc: Svc,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RangeKey {
    pub addr: [u32; 4],
    pub proto: u8,
    pub family: u8,
    pub pad: u16,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ranges {
    pub r: [Range; MAX_RANGES],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ep {
    pub addr: [u32; 4],
    pub snat_addr: [u32; 4],
    /// Host order; 0 keeps the client's destination port.
    pub port: u16,
    pub weight: u16,
    pub active: u8,
    pub pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Backends {
    pub count: u32,
    pub lut_len: u32,
    pub ep: [Ep; MAX_ENDPOINTS],
    pub lut: [u8; LUT_SIZE],
    pub pad: [u8; 5],
}

impl Default for Backends {
    fn default() -> Self {
        Backends {
            count: 0,
            lut_len: 0,
            ep: [Ep::default(); MAX_ENDPOINTS],
            lut: [LUT_NONE; LUT_SIZE],
            pad: [0; 5],
        }
    }
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backends")
            .field("count", &self.count)
            .field("lut_len", &self.lut_len)
            .field("ep", &&self.ep[..(self.count as usize).min(MAX_ENDPOINTS)])
            .finish_non_exhaustive()
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    /// Network order; ICMP echo: identifier.
    pub sport: u16,
    /// Network order; ICMP echo: 0.
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub zone: u16,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ct {
    pub nat_saddr: [u32; 4],
    pub nat_daddr: [u32; 4],
    pub nat_sport: u16,
    pub nat_dport: u16,
    pub svc_id: u32,
    pub timeout_s: u32,
    pub ep_idx: u16,
    pub origin: u16,
    /// 0 original (client -> VIP), 1 reply.
    pub dir: u8,
    pub state: u8,
    pub flags: u8,
    pub mode: u8,
    /// FIN bits (orig 1, reply 2) and 4 once the close was counted.
    pub fin: u32,
    /// TCP, host order: the next sequence number this direction sends (`CTF_SEQ`).
    pub seq_next: u32,
    /// TCP, host order: the highest acknowledgment this direction sent (`CTF_ACK`).
    pub ack_seen: u32,
    pub created_ns: u64,
    pub last_ns: u64,
    pub packets: u64,
    pub bytes: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CtEvent {
    pub kind: u32,
    pub pad: u32,
    pub key: CtKey,
    pub val: Ct,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub svc_id: u32,
    pub pad: u32,
    pub addr: [u32; 4],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Affinity {
    pub ep_idx: u32,
    pub pad: u32,
    pub last_ns: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub packets: u64,
    pub bytes: u64,
}

// Sizes and offsets must equal the C header's. At load time aya also checks every typed map's
// key and value size against the object's BTF map definitions (`take` fails on a mismatch).
const _: () = {
    assert!(size_of::<SvcKey>() == 20);
    assert!(size_of::<Svc>() == 20);
    assert!(size_of::<SrcKey>() == 20);
    assert!(size_of::<Range>() == 28);
    assert!(size_of::<RangeKey>() == 20);
    assert!(size_of::<Ranges>() == 28 * MAX_RANGES);
    assert!(size_of::<Ep>() == 40);
    assert!(offset_of!(Ep, port) == 32);
    assert!(size_of::<Backends>() == 8 + 40 * MAX_ENDPOINTS + LUT_SIZE + 5);
    assert!(offset_of!(Backends, lut) == 8 + 40 * MAX_ENDPOINTS);
    assert!(size_of::<CtKey>() == 40);
    assert!(offset_of!(CtKey, sport) == 32);
    assert!(offset_of!(CtKey, proto) == 36);
    assert!(size_of::<Ct>() == 96);
    assert!(offset_of!(Ct, svc_id) == 36);
    assert!(offset_of!(Ct, dir) == 48);
    assert!(offset_of!(Ct, fin) == 52);
    assert!(offset_of!(Ct, seq_next) == 56);
    assert!(offset_of!(Ct, created_ns) == 64);
    assert!(size_of::<CtEvent>() == 144);
    assert!(offset_of!(CtEvent, val) == 48);
    assert!(size_of::<AffinityKey>() == 24);
    assert!(size_of::<Affinity>() == 16);
    assert!(size_of::<Stats>() == 16);
};

// SAFETY: all of these are #[repr(C)] plain-old-data with explicit padding fields, so every
// byte pattern is valid and there are no implicit padding bytes.
unsafe impl aya::Pod for SvcKey {}
unsafe impl aya::Pod for Svc {}
unsafe impl aya::Pod for SrcKey {}
unsafe impl aya::Pod for RangeKey {}
unsafe impl aya::Pod for Ranges {}
unsafe impl aya::Pod for Backends {}
unsafe impl aya::Pod for CtKey {}
unsafe impl aya::Pod for Ct {}
unsafe impl aya::Pod for AffinityKey {}
unsafe impl aya::Pod for Affinity {}
unsafe impl aya::Pod for Stats {}

impl CtKey {
    /// An IPv4 key; ports in host order.
    pub fn v4(saddr: Ipv4Addr, sport: u16, daddr: Ipv4Addr, dport: u16, proto: u8) -> CtKey {
        CtKey::new(IpAddr::V4(saddr), sport, IpAddr::V4(daddr), dport, proto)
    }

    /// A key of either family (taken from `saddr`; both addresses must share it); ports in
    /// host order. ICMPv6 flows use `PROTO_ICMP` with the IPv6 family, as the datapath does.
    pub fn new(saddr: IpAddr, sport: u16, daddr: IpAddr, dport: u16, proto: u8) -> CtKey {
        let (s, family) = addr_words(saddr);
        CtKey {
            saddr: s,
            daddr: addr_words(daddr).0,
            sport: sport.to_be(),
            dport: dport.to_be(),
            proto,
            family,
            zone: 0,
        }
    }

    pub fn src(&self) -> IpAddr {
        words_addr(&self.saddr, self.family)
    }

    pub fn dst(&self) -> IpAddr {
        words_addr(&self.daddr, self.family)
    }

    pub fn src_port(&self) -> u16 {
        u16::from_be(self.sport)
    }

    pub fn dst_port(&self) -> u16 {
        u16::from_be(self.dport)
    }

    /// The key of the other direction of the flow `val` translates.
    pub fn peer(&self, val: &Ct) -> CtKey {
        let (sport, dport) = if self.proto == PROTO_ICMP {
            (val.nat_sport, 0)
        } else {
            (val.nat_dport, val.nat_sport)
        };
        CtKey {
            saddr: val.nat_daddr,
            daddr: val.nat_saddr,
            sport,
            dport,
            proto: self.proto,
            family: self.family,
            zone: self.zone,
        }
    }
}

impl Ct {
    /// The reply entry of the flow whose original-direction entry is `orig` under `key`, with
    /// its key: the translation back to the VIP and the client (as the datapath's `ct_plan`
    /// writes it), every other field as `orig` has it.
    pub fn reply_of(key: &CtKey, orig: &Ct) -> (CtKey, Ct) {
        let (nat_sport, nat_dport) = if key.proto == PROTO_ICMP {
            (key.sport, 0)
        } else {
            (key.dport, key.sport)
        };
        let reply = Ct {
            nat_saddr: key.daddr,
            nat_daddr: key.saddr,
            nat_sport,
            nat_dport,
            dir: 1,
            ..*orig
        };
        (key.peer(orig), reply)
    }

    /// The state in force (both FINs seen is TIME_WAIT, as in the datapath's `eff_state`).
    pub fn state(&self) -> CtState {
        let s = CtState::from_u8(self.state);
        if s < CtState::TimeWait && self.fin & 3 == 3 {
            CtState::TimeWait
        } else {
            s
        }
    }

    pub fn nat_src(&self, family: u8) -> IpAddr {
        words_addr(&self.nat_saddr, family)
    }

    pub fn nat_dst(&self, family: u8) -> IpAddr {
        words_addr(&self.nat_daddr, family)
    }

    /// The inactivity timeout in force for this entry (the datapath's `ct_timeout_ns`).
    pub fn timeout_s(&self, proto: u8) -> u32 {
        if proto != PROTO_TCP && proto != PROTO_SCTP {
            return self.timeout_s;
        }
        match self.state() {
            CtState::Established if self.flags & CTF_PICKUP != 0 => TO_PICKUP_S,
            CtState::SynSent | CtState::SynRecv => TO_SYN_S,
            CtState::FinWait => TO_FIN_WAIT_S,
            CtState::TimeWait => TO_TIME_WAIT_S,
            CtState::Close => TO_CLOSE_S,
            _ => self.timeout_s,
        }
    }

    /// True when the entry has been idle longer than its timeout at `now_ns` (monotonic).
    pub fn expired(&self, proto: u8, now_ns: u64) -> bool {
        now_ns.saturating_sub(self.last_ns) > u64::from(self.timeout_s(proto)) * 1_000_000_000
    }
}

impl CtEvent {
    /// Decodes a ring-buffer record; `None` when it is not a whole event.
    pub fn from_bytes(b: &[u8]) -> Option<CtEvent> {
        if b.len() < size_of::<CtEvent>() {
            return None;
        }
        // SAFETY: the length is checked, CtEvent is plain-old-data valid for any bytes, and
        // read_unaligned does not need alignment.
        Some(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<CtEvent>()) })
    }

    pub fn kind(&self) -> Option<EventKind> {
        match self.kind {
            1 => Some(EventKind::Created),
            2 => Some(EventKind::Established),
            3 => Some(EventKind::Closed),
            4 => Some(EventKind::Removed),
            5 => Some(EventKind::NatPressure),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_words_round_trip() {
        for ip in ["10.1.2.3", "255.0.0.1", "2001:db8::1", "::"] {
            let ip: IpAddr = ip.parse().unwrap();
            let (w, f) = addr_words(ip);
            assert_eq!(words_addr(&w, f), ip);
        }
        // IPv4 in network order in word 0: the bytes in memory are the octets.
        let (w, _) = addr_words("10.1.2.3".parse().unwrap());
        assert_eq!(w[0].to_ne_bytes(), [10, 1, 2, 3]);
    }

    #[test]
    fn peer_key_of_a_fullnat_entry() {
        let k = CtKey::v4(
            "198.51.100.2".parse().unwrap(),
            40000,
            "203.0.113.10".parse().unwrap(),
            80,
            PROTO_TCP,
        );
        let v = Ct {
            nat_saddr: addr_words("203.0.113.10".parse().unwrap()).0,
            nat_daddr: addr_words("10.10.10.11".parse().unwrap()).0,
            nat_sport: 5000u16.to_be(),
            nat_dport: 8080u16.to_be(),
            ..Default::default()
        };
        let p = k.peer(&v);
        assert_eq!(p.src().to_string(), "10.10.10.11");
        assert_eq!(p.src_port(), 8080);
        assert_eq!(p.dst().to_string(), "203.0.113.10");
        assert_eq!(p.dst_port(), 5000);
        // Its reply entry translates back to the VIP and the client, and points at `k`.
        let (rk, r) = Ct::reply_of(&k, &v);
        assert_eq!(rk, p);
        assert_eq!(
            (r.dir, r.nat_src(k.family).to_string()),
            (1, "203.0.113.10".into())
        );
        assert_eq!(u16::from_be(r.nat_sport), 80);
        assert_eq!(rk.peer(&r), k);
        // ICMP echo: the identifier both ways.
        let ki = CtKey {
            proto: PROTO_ICMP,
            dport: 0,
            ..k
        };
        let vi = Ct {
            nat_sport: k.sport,
            nat_dport: 0,
            ..v
        };
        let (rki, ri) = Ct::reply_of(&ki, &vi);
        assert_eq!((rki.sport, rki.dport), (k.sport, 0));
        assert_eq!(rki.peer(&ri), ki);
    }

    #[test]
    fn timeouts_follow_state() {
        let mut v = Ct {
            timeout_s: 240,
            state: CtState::Established.as_u8(),
            last_ns: 0,
            ..Default::default()
        };
        assert!(!v.expired(PROTO_TCP, 240_000_000_000));
        assert!(v.expired(PROTO_TCP, 240_000_000_001));
        v.state = CtState::TimeWait.as_u8();
        assert!(v.expired(PROTO_TCP, 10_000_000_001));
        assert_eq!(v.timeout_s(PROTO_UDP), 240);
        // A pick-up holds 10 s until the endpoint's side confirms it.
        v.state = CtState::Established.as_u8();
        v.flags = CTF_PICKUP;
        assert!(!v.expired(PROTO_TCP, 10_000_000_000));
        assert!(v.expired(PROTO_TCP, 10_000_000_001));
        assert_eq!(v.timeout_s(PROTO_UDP), 240);
    }

    #[test]
    fn event_decoding_needs_a_whole_record() {
        assert!(CtEvent::from_bytes(&[0u8; 143]).is_none());
        let mut b = vec![0u8; 144];
        b[0] = 2;
        assert_eq!(
            CtEvent::from_bytes(&b).unwrap().kind(),
            Some(EventKind::Established)
        );
    }
}
