//! Conversions between datapath conntrack entries and the sync protocol's explicit flows.
//!
//! A flow travels as its original direction (client → VIP) and its translation; the
//! receiver rebuilds both datapath entries from it and resolves the service and endpoint
//! numbers, which are local to each node, from its own service maps.

use std::net::IpAddr;

use ferrolb_bpf::SyncTable;
use ferrolb_bpf::maps::{
    CTF_SYNCED, Ct, CtKey, FAMILY_V4, FAMILY_V6, PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
    addr_words, words_addr,
};
use ferrolb_consync::{Flow, FlowKey, pb};

/// `svc_id` of a synced flow whose service this node does not have: out of range of every
/// statistics map, so the datapath counts nothing for it (the translation still works).
pub const SVC_UNKNOWN: u32 = 0x07ff_ffff;

/// An address in the sync protocol's explicit form (node status messages).
pub(crate) fn addr(ip: IpAddr) -> pb::Addr {
    pb::Addr {
        ip: match ip {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        },
    }
}

/// An address from the explicit form; `None` unless 4 or 16 bytes.
pub(crate) fn ip_of(a: Option<&pb::Addr>) -> Option<IpAddr> {
    let b = &a?.ip;
    match b.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(b.as_slice()).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(b.as_slice()).ok()?)),
        _ => None,
    }
}

/// The flow key of an original-direction entry's key.
pub fn key_of(k: &CtKey) -> FlowKey {
    FlowKey {
        protocol: k.proto,
        client: words_addr(&k.saddr, k.family),
        client_port: u16::from_be(k.sport),
        vip: words_addr(&k.daddr, k.family),
        vip_port: u16::from_be(k.dport),
    }
}

/// The datapath key of a flow's original direction; `None` when the key does not fit the
/// datapath (consync has checked the protocol and that both addresses share a family).
pub fn ct_key(k: &FlowKey) -> Option<CtKey> {
    if !matches!(k.protocol, PROTO_ICMP | PROTO_TCP | PROTO_UDP | PROTO_SCTP) {
        return None;
    }
    let (s, fs) = addr_words(k.client);
    let (d, fd) = addr_words(k.vip);
    if fs != fd {
        return None;
    }
    let dport = if k.protocol == PROTO_ICMP {
        0
    } else {
        k.vip_port
    };
    Some(CtKey {
        saddr: s,
        daddr: d,
        sport: k.client_port.to_be(),
        dport: dport.to_be(),
        proto: k.protocol,
        family: fs,
        zone: 0,
    })
}

/// A flow from an original-direction entry. `now_ns` is this node's monotonic clock.
pub fn flow_of(k: &CtKey, v: &Ct, now_ns: u64) -> Flow {
    Flow {
        key: key_of(k),
        nat_source: v.nat_src(k.family),
        nat_source_port: u16::from_be(v.nat_sport),
        endpoint: v.nat_dst(k.family),
        endpoint_port: u16::from_be(v.nat_dport),
        mode: v.mode,
        state: v.state,
        fin: (v.fin & 3) as u8,
        timeout_s: v.timeout_s,
        origin: u32::from(v.origin),
        age_ms: now_ns.saturating_sub(v.created_ns) / 1_000_000,
        idle_ms: now_ns.saturating_sub(v.last_ns) / 1_000_000,
    }
}

/// This node's (service id, endpoint index) for a flow to `key`'s VIP served by `ep`:`ep_port`,
/// from its own service maps; [`SVC_UNKNOWN`] when it has no such service.
pub fn resolve(table: &SyncTable, key: &CtKey, ep: IpAddr, ep_port: u16) -> (u32, u16) {
    let family = key.family;
    let vip = words_addr(&key.daddr, family);
    match table.service(vip, u16::from_be(key.dport), key.proto) {
        Some(svc) => {
            let idx = table.backends(svc.be_slot).and_then(|b| {
                b.ep.iter()
                    .take(b.count as usize)
                    .position(|e| {
                        words_addr(&e.addr, family) == ep && (e.port == 0 || e.port == ep_port)
                    })
                    .and_then(|i| u16::try_from(i).ok())
            });
            (svc.id, idx.unwrap_or(0))
        }
        None => (SVC_UNKNOWN, 0),
    }
}

