//! Hostile input (issue 16): malformed packets are dropped by reason before any flow exists;
//! a segment that is not a SYN never opens a flow whose source this node chooses; a blind RST
//! or FIN outside the tracked window changes nothing; half-open flows give their source-NAT
//! ports up under pressure, established ones never do.

use super::nat::{big_datapath, occupy_as, pool_entry};
use super::*;

const MODE_FULL: u8 = 2;
const MODE_ONE_ARM: u8 = 1;
const OTHER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 77);

fn counter(dp: &Datapath, c: Counter) -> u64 {
    dp.counters()[c as usize]
}

/// A TCP segment to the VIP, then `edit` applied to the whole frame (checksums are not
/// recomputed: the datapath must judge the headers before anything else).
fn mangled(flags: u8, edit: impl Fn(&mut Vec<u8>)) -> Vec<u8> {
    let mut p = tcp(ip(CLIENT, VIP, 6), 40000, 80, flags, b"payload");
    edit(&mut p);
    p
}

fn vlan_tagged(frame: &[u8], vid: u16) -> Vec<u8> {
    let mut v = frame[..12].to_vec();
    v.extend([0x81, 0x00]);
    v.extend(vid.to_be_bytes());
    v.extend_from_slice(&frame[12..]);
    v
}

/// Every malformed case is dropped, counted under its own reason, and creates no flow; the
/// same malformations toward an address that is not ours pass to the stack untouched.
#[test]
fn malformed_packets_are_dropped_by_reason_before_any_flow() {
    if !in_private_netns("malformed_packets_are_dropped_by_reason_before_any_flow") {
        return;
    }
    let mut dp = datapath(0);
    install(&mut dp, &svc(1, 80, PROTO_TCP, MODE_FULL, 0));
    install(&mut dp, &svc(2, 53, PROTO_UDP, MODE_FULL, 0));
    let udp_len = |len: u16| {
        let mut p = udp(ip(CLIENT, VIP, 17), 5353, 53, b"query", true);
        p[38..40].copy_from_slice(&len.to_be_bytes());
        p
    };
    let cases: Vec<(&str, Vec<u8>, Counter)> = vec![
        (
            "ihl 4",
            mangled(SYN, |p| p[14] = 0x44),
            Counter::DropIpHeader,
        ),
        (
            "version 5",
            mangled(SYN, |p| p[14] = 0x55),
            Counter::DropIpHeader,
        ),
        (
            "total length below the header",
            mangled(SYN, |p| p[16..18].copy_from_slice(&19u16.to_be_bytes())),
            Counter::DropIpLength,
        ),
        (
            "total length beyond the frame",
            mangled(SYN, |p| {
                let l = u16::from_be_bytes([p[16], p[17]]) + 100;
                p[16..18].copy_from_slice(&l.to_be_bytes());
            }),
            Counter::DropIpLength,
        ),
        ("ttl 0", mangled(SYN, |p| p[22] = 0), Counter::DropTtl),
        (
            "data offset beyond the packet",
            mangled(SYN, |p| p[46] = 15 << 4),
            Counter::DropTcpHeader,
        ),
        (
            "data offset below 5",
            mangled(SYN, |p| p[46] = 4 << 4),
            Counter::DropTcpHeader,
        ),
        (
            "tcp header cut by the ip length",
            mangled(SYN, |p| p[16..18].copy_from_slice(&30u16.to_be_bytes())),
            Counter::DropTcpHeader,
        ),
        ("syn+fin", mangled(SYN | FIN, |_| {}), Counter::DropTcpFlags),
        ("syn+rst", mangled(SYN | RST, |_| {}), Counter::DropTcpFlags),
        ("null", mangled(0, |_| {}), Counter::DropTcpFlags),
        ("all flags", mangled(0x3f, |_| {}), Counter::DropTcpFlags),
        ("fin alone", mangled(FIN, |_| {}), Counter::DropTcpFlags),
        ("udp length 0", udp_len(0), Counter::DropUdpLength),
        ("udp length 7", udp_len(7), Counter::DropUdpLength),
        ("udp length beyond", udp_len(200), Counter::DropUdpLength),
        (
            "802.1Q tagged",
            vlan_tagged(&tcp(ip(CLIENT, VIP, 6), 40000, 80, SYN, b""), 100),
            Counter::DropVlan,
        ),
    ];
    for (name, p, reason) in &cases {
        let before = counter(&dp, *reason);
        let (rc, _) = run(&mut dp, p);
        assert_eq!(rc, TC_ACT_SHOT, "{name}");
        assert_eq!(counter(&dp, *reason), before + 1, "{name} counted");
        assert!(dp.ct_entries().is_empty(), "{name} made a flow");
    }
    assert_eq!(counter(&dp, Counter::CtCreated), 0);
    // The same packets toward an address that is neither a VIP nor a tracked flow are the
    // stack's business (it drops them itself).
    let total =
        |dp: &Datapath| -> u64 { cases.iter().map(|(_, _, r)| counter(dp, *r)).sum::<u64>() };
    let before = total(&dp);
    for (name, p, _) in &cases {
        let mut q = p.clone();
        let off = if name.starts_with("802.1Q") { 4 } else { 0 };
        q[30 + off..34 + off].copy_from_slice(&OTHER.octets());
        assert_eq!(
            run(&mut dp, &q),
            (TC_ACT_OK, q.clone()),
            "{name} to another host"
        );
    }
    assert_eq!(total(&dp), before);
    // Well-formed traffic still opens flows: ECN bits and PSH are fine, a priority tag too
    // would be (the kernel strips VLAN 0 like no tag).
    let (rc, _) = run(
        &mut dp,
        &tcp(ip(CLIENT, VIP, 6), 40001, 80, SYN | 0xc0, b""),
    );
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(counter(&dp, Counter::CtCreated), 1);
}

