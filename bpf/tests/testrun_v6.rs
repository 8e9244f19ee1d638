//! IPv6 datapath tests with BPF_PROG_TEST_RUN, like `testrun.rs`: packets are built byte by
//! byte with checksums computed from scratch, so an incremental-checksum mistake shows as a
//! difference from the expected packet. Each test runs in its own empty network namespace.
#![allow(clippy::unwrap_used)]

use std::net::Ipv6Addr;

mod common;

use common::*;
use ferrolb_bpf::maps::*;
use ferrolb_bpf::{Datapath, DatapathConfig, lut};

const CLIENT: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 2);
const VIP: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xaaaa, 0, 0, 0, 0, 0x10);
const EP1: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 0x11);
const EP2: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 0x12);
const LB_IF: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 2);

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP6: u8 = 58;

// ---------------------------------------------------------------------------------------
// Packet building

/// RFC 8200 section 8.1 pseudo header.
fn pseudo(src: Ipv6Addr, dst: Ipv6Addr, next: u8, len: usize) -> u32 {
    let mut s = 0u32;
    for a in [src.octets(), dst.octets()] {
        for w in a.chunks(2) {
            s += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
    }
    s + (len as u32 >> 16) + (len as u32 & 0xffff) + u32::from(next)
}

#[derive(Clone)]
struct Ip {
    src: Ipv6Addr,
    dst: Ipv6Addr,
    next: u8,
    hop: u8,
    /// Extension header placed before the L4 header: (type, bytes).
    ext: Option<(u8, Vec<u8>)>,
}

fn ip(src: Ipv6Addr, dst: Ipv6Addr, next: u8) -> Ip {
    Ip {
        src,
        dst,
        next,
        hop: 64,
        ext: None,
    }
}

/// Ethernet + IPv6 (+ extension header) + `l4`, whose checksum at `csum_at` is computed.
fn frame(h: &Ip, mut l4: Vec<u8>, csum_at: Option<usize>) -> Vec<u8> {
    if let Some(at) = csum_at {
        l4[at] = 0;
        l4[at + 1] = 0;
        let mut c = csum(&l4, pseudo(h.src, h.dst, h.next, l4.len()));
        if c == 0 && h.next == UDP {
            c = 0xffff;
        }
        l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
    let ext = h.ext.clone();
    let ext_len = ext.as_ref().map_or(0, |(_, b)| b.len());
    let mut b = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x86, 0xdd];
    b.extend([0x60, 0, 0, 0]);
    b.extend(((l4.len() + ext_len) as u16).to_be_bytes());
    b.push(ext.as_ref().map_or(h.next, |(t, _)| *t));
    b.push(h.hop);
    b.extend(h.src.octets());
    b.extend(h.dst.octets());
    if let Some((_, e)) = ext {
        b.extend(e);
    }
    b.extend(l4);
    b
}

fn tcp(h: Ip, sport: u16, dport: u16, flags: u8, data: &[u8]) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&1000u32.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    t.extend_from_slice(data);
    frame(&h, t, Some(16))
}

fn udp(h: Ip, sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    u.extend_from_slice(data);
    frame(&h, u, Some(6))
}

fn echo(h: Ip, ty: u8, id: u16, seq: u16) -> Vec<u8> {
    let mut b = vec![ty, 0, 0, 0];
    b.extend(id.to_be_bytes());
    b.extend(seq.to_be_bytes());
    b.extend(b"ferrolb-ping6-payload");
    frame(&h, b, Some(2))
}

/// An ICMPv6 error quoting `quoted` (an Ethernet frame) from its IPv6 header on.
fn icmp_error(h: Ip, ty: u8, code: u8, mtu: u32, quoted: &[u8]) -> Vec<u8> {
    let mut b = vec![ty, code, 0, 0];
    b.extend(mtu.to_be_bytes());
    b.extend_from_slice(&quoted[14..]);
    frame(&h, b, Some(2))
}

/// The L4 checksum of an IPv6 frame without extension headers verifies.
fn checksum_ok(p: &[u8]) -> bool {
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&p[22..38]).unwrap());
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&p[38..54]).unwrap());
    let l4 = &p[54..];
    csum(l4, pseudo(src, dst, p[20], l4.len())) == 0
}