/// Both datapath entries of a peer's flow, flagged synced, with this node's service and
/// endpoint numbers from `resolve` (see [`resolve`]). `None` when the flow is malformed (it
/// is then skipped and counted).
pub fn entries_of(
    f: &Flow,
    now_ns: u64,
    mut resolve: impl FnMut(&CtKey, IpAddr, u16) -> (u32, u16),
) -> Option<[(CtKey, Ct); 2]> {
    let key = ct_key(&f.key)?;
    let family = key.family;
    let (ns, fa) = addr_words(f.nat_source);
    let (nd, fb) = addr_words(f.endpoint);
    if fa != family || fb != family || !(family == FAMILY_V4 || family == FAMILY_V6) {
        return None;
    }
    let origin = u16::try_from(f.origin).ok()?;
    let state = Some(f.state).filter(|s| *s <= 6)?;
    let mode = Some(f.mode).filter(|m| *m <= 2)?;
    let ep_port = if key.proto == PROTO_ICMP {
        0
    } else {
        f.endpoint_port
    };
    let (svc_id, ep_idx) = resolve(&key, f.endpoint, ep_port);
    let orig = Ct {
        nat_saddr: ns,
        nat_daddr: nd,
        nat_sport: f.nat_source_port.to_be(),
        nat_dport: ep_port.to_be(),
        svc_id,
        timeout_s: f.timeout_s,
        ep_idx,
        origin,
        dir: 0,
        state,
        flags: CTF_SYNCED,
        mode,
        fin: u32::from(f.fin & 3),
        // Sequence tracking is this node's own: it starts from the next segment here.
        seq_next: 0,
        ack_seen: 0,
        created_ns: now_ns.saturating_sub(f.age_ms.saturating_mul(1_000_000)),
        last_ns: now_ns.saturating_sub(f.idle_ms.saturating_mul(1_000_000)),
        packets: 0,
        bytes: 0,
    };
    Some([(key, orig), Ct::reply_of(&key, &orig)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrolb_bpf::maps::CTF_LOCAL;
    use std::net::{IpAddr, Ipv4Addr};

    fn entry(proto: u8) -> (CtKey, Ct) {
        entry_in(proto, false)
    }

    /// An IPv4 or IPv6 (`v6`) flow entry of the original direction.
    fn entry_in(proto: u8, v6: bool) -> (CtKey, Ct) {
        let ip = |s4: &str, s6: &str| -> IpAddr {
            (if v6 { s6 } else { s4 })
                .parse()
                .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
        };
        let client = ip("198.51.100.2", "2001:db8:100::2");
        let vip = ip("203.0.113.10", "2001:db8:aaaa::10");
        let ep = ip("10.10.10.12", "fd00:10::12");
        let icmp = proto == PROTO_ICMP;
        let k = CtKey::new(client, 40001, vip, if icmp { 0 } else { 80 }, proto);
        let v = Ct {
            nat_saddr: addr_words(vip).0,
            nat_daddr: addr_words(ep).0,
            nat_sport: 5555u16.to_be(),
            nat_dport: if icmp { 0 } else { 8080u16.to_be() },
            svc_id: 4,
            timeout_s: 240,
            ep_idx: 1,
            origin: 3,
            dir: 0,
            state: 3,
            flags: CTF_LOCAL,
            mode: 2,
            fin: 1,
            seq_next: 0,
            ack_seen: 0,
            created_ns: 1_000_000_000,
            last_ns: 9_000_000_000,
            packets: 7,
            bytes: 700,
        };
        (k, v)
    }

    #[test]
    fn keys_round_trip() {
        for (p, v6) in [PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_SCTP]
            .into_iter()
            .flat_map(|p| [(p, false), (p, true)])
        {
            let (k, _) = entry_in(p, v6);
            assert_eq!(ct_key(&key_of(&k)), Some(k));
        }
    }

    #[test]
    fn malformed_keys_are_refused() {
        let (k, _) = entry(PROTO_TCP);
        let good = key_of(&k);
        let mut bad = good;
        bad.protocol = 47;
        assert_eq!(ct_key(&bad), None);
        let mut bad = good;
        bad.vip = IpAddr::from([0u8; 16]);
        assert_eq!(ct_key(&bad), None, "mixed families");
        let (k, v) = entry(PROTO_TCP);
        let mut f = flow_of(&k, &v, 10_000_000_000);
        f.origin = 70_000;
        assert!(
            entries_of(&f, 0, |_, _, _| (0, 0)).is_none(),
            "origin beyond u16"
        );
        let mut f = flow_of(&k, &v, 10_000_000_000);
        f.endpoint = IpAddr::from([0u8; 16]);
        assert!(
            entries_of(&f, 0, |_, _, _| (0, 0)).is_none(),
            "mixed families"
        );
    }

    #[test]
    fn flows_carry_the_translation_and_relative_times() {
        let (k, v) = entry(PROTO_TCP);
        let f = flow_of(&k, &v, 10_000_000_000);
        assert_eq!(f.nat_source_port, 5555);
        assert_eq!(f.endpoint_port, 8080);
        assert_eq!(f.endpoint, IpAddr::from([10, 10, 10, 12]));
        assert_eq!((f.age_ms, f.idle_ms), (9000, 1000));
        assert_eq!((f.origin, f.mode, f.state, f.fin), (3, 2, 3, 1));
    }

    /// A flow rebuilt on a peer is the origin's entry pair, flagged synced: the same keys and
    /// translations the datapath made (its reply entry is what `ct_create` writes).
    #[test]
    fn entries_rebuild_both_directions() {
        for (p, v6) in [PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_SCTP]
            .into_iter()
            .flat_map(|p| [(p, false), (p, true)])
        {
            let (k, v) = entry_in(p, v6);
            assert_eq!(k.family, if v6 { FAMILY_V6 } else { FAMILY_V4 });
            let f = flow_of(&k, &v, 10_000_000_000);
            let [(ok, o), (rk, r)] =
                entries_of(&f, 20_000_000_000, |_, _, _| (9, 2)).expect("well-formed");
            assert_eq!(ok, k);
            assert_eq!(rk, k.peer(&v), "reply key");
            assert_eq!((o.nat_saddr, o.nat_daddr), (v.nat_saddr, v.nat_daddr));
            assert_eq!((o.nat_sport, o.nat_dport), (v.nat_sport, v.nat_dport));
            assert_eq!(
                (o.svc_id, o.ep_idx, o.flags, o.origin),
                (9, 2, CTF_SYNCED, 3)
            );
            assert_eq!(
                o.created_ns, 11_000_000_000,
                "age kept relative to our clock"
            );
            // The reply entry turns (endpoint, nat source) back into (VIP, client).
            assert_eq!((r.nat_saddr, r.nat_daddr), (k.daddr, k.saddr));
            if p == PROTO_ICMP {
                assert_eq!((r.nat_sport, r.nat_dport), (k.sport, 0));
            } else {
                assert_eq!((r.nat_sport, r.nat_dport), (k.dport, k.sport));
            }
            assert_eq!(
                rk.peer(&r),
                k,
                "the reply entry points back at the original"
            );
            assert_eq!(r.dir, 1);
        }
        let (k, v) = entry(PROTO_TCP);
        let mut f = flow_of(&k, &v, 10_000_000_000);
        f.mode = 7;
        assert!(entries_of(&f, 0, |_, _, _| (0, 0)).is_none(), "bad mode");
    }
}