/// A malformed packet claiming a tracked flow (a DNAT reply: its destination is the client,
/// not a VIP) is dropped too, not handed to the stack untranslated.
#[test]
fn malformed_packets_of_a_tracked_flow_are_dropped() {
    if !in_private_netns("malformed_packets_of_a_tracked_flow_are_dropped") {
        return;
    }
    let mut dp = datapath(0);
    install(&mut dp, &svc(1, 80, PROTO_TCP, 0, 0));
    run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, 80, SYN, b""));
    let bad = tcp(ip(EP1, CLIENT, 6), 8080, 40000, SYN | FIN | ACK, b"");
    assert_eq!(run(&mut dp, &bad).0, TC_ACT_SHOT);
    assert_eq!(counter(&dp, Counter::DropTcpFlags), 1);
    assert_eq!(orig(&dp, 40000, 80, PROTO_TCP).state(), CtState::SynSent);
}

/// One-arm and full NAT: a segment that is not a SYN and matches no flow is dropped and
/// counted, whatever its flags, and holds no port. DNAT picks it up on a 10 s timeout until
/// the endpoint's side answers.
#[test]
fn only_a_syn_opens_a_source_nat_flow_and_dnat_pickups_are_short() {
    if !in_private_netns("only_a_syn_opens_a_source_nat_flow_and_dnat_pickups_are_short") {
        return;
    }
    let mut dp = datapath(0);
    install(&mut dp, &svc(1, 80, PROTO_TCP, MODE_FULL, 0));
    install(&mut dp, &svc(2, 81, PROTO_TCP, MODE_ONE_ARM, 0));
    install(&mut dp, &svc(3, 82, PROTO_TCP, 0, 0));
    for port in [80, 81] {
        for flags in [ACK, ACK | PSH, FIN | ACK, RST, RST | ACK, SYN | ACK] {
            let (rc, _) = run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, port, flags, b"x"));
            assert_eq!(rc, TC_ACT_SHOT, "port {port} flags {flags:#x}");
        }
    }
    assert_eq!(counter(&dp, Counter::DropNotSyn), 12);
    assert!(dp.ct_entries().is_empty());

    // DNAT: picked up, forwarded, on the short timeout.
    let (rc, out) = run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, 82, ACK, b"x"));
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(out, tcp(ip(CLIENT, EP1, 6), 40000, 8080, ACK, b"x"));
    let o = orig(&dp, 40000, 82, PROTO_TCP);
    assert_eq!(o.state(), CtState::Established);
    assert_eq!(o.flags & CTF_PICKUP, CTF_PICKUP);
    assert_eq!(o.timeout_s(PROTO_TCP), TO_PICKUP_S);
    // The segment that picked the flow up is counted once (it is tracked on the entry, not
    // forwarded from the inserted copy as a SYN is).
    assert_eq!(o.packets, 1);
    // More client segments do not confirm it; the endpoint's ACK does, on both entries.
    run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, 82, ACK, b"y"));
    let o = orig(&dp, 40000, 82, PROTO_TCP);
    assert_eq!(o.flags & CTF_PICKUP, CTF_PICKUP);
    assert_eq!(o.packets, 2);
    run(&mut dp, &tcp(ip(EP1, CLIENT, 6), 8080, 40000, ACK, b""));
    let o = orig(&dp, 40000, 82, PROTO_TCP);
    assert_eq!(o.flags & CTF_PICKUP, 0);
    assert_eq!(o.timeout_s(PROTO_TCP), 240);
    let r = dp
        .ct_get(&CtKey::v4(EP1, 8080, CLIENT, 40000, PROTO_TCP))
        .unwrap()
        .unwrap();
    assert_eq!(r.flags & CTF_PICKUP, 0);
}