// ---------------------------------------------------------------------------------------
// Datapath setup

fn datapath() -> Datapath {
    Datapath::load(&DatapathConfig {
        max_services: 64,
        max_conntrack: 4096,
        ..Default::default()
    })
    .expect("load datapath")
}

/// One IPv6 service on VIP:port with endpoints (address, port).
fn install(dp: &mut Datapath, id: u32, port: u16, proto: u8, mode: u8, eps: &[(Ipv6Addr, u16)]) {
    let mut be = Backends {
        count: eps.len() as u32,
        ..Default::default()
    };
    let mut lut_eps = Vec::new();
    for (i, (a, p)) in eps.iter().enumerate() {
        be.ep[i] = Ep {
            addr: addr_words((*a).into()).0,
            snat_addr: addr_words(LB_IF.into()).0,
            port: *p,
            weight: 1,
            active: 1,
            pad: [0; 3],
        };
        let mut identity = a.octets().to_vec();
        identity.extend(p.to_be_bytes());
        lut_eps.push(lut::LutEndpoint {
            slot: i as u8,
            identity,
            weight: 1,
        });
    }
    let table = lut::round_robin(&lut_eps);
    be.lut_len = table.len() as u32;
    be.lut[..table.len()].copy_from_slice(&table);
    let slot = id * 2;
    dp.set_backends(slot, &be).unwrap();
    dp.reset_service_state(id).unwrap();
    let (addr, family) = addr_words(VIP.into());
    assert_eq!(family, FAMILY_V6);
    let key = SvcKey {
        addr,
        port: if proto == PROTO_ICMP { 0 } else { port.to_be() },
        proto,
        family,
    };
    dp.set_service(
        &key,
        &Svc {
            id,
            be_slot: slot,
            timeout_s: 240,
            port_base: port,
            mode,
            sel: 0,
            flags: 0,
        },
    )
    .unwrap();
    dp.set_ranges(
        &RangeKey {
            addr,
            proto,
            family,
            pad: 0,
        },
        &Ranges::default(),
    )
    .unwrap();
}

fn run(dp: &mut Datapath, p: &[u8]) -> (u32, Vec<u8>) {
    dp.test_run(p).unwrap()
}

fn key(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, proto: u8) -> CtKey {
    CtKey::new(src.into(), sport, dst.into(), dport, proto)
}

fn orig(dp: &Datapath, sport: u16, dport: u16, proto: u8) -> Ct {
    dp.ct_get(&key(CLIENT, sport, VIP, dport, proto))
        .unwrap()
        .expect("original-direction entry")
}

// ---------------------------------------------------------------------------------------
// Tests

