//! Source NAT (one-arm, full NAT): a live flow's translation never changes, whatever two CPUs
//! do with it at once; port allocation keeps the client's port when it can, finds a free one
//! up to high occupancy, takes over expired occupants, and leaves no orphaned entry when a
//! 4-tuple is reused.

use std::sync::{Arc, Barrier};

use ferrolb_bpf::TestRunner;

use super::*;

const CLIENT2: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 3);
const MODE_FULL: u8 = 2;
const MODE_ONE_ARM: u8 = 1;
const POOL_LO: u16 = 1024;

/// A datapath whose conntrack map holds a whole NAT pool in one CPU's LRU share.
pub(super) fn big_datapath() -> Datapath {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    Datapath::load(&DatapathConfig {
        max_services: 64,
        max_conntrack: 131_072 * cpus,
        ..Default::default()
    })
    .expect("load datapath")
}

/// (source address, source port) of a packet built by these tests.
fn src_of(p: &[u8]) -> (Ipv4Addr, u16) {
    (
        Ipv4Addr::new(p[26], p[27], p[28], p[29]),
        u16::from_be_bytes([p[34], p[35]]),
    )
}

fn dst_of(p: &[u8]) -> (Ipv4Addr, u16) {
    (dest_of(p), u16::from_be_bytes([p[36], p[37]]))
}

/// Live reply entries holding `ports` of the pool (VIP -> EP1:8080, TCP), as other clients'
/// full-NAT flows would.
fn occupy(dp: &Datapath, ports: impl Iterator<Item = u16>) -> usize {
    occupy_as(dp, ports, CtState::Established, 0)
}

/// The reply entry of another client's full-NAT flow to the VIP's `vport` (`proto`) that holds
/// `port` of the pool VIP -> EP1:8080, in `state` with `flags`, last seen at `at_ns`.
pub(super) fn pool_entry(
    (proto, vport): (u8, u16),
    port: u16,
    state: CtState,
    flags: u8,
    at_ns: u64,
) -> (CtKey, Ct) {
    let k = CtKey::v4(EP1, 8080, VIP, port, proto);
    let v = Ct {
        nat_saddr: addr_words(VIP.into()).0,
        nat_daddr: addr_words(Ipv4Addr::new(192, 0, 2, 1).into()).0,
        nat_sport: vport.to_be(),
        nat_dport: port.to_be(),
        svc_id: 9,
        timeout_s: 240,
        dir: 1,
        state: state.as_u8(),
        flags,
        mode: MODE_FULL,
        created_ns: at_ns,
        last_ns: at_ns,
        ..Default::default()
    };
    (k, v)
}

/// Reply entries holding `ports` of the pool VIP -> EP1:8080 (TCP) in `state`, idle for
/// `idle_ns`, as other clients' full-NAT flows would.
pub(super) fn occupy_as(
    dp: &Datapath,
    ports: impl Iterator<Item = u16>,
    state: CtState,
    idle_ns: u64,
) -> usize {
    let now = monotonic_ns() - idle_ns;
    let entries: Vec<(CtKey, Ct)> = ports
        .map(|p| pool_entry((PROTO_TCP, 80), p, state, CTF_LOCAL, now))
        .collect();
    let mut t = dp.sync_table().unwrap();
    let n = t.insert_many(&entries);
    assert_eq!(n, entries.len());
    n
}

fn events(dp: &mut Datapath) -> Vec<CtEvent> {
    let mut ev = dp.take_events().unwrap();
    std::iter::from_fn(|| ev.try_next()).collect()
}

/// The root cause of issue 12, deterministically: another CPU handling the same flow stamps
/// last_ns with a time later than the one this packet read before its lookup. Unsigned,
/// `now - last_ns` wrapped and the live flow looked expired: it was re-created with a new NAT
/// port mid-stream.
#[test]
fn a_flow_stamped_later_by_another_cpu_keeps_its_translation() {
    if !in_private_netns("a_flow_stamped_later_by_another_cpu_keeps_its_translation") {
        return;
    }
    for mode in [MODE_FULL, MODE_ONE_ARM] {
        let mut dp = datapath(0);
        install(&mut dp, &svc(9, 80, PROTO_TCP, mode, 0));
        run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, 80, SYN, b""));
        let k = CtKey::v4(CLIENT, 40000, VIP, 80, PROTO_TCP);
        let o = dp.ct_get(&k).unwrap().unwrap();
        for key in [k, k.peer(&o)] {
            let mut v = dp.ct_get(&key).unwrap().unwrap();
            v.state = CtState::Established.as_u8();
            v.last_ns = monotonic_ns() + 50_000_000; // "later", by the other CPU
            dp.ct_insert(&key, &v).unwrap();
        }
        let (rc, out) = run(
            &mut dp,
            &tcp_seq(ip(CLIENT, VIP, 6), 40000, 80, 2000, PSH | ACK, b"data"),
        );
        assert_eq!(rc, TC_ACT_OK);
        assert_eq!(
            src_of(&out).1,
            u16::from_be(o.nat_sport),
            "mode {mode}: translation kept"
        );
        assert_eq!(
            dp.counter(Counter::CtCreated),
            1,
            "mode {mode}: no new flow"
        );
        assert_eq!(dp.ct_entries().len(), 2, "mode {mode}");
    }
}