/// A full-NAT connection with real sequence numbers: client ISN 1000, endpoint ISN 5000.
/// Returns the translated source port.
pub(crate) fn handshake(dp: &mut Datapath) -> u16 {
    let (rc, out) = run(
        dp,
        &tcp_sa(ip(CLIENT, VIP, 6), 40000, 80, 1000, 0, SYN, b""),
    );
    assert_eq!(rc, TC_ACT_OK);
    let nport = u16::from_be_bytes([out[34], out[35]]);
    run(
        dp,
        &tcp_sa(ip(EP1, VIP, 6), 8080, nport, 5000, 1001, SYN | ACK, b""),
    );
    run(
        dp,
        &tcp_sa(ip(CLIENT, VIP, 6), 40000, 80, 1001, 5001, ACK, b""),
    );
    run(
        dp,
        &tcp_sa(
            ip(CLIENT, VIP, 6),
            40000,
            80,
            1001,
            5001,
            ACK | PSH,
            b"hello",
        ),
    );
    run(
        dp,
        &tcp_sa(
            ip(EP1, VIP, 6),
            8080,
            nport,
            5001,
            1006,
            ACK | PSH,
            b"world!",
        ),
    );
    assert_eq!(orig(dp, 40000, 80, PROTO_TCP).state(), CtState::Established);
    nport
}

/// RFC 5961's reasoning: a blind attacker does not know the sequence numbers. RSTs and FINs
/// outside the tracked window are forwarded (the end host judges them) but the flow stays
/// established; a forged segment cannot move the window for a later RST; an RST at the
/// sender's next sequence number closes the flow.
#[test]
fn a_blind_rst_outside_the_window_changes_nothing() {
    if !in_private_netns("a_blind_rst_outside_the_window_changes_nothing") {
        return;
    }
    let mut dp = datapath(0);
    install(&mut dp, &svc(1, 80, PROTO_TCP, MODE_FULL, 0));
    let nport = handshake(&mut dp);
    let o = orig(&dp, 40000, 80, PROTO_TCP);
    assert_eq!(o.flags & CTF_SEQ, CTF_SEQ);
    assert_eq!(o.seq_next, 1006);
    assert_eq!(o.ack_seen, 5001);

    // Spoofed as the client, and as the endpoint, at sequence numbers far from the window.
    for seq in [
        1006u32.wrapping_add(1 << 20),
        1006 ^ 0x8000_0000,
        1006u32.wrapping_sub(1 << 18),
    ] {
        let (rc, _) = run(
            &mut dp,
            &tcp_sa(ip(CLIENT, VIP, 6), 40000, 80, seq, 0, RST, b""),
        );
        assert_eq!(rc, TC_ACT_OK, "forwarded: the endpoint judges it");
        run(
            &mut dp,
            &tcp_sa(ip(EP1, VIP, 6), 8080, nport, seq ^ 0x4000_0000, 0, RST, b""),
        );
    }
    assert_eq!(counter(&dp, Counter::TcpStateIgnored), 6);
    assert_eq!(
        orig(&dp, 40000, 80, PROTO_TCP).state(),
        CtState::Established
    );
    // A SYN on the established flow changes nothing either.
    run(
        &mut dp,
        &tcp_sa(ip(CLIENT, VIP, 6), 40000, 80, 77_777, 0, SYN, b""),
    );
    assert_eq!(
        orig(&dp, 40000, 80, PROTO_TCP).state(),
        CtState::Established
    );
    // A forged FIN with a wrong acknowledgment: no FIN bit, no state change.
    run(
        &mut dp,
        &tcp_sa(
            ip(CLIENT, VIP, 6),
            40000,
            80,
            1006,
            5007 ^ 0x8000_0000,
            FIN | ACK,
            b"",
        ),
    );
    let o = orig(&dp, 40000, 80, PROTO_TCP);
    assert_eq!(o.fin & 3, 0);
    assert_eq!(o.state(), CtState::Established);
    // A forged data segment far ahead does not move the window, so an RST at its end is
    // still refused.
    let far = 1006u32.wrapping_add(1 << 25);
    run(
        &mut dp,
        &tcp_sa(ip(CLIENT, VIP, 6), 40000, 80, far, 5007, ACK, b"zzzz"),
    );
    assert_eq!(orig(&dp, 40000, 80, PROTO_TCP).seq_next, 1006);
    run(
        &mut dp,
        &tcp_sa(ip(CLIENT, VIP, 6), 40000, 80, far + 4, 0, RST, b""),
    );
    assert_eq!(
        orig(&dp, 40000, 80, PROTO_TCP).state(),
        CtState::Established
    );
    assert!(counter(&dp, Counter::TcpOutOfWindow) >= 2);
    // The real close: the client's RST at its next sequence number.
    run(
        &mut dp,
        &tcp_sa(ip(CLIENT, VIP, 6), 40000, 80, 1006, 0, RST, b""),
    );
    assert_eq!(orig(&dp, 40000, 80, PROTO_TCP).state(), CtState::Close);
}