#[test]
fn v6_dnat_rewrites_both_directions_exactly() {
    if !in_private_netns("v6_dnat_rewrites_both_directions_exactly") {
        return;
    }
    let mut dp = datapath();
    install(&mut dp, 1, 80, PROTO_TCP, 0, &[(EP1, 8080)]);
    let (rc, out) = run(&mut dp, &tcp(ip(CLIENT, VIP, TCP), 40000, 80, SYN, b""));
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(out, tcp(ip(CLIENT, EP1, TCP), 40000, 8080, SYN, b""));
    assert!(checksum_ok(&out));
    let o = orig(&dp, 40000, 80, PROTO_TCP);
    assert_eq!(o.nat_dst(FAMILY_V6), std::net::IpAddr::V6(EP1));
    assert_eq!(o.state, CtState::SynSent.as_u8());
    let (_, out) = run(
        &mut dp,
        &tcp(ip(EP1, CLIENT, TCP), 8080, 40000, SYN | ACK, b""),
    );
    assert_eq!(out, tcp(ip(VIP, CLIENT, TCP), 80, 40000, SYN | ACK, b""));
    let (_, out) = run(
        &mut dp,
        &tcp(ip(CLIENT, VIP, TCP), 40000, 80, ACK | PSH, b"GET /"),
    );
    assert_eq!(
        out,
        tcp(ip(CLIENT, EP1, TCP), 40000, 8080, ACK | PSH, b"GET /")
    );
    assert_eq!(
        orig(&dp, 40000, 80, PROTO_TCP).state,
        CtState::Established.as_u8()
    );
    assert_eq!(dp.ct_entries().len(), 2);

    // UDP, with an extension header (destination options, 8 bytes of padding) before it.
    install(&mut dp, 2, 53, PROTO_UDP, 0, &[(EP2, 5300)]);
    let mut h = ip(CLIENT, VIP, UDP);
    h.ext = Some((60, vec![UDP, 0, 1, 4, 0, 0, 0, 0]));
    let (_, out) = run(&mut dp, &udp(h, 5353, 53, b"query"));
    let mut want = ip(CLIENT, EP2, UDP);
    want.ext = Some((60, vec![UDP, 0, 1, 4, 0, 0, 0, 0]));
    assert_eq!(out, udp(want, 5353, 5300, b"query"));
    let (_, out) = run(&mut dp, &udp(ip(EP2, CLIENT, UDP), 5300, 5353, b"answer"));
    assert_eq!(out, udp(ip(VIP, CLIENT, UDP), 53, 5353, b"answer"));
    assert!(checksum_ok(&out));
    // Answered, then asked again: confirmed (moved to the conntrack table), translated as
    // before.
    let k = key(CLIENT, 5353, VIP, 53, PROTO_UDP);
    let flags = |dp: &Datapath| dp.ct_get(&k).unwrap().unwrap().flags & (CTF_NEW | CTF_REPLIED);
    assert_eq!(flags(&dp), CTF_NEW | CTF_REPLIED);
    let (_, out) = run(&mut dp, &udp(ip(CLIENT, VIP, UDP), 5353, 53, b"again"));
    assert_eq!(out, udp(ip(CLIENT, EP2, UDP), 5353, 5300, b"again"));
    assert_eq!(flags(&dp), 0);
    let (_, out) = run(&mut dp, &udp(ip(EP2, CLIENT, UDP), 5300, 5353, b"answer"));
    assert_eq!(out, udp(ip(VIP, CLIENT, UDP), 53, 5353, b"answer"));
}

#[test]
fn v6_fullnat_and_onearm_rewrite_the_source() {
    if !in_private_netns("v6_fullnat_and_onearm_rewrite_the_source") {
        return;
    }
    let mut dp = datapath();
    install(&mut dp, 1, 80, PROTO_TCP, 2, &[(EP1, 8080)]);
    let (_, out) = run(&mut dp, &tcp(ip(CLIENT, VIP, TCP), 40000, 80, SYN, b""));
    let nport = u16::from_be(orig(&dp, 40000, 80, PROTO_TCP).nat_sport);
    assert!(nport >= 1024);
    assert_eq!(out, tcp(ip(VIP, EP1, TCP), nport, 8080, SYN, b""));
    let (_, out) = run(
        &mut dp,
        &tcp(ip(EP1, VIP, TCP), 8080, nport, SYN | ACK, b"hi"),
    );
    assert_eq!(out, tcp(ip(VIP, CLIENT, TCP), 80, 40000, SYN | ACK, b"hi"));
    assert!(checksum_ok(&out));

    install(&mut dp, 2, 53, PROTO_UDP, 1, &[(EP2, 5300)]);
    let (_, out) = run(&mut dp, &udp(ip(CLIENT, VIP, UDP), 5353, 53, b"q"));
    let nport = u16::from_be(orig(&dp, 5353, 53, PROTO_UDP).nat_sport);
    assert_eq!(out, udp(ip(LB_IF, EP2, UDP), nport, 5300, b"q"));
    let (_, out) = run(&mut dp, &udp(ip(EP2, LB_IF, UDP), 5300, nport, b"a"));
    assert_eq!(out, udp(ip(VIP, CLIENT, UDP), 53, 5353, b"a"));
}