/// Segment shapes of a bulk transfer: in-order data, a retransmission, an out-of-order
/// segment, a window probe, a pure ACK.
fn shapes(i: u32) -> (u32, u8, &'static [u8]) {
    let seq = 5000 + i * 1000;
    match i % 5 {
        0 => (seq, PSH | ACK, &[0x55; 1000]),
        1 => (seq - 1000, PSH | ACK, &[0x55; 1000]), // retransmitted
        2 => (seq + 7000, ACK, &[0x66; 500]),        // out of order
        3 => (seq - 1, ACK, &[0x77]),                // window probe
        _ => (seq, ACK, b""),
    }
}

/// Both directions of one flow hammered from two CPUs at once: every packet keeps the flow's
/// translation, and no second flow is ever created.
#[test]
fn translation_holds_under_both_directions_on_two_cpus() {
    if !in_private_netns("translation_holds_under_both_directions_on_two_cpus") {
        return;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    const N: u32 = 40_000;
    for mode in [MODE_FULL, MODE_ONE_ARM] {
        let mut dp = datapath(0);
        install(&mut dp, &svc(9, 80, PROTO_TCP, mode, 0));
        let src = if mode == MODE_FULL { VIP } else { LB_IF };
        let (_, out) = run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, 80, SYN, b""));
        let nport = src_of(&out).1;
        run(&mut dp, &tcp(ip(EP1, src, 6), 8080, nport, SYN | ACK, b""));
        run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, 80, ACK, b""));
        assert_eq!(
            dp.ct_get(&CtKey::v4(CLIENT, 40000, VIP, 80, PROTO_TCP))
                .unwrap()
                .unwrap()
                .state(),
            CtState::Established
        );
        let runners: Vec<Arc<TestRunner>> = (0..2)
            .map(|_| Arc::new(dp.test_runner().unwrap()))
            .collect();
        let start = Arc::new(Barrier::new(2));
        let handles: Vec<_> = runners
            .into_iter()
            .enumerate()
            .map(|(side, r)| {
                let start = start.clone();
                std::thread::spawn(move || {
                    pin_to(side % cpus);
                    start.wait();
                    let mut bad = Vec::new();
                    for i in 0..N {
                        let (seq, flags, data) = shapes(i);
                        let (p, want_src, want_dst) = if side == 0 {
                            (
                                tcp_seq(ip(CLIENT, VIP, 6), 40000, 80, seq, flags, data),
                                (src, nport),
                                (EP1, 8080),
                            )
                        } else {
                            (
                                tcp_seq(ip(EP1, src, 6), 8080, nport, seq, flags, data),
                                (VIP, 80),
                                (CLIENT, 40000),
                            )
                        };
                        let (rc, out) = r.run(&p).unwrap();
                        if rc != TC_ACT_OK || src_of(&out) != want_src || dst_of(&out) != want_dst {
                            bad.push((i, rc, src_of(&out), dst_of(&out)));
                        }
                    }
                    bad
                })
            })
            .collect();
        for (side, h) in handles.into_iter().enumerate() {
            let bad = h.join().unwrap();
            assert!(
                bad.is_empty(),
                "mode {mode}, side {side}: {} of {N} packets translated otherwise, first {:?}",
                bad.len(),
                &bad[..bad.len().min(5)]
            );
        }
        assert_eq!(dp.counter(Counter::CtCreated), 1, "mode {mode}: one flow");
        assert_eq!(dp.ct_entries().len(), 2, "mode {mode}");
        let o = orig(&dp, 40000, 80, PROTO_TCP);
        assert_eq!(u16::from_be(o.nat_sport), nport, "mode {mode}");
        assert!(o.packets >= u64::from(N), "mode {mode}");
    }
}