/// A pool full of half-open flows idle for seconds gives a new SYN a port (the half-open flow
/// goes, counted); one full of established flows, or of half-open flows only just opened,
/// does not: established flows are never evicted for new ones.
#[test]
fn half_open_flows_give_their_ports_up_under_pressure() {
    if !in_private_netns("half_open_flows_give_their_ports_up_under_pressure") {
        return;
    }
    pin_to(0);
    let cases = [
        (CtState::SynRecv, 4_000_000_000u64, true),
        (CtState::SynSent, 1_500_000_000, true),
        (CtState::Established, 4_000_000_000, false),
        (CtState::SynRecv, 200_000_000, false),
    ];
    for (state, idle, gets_port) in cases {
        let mut dp = big_datapath();
        install(&mut dp, &svc(1, 80, PROTO_TCP, MODE_FULL, 0));
        occupy_as(&dp, 1024..=u16::MAX, state, idle);
        let (rc, _) = run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, 80, SYN, b""));
        let what = format!("{} idle {} ms", state.name(), idle / 1_000_000);
        if gets_port {
            assert_eq!(rc, TC_ACT_OK, "{what}");
            assert_eq!(counter(&dp, Counter::HalfOpenTakeover), 1, "{what}");
            assert_eq!(counter(&dp, Counter::DropNatPorts), 0, "{what}");
            let o = orig(&dp, 40000, 80, PROTO_TCP);
            // The taken port now belongs to the new flow.
            let r = dp
                .ct_get(&CtKey::v4(
                    EP1,
                    8080,
                    VIP,
                    u16::from_be(o.nat_sport),
                    PROTO_TCP,
                ))
                .unwrap()
                .unwrap();
            assert_eq!(r.nat_daddr, addr_words(CLIENT.into()).0, "{what}");
            assert_eq!(r.state(), CtState::SynSent);
        } else {
            assert_eq!(rc, TC_ACT_SHOT, "{what}");
            assert_eq!(counter(&dp, Counter::HalfOpenTakeover), 0, "{what}");
            assert_eq!(counter(&dp, Counter::DropNatPorts), 1, "{what}");
        }
    }
}

/// Small tables: `conntrack` and `ct_new` at their minimum of 1024 entries each.
fn small_datapath() -> Datapath {
    Datapath::load(&DatapathConfig {
        max_services: 64,
        max_conntrack: 1024,
        max_halfopen: 1024,
        ..Default::default()
    })
    .expect("load datapath")
}

/// The entries under the flow's two keys, as (original, reply).
fn both(dp: &Datapath, nport: u16) -> (Option<Ct>, Option<Ct>) {
    (
        dp.ct_get(&CtKey::v4(CLIENT, 40000, VIP, 80, PROTO_TCP))
            .unwrap(),
        dp.ct_get(&CtKey::v4(EP1, 8080, VIP, nport, PROTO_TCP))
            .unwrap(),
    )
}

/// A SYN from a spoofed source: a random address in 100.64/10 and a random port.
fn spoofed_syn(i: u32) -> Vec<u8> {
    let h = i.wrapping_mul(0x9e37_79b1);
    let src = Ipv4Addr::from(0x6440_0000 | (h >> 10));
    tcp(ip(src, VIP, 6), 1024 + (h & 0x7fff) as u16, 80, SYN, b"")
}

/// A full-NAT connection from OTHER:41000 up to the endpoint's SYN-ACK (both forwarded): the
/// client's ACK that would complete it, to send.
fn half_open_from_other(dp: &mut Datapath) -> Vec<u8> {
    let (rc, out) = run(dp, &tcp_sa(ip(OTHER, VIP, 6), 41000, 80, 7000, 0, SYN, b""));
    assert_eq!(rc, TC_ACT_OK, "a SYN opens a half-open flow");
    let np = u16::from_be_bytes([out[34], out[35]]);
    let (rc, _) = run(
        dp,
        &tcp_sa(ip(EP1, VIP, 6), 8080, np, 9000, 7001, SYN | ACK, b""),
    );
    assert_eq!(rc, TC_ACT_OK, "the SYN-ACK goes back");
    tcp_sa(ip(OTHER, VIP, 6), 41000, 80, 7001, 9001, ACK, b"")
}

/// The connection `handshake` opened still translates, both ways: the client's segment leaves
/// from source port `nport`, the endpoint's answer goes to the client's port.
fn still_translates(dp: &mut Datapath, nport: u16) {
    let (rc, out) = run(
        dp,
        &tcp_sa(
            ip(CLIENT, VIP, 6),
            40000,
            80,
            1006,
            5007,
            ACK | PSH,
            b"again",
        ),
    );
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(u16::from_be_bytes([out[34], out[35]]), nport);
    let (rc, out) = run(
        dp,
        &tcp_sa(ip(EP1, VIP, 6), 8080, nport, 5007, 1011, ACK | PSH, b"back"),
    );
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(
        u16::from_be_bytes([out[36], out[37]]),
        40000,
        "to the client's port"
    );
}