#[test]
fn v6_icmp_echo_is_balanced_and_neighbour_discovery_passes() {
    if !in_private_netns("v6_icmp_echo_is_balanced_and_neighbour_discovery_passes") {
        return;
    }
    let mut dp = datapath();
    install(&mut dp, 3, 0, PROTO_ICMP, 2, &[(EP1, 0)]);
    let (rc, out) = run(&mut dp, &echo(ip(CLIENT, VIP, ICMP6), 128, 77, 1));
    assert_eq!(rc, TC_ACT_OK);
    let o = orig(&dp, 77, 0, PROTO_ICMP);
    let id = u16::from_be(o.nat_sport);
    assert_eq!(out, echo(ip(VIP, EP1, ICMP6), 128, id, 1));
    assert!(checksum_ok(&out), "ICMPv6 covers the pseudo header");
    let (_, out) = run(&mut dp, &echo(ip(EP1, VIP, ICMP6), 129, id, 1));
    assert_eq!(out, echo(ip(VIP, CLIENT, ICMP6), 129, 77, 1));
    // The next request confirms the flow; its reply comes back the same way.
    let (_, out) = run(&mut dp, &echo(ip(CLIENT, VIP, ICMP6), 128, 77, 2));
    assert_eq!(out, echo(ip(VIP, EP1, ICMP6), 128, id, 2));
    assert_eq!(orig(&dp, 77, 0, PROTO_ICMP).flags & CTF_NEW, 0);
    let (_, out) = run(&mut dp, &echo(ip(EP1, VIP, ICMP6), 129, id, 2));
    assert_eq!(out, echo(ip(VIP, CLIENT, ICMP6), 129, 77, 2));
    // A reply without a flow, and neighbour solicitation for the VIP: untouched (the
    // datapath answers solicitations only on interfaces whose MAC the agent recorded).
    let stray = echo(ip(EP2, VIP, ICMP6), 129, 5, 1);
    assert_eq!(run(&mut dp, &stray), (TC_ACT_OK, stray.clone()));
    let mut ns = vec![135, 0, 0, 0, 0, 0, 0, 0];
    ns.extend(VIP.octets());
    let mut h = ip(EP1, VIP, ICMP6);
    h.hop = 255;
    let ns = frame(&h, ns, Some(2));
    assert_eq!(run(&mut dp, &ns), (TC_ACT_OK, ns.clone()));
    assert_eq!(dp.ct_entries().len(), 2);
}

#[test]
fn v6_packet_too_big_reaches_the_client_about_its_own_packet() {
    if !in_private_netns("v6_packet_too_big_reaches_the_client_about_its_own_packet") {
        return;
    }
    let mut dp = datapath();
    install(&mut dp, 1, 80, PROTO_TCP, 2, &[(EP1, 8080)]);
    run(&mut dp, &tcp(ip(CLIENT, VIP, TCP), 40000, 80, SYN, b""));
    let (_, fwd) = run(&mut dp, &tcp(ip(CLIENT, VIP, TCP), 40000, 80, ACK, b"data"));
    // A router on the backend side cannot forward VIP:nport -> EP1:8080 (MTU 1400).
    let router = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 1);
    let (rc, out) = run(
        &mut dp,
        &icmp_error(ip(router, VIP, ICMP6), 2, 0, 1400, &fwd),
    );
    assert_eq!(rc, TC_ACT_OK);
    let sent = tcp(ip(CLIENT, VIP, TCP), 40000, 80, ACK, b"data");
    let want = icmp_error(ip(router, CLIENT, ICMP6), 2, 0, 1400, &sent);
    // Everything but the quoted TCP checksum (not rewritten) is as the client would expect,
    // and the ICMPv6 checksum verifies over the whole rewritten message.
    assert_eq!(out.len(), want.len());
    // (Their ICMPv6 checksums differ by exactly that quoted checksum.)
    let qsum = 14 + 40 + 8 + 40 + 16;
    assert_eq!(out[..56], want[..56]);
    assert_eq!(out[58..qsum], want[58..qsum]);
    assert_eq!(out[qsum + 2..], want[qsum + 2..]);
    assert!(checksum_ok(&out));
    assert_eq!(dp.counter(Counter::IcmpErrTranslated), 1);
}