/// Two CPUs miss the same new flow at once (a duplicate SYN): one creates it, the other
/// adopts it; both packets go the same way and no stray entry is left.
#[test]
fn a_duplicate_syn_on_two_cpus_makes_one_flow() {
    if !in_private_netns("a_duplicate_syn_on_two_cpus_makes_one_flow") {
        return;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    const FLOWS: u16 = 3000;
    let mut dp = big_datapath();
    let mut s = svc(9, 80, PROTO_TCP, MODE_FULL, 0);
    s.eps = vec![(EP1, 8080, 1), (EP2, 8080, 1)];
    install(&mut dp, &s);
    let start = Arc::new(Barrier::new(2));
    let handles: Vec<_> = (0..2)
        .map(|side| {
            let r = dp.test_runner().unwrap();
            let start = start.clone();
            std::thread::spawn(move || {
                pin_to(side % cpus);
                let mut outs = Vec::new();
                for i in 0..FLOWS {
                    let p = tcp(ip(CLIENT, VIP, 6), 20000 + i, 80, SYN, b"");
                    start.wait();
                    let (rc, out) = r.run(&p).unwrap();
                    outs.push((rc, src_of(&out), dst_of(&out)));
                }
                outs
            })
        })
        .collect();
    let outs: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (i, (a, b)) in outs[0].iter().zip(&outs[1]).enumerate() {
        assert_eq!(a, b, "flow {i}: both SYNs went one way");
        assert_eq!(a.0, TC_ACT_OK);
    }
    assert_eq!(outs[0].len(), FLOWS as usize);
    assert_eq!(dp.counter(Counter::CtCreated), u64::from(FLOWS));
    assert_eq!(
        dp.ct_entries().len(),
        2 * FLOWS as usize,
        "no stray reply entry"
    );
}

#[test]
fn the_client_port_is_kept_when_free() {
    if !in_private_netns("the_client_port_is_kept_when_free") {
        return;
    }
    let mut dp = datapath(0);
    install(&mut dp, &svc(9, 80, PROTO_TCP, MODE_FULL, 0));
    let (_, a) = run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, 80, SYN, b""));
    assert_eq!(src_of(&a), (VIP, 40000), "own port kept");
    // Same port from another client: taken, so another one.
    let (_, b) = run(&mut dp, &tcp(ip(CLIENT2, VIP, 6), 40000, 80, SYN, b""));
    assert_eq!(src_of(&b).0, VIP);
    assert_ne!(src_of(&b).1, 40000);
    assert!(src_of(&b).1 >= POOL_LO);
    // A privileged source port is never used as a NAT port.
    let (_, c) = run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 700, 80, SYN, b""));
    assert!(src_of(&c).1 >= POOL_LO);
    assert_eq!(dp.counter(Counter::NatHard), 0);
    assert_eq!(dp.ct_entries().len(), 6);
}

/// 90 % of the pool held by live flows (every port but one in ten): new flows whose own
/// port is taken still get a free port, each a different one.
#[test]
fn a_pool_ninety_percent_full_still_gives_ports() {
    if !in_private_netns("a_pool_ninety_percent_full_still_gives_ports") {
        return;
    }
    pin_to(0); // one CPU's LRU share holds the pool
    let mut dp = big_datapath();
    install(&mut dp, &svc(9, 80, PROTO_TCP, MODE_FULL, 0));
    let free = |p: u16| (p - POOL_LO).is_multiple_of(10);
    let held = occupy(&dp, (POOL_LO..=u16::MAX).filter(|p| !free(*p)));
    assert_eq!(held, 58_060);
    const FLOWS: u16 = 400;
    let mut got = std::collections::BTreeSet::new();
    for i in 0..FLOWS {
        let cport = 30001 + i * 10; // taken in the pool
        let (rc, out) = run(&mut dp, &tcp(ip(CLIENT, VIP, 6), cport, 80, SYN, b""));
        assert_eq!(rc, TC_ACT_OK, "flow {i} got a port");
        let (s, p) = src_of(&out);
        assert_eq!(s, VIP);
        assert!(free(p), "flow {i}: port {p} was held");
        assert!(got.insert(p), "flow {i}: port {p} given twice");
    }
    assert_eq!(dp.counter(Counter::DropNatPorts), 0);
    assert_eq!(dp.ct_entries().len(), held + 2 * FLOWS as usize);
    // At 90 % a good share needs more than 8 probes: counted, and the agent told (once per
    // 100 ms at most).
    assert!(dp.counter(Counter::NatHard) > 0);
    let pressure = events(&mut dp)
        .iter()
        .filter(|e| e.kind() == Some(EventKind::NatPressure))
        .count();
    assert!(pressure >= 1);
}