/// A new full-NAT connection from OTHER:41000 completes and moves to the conntrack table.
fn a_new_connection_completes(dp: &mut Datapath) {
    let before = counter(dp, Counter::CtPromoted);
    let ack = half_open_from_other(dp);
    let (rc, _) = run(dp, &ack);
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(counter(dp, Counter::CtPromoted), before + 1);
    let k = CtKey::v4(OTHER, 41000, VIP, 80, PROTO_TCP);
    let v = dp.ct_get(&k).unwrap().expect("the new flow");
    assert_eq!(v.state(), CtState::Established);
    assert_eq!(v.flags & CTF_NEW, 0, "moved out of the half-open table");
}

/// Half-open flows live in a table of their own: a SYN flood many times that table's size
/// churns only it, past the few it may make in conntrack itself (the in-place budget, an eighth
/// of the half-open table, for which conntrack has room of its own); the established flow keeps
/// both entries and its translation, and a new connection completes after it (through the
/// half-open table: the budget is full).
#[test]
fn a_half_open_flood_does_not_evict_an_established_flow() {
    if !in_private_netns("a_half_open_flood_does_not_evict_an_established_flow") {
        return;
    }
    let mut dp = small_datapath();
    install(&mut dp, &svc(1, 80, PROTO_TCP, MODE_FULL, 0));
    let nport = handshake(&mut dp);
    let (o, r) = both(&dp, nport);
    let (o, r) = (o.expect("original entry"), r.expect("reply entry"));
    assert_eq!(o.flags & CTF_NEW, 0, "an established flow is in conntrack");
    assert_eq!(r.flags & CTF_NEW, 0);
    // 5,000 SYNs: 10,000 half-open entries into a 1,024-entry table.
    for i in 0..5_000 {
        run(&mut dp, &spoofed_syn(i));
    }
    let all = dp.ct_entries();
    let half = all.iter().filter(|(_, v)| v.flags & CTF_NEW != 0).count();
    let est = all
        .iter()
        .filter(|(_, v)| v.flags & CTF_NEW == 0 && v.state() == CtState::Established)
        .count();
    let inplace = all
        .iter()
        .filter(|(_, v)| v.flags & CTF_NEW == 0 && v.state() == CtState::SynSent)
        .count();
    assert!(
        half > 0 && half <= 1024 + 64,
        "half-open entries bounded by their table: {half}"
    );
    assert_eq!(est, 2, "the established flow, whole");
    let (limit, counted) = dp.halfopen_inplace();
    assert_eq!(limit, 128, "an eighth of the half-open table");
    assert_eq!(
        (inplace, counted),
        (2 * limit as usize, i64::from(limit)),
        "the flood filled the in-place budget and no more"
    );
    assert_eq!(
        dp.capacity().conntrack,
        1024 + 2 * limit,
        "conntrack has room of its own for them"
    );
    let (o2, r2) = both(&dp, nport);
    assert_eq!(o2.map(|v| v.state()), Some(CtState::Established));
    assert_eq!(r2.map(|v| v.nat_daddr), Some(r.nat_daddr));
    // Its packets still go out with their translation, both ways.
    still_translates(&mut dp, nport);
    // A new connection completes through the churn and moves to the conntrack table.
    a_new_connection_completes(&mut dp);
}

