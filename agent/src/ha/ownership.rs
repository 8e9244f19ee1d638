//! Who owns a synced flow while every node lives (decision 0009): **the node that carries the
//! flow's owning direction**. Pure decisions; [`super::Ha`] applies them.
//!
//! - The owning direction of a flow is where its packets arrive at exactly one node: the
//!   replies when they go to an address of one node (full NAT from `--node-snat`, one-arm),
//!   otherwise the client's packets (DNAT, full NAT from the VIP), which the ToR's ECMP hash
//!   sends to one node until the node set changes.
//! - A node whose synced copy carried owning-direction packets recently **claims** the flow:
//!   its two entries become its own (they age here) and it publishes the flow under its own
//!   origin, stamped with the time of its last owning-direction packet.
//! - A node that holds the flow under another origin (its own, or a third node's) takes a
//!   peer's version only when that version's owning-direction packet is at least as recent as
//!   its own copy's: the last node to see the flow's traffic owns it, whatever order the
//!   messages arrive in. Stale versions (a node returning from a partition with flows that
//!   moved away meanwhile) are refused; an owner that refuses one publishes its own again.
//! - A synced copy whose origin is a dead peer and that nobody claimed is removed once idle
//!   here past its timeout (a dead node's flows that no traffic reaches).

use std::net::IpAddr;

use ferrolb_bpf::maps::{CTF_NEW, CTF_SYNCED, Ct, CtKey, MODE_DNAT};

/// The direction (0 client -> VIP, 1 reply) whose packets decide the owner of the flow whose
/// original-direction entry is `k`/`v`.
pub fn owning_dir(k: &CtKey, v: &Ct) -> u8 {
    if v.mode != MODE_DNAT && v.nat_saddr != k.daddr {
        1
    } else {
        0
    }
}

/// When the flow's owning direction last carried a packet (local clock): `orig` is the
/// original-direction entry, `reply` the reply entry if found.
pub fn owning_last_ns(k: &CtKey, orig: &Ct, reply: Option<&Ct>) -> u64 {
    match (owning_dir(k, orig), reply) {
        (1, Some(r)) => r.last_ns,
        _ => orig.last_ns,
    }
}

/// Whether a peer's version of a flow (owning-direction packet at `incoming_ns`) replaces the
/// copy held here (owning-direction packet at `held_ns`). Ties go to the incoming version.
pub fn incoming_wins(incoming_ns: u64, held_ns: u64) -> bool {
    incoming_ns >= held_ns
}

/// What one collector pass does about synced flows.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Flows to claim: original-direction key and entry, reply key and entry.
    pub claims: Vec<[(CtKey, Ct); 2]>,
    /// Flows of dead peers nobody carries, idle here past their timeout: (original key,
    /// reply key).
    pub orphans: Vec<(CtKey, Option<CtKey>)>,
}

/// From a chunk of a walk of the table at `now_ns`: the synced flows (origin not `me`) whose
/// owning direction carried packets here within `window_ns`, and the orphans of dead origins.
///
/// A flow's two entries may be listed chunks apart, so the chunk only names candidates: an
/// entry of its owning direction that carried packets recently, or an original-direction
/// entry of a dead origin idle past its timeout. Each candidate flow is decided on both of
/// its entries as `lookup` reads them now (the table, under the caller's lock), which is also
/// what a claim writes back.
pub fn plan(
    chunk: &[(CtKey, Ct)],
    lookup: impl Fn(&CtKey) -> Option<Ct>,
    me: u16,
    dead: impl Fn(u16) -> bool,
    now_ns: u64,
    window_ns: u64,
) -> Plan {
    let synced = |v: &Ct| v.flags & CTF_SYNCED != 0 && v.flags & CTF_NEW == 0 && v.origin != me;
    let recent = |v: &Ct| v.packets > 0 && now_ns.saturating_sub(v.last_ns) <= window_ns;
    let mut seen = std::collections::HashSet::new();
    let mut out = Plan::default();
    for (k, v) in chunk.iter().filter(|(_, v)| synced(v)) {
        // The flow's original-direction key.
        let ok = if v.dir == 0 { *k } else { k.peer(v) };
        let owning = if v.dir == 0 {
            owning_dir(k, v) == 0
        } else {
            owning_dir_of_reply(k, v) == 1
        };
        let claimable = owning && recent(v);
        let orphan = v.dir == 0 && dead(v.origin) && v.expired(k.proto, now_ns);
        if !(claimable || orphan) || !seen.insert(ok) {
            continue;
        }
        let Some(o) = lookup(&ok).filter(|o| o.dir == 0 && synced(o)) else {
            continue;
        };
        let rk = ok.peer(&o);
        let reply = lookup(&rk).filter(|r| r.dir == 1 && r.origin == o.origin);
        let owner = match (owning_dir(&ok, &o), &reply) {
            (1, Some(r)) => Some(r),
            (1, None) => None,
            _ => Some(&o),
        };
        if let Some(owner) = owner
            && recent(owner)
        {
            if let Some(r) = reply {
                out.claims.push([(ok, o), (rk, r)]);
            }
            continue;
        }
        if owner.is_some()
            && dead(o.origin)
            && o.expired(ok.proto, now_ns)
            && reply.is_none_or(|r| r.expired(ok.proto, now_ns))
        {
            out.orphans.push((ok, reply.map(|_| rk)));
        }
    }
    out
}