/// Every port held by a live flow: the new flow is dropped, counted, and the agent told.
#[test]
fn a_full_pool_drops_counts_and_tells_the_agent() {
    if !in_private_netns("a_full_pool_drops_counts_and_tells_the_agent") {
        return;
    }
    pin_to(0);
    let mut dp = big_datapath();
    install(&mut dp, &svc(9, 80, PROTO_TCP, MODE_FULL, 0));
    occupy(&dp, POOL_LO..=u16::MAX);
    let (rc, _) = run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, 80, SYN, b""));
    assert_eq!(rc, TC_ACT_SHOT);
    assert_eq!(dp.counter(Counter::DropNatPorts), 1);
    assert_eq!(dp.counter(Counter::NatHard), 1);
    assert_eq!(dp.counter(Counter::CtCreated), 0);
    let ev = events(&mut dp);
    let p: Vec<_> = ev
        .iter()
        .filter(|e| e.kind() == Some(EventKind::NatPressure))
        .collect();
    assert_eq!(p.len(), 1);
    // The event names the pool: endpoint and translated source.
    assert_eq!(p[0].key.saddr, addr_words(EP1.into()).0);
    assert_eq!(p[0].key.daddr, addr_words(VIP.into()).0);
    assert!(
        dp.ct_get(&CtKey::v4(CLIENT, 40000, VIP, 80, PROTO_TCP))
            .unwrap()
            .is_none()
    );
}

/// A full-NAT UDP rule (port 53, 1 s timeout) and one flow from CLIENT:5353 that kept its
/// port: the datapath, the flow's key and its original-direction entry.
fn udp_flow_keeping_port_5353() -> (Datapath, CtKey, Ct) {
    let mut dp = datapath(0);
    let mut s = svc(9, 53, PROTO_UDP, MODE_FULL, 0);
    s.timeout_s = 1;
    install(&mut dp, &s);
    run(&mut dp, &udp(ip(CLIENT, VIP, 17), 5353, 53, b"a", true));
    let ka = CtKey::v4(CLIENT, 5353, VIP, 53, PROTO_UDP);
    let a = dp.ct_get(&ka).unwrap().unwrap();
    assert_eq!(u16::from_be(a.nat_sport), 5353);
    (dp, ka, a)
}

/// Makes the entry under `key` 2 s older (past the 1 s timeout of the rule above).
fn age(dp: &mut Datapath, key: &CtKey) {
    let mut v = dp.ct_get(key).unwrap().unwrap();
    v.last_ns = v.last_ns.saturating_sub(2_000_000_000);
    dp.ct_insert(key, &v).unwrap();
}

/// An expired flow still holding the port a new flow wants is taken over: the old flow's
/// entries go (the peers are told), the new flow gets the port.
#[test]
fn an_expired_occupant_is_taken_over() {
    if !in_private_netns("an_expired_occupant_is_taken_over") {
        return;
    }
    let (mut dp, ka, a) = udp_flow_keeping_port_5353();
    // Only the reply direction quiet (one-way UDP): the flow lives, its port stays taken.
    age(&mut dp, &ka.peer(&a));
    let (_, out) = run(&mut dp, &udp(ip(CLIENT2, VIP, 17), 5353, 53, b"b", true));
    assert_ne!(src_of(&out).1, 5353);
    assert_eq!(dp.counter(Counter::NatTakeover), 0);
    assert!(dp.ct_get(&ka).unwrap().is_some());
    // Both directions quiet: a third client takes the port over.
    age(&mut dp, &ka);
    let client3 = Ipv4Addr::new(198, 51, 100, 4);
    let (rc, out) = run(&mut dp, &udp(ip(client3, VIP, 17), 5353, 53, b"c", true));
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(src_of(&out), (VIP, 5353));
    assert_eq!(dp.counter(Counter::NatTakeover), 1);
    assert!(dp.ct_get(&ka).unwrap().is_none(), "old flow removed");
    assert_eq!(dp.ct_entries().len(), 4, "two live flows, no orphan");
    let removed: Vec<_> = events(&mut dp)
        .into_iter()
        .filter(|e| e.kind() == Some(EventKind::Removed))
        .collect();
    assert_eq!(removed.len(), 1);
    assert_eq!(removed[0].key, ka);
    // The reply reaches the new client.
    let (_, back) = run(&mut dp, &udp(ip(EP1, VIP, 17), 8080, 5353, b"r", true));
    assert_eq!(dst_of(&back), (client3, 5353));
}