/// Half-open TCP flows made in conntrack itself (the in-place budget): a handshake completes
/// there (no entry in the half-open table, counted as a completed handshake) and gives its
/// place back; a flow closed by an RST before it was established keeps its place until it is
/// removed; a flood fills the budget and no more; the collector gives back the places of the
/// flows it removes, after which new flows are made in conntrack again. Without the budget
/// (0) every half-open flow goes through the half-open table, as before.
#[test]
fn the_inplace_budget_bounds_halfopen_flows_in_conntrack_and_is_given_back() {
    if !in_private_netns("the_inplace_budget_bounds_halfopen_flows_in_conntrack_and_is_given_back")
    {
        return;
    }
    let mut dp = small_datapath();
    install(&mut dp, &svc(1, 80, PROTO_TCP, MODE_FULL, 0));
    let in_new = |dp: &Datapath| {
        dp.ct_entries()
            .iter()
            .filter(|(_, v)| v.flags & CTF_NEW != 0)
            .count()
    };
    // A handshake: made in conntrack, counted until its ACK; then established in place.
    let (rc, out) = run(
        &mut dp,
        &tcp_sa(ip(CLIENT, VIP, 6), 40000, 80, 1000, 0, SYN, b""),
    );
    assert_eq!(rc, TC_ACT_OK);
    let nport = u16::from_be_bytes([out[34], out[35]]);
    assert_eq!(dp.halfopen_inplace(), (128, 1));
    let o = orig(&dp, 40000, 80, PROTO_TCP);
    assert_eq!((o.flags & CTF_NEW, o.fin), (0, FIN_HALFOPEN));
    assert_eq!(in_new(&dp), 0, "nothing in the half-open table");
    run(
        &mut dp,
        &tcp_sa(ip(EP1, VIP, 6), 8080, nport, 5000, 1001, SYN | ACK, b""),
    );
    assert_eq!(
        dp.halfopen_inplace().1,
        1,
        "a SYN-ACK does not establish it"
    );
    let promoted = counter(&dp, Counter::CtPromoted);
    run(
        &mut dp,
        &tcp_sa(ip(CLIENT, VIP, 6), 40000, 80, 1001, 5001, ACK, b""),
    );
    let o = orig(&dp, 40000, 80, PROTO_TCP);
    assert_eq!((o.state(), o.fin), (CtState::Established, 0));
    assert_eq!(
        dp.halfopen_inplace().1,
        0,
        "established: its place is given back"
    );
    assert_eq!(counter(&dp, Counter::CtPromoted), promoted + 1);
    still_translates(&mut dp, nport);

    // Closed by an RST before it was established: still there, still counted.
    run(
        &mut dp,
        &tcp_sa(ip(OTHER, VIP, 6), 41000, 80, 7000, 0, SYN, b""),
    );
    run(
        &mut dp,
        &tcp_sa(ip(OTHER, VIP, 6), 41000, 80, 7001, 0, RST, b""),
    );
    let v = dp
        .ct_get(&CtKey::v4(OTHER, 41000, VIP, 80, PROTO_TCP))
        .unwrap()
        .expect("the closed flow");
    assert_eq!(v.state(), CtState::Close);
    assert_eq!(dp.halfopen_inplace().1, 1, "its entries still take room");

    // A flood: the budget fills (the closed flow is in it) and no more; the rest goes to the
    // half-open table.
    for i in 0..1_000 {
        run(&mut dp, &spoofed_syn(i));
    }
    assert_eq!(dp.halfopen_inplace().1, 128);
    let inplace = dp
        .ct_entries()
        .iter()
        .filter(|(_, v)| v.flags & CTF_NEW == 0 && v.state() < CtState::Established)
        .count();
    assert_eq!(
        inplace,
        2 * 127,
        "127 flood flows' two entries each (and the closed one)"
    );
    assert!(in_new(&dp) > 500, "the rest in the half-open table");

    // The collector, past the half-open flows' timeout: it removes them (the established flow
    // stays), and gives their places back, whichever table they were in.
    let later = monotonic_ns() + 61_000_000_000;
    let mut c = dp.collector().unwrap();
    let stats = c.pass(later, 4096, |_| {}, |_| {});
    assert_eq!(
        (stats.halfopen_inplace, stats.refunded),
        (0, 128),
        "{stats:?}"
    );
    assert_eq!(dp.halfopen_inplace().1, 0);
    assert_eq!(c.halfopen_inplace(), Some(0));
    assert_eq!(
        orig(&dp, 40000, 80, PROTO_TCP).state(),
        CtState::Established
    );
    // A second pass gives nothing more back.
    assert_eq!(c.pass(later, 4096, |_| {}, |_| {}).refunded, 0);
    // New flows are made in conntrack again.
    run(&mut dp, &spoofed_syn(5_000));
    assert_eq!(dp.halfopen_inplace().1, 1);
    assert_eq!(in_new(&dp), 0);

    // Without the budget: the half-open table, as before; conntrack no larger.
    let mut dp = Datapath::load(&DatapathConfig {
        max_services: 64,
        max_conntrack: 1024,
        max_halfopen: 1024,
        halfopen_inplace: Some(0),
        ..Default::default()
    })
    .expect("load datapath");
    install(&mut dp, &svc(1, 80, PROTO_TCP, MODE_FULL, 0));
    assert_eq!(dp.capacity().conntrack, 1024);
    run(&mut dp, &spoofed_syn(1));
    assert_eq!(dp.halfopen_inplace(), (0, 0));
    assert_eq!(in_new(&dp), 2);
    let nport = handshake(&mut dp);
    still_translates(&mut dp, nport);
    assert_eq!(
        counter(&dp, Counter::CtPromoted),
        1,
        "moved out of the half-open table"
    );
}

/// A datagram from a spoofed source random every time: from 100.64/10, to the VIP's port 53.
fn spoofed_datagram(i: u32) -> Vec<u8> {
    let h = i.wrapping_mul(0x9e37_79b1);
    let src = Ipv4Addr::from(0x6440_0000 | (h >> 10));
    udp(
        ip(src, VIP, 17),
        1024 + (h & 0x7fff) as u16,
        53,
        b"junk",
        true,
    )
}