/// [`owning_dir`] read off a flow's reply entry (key `rk`, entry `r`): its key's destination
/// is the flow's source address toward the endpoint, its `nat_saddr` the VIP.
pub fn owning_dir_of_reply(rk: &CtKey, r: &Ct) -> u8 {
    if r.mode != MODE_DNAT && r.nat_saddr != rk.daddr {
        1
    } else {
        0
    }
}

/// Ring distance from `owner` to `me` among the node ids `ids` (sorted, distinct, both
/// present): 1 for the node right after the owner. `None` when either is missing.
pub fn ring_distance(ids: &[u32], owner: u32, me: u32) -> Option<u8> {
    let n = ids.len();
    let a = ids.iter().position(|i| *i == owner)?;
    let b = ids.iter().position(|i| *i == me)?;
    u8::try_from((b + n - a) % n).ok()
}

/// The node source addresses this node advertises, each with its distance: its own at 0,
/// each peer's at the ring distance from that peer (the next node after a peer is its first
/// backup). `peers`: (node id, its addresses). A peer claiming one of our addresses (a
/// misconfiguration) does not get it advertised.
pub fn snat_routes(me: u32, own: &[IpAddr], peers: &[(u32, Vec<IpAddr>)]) -> Vec<(IpAddr, u8)> {
    let mut ids: Vec<u32> = peers.iter().map(|p| p.0).chain([me]).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut out: Vec<(IpAddr, u8)> = own.iter().map(|a| (*a, 0)).collect();
    for (id, addrs) in peers {
        if *id == me {
            continue;
        }
        let Some(d) = ring_distance(&ids, *id, me) else {
            continue;
        };
        for a in addrs.iter().filter(|a| routable(a)) {
            if !out.iter().any(|(o, _)| o == a) {
                out.push((*a, d));
            }
        }
    }
    out
}