/// A closed TCP flow's 4-tuple reused by a new SYN (TIME_WAIT): a new flow, the old one's
/// entries both gone (its reply entry held a NAT port), to the same endpoint or another.
#[test]
fn a_four_tuple_reused_after_time_wait_leaves_no_orphan() {
    if !in_private_netns("a_four_tuple_reused_after_time_wait_leaves_no_orphan") {
        return;
    }
    for eps in [vec![(EP1, 8080, 1)], vec![(EP1, 8080, 1), (EP2, 8080, 1)]] {
        for mode in [MODE_FULL, MODE_ONE_ARM] {
            let mut dp = datapath(0);
            let mut s = svc(9, 80, PROTO_TCP, mode, 0);
            s.eps = eps.clone();
            install(&mut dp, &s);
            let src = if mode == MODE_FULL { VIP } else { LB_IF };
            let mut last_port = 0;
            for round in 0..3u64 {
                let (_, out) = run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, 80, SYN, b""));
                let (ep, _) = dst_of(&out);
                let nport = src_of(&out).1;
                run(&mut dp, &tcp(ip(ep, src, 6), 8080, nport, SYN | ACK, b""));
                run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, 80, ACK, b""));
                run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, 80, FIN | ACK, b""));
                run(&mut dp, &tcp(ip(ep, src, 6), 8080, nport, FIN | ACK, b""));
                run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, 80, ACK, b""));
                let o = orig(&dp, 40000, 80, PROTO_TCP);
                assert_eq!(o.state(), CtState::TimeWait, "round {round}");
                assert_eq!(
                    dp.ct_entries().len(),
                    2,
                    "round {round}: one flow's entries"
                );
                assert_eq!(dp.counter(Counter::CtCreated), round + 1);
                if eps.len() == 1 {
                    // One endpoint: the freed reply key lets the client keep its port.
                    assert_eq!(nport, 40000, "round {round}");
                }
                last_port = nport;
            }
            assert!(last_port >= POOL_LO);
            let removed = events(&mut dp)
                .iter()
                .filter(|e| e.kind() == Some(EventKind::Removed))
                .count();
            assert_eq!(removed, 2, "each reuse removed the closed flow");
            assert_eq!(dp.counter(Counter::DropNatPorts), 0);
        }
    }
}