/// Unconfirmed UDP flows live in the half-open table: a flood of spoofed datagrams many times
/// that table's size (nobody continues them) churns only it. The conntrack table keeps the
/// confirmed flows only, an established TCP connection and a UDP stream keep their
/// translations, and new TCP and UDP flows are confirmed after the flood.
#[test]
fn a_spoofed_datagram_flood_churns_only_the_unconfirmed_table() {
    if !in_private_netns("a_spoofed_datagram_flood_churns_only_the_unconfirmed_table") {
        return;
    }
    let mut dp = small_datapath();
    install(&mut dp, &svc(1, 80, PROTO_TCP, MODE_FULL, 0));
    install(&mut dp, &svc(2, 53, PROTO_UDP, MODE_FULL, 0));
    let nport = handshake(&mut dp);
    // A UDP stream from OTHER:5353: asked, answered, asked again: confirmed.
    let q = udp(ip(OTHER, VIP, 17), 5353, 53, b"q", true);
    let (_, out) = run(&mut dp, &q);
    let uport = u16::from_be_bytes([out[34], out[35]]);
    let answer = udp(ip(EP1, VIP, 17), 8080, uport, b"a", true);
    run(&mut dp, &answer);
    run(&mut dp, &q);
    let uk = CtKey::v4(OTHER, 5353, VIP, 53, PROTO_UDP);
    assert_eq!(dp.ct_get(&uk).unwrap().unwrap().flags & CTF_NEW, 0);
    // 5,000 spoofed datagrams: 10,000 unconfirmed entries into a 1,024-entry table.
    for i in 0..5_000 {
        let (rc, _) = run(&mut dp, &spoofed_datagram(i));
        assert_eq!(rc, TC_ACT_OK, "forwarded, unconfirmed");
    }
    let all = dp.ct_entries();
    let unconfirmed = all.iter().filter(|(_, v)| v.flags & CTF_NEW != 0).count();
    let confirmed: Vec<CtKey> = all
        .iter()
        .filter(|(_, v)| v.flags & CTF_NEW == 0)
        .map(|e| e.0)
        .collect();
    assert!(
        unconfirmed > 0 && unconfirmed <= 1024 + 64,
        "unconfirmed entries bounded by their table: {unconfirmed}"
    );
    assert_eq!(
        confirmed.len(),
        4,
        "the conntrack table holds the TCP connection and the UDP stream: {confirmed:?}"
    );
    assert_eq!(counter(&dp, Counter::DropCtFull), 0);
    // Both keep their translations, both ways.
    still_translates(&mut dp, nport);
    let (_, out) = run(&mut dp, &q);
    assert_eq!(u16::from_be_bytes([out[34], out[35]]), uport);
    let (_, out) = run(&mut dp, &answer);
    assert_eq!(u16::from_be_bytes([out[36], out[37]]), 5353);
    // New flows are confirmed after it: a TCP connection, a UDP flow.
    a_new_connection_completes(&mut dp);
    let before = counter(&dp, Counter::CtPromoted);
    let q2 = udp(ip(OTHER, VIP, 17), 5354, 53, b"q", true);
    let (_, out) = run(&mut dp, &q2);
    let p2 = u16::from_be_bytes([out[34], out[35]]);
    run(&mut dp, &udp(ip(EP1, VIP, 17), 8080, p2, b"a", true));
    run(&mut dp, &q2);
    assert_eq!(counter(&dp, Counter::CtPromoted), before + 1);
    let v = dp
        .ct_get(&CtKey::v4(OTHER, 5354, VIP, 53, PROTO_UDP))
        .unwrap()
        .expect("the new UDP flow");
    assert_eq!(v.flags & CTF_NEW, 0, "confirmed");
}

/// In a source-NAT pool under pressure, an unconfirmed UDP flow idle for seconds gives its
/// port up to a new flow (as a half-open TCP flow does); a confirmed one never does before
/// its timeout, nor an unconfirmed one just used.
#[test]
fn unconfirmed_datagram_flows_give_their_ports_up_under_pressure() {
    if !in_private_netns("unconfirmed_datagram_flows_give_their_ports_up_under_pressure") {
        return;
    }
    pin_to(0);
    for (unconfirmed, idle, gets_port) in [
        (true, 4_000_000_000u64, true),
        (true, 200_000_000, false),
        (false, 4_000_000_000, false),
    ] {
        let mut dp = Datapath::load(&DatapathConfig {
            max_services: 64,
            max_conntrack: 1 << 17,
            max_halfopen: 1 << 17,
            ..Default::default()
        })
        .expect("load datapath");
        install(&mut dp, &svc(2, 53, PROTO_UDP, MODE_FULL, 0));
        let then = monotonic_ns() - idle;
        let flags = CTF_LOCAL | if unconfirmed { CTF_NEW } else { 0 };
        for p in 1024..=u16::MAX {
            let (k, v) = pool_entry((PROTO_UDP, 53), p, CtState::Established, flags, then);
            // Into the table the flags name (the half-open one when unconfirmed).
            dp.ct_insert(&k, &v).unwrap();
        }
        let (rc, out) = run(&mut dp, &udp(ip(CLIENT, VIP, 17), 40000, 53, b"q", true));
        let what = format!("unconfirmed {unconfirmed}, idle {} ms", idle / 1_000_000);
        if gets_port {
            assert_eq!(rc, TC_ACT_OK, "{what}");
            assert_eq!(counter(&dp, Counter::HalfOpenTakeover), 1, "{what}");
            let np = u16::from_be_bytes([out[34], out[35]]);
            let r = dp
                .ct_get(&CtKey::v4(EP1, 8080, VIP, np, PROTO_UDP))
                .unwrap()
                .unwrap();
            assert_eq!(r.nat_daddr, addr_words(CLIENT.into()).0, "{what}");
        } else {
            assert_eq!(rc, TC_ACT_SHOT, "{what}");
            assert_eq!(counter(&dp, Counter::HalfOpenTakeover), 0, "{what}");
            assert_eq!(counter(&dp, Counter::DropNatPorts), 1, "{what}");
        }
    }
}