#[test]
fn v6_fragments_and_unknown_mid_stream_tcp_to_a_vip_are_dropped() {
    if !in_private_netns("v6_fragments_and_unknown_mid_stream_tcp_to_a_vip_are_dropped") {
        return;
    }
    let mut dp = datapath();
    install(&mut dp, 1, 80, PROTO_TCP, 0, &[(EP1, 8080)]);
    install(&mut dp, 2, 53, PROTO_UDP, 0, &[(EP1, 5300)]);
    let mut h = ip(CLIENT, VIP, UDP);
    h.ext = Some((44, vec![UDP, 0, 0, 1, 0, 0, 0, 9]));
    assert_eq!(run(&mut dp, &udp(h, 5353, 53, b"frag")).0, TC_ACT_SHOT);
    assert_eq!(dp.counter(Counter::DropFragment), 1);
    let mut h = ip(CLIENT, EP2, UDP);
    h.ext = Some((44, vec![UDP, 0, 0, 1, 0, 0, 0, 9]));
    let elsewhere = udp(h, 5353, 53, b"frag");
    assert_eq!(run(&mut dp, &elsewhere), (TC_ACT_OK, elsewhere.clone()));

    let (rc, _) = run(&mut dp, &tcp(ip(EP1, VIP, TCP), 8080, 41234, ACK, b"x"));
    assert_eq!(rc, TC_ACT_SHOT);
    assert_eq!(dp.counter(Counter::DropNoFlow), 1);
    // A local IPv6 socket owns the segment: it passes.
    let l = std::net::TcpListener::bind("[::]:5556").unwrap();
    let ack = tcp(ip(CLIENT, VIP, TCP), 40001, 5556, ACK, b"");
    assert_eq!(run(&mut dp, &ack), (TC_ACT_OK, ack.clone()));
    drop(l);
    assert!(dp.ct_entries().is_empty());
}

const OUR_MAC: [u8; 6] = [0x02, 0xfe, 0, 0, 0, 0x01];
const TC_ACT_REDIRECT: u32 = 7;

/// A neighbour solicitation for `target` from CLIENT (MAC 02:00:00:00:00:02), to the
/// solicited-node multicast group, with or without the source link-layer address option.
fn solicitation(target: Ipv6Addr, src: Ipv6Addr, hop: u8, with_slla: bool) -> Vec<u8> {
    let t = target.octets();
    let group = Ipv6Addr::from([
        0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, t[13], t[14], t[15],
    ]);
    let mut body = vec![135, 0, 0, 0, 0, 0, 0, 0];
    body.extend(t);
    if with_slla {
        body.extend([1, 1, 0x02, 0, 0, 0, 0, 0x02]);
    }
    let mut h = ip(src, group, ICMP6);
    h.hop = hop;
    let mut f = frame(&h, body, Some(2));
    f[0..6].copy_from_slice(&[0x33, 0x33, 0xff, t[13], t[14], t[15]]);
    f
}

/// The advertisement the datapath must answer with: solicited + override, our MAC.
fn advertisement(target: Ipv6Addr, to: Ipv6Addr) -> Vec<u8> {
    let mut body = vec![136, 0, 0, 0, 0x60, 0, 0, 0];
    body.extend(target.octets());
    body.extend([2, 1]);
    body.extend(OUR_MAC);
    let mut h = ip(target, to, ICMP6);
    h.hop = 255;
    let mut f = frame(&h, body, Some(2));
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f[6..12].copy_from_slice(&OUR_MAC);
    f
}