/// A client reconnecting from the same address and port to the same endpoint through the same
/// source (DNAT, or source NAT keeping the client's port) gets the closed flow's two entries
/// rewritten in place: no delete, no insert, and no place taken in the in-place budget of
/// half-open flows (the first flow is made in conntrack and counted there until it is
/// established; a reused flow takes no room, so it is not counted); the new flow is whole
/// (its own creation time, counters, state, least-connections count) and reported to the peers
/// as the old one's removal, then its own establishment. A reconnect that lands on another
/// endpoint does not reuse the entries.
#[test]
fn a_reconnect_with_the_same_translation_reuses_the_closed_flows_entries() {
    if !in_private_netns("a_reconnect_with_the_same_translation_reuses_the_closed_flows_entries") {
        return;
    }
    const LC: u8 = 4; // least connections: every flow counted while it is open
    for mode in [0, MODE_FULL, MODE_ONE_ARM] {
        let mut dp = datapath(0);
        install(&mut dp, &svc(9, 80, PROTO_TCP, mode, LC));
        let src = match mode {
            0 => CLIENT,
            MODE_FULL => VIP,
            _ => LB_IF,
        };
        let mut created = 0;
        for round in 0..4u64 {
            let (_, out) = run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, 80, SYN, b""));
            assert_eq!(dst_of(&out), (EP1, 8080), "mode {mode} round {round}");
            assert_eq!(src_of(&out), (src, 40000), "mode {mode} round {round}");
            let o = orig(&dp, 40000, 80, PROTO_TCP);
            assert_eq!(o.state(), CtState::SynSent);
            assert!(
                o.created_ns > created,
                "a new flow, with its own creation time"
            );
            created = o.created_ns;
            assert_eq!(
                (o.packets, o.fin),
                (1, if round == 0 { FIN_HALFOPEN } else { 0 }),
                "the closed flow's counters are gone; only the first flow is counted half-open"
            );
            assert_eq!(
                dp.halfopen_inplace().1,
                i64::from(round == 0),
                "mode {mode} round {round}"
            );
            // Both entries in conntrack, whether reused or new (the in-place budget).
            let in_new = dp
                .ct_entries()
                .iter()
                .filter(|(_, v)| v.flags & CTF_NEW != 0)
                .count();
            assert_eq!(in_new, 0, "mode {mode} round {round}");
            assert_eq!(
                dp.ep_conns(9, 0),
                1,
                "mode {mode} round {round}: one open flow"
            );
            run(&mut dp, &tcp(ip(EP1, src, 6), 8080, 40000, SYN | ACK, b""));
            run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, 80, ACK, b""));
            assert_eq!(
                orig(&dp, 40000, 80, PROTO_TCP).state(),
                CtState::Established
            );
            // Only the first flow completed a counted handshake; none is counted any more.
            assert_eq!(dp.counter(Counter::CtPromoted), 1);
            assert_eq!(dp.halfopen_inplace().1, 0);
            run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, 80, FIN | ACK, b""));
            run(&mut dp, &tcp(ip(EP1, src, 6), 8080, 40000, FIN | ACK, b""));
            run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, 80, ACK, b""));
            assert_eq!(orig(&dp, 40000, 80, PROTO_TCP).state(), CtState::TimeWait);
            assert_eq!(
                dp.ct_entries().len(),
                2,
                "mode {mode} round {round}: one flow"
            );
            assert_eq!(dp.ep_conns(9, 0), 0, "mode {mode} round {round}: closed");
        }
        assert_eq!(dp.counter(Counter::CtCreated), 4);
        let kinds: Vec<EventKind> = events(&mut dp).iter().filter_map(|e| e.kind()).collect();
        let removed = kinds.iter().filter(|k| **k == EventKind::Removed).count();
        let established = kinds
            .iter()
            .filter(|k| **k == EventKind::Established)
            .count();
        assert_eq!((removed, established), (3, 4), "mode {mode}: {kinds:?}");
    }

    // Two endpoints in turn: each reconnect lands on the other one, a new translation.
    let mut dp = datapath(0);
    let mut s = svc(9, 80, PROTO_TCP, 0, 0);
    s.eps = vec![(EP1, 8080, 1), (EP2, 8080, 1)];
    install(&mut dp, &s);
    let mut eps = Vec::new();
    for _ in 0..4 {
        let (_, out) = run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, 80, SYN, b""));
        let ep = dest_of(&out);
        eps.push(ep);
        run(
            &mut dp,
            &tcp(ip(ep, CLIENT, 6), 8080, 40000, SYN | ACK, b""),
        );
        run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, 80, ACK, b""));
        run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, 80, FIN | ACK, b""));
        run(
            &mut dp,
            &tcp(ip(ep, CLIENT, 6), 8080, 40000, FIN | ACK, b""),
        );
        assert_eq!(dp.ct_entries().len(), 2, "one flow's entries");
    }
    assert!(eps.windows(2).all(|w| w[0] != w[1]), "round robin: {eps:?}");
    // Each flow was a new one, made half-open in conntrack and established there.
    assert_eq!(dp.counter(Counter::CtPromoted), 4);
    assert_eq!(dp.halfopen_inplace().1, 0);
}

/// Opens and closes one flow from CLIENT:40000 to VIP:80 (the endpoint EP1:8080, seen from
/// `src`), leaving it in TIME_WAIT.
fn open_and_close(dp: &mut Datapath, src: Ipv4Addr) {
    run(dp, &tcp(ip(CLIENT, VIP, 6), 40000, 80, SYN, b""));
    run(dp, &tcp(ip(EP1, src, 6), 8080, 40000, SYN | ACK, b""));
    run(dp, &tcp(ip(CLIENT, VIP, 6), 40000, 80, ACK, b""));
    run(dp, &tcp(ip(CLIENT, VIP, 6), 40000, 80, FIN | ACK, b""));
    run(dp, &tcp(ip(EP1, src, 6), 8080, 40000, FIN | ACK, b""));
    run(dp, &tcp(ip(CLIENT, VIP, 6), 40000, 80, ACK, b""));
}

fn set_claim(dp: &mut Datapath, key: &CtKey, on: bool) {
    let mut v = dp.ct_get(key).unwrap().expect("entry to claim");
    if on {
        v.fin |= FIN_CLAIMED;
    } else {
        v.fin &= !FIN_CLAIMED;
    }
    dp.ct_insert(key, &v).unwrap();
}