/// A full conntrack table evicts nothing and confirms no new flow: a new UDP flow runs
/// unconfirmed in the half-open table (forwarded, both ways) and stays there, still forwarded,
/// when answered and continued; a TCP handshake runs in the half-open table, and its
/// completing ACK is dropped and counted (`DropCtFull`) until there is room. Then both move.
#[test]
fn a_full_conntrack_table_refuses_new_flows_and_counts_them() {
    if !in_private_netns("a_full_conntrack_table_refuses_new_flows_and_counts_them") {
        return;
    }
    let mut dp = small_datapath();
    install(&mut dp, &svc(1, 80, PROTO_TCP, MODE_FULL, 0));
    install(&mut dp, &svc(2, 53, PROTO_UDP, MODE_FULL, 0));
    let nport = handshake(&mut dp);
    // Fill the rest of the table with other (established UDP) flows' entries.
    let cap = dp.capacity().conntrack;
    let filler: Vec<(CtKey, Ct)> = (0..cap)
        .map(|i| {
            let k = CtKey::v4(Ipv4Addr::from(0x0a63_0000 + i), 9999, VIP, 53, PROTO_UDP);
            let v = Ct {
                state: CtState::Established.as_u8(),
                flags: CTF_LOCAL,
                timeout_s: 240,
                created_ns: monotonic_ns(),
                last_ns: monotonic_ns(),
                ..Default::default()
            };
            (k, v)
        })
        .collect();
    let mut t = dp.sync_table().unwrap();
    let written = t.insert_many(&filler);
    assert_eq!(
        written as u32,
        cap - 2,
        "the table takes what it has room for"
    );
    // A new UDP flow: unconfirmed, forwarded both ways; confirmed by the client's next
    // datagram, but no room to move: it stays where it is, forwarded, nothing dropped.
    let uk = CtKey::v4(OTHER, 5353, VIP, 53, PROTO_UDP);
    let q = udp(ip(OTHER, VIP, 17), 5353, 53, b"q", true);
    let (rc, out) = run(&mut dp, &q);
    assert_eq!(rc, TC_ACT_OK);
    let unport = u16::from_be_bytes([out[34], out[35]]);
    let (rc, out) = run(&mut dp, &udp(ip(EP1, VIP, 17), 8080, unport, b"a", true));
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(u16::from_be_bytes([out[36], out[37]]), 5353, "answered");
    let (rc, _) = run(&mut dp, &q);
    assert_eq!(rc, TC_ACT_OK, "forwarded unconfirmed");
    let v = dp.ct_get(&uk).unwrap().expect("the UDP flow");
    assert_eq!(v.flags & (CTF_NEW | CTF_REPLIED), CTF_NEW | CTF_REPLIED);
    assert_eq!(counter(&dp, Counter::DropCtFull), 0);
    let (o, r) = both(&dp, nport);
    assert!(o.is_some() && r.is_some(), "the established flow is kept");
    // A TCP handshake: SYN and SYN-ACK in the half-open table, the ACK refused.
    let ack = half_open_from_other(&mut dp);
    let (rc, _) = run(&mut dp, &ack);
    assert_eq!(rc, TC_ACT_SHOT, "no room to complete");
    assert_eq!(counter(&dp, Counter::DropCtFull), 1);
    let k = CtKey::v4(OTHER, 41000, VIP, 80, PROTO_TCP);
    let v = dp.ct_get(&k).unwrap().expect("still half-open");
    assert_ne!(v.flags & CTF_NEW, 0);
    // Room again (flows closed elsewhere): the retransmitted ACK completes it.
    for (k, _) in &filler[..8] {
        t.delete(k).unwrap();
    }
    let (rc, _) = run(&mut dp, &ack);
    assert_eq!(rc, TC_ACT_OK);
    let v = dp.ct_get(&k).unwrap().expect("established");
    assert_eq!((v.flags & CTF_NEW, v.state()), (0, CtState::Established));
    let (rc, _) = run(&mut dp, &q);
    assert_eq!(rc, TC_ACT_OK);
    let v = dp.ct_get(&uk).unwrap().expect("the UDP flow");
    assert_eq!(v.flags & (CTF_NEW | CTF_REPLIED), 0, "confirmed, moved");
    assert_eq!(counter(&dp, Counter::DropCtFull), 1);
}