/// An address a peer may have us advertise as its source: unicast, not loopback.
fn routable(a: &IpAddr) -> bool {
    !(a.is_unspecified()
        || a.is_loopback()
        || a.is_multicast()
        || matches!(a, IpAddr::V4(v4) if v4.is_broadcast()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrolb_bpf::maps::{CTF_LOCAL, MODE_FULLNAT, MODE_ONEARM, PROTO_TCP, addr_words};

    const S: u64 = 1_000_000_000;

    /// [`plan`] over `entries` as one chunk, reading the table they make up.
    fn plan_of(
        entries: &[(CtKey, Ct)],
        me: u16,
        dead: impl Fn(u16) -> bool,
        now_ns: u64,
        window_ns: u64,
    ) -> Plan {
        let table: std::collections::HashMap<CtKey, Ct> = entries.iter().copied().collect();
        plan(
            entries,
            |k| table.get(k).copied(),
            me,
            dead,
            now_ns,
            window_ns,
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
    }

    /// A synced full-NAT flow of `origin` from `src` (the VIP, or a node address), both entries.
    fn flow(origin: u16, src: &str, mode: u8) -> [(CtKey, Ct); 2] {
        let k = CtKey::new(ip("198.51.100.2"), 40000, ip("203.0.113.10"), 80, PROTO_TCP);
        let v = Ct {
            nat_saddr: addr_words(ip(src)).0,
            nat_daddr: addr_words(ip("10.10.10.11")).0,
            nat_sport: 50000u16.to_be(),
            nat_dport: 80u16.to_be(),
            timeout_s: 10,
            origin,
            dir: 0,
            state: 3,
            flags: CTF_SYNCED,
            mode,
            last_ns: 100 * S,
            ..Default::default()
        };
        [(k, v), Ct::reply_of(&k, &v)]
    }

    /// A synced full-NAT flow of node 1 from a node address whose replies (its owning
    /// direction) reached this node at 101 s.
    fn replied_at_101s() -> [(CtKey, Ct); 2] {
        let [o, mut r] = flow(1, "203.0.113.201", MODE_FULLNAT);
        r.1.packets = 3;
        r.1.last_ns = 101 * S;
        [o, r]
    }

    #[test]
    fn the_owning_direction_is_the_one_that_reaches_a_single_node() {
        let [(k, v), _] = flow(1, "203.0.113.201", MODE_FULLNAT);
        assert_eq!(
            owning_dir(&k, &v),
            1,
            "full NAT from a node address: replies"
        );
        let [(k, v), _] = flow(1, "203.0.113.10", MODE_FULLNAT);
        assert_eq!(
            owning_dir(&k, &v),
            0,
            "full NAT from the VIP: the client's packets"
        );
        let [(k, v), _] = flow(1, "198.51.100.2", MODE_DNAT);
        assert_eq!(owning_dir(&k, &v), 0, "DNAT: the client's packets");
    }

    #[test]
    fn a_copy_that_carried_owning_traffic_recently_is_claimed() {
        let now = 102 * S;
        // Node-address source: the reply entry decides.
        let [o, r] = replied_at_101s();
        let p = plan_of(&[o, r], 2, |_| false, now, 5 * S);
        assert_eq!(p.claims, vec![[o, r]]);
        // Client packets alone do not claim such a flow (its replies go elsewhere).
        let [mut o, r] = flow(1, "203.0.113.201", MODE_FULLNAT);
        o.1.packets = 9;
        o.1.last_ns = 101 * S;
        assert!(plan_of(&[o, r], 2, |_| false, now, 5 * S).claims.is_empty());
        // VIP source: the client's packets claim.
        let [mut o, r] = flow(1, "203.0.113.10", MODE_FULLNAT);
        o.1.packets = 1;
        o.1.last_ns = 101 * S;
        assert_eq!(
            plan_of(&[r, o], 2, |_| false, now, 5 * S).claims,
            vec![[o, r]]
        );
        // Packets long ago (outside the window) do not claim; nor do our own flows, local
        // entries or half-open ones.
        assert!(
            plan_of(&[r, o], 2, |_| false, 200 * S, 5 * S)
                .claims
                .is_empty()
        );
        assert!(plan_of(&[r, o], 1, |_| false, now, 5 * S).claims.is_empty());
        let mut local = o;
        local.1.flags = CTF_LOCAL;
        assert!(
            plan_of(&[r, local], 2, |_| false, now, 5 * S)
                .claims
                .is_empty()
        );
        let mut new = o;
        new.1.flags |= CTF_NEW;
        assert!(
            plan_of(&[r, new], 2, |_| false, now, 5 * S)
                .claims
                .is_empty()
        );
        // A reply entry of another origin is not this flow's.
        let mut other = r;
        other.1.origin = 3;
        let [o2, mut r2] = flow(1, "203.0.113.201", MODE_FULLNAT);
        r2.1 = Ct {
            packets: 1,
            last_ns: 101 * S,
            ..other.1
        };
        assert!(
            plan_of(&[o2, r2], 2, |_| false, now, 5 * S)
                .claims
                .is_empty()
        );
    }

    #[test]
    fn the_reply_entry_names_the_same_owning_direction() {
        for (src, mode) in [
            ("203.0.113.201", MODE_FULLNAT),
            ("203.0.113.10", MODE_FULLNAT),
            ("10.10.10.1", MODE_ONEARM),
            ("198.51.100.2", MODE_DNAT),
        ] {
            let [(k, v), (rk, r)] = flow(1, src, mode);
            assert_eq!(
                owning_dir_of_reply(&rk, &r),
                owning_dir(&k, &v),
                "{src} {mode}"
            );
        }
    }

    /// A flow's two entries are listed chunks apart: the chunk holding the entry of its
    /// owning direction finds the claim, reading the other entry from the table; a chunk
    /// without it finds none (and the flow is claimed once, not twice).
    #[test]
    fn a_claim_is_found_whichever_chunk_holds_the_owning_entry() {
        let now = 102 * S;
        let [o, r] = replied_at_101s();
        let table: std::collections::HashMap<CtKey, Ct> = [o, r].into_iter().collect();
        let chunk =
            |c: &[(CtKey, Ct)]| plan(c, |k| table.get(k).copied(), 2, |_| false, now, 5 * S);
        assert!(chunk(&[o]).claims.is_empty());
        assert_eq!(chunk(&[r]).claims, vec![[o, r]]);
        assert_eq!(chunk(&[r, o]).claims, vec![[o, r]]);
        // As the table is now: a reply entry gone since the listing, no claim.
        let gone = plan(
            &[r],
            |k| (*k == o.0).then_some(o.1),
            2,
            |_| false,
            now,
            5 * S,
        );
        assert!(gone.claims.is_empty());
        // An orphan found from its original entry's chunk, its reply read from the table.
        let [o, r] = flow(1, "203.0.113.10", MODE_FULLNAT);
        let table: std::collections::HashMap<CtKey, Ct> = [o, r].into_iter().collect();
        let p = plan(&[o], |k| table.get(k).copied(), 2, |_| true, 200 * S, S);
        assert_eq!(p.orphans, vec![(o.0, Some(r.0))]);
        assert!(
            plan(&[r], |k| table.get(k).copied(), 2, |_| true, 200 * S, S)
                .orphans
                .is_empty()
        );
    }

    #[test]
    fn only_idle_flows_of_dead_origins_are_orphans() {
        let [o, r] = flow(1, "203.0.113.10", MODE_FULLNAT);
        // Timeout 10 s, last packet at 100 s.
        assert!(
            plan_of(&[o, r], 2, |_| true, 105 * S, S).orphans.is_empty(),
            "not idle yet"
        );
        assert!(
            plan_of(&[o, r], 2, |_| false, 200 * S, S)
                .orphans
                .is_empty(),
            "origin alive"
        );
        let p = plan_of(&[o, r], 2, |id| id == 1, 200 * S, S);
        assert_eq!(p.orphans, vec![(o.0, Some(r.0))]);
        // A reply entry still in use keeps the flow.
        let mut busy = r;
        busy.1.last_ns = 199 * S;
        assert!(
            plan_of(&[o, busy], 2, |_| true, 200 * S, S)
                .orphans
                .is_empty()
        );
    }

    #[test]
    fn the_last_node_to_see_the_traffic_wins_ties_to_the_incoming() {
        assert!(incoming_wins(10, 9));
        assert!(incoming_wins(10, 10));
        assert!(!incoming_wins(9, 10));
        let [(k, o), (_, r)] = flow(1, "203.0.113.201", MODE_FULLNAT);
        let r2 = Ct {
            last_ns: 150 * S,
            ..r
        };
        assert_eq!(owning_last_ns(&k, &o, Some(&r2)), 150 * S);
        assert_eq!(owning_last_ns(&k, &o, None), 100 * S);
    }

    #[test]
    fn node_addresses_are_backed_up_by_the_next_nodes_in_ring_order() {
        let a = |s: &str| vec![ip(s)];
        let peers = [(0, a("203.0.113.200")), (2, a("203.0.113.202"))];
        let r = snat_routes(1, &a("203.0.113.201"), &peers);
        assert_eq!(
            r,
            vec![
                (ip("203.0.113.201"), 0),
                (ip("203.0.113.200"), 1),
                (ip("203.0.113.202"), 2)
            ]
        );
        // Node 2 backs node 1 second and node 0 first.
        let peers = [(0, a("203.0.113.200")), (1, a("203.0.113.201"))];
        let r = snat_routes(2, &a("203.0.113.202"), &peers);
        assert!(r.contains(&(ip("203.0.113.200"), 2)) && r.contains(&(ip("203.0.113.201"), 1)));
        // A peer reporting our address does not get it advertised as theirs.
        let r = snat_routes(2, &a("203.0.113.202"), &[(0, a("203.0.113.202"))]);
        assert_eq!(r, vec![(ip("203.0.113.202"), 0)]);
        // Nor addresses no host could reply to.
        let junk = vec![ip("0.0.0.0"), ip("127.0.0.1"), ip("224.0.0.5"), ip("::")];
        assert_eq!(snat_routes(2, &[], &[(0, junk)]), vec![]);
        assert_eq!(ring_distance(&[0, 1, 2], 2, 0), Some(1));
        assert_eq!(ring_distance(&[0, 1, 2], 5, 0), None);
    }
}