/// The CPU that replaces or removes a dead flow holds a claim on both its entries
/// (FIN_CLAIMED), so that two CPUs never act on one dead flow at once (retire it twice,
/// delete the entries the other is writing). A SYN that meets a closed flow another CPU holds,
/// under either of its keys, is dropped (counted) and changes nothing: no new flow, no
/// removal, no least-connections count, the entries as they were, none left claimed by it.
/// Once the other CPU is done, the same SYN opens the new flow.
#[test]
fn a_syn_meeting_a_dead_flow_another_cpu_holds_is_dropped_and_changes_nothing() {
    if !in_private_netns(
        "a_syn_meeting_a_dead_flow_another_cpu_holds_is_dropped_and_changes_nothing",
    ) {
        return;
    }
    const LC: u8 = 4;
    for mode in [0, MODE_FULL, MODE_ONE_ARM] {
        for held_side in ["original", "reply"] {
            let what = format!("mode {mode}, {held_side} entry held");
            let mut dp = datapath(0);
            install(&mut dp, &svc(9, 80, PROTO_TCP, mode, LC));
            let src = match mode {
                0 => CLIENT,
                MODE_FULL => VIP,
                _ => LB_IF,
            };
            open_and_close(&mut dp, src);
            let okey = CtKey::v4(CLIENT, 40000, VIP, 80, PROTO_TCP);
            let o = dp.ct_get(&okey).unwrap().unwrap();
            assert_eq!(o.state(), CtState::TimeWait, "{what}");
            let rkey = okey.peer(&o);
            let held = if held_side == "original" { okey } else { rkey };
            set_claim(&mut dp, &held, true);
            let before = (dp.ct_get(&okey).unwrap(), dp.ct_get(&rkey).unwrap());
            let mut ev = dp.take_events().unwrap();
            while ev.try_next().is_some() {}
            let ignored = dp.counter(Counter::TcpStateIgnored);

            let (rc, _) = run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, 80, SYN, b""));
            assert_eq!(rc, TC_ACT_SHOT, "{what}: dropped");
            assert_eq!(dp.counter(Counter::TcpStateIgnored), ignored + 1, "{what}");
            assert_eq!(dp.counter(Counter::CtCreated), 1, "{what}: no new flow");
            assert_eq!(dp.ep_conns(9, 0), 0, "{what}: no count taken");
            assert_eq!(
                (dp.ct_get(&okey).unwrap(), dp.ct_get(&rkey).unwrap()),
                before,
                "{what}: both entries as they were (the claim it took released)"
            );
            assert_eq!(dp.ct_entries().len(), 2, "{what}");
            assert!(ev.try_next().is_none(), "{what}: nothing reported");

            // The other CPU done (here: its claim gone): the SYN opens the new flow, in place.
            set_claim(&mut dp, &held, false);
            let (rc, out) = run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, 80, SYN, b""));
            assert_eq!(rc, TC_ACT_OK, "{what}");
            assert_eq!(dst_of(&out), (EP1, 8080), "{what}");
            assert_eq!(src_of(&out), (src, 40000), "{what}");
            let n = dp.ct_get(&okey).unwrap().unwrap();
            assert_eq!(n.state(), CtState::SynSent, "{what}");
            assert!(n.created_ns > o.created_ns, "{what}: a new flow");
            let r = dp.ct_get(&rkey).unwrap().unwrap();
            assert_eq!((n.fin, r.fin), (0, 0), "{what}: no claim left");
            assert_eq!(dp.ep_conns(9, 0), 1, "{what}");
            assert_eq!(dp.counter(Counter::CtCreated), 2, "{what}");
        }
    }
}

/// A source-NAT port search never takes over a dead flow another CPU holds (its own client
/// reconnecting, or another search): not through its reply entry (the port), and not by
/// halves when only the other direction is held. The search tries another port and leaves
/// the flow as it was; once the other CPU is done, the port is taken over as before.
#[test]
fn a_port_take_over_leaves_a_flow_another_cpu_holds() {
    if !in_private_netns("a_port_take_over_leaves_a_flow_another_cpu_holds") {
        return;
    }
    for held_side in ["original", "reply"] {
        let (mut dp, ka, a) = udp_flow_keeping_port_5353();
        let kr = ka.peer(&a);
        age(&mut dp, &ka);
        age(&mut dp, &kr);
        let held = if held_side == "original" { ka } else { kr };
        set_claim(&mut dp, &held, true);
        let before = (dp.ct_get(&ka).unwrap(), dp.ct_get(&kr).unwrap());

        let client3 = Ipv4Addr::new(198, 51, 100, 4);
        let (rc, out) = run(&mut dp, &udp(ip(client3, VIP, 17), 5353, 53, b"c", true));
        assert_eq!(rc, TC_ACT_OK, "{held_side}");
        assert_eq!(src_of(&out).0, VIP);
        assert_ne!(
            src_of(&out).1,
            5353,
            "{held_side}: the held flow's port not taken"
        );
        assert_eq!(dp.counter(Counter::NatTakeover), 0, "{held_side}");
        assert_eq!(
            (dp.ct_get(&ka).unwrap(), dp.ct_get(&kr).unwrap()),
            before,
            "{held_side}: the held flow as it was"
        );
        assert_eq!(dp.ct_entries().len(), 4, "{held_side}");

        set_claim(&mut dp, &held, false);
        let client4 = Ipv4Addr::new(198, 51, 100, 5);
        let (rc, out) = run(&mut dp, &udp(ip(client4, VIP, 17), 5353, 53, b"d", true));
        assert_eq!(rc, TC_ACT_OK, "{held_side}");
        assert_eq!(src_of(&out), (VIP, 5353), "{held_side}: taken over now");
        assert_eq!(dp.counter(Counter::NatTakeover), 1, "{held_side}");
        assert!(dp.ct_get(&ka).unwrap().is_none(), "{held_side}");
        assert_eq!(dp.ct_entries().len(), 4, "{held_side}: two live flows");
    }
}