/// IPv6 VIPs live on lo, where the kernel's neighbour discovery does not answer for them: the
/// datapath answers solicitations for VIPs itself (out of the interface they came in on), and
/// drops them while the node is an L2 standby.
#[test]
fn v6_neighbour_solicitations_for_vips_are_answered_unless_standby() {
    if !in_private_netns("v6_neighbour_solicitations_for_vips_are_answered_unless_standby") {
        return;
    }
    let mut dp = datapath();
    install(&mut dp, 1, 80, PROTO_TCP, 0, &[(EP1, 8080)]);
    // Test runs see the packet arrive on lo (ifindex 1 in a fresh namespace).
    dp.set_if_mac(1, OUR_MAC).unwrap();
    for with_slla in [true, false] {
        let (rc, out) = run(&mut dp, &solicitation(VIP, CLIENT, 255, with_slla));
        assert_eq!(rc, TC_ACT_REDIRECT, "answered out of the same interface");
        assert_eq!(out, advertisement(VIP, CLIENT), "with SLLA: {with_slla}");
        assert!(checksum_ok(&out));
    }
    assert_eq!(dp.counter(Counter::NdAnswered), 2);
    // Not a VIP, not hop limit 255 (RFC 4861 §7.1.1), or duplicate address detection (from
    // ::): left to the kernel untouched.
    for ns in [
        solicitation(EP2, CLIENT, 255, true),
        solicitation(VIP, CLIENT, 64, true),
        solicitation(VIP, Ipv6Addr::UNSPECIFIED, 255, false),
    ] {
        assert_eq!(run(&mut dp, &ns), (TC_ACT_OK, ns.clone()));
    }
    // An L2 standby drops solicitations for VIPs (as it drops ARP requests for them).
    dp.set_ha_flags(HA_L2_STANDBY).unwrap();
    let (rc, _) = run(&mut dp, &solicitation(VIP, CLIENT, 255, true));
    assert_eq!(rc, TC_ACT_SHOT);
    assert_eq!(dp.counter(Counter::ArpSuppressed), 1);
    assert_eq!(dp.counter(Counter::NdAnswered), 2);
    assert!(dp.ct_entries().is_empty());
}

#[test]
fn v6_only_allowed_sources_open_flows() {
    if !in_private_netns("v6_only_allowed_sources_open_flows") {
        return;
    }
    let mut dp = datapath();
    install(&mut dp, 1, 80, PROTO_TCP, 2, &[(EP1, 8080)]);
    // 2001:db8:100::/56 and a /128, among 100 unrelated /48s; the flag goes on last (as the
    // agent does), so the rule never refuses a source it is about to allow.
    for i in 0..100u16 {
        dp.set_source(1, Ipv6Addr::new(0x2001, 0xdb9, i, 0, 0, 0, 0, 0).into(), 48)
            .unwrap();
    }
    dp.set_source(
        1,
        Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0).into(),
        56,
    )
    .unwrap();
    let single = Ipv6Addr::new(0x2001, 0xdb8, 0x5, 0, 0, 0, 0, 0x77);
    dp.set_source(1, single.into(), 128).unwrap();
    let (addr, family) = addr_words(VIP.into());
    dp.set_service(
        &SvcKey {
            addr,
            port: 80u16.to_be(),
            proto: PROTO_TCP,
            family,
        },
        &Svc {
            id: 1,
            be_slot: 2,
            timeout_s: 240,
            port_base: 80,
            mode: 2,
            sel: 0,
            flags: SVCF_SOURCES,
        },
    )
    .unwrap();
    let syn = |src: Ipv6Addr| tcp(ip(src, VIP, TCP), 40000, 80, SYN, b"");
    for a in [
        CLIENT,
        Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0xff, 1, 2, 3, 4),
        single,
        Ipv6Addr::new(0x2001, 0xdb9, 99, 1, 0, 0, 0, 1),
    ] {
        let (rc, out) = run(&mut dp, &syn(a));
        assert_eq!(rc, TC_ACT_OK, "{a} is allowed");
        assert_eq!(&out[38..54], &EP1.octets(), "{a} goes to the endpoint");
        assert!(checksum_ok(&out));
    }
    for a in [
        Ipv6Addr::new(0x2001, 0xdb8, 0x101, 0, 0, 0, 0, 2),
        Ipv6Addr::new(0x2001, 0xdb8, 0x5, 0, 0, 0, 0, 0x78),
        Ipv6Addr::new(0x2001, 0xdb9, 100, 0, 0, 0, 0, 1),
    ] {
        let (rc, _) = run(&mut dp, &syn(a));
        assert_eq!(rc, TC_ACT_SHOT, "{a} is refused");
        assert!(
            dp.ct_get(&key(a, 40000, VIP, 80, PROTO_TCP))
                .unwrap()
                .is_none()
        );
    }
    assert_eq!(dp.source_drops(1), 3);
    assert_eq!(dp.counter(Counter::DropSource), 3);
}