/// The same reconnecting SYN handled by both CPUs at once, round after round (each round
/// started on a barrier, the flow closed again between rounds): every round replaces the
/// closed flow exactly once — one flow created, least-connections back to 0 after each close,
/// never a stray entry or a claim left behind — and each of the two SYNs either goes to the
/// flow's endpoint from the kept port or is dropped as the other CPU's duplicate.
#[test]
fn reconnecting_syns_on_two_cpus_replace_the_closed_flow_once() {
    if !in_private_netns("reconnecting_syns_on_two_cpus_replace_the_closed_flow_once") {
        return;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    const ROUNDS: u32 = 3000;
    const LC: u8 = 4;
    for mode in [0, MODE_FULL] {
        let mut dp = datapath(0);
        install(&mut dp, &svc(9, 80, PROTO_TCP, mode, LC));
        let src = if mode == 0 { CLIENT } else { VIP };
        open_and_close(&mut dp, src);
        let syn = Arc::new(Barrier::new(2));
        let closed = Arc::new(Barrier::new(2));
        let handles: Vec<_> = (0..2)
            .map(|side| {
                let r = dp.test_runner().unwrap();
                let (syn, closed) = (syn.clone(), closed.clone());
                std::thread::spawn(move || {
                    pin_to(side % cpus);
                    let mut outs = Vec::new();
                    for _ in 0..ROUNDS {
                        syn.wait();
                        let (rc, out) = r
                            .run(&tcp(ip(CLIENT, VIP, 6), 40000, 80, SYN, b""))
                            .unwrap();
                        outs.push((rc, src_of(&out), dst_of(&out)));
                        syn.wait();
                        if side == 0 {
                            for p in [
                                tcp(ip(EP1, src, 6), 8080, 40000, SYN | ACK, b""),
                                tcp(ip(CLIENT, VIP, 6), 40000, 80, ACK, b""),
                                tcp(ip(CLIENT, VIP, 6), 40000, 80, FIN | ACK, b""),
                                tcp(ip(EP1, src, 6), 8080, 40000, FIN | ACK, b""),
                                tcp(ip(CLIENT, VIP, 6), 40000, 80, ACK, b""),
                            ] {
                                r.run(&p).unwrap();
                            }
                        }
                        closed.wait();
                    }
                    outs
                })
            })
            .collect();
        let outs: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let mut dropped = 0u64;
        for (i, (a, b)) in outs[0].iter().zip(&outs[1]).enumerate() {
            for x in [a, b] {
                if x.0 == TC_ACT_SHOT {
                    dropped += 1;
                } else {
                    assert_eq!(x.0, TC_ACT_OK, "mode {mode} round {i}");
                    assert_eq!(
                        (x.1, x.2),
                        ((src, 40000), (EP1, 8080)),
                        "mode {mode} round {i}"
                    );
                }
            }
            assert!(
                a.0 == TC_ACT_OK || b.0 == TC_ACT_OK,
                "mode {mode} round {i}: one SYN went on"
            );
        }
        assert_eq!(
            dp.counter(Counter::CtCreated),
            u64::from(ROUNDS) + 1,
            "mode {mode}: one new flow per round ({dropped} duplicates dropped)"
        );
        assert_eq!(dp.counter(Counter::TcpStateIgnored), dropped, "mode {mode}");
        assert_eq!(dp.ep_conns(9, 0), 0, "mode {mode}: every flow closed");
        let entries = dp.ct_entries();
        assert_eq!(entries.len(), 2, "mode {mode}: one flow's entries");
        assert!(
            entries.iter().all(|(_, v)| v.fin & FIN_CLAIMED == 0),
            "mode {mode}: no claim left"
        );
        assert_eq!(
            orig(&dp, 40000, 80, PROTO_TCP).state(),
            CtState::TimeWait,
            "mode {mode}"
        );
        println!("mode {mode}: {ROUNDS} rounds, {dropped} duplicate SYNs dropped");
    }
}
