//! Datapath tests with BPF_PROG_TEST_RUN: packets are built byte by byte, run through the
//! program, and compared with the exact packet expected after translation (whose checksums
//! the builder computes from scratch, so an incremental-checksum mistake shows as a diff).
//!
//! Each test runs in a thread that has its own empty network namespace, so the program's FIB
//! lookup finds no route and the verdict is TC_ACT_OK (no redirect, no TTL change); the
//! forwarding test gives its namespace interfaces and routes ([`routed`]).
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr};

mod attack;
mod common;
mod nat;

use common::*;
use ferrolb_bpf::maps::*;
use ferrolb_bpf::{Datapath, DatapathConfig, EventStream, lut, monotonic_ns};

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const EP1: Ipv4Addr = Ipv4Addr::new(10, 10, 10, 11);
const EP2: Ipv4Addr = Ipv4Addr::new(10, 10, 10, 12);
const EP3: Ipv4Addr = Ipv4Addr::new(10, 10, 10, 13);
const LB_IF: Ipv4Addr = Ipv4Addr::new(10, 10, 10, 2);

// ---------------------------------------------------------------------------------------
// Packet building

fn pseudo(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let mut s = 0u32;
    for o in [src.octets(), dst.octets()] {
        s += u32::from(u16::from_be_bytes([o[0], o[1]]));
        s += u32::from(u16::from_be_bytes([o[2], o[3]]));
    }
    s + u32::from(proto) + len as u32
}

#[derive(Clone)]
struct Ip {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    ttl: u8,
    frag: u16,
    id: u16,
}

fn ip(src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> Ip {
    Ip {
        src,
        dst,
        proto,
        ttl: 64,
        frag: 0,
        id: 0x1234,
    }
}

fn ipv4_header(h: &Ip, payload_len: usize) -> Vec<u8> {
    let mut b = vec![0u8; 20];
    b[0] = 0x45;
    b[2..4].copy_from_slice(&((20 + payload_len) as u16).to_be_bytes());
    b[4..6].copy_from_slice(&h.id.to_be_bytes());
    b[6..8].copy_from_slice(&h.frag.to_be_bytes());
    b[8] = h.ttl;
    b[9] = h.proto;
    b[12..16].copy_from_slice(&h.src.octets());
    b[16..20].copy_from_slice(&h.dst.octets());
    let c = csum(&b, 0);
    b[10..12].copy_from_slice(&c.to_be_bytes());
    b
}

fn eth(payload: Vec<u8>) -> Vec<u8> {
    let mut b = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
    b.extend(payload);
    b
}

fn tcp(h: Ip, sport: u16, dport: u16, flags: u8, data: &[u8]) -> Vec<u8> {
    tcp_seq(h, sport, dport, 1000, flags, data)
}

fn tcp_seq(h: Ip, sport: u16, dport: u16, seq: u32, flags: u8, data: &[u8]) -> Vec<u8> {
    tcp_sa(h, sport, dport, seq, 0, flags, data)
}

/// A TCP segment with sequence and acknowledgment numbers.
fn tcp_sa(h: Ip, sport: u16, dport: u16, seq: u32, ack: u32, flags: u8, data: &[u8]) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&ack.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    t.extend_from_slice(data);
    let c = csum(&t, pseudo(h.src, h.dst, 6, t.len()));
    t[16..18].copy_from_slice(&c.to_be_bytes());
    let mut p = ipv4_header(&h, t.len());
    p.extend(t);
    eth(p)
}

fn udp(h: Ip, sport: u16, dport: u16, data: &[u8], with_csum: bool) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    u.extend_from_slice(data);
    if with_csum {
        let mut c = csum(&u, pseudo(h.src, h.dst, 17, u.len()));
        if c == 0 {
            c = 0xffff;
        }
        u[6..8].copy_from_slice(&c.to_be_bytes());
    }
    let mut p = ipv4_header(&h, u.len());
    p.extend(u);
    eth(p)
}

fn icmp_raw(h: Ip, body: Vec<u8>) -> Vec<u8> {
    let mut b = body;
    b[2] = 0;
    b[3] = 0;
    let c = csum(&b, 0);
    b[2..4].copy_from_slice(&c.to_be_bytes());
    let mut p = ipv4_header(&h, b.len());
    p.extend(b);
    eth(p)
}

fn echo(h: Ip, ty: u8, id: u16, seq: u16) -> Vec<u8> {
    let mut b = vec![ty, 0, 0, 0];
    b.extend(id.to_be_bytes());
    b.extend(seq.to_be_bytes());
    b.extend(b"ferrolb-ping-payload");
    icmp_raw(h, b)
}

/// An ICMP error (type/code) quoting the first 28 bytes of `quoted` (an Ethernet frame).
fn icmp_error(h: Ip, ty: u8, code: u8, mtu: u16, quoted: &[u8]) -> Vec<u8> {
    let mut b = vec![ty, code, 0, 0, 0, 0];
    b.extend(mtu.to_be_bytes());
    b.extend_from_slice(&quoted[14..14 + 28]);
    icmp_raw(h, b)
}

/// Every checksum in a packet verifies (IPv4 header, and TCP/UDP/ICMP).
fn checksums_ok(p: &[u8]) -> bool {
    let l3 = &p[14..];
    let ihl = usize::from(l3[0] & 0xf) * 4;
    if csum(&l3[..ihl], 0) != 0 {
        return false;
    }
    let src = Ipv4Addr::new(l3[12], l3[13], l3[14], l3[15]);
    let dst = Ipv4Addr::new(l3[16], l3[17], l3[18], l3[19]);
    let l4 = &l3[ihl..];
    match l3[9] {
        6 => csum(l4, pseudo(src, dst, 6, l4.len())) == 0,
        17 => l4[6..8] == [0, 0] || csum(l4, pseudo(src, dst, 17, l4.len())) == 0,
        1 => csum(l4, 0) == 0,
        _ => true,
    }
}

// ---------------------------------------------------------------------------------------
// Datapath setup

fn datapath(node_id: u16) -> Datapath {
    Datapath::load(&DatapathConfig {
        max_services: 64,
        max_conntrack: 4096,
        node_id,
        ..Default::default()
    })
    .expect("load datapath")
}

struct SvcSpec {
    id: u32,
    vip: Ipv4Addr,
    port: u16,
    proto: u8,
    mode: u8,
    sel: u8,
    timeout_s: u32,
    eps: Vec<(Ipv4Addr, u16, u16)>,
    /// Allowed source prefixes (empty: every source).
    sources: Vec<(Ipv4Addr, u8)>,
}

fn svc(id: u32, port: u16, proto: u8, mode: u8, sel: u8) -> SvcSpec {
    SvcSpec {
        id,
        vip: VIP,
        port,
        proto,
        mode,
        sel,
        timeout_s: 240,
        eps: vec![(EP1, 8080, 1)],
        sources: vec![],
    }
}

fn install(dp: &mut Datapath, s: &SvcSpec) {
    let mut be = Backends {
        count: s.eps.len() as u32,
        ..Default::default()
    };
    let mut lut_eps = Vec::new();
    for (i, (a, port, w)) in s.eps.iter().enumerate() {
        be.ep[i] = Ep {
            addr: addr_words((*a).into()).0,
            snat_addr: addr_words(LB_IF.into()).0,
            port: *port,
            weight: *w,
            active: 1,
            pad: [0; 3],
        };
        let mut identity = a.octets().to_vec();
        identity.extend(port.to_be_bytes());
        lut_eps.push(lut::LutEndpoint {
            slot: i as u8,
            identity,
            weight: *w,
        });
    }
    let table = match s.sel {
        1 => lut::maglev(&lut_eps),
        2 => lut::weighted(&lut_eps),
        _ => lut::round_robin(&lut_eps),
    };
    be.lut_len = table.len() as u32;
    be.lut[..table.len()].copy_from_slice(&table);
    let slot = s.id * 2;
    dp.set_backends(slot, &be).unwrap();
    for (a, len) in &s.sources {
        dp.set_source(s.id, (*a).into(), *len).unwrap();
    }
    dp.reset_service_state(s.id).unwrap();
    let key = SvcKey {
        addr: addr_words(s.vip.into()).0,
        port: if s.proto == PROTO_ICMP {
            0
        } else {
            s.port.to_be()
        },
        proto: s.proto,
        family: FAMILY_V4,
    };
    dp.set_service(
        &key,
        &Svc {
            id: s.id,
            be_slot: slot,
            timeout_s: s.timeout_s,
            port_base: s.port,
            mode: s.mode,
            sel: s.sel,
            flags: if s.sources.is_empty() {
                0
            } else {
                SVCF_SOURCES
            },
        },
    )
    .unwrap();
    dp.set_ranges(
        &RangeKey {
            addr: key.addr,
            proto: s.proto,
            family: FAMILY_V4,
            pad: 0,
        },
        &Ranges::default(),
    )
    .unwrap();
}

fn run(dp: &mut Datapath, p: &[u8]) -> (u32, Vec<u8>) {
    dp.test_run(p).unwrap()
}

fn orig(dp: &Datapath, sport: u16, dport: u16, proto: u8) -> Ct {
    dp.ct_get(&CtKey::v4(CLIENT, sport, VIP, dport, proto))
        .unwrap()
        .expect("original-direction entry")
}

fn dest_of(p: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(p[30], p[31], p[32], p[33])
}

// ---------------------------------------------------------------------------------------
// Tests

#[test]
fn unknown_traffic_passes_untouched() {
    if !in_private_netns("unknown_traffic_passes_untouched") {
        return;
    }
    let mut dp = datapath(0);
    install(&mut dp, &svc(1, 80, PROTO_TCP, 0, 0));
    let other_port = tcp(ip(CLIENT, VIP, 6), 40000, 81, SYN, b"");
    let other_dst = tcp(ip(CLIENT, EP2, 6), 40000, 80, SYN, b"");
    let udp_to_tcp_svc = udp(ip(CLIENT, VIP, 17), 5000, 80, b"x", true);
    let ping_vip = echo(ip(CLIENT, VIP, 1), 8, 7, 1);
    let mut arp = vec![0xffu8; 6];
    arp.extend([2, 0, 0, 0, 0, 2, 0x08, 0x06]);
    arp.extend([0u8; 28]);
    let mut v6 = vec![0u8; 12];
    v6.extend([0x86, 0xdd]);
    v6.extend([0x60u8; 40]);
    for p in [other_port, other_dst, udp_to_tcp_svc, ping_vip, arp, v6] {
        let (rc, out) = run(&mut dp, &p);
        assert_eq!(rc, TC_ACT_OK);
        assert_eq!(out, p);
    }
    assert!(dp.ct_entries().is_empty());
}

#[test]
fn dnat_rewrites_both_directions_and_tracks_tcp_states() {
    if !in_private_netns("dnat_rewrites_both_directions_and_tracks_tcp_states") {
        return;
    }
    let mut dp = datapath(7);
    install(&mut dp, &svc(1, 80, PROTO_TCP, 0, 0));

    let (rc, out) = run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, 80, SYN, b""));
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(out, tcp(ip(CLIENT, EP1, 6), 40000, 8080, SYN, b""));
    assert!(checksums_ok(&out));
    let o = orig(&dp, 40000, 80, PROTO_TCP);
    assert_eq!(o.state(), CtState::SynSent);
    assert_eq!(o.origin, 7);
    assert_eq!(o.flags & CTF_LOCAL, CTF_LOCAL);

    let (_, out) = run(
        &mut dp,
        &tcp(ip(EP1, CLIENT, 6), 8080, 40000, SYN | ACK, b""),
    );
    assert_eq!(out, tcp(ip(VIP, CLIENT, 6), 80, 40000, SYN | ACK, b""));
    assert_eq!(orig(&dp, 40000, 80, PROTO_TCP).state(), CtState::SynRecv);

    let (_, out) = run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, 80, ACK, b""));
    assert_eq!(out, tcp(ip(CLIENT, EP1, 6), 40000, 8080, ACK, b""));
    assert_eq!(
        orig(&dp, 40000, 80, PROTO_TCP).state(),
        CtState::Established
    );

    let data = b"GET / HTTP/1.0\r\n\r\n";
    let (_, out) = run(
        &mut dp,
        &tcp(ip(CLIENT, VIP, 6), 40000, 80, ACK | PSH, data),
    );
    assert_eq!(out, tcp(ip(CLIENT, EP1, 6), 40000, 8080, ACK | PSH, data));

    run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, 80, FIN | ACK, b""));
    assert_eq!(orig(&dp, 40000, 80, PROTO_TCP).state(), CtState::FinWait);
    run(
        &mut dp,
        &tcp(ip(EP1, CLIENT, 6), 8080, 40000, FIN | ACK, b""),
    );
    let o = orig(&dp, 40000, 80, PROTO_TCP);
    assert_eq!(o.state(), CtState::TimeWait);
    assert_eq!(o.packets, 4);
    // The reply entry carries the same state.
    let r = dp
        .ct_get(&CtKey::v4(EP1, 8080, CLIENT, 40000, PROTO_TCP))
        .unwrap()
        .unwrap();
    assert_eq!(r.state(), CtState::TimeWait);
    assert_eq!(r.dir, 1);

    // Two CPUs racing at close time can leave FIN_WAIT stored after TIME_WAIT; the FIN bits
    // (set atomically) still say closed, and the datapath and the agent go by them.
    let okey = CtKey::v4(CLIENT, 40000, VIP, 80, PROTO_TCP);
    let mut raced = orig(&dp, 40000, 80, PROTO_TCP);
    assert_eq!(raced.fin & 3, 3);
    raced.state = CtState::FinWait.as_u8();
    dp.ct_insert(&okey, &raced).unwrap();
    assert_eq!(orig(&dp, 40000, 80, PROTO_TCP).state(), CtState::TimeWait);
    assert!(
        raced.expired(PROTO_TCP, raced.last_ns + 10_000_000_001),
        "TIME_WAIT's 10 s"
    );

    // A new SYN from the same client port opens a new connection.
    run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, 80, SYN, b""));
    assert_eq!(orig(&dp, 40000, 80, PROTO_TCP).state(), CtState::SynSent);
    // The endpoint refuses it: an RST that does not acknowledge the SYN changes nothing
    // (anyone can send one), one that does (RFC 793, SYN-SENT) closes the flow.
    run(&mut dp, &tcp(ip(EP1, CLIENT, 6), 8080, 40000, RST, b""));
    assert_eq!(orig(&dp, 40000, 80, PROTO_TCP).state(), CtState::SynSent);
    run(
        &mut dp,
        &tcp_sa(ip(EP1, CLIENT, 6), 8080, 40000, 0, 1001, RST | ACK, b""),
    );
    assert_eq!(orig(&dp, 40000, 80, PROTO_TCP).state(), CtState::Close);

    // SYN, SYN-ACK, ACK, data, FIN, FIN, SYN, RST, RST: translated, but this namespace has no
    // interface to look a route up from, so the stack got them and none counts as served.
    assert_eq!(dp.service_stats(1).packets, 0);
    assert_eq!(dp.endpoint_stats(1, 0).packets, 0);
    assert_eq!(dp.counters()[Counter::FallbackOther as usize], 9);
    assert_eq!(dp.counters()[Counter::TcpStateIgnored as usize], 1);
    // The chunked conntrack reader sees what the listing sees.
    let reader = dp.ct_reader().unwrap();
    let mut b = reader.batches(64);
    let mut n = 0;
    while let Some(c) = b.next_chunk().unwrap() {
        for (k, v) in &c {
            assert_eq!(reader.get(k), Some(*v));
        }
        n += c.len();
    }
    assert_eq!(n, dp.ct_entries().len());

    // Events: established (a TCP flow is reported when its handshake completes and it moves
    // out of the half-open table, never before), closed; the reused 4-tuple removes the
    // closed flow (peers drop it too); the new flow, refused at once, closes half-open.
    // Each carries the flow's original-direction entry, whichever side's packet made it
    // (the endpoint's FIN closed the first connection, its RST the second): that is the
    // entry peers are sent, so the agent need not read it from the table.
    let mut ev = dp.take_events().unwrap();
    let events: Vec<_> = std::iter::from_fn(|| ev.try_next())
        .map(|e| (e.kind().unwrap(), e.key, e.val.dir))
        .collect();
    use ferrolb_bpf::maps::EventKind::*;
    assert_eq!(
        events,
        vec![
            (Established, okey, 0),
            (Closed, okey, 0),
            (Removed, okey, 0),
            (Closed, okey, 0)
        ]
    );
}

/// A node that syncs nothing (flow_events off, as the agent loads it without --cluster) puts
/// no flow event in the ring: created, established, closed cost nothing for nobody; the
/// datapath's counters still count the flows.
#[test]
fn without_a_reader_no_flow_events_are_made() {
    if !in_private_netns("without_a_reader_no_flow_events_are_made") {
        return;
    }
    let mut dp = Datapath::load(&DatapathConfig {
        max_services: 64,
        max_conntrack: 4096,
        flow_events: false,
        ..Default::default()
    })
    .expect("load datapath");
    install(&mut dp, &svc(1, 80, PROTO_TCP, 2, 0));
    install(&mut dp, &svc(2, 53, PROTO_UDP, 0, 0));
    run(&mut dp, &udp(ip(CLIENT, VIP, 17), 40001, 53, b"q", true));
    // Opened and established (asserted there), then closed by its client.
    attack::handshake(&mut dp);
    run(
        &mut dp,
        &tcp_sa(ip(CLIENT, VIP, 6), 40000, 80, 1006, 5007, RST | ACK, b""),
    );
    assert_eq!(orig(&dp, 40000, 80, PROTO_TCP).state(), CtState::Close);
    let c = dp.counters();
    assert_eq!(
        c[Counter::CtCreated as usize],
        2,
        "the UDP and the TCP flow"
    );
    assert_eq!(c[Counter::CtPromoted as usize], 1);
    assert_eq!(c[Counter::EventsLost as usize], 0);
    let mut ev = dp.take_events().unwrap();
    assert!(ev.try_next().is_none(), "no event in the ring");
}

/// The datapath wakes the event reader when the ring's unread data crosses a multiple of
/// 256 KiB (a record is 152 bytes: marks at events 1,725, 3,449 and 5,174; 6,898 fill the
/// 1 MiB ring), not at every event past the first mark: each wakeup is an interrupt the CPU
/// sends itself, ~7 us on a VM. Woken again after the reader drained the ring. Observed with
/// an edge-triggered epoll on the ring's fd (one readiness per wakeup), polled after each
/// packet.
#[test]
fn the_event_reader_is_woken_at_backlog_marks_not_per_event() {
    if !in_private_netns("the_event_reader_is_woken_at_backlog_marks_not_per_event") {
        return;
    }
    let mut dp = Datapath::load(&DatapathConfig {
        max_services: 64,
        max_conntrack: 1 << 15,
        ..Default::default()
    })
    .expect("load datapath");
    install(&mut dp, &svc(2, 53, PROTO_UDP, 0, 0));
    let mut ev = dp.take_events().unwrap();
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: a plain syscall; the fd it returns is owned below and closed on drop.
    let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(
        raw >= 0,
        "epoll_create1: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new fd nobody else owns.
    let ep = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut e = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLET) as u32,
        u64: 0,
    };
    // SAFETY: both fds are open (`ev` keeps the ring's for the test's whole life) and `e`
    // outlives the call.
    let rc =
        unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, ev.as_raw_fd(), &mut e) };
    assert_eq!(rc, 0, "epoll_ctl: {}", std::io::Error::last_os_error());
    let woken = |timeout_ms: i32| -> bool {
        let mut out = [libc::epoll_event { events: 0, u64: 0 }];
        // SAFETY: an open epoll fd; `out` has room for the one event asked for.
        let n = unsafe { libc::epoll_wait(ep.as_raw_fd(), out.as_mut_ptr(), 1, timeout_ms) };
        assert!(n >= 0, "epoll_wait: {}", std::io::Error::last_os_error());
        n == 1
    };
    // Each UDP flow from a new port, answered by its endpoint and continued by its client, is
    // confirmed: one event (its move to the conntrack table).
    let mut flows = 0u16;
    let mut send = |dp: &mut Datapath, n: usize| -> Vec<usize> {
        let mut at = Vec::new();
        for i in 1..=n {
            flows += 1;
            let port = 1024 + flows;
            run(dp, &udp(ip(CLIENT, VIP, 17), port, 53, b"q", true));
            run(dp, &udp(ip(EP1, CLIENT, 17), 8080, port, b"a", true));
            run(dp, &udp(ip(CLIENT, VIP, 17), port, 53, b"q", true));
            if woken(0) {
                at.push(i);
            }
        }
        if woken(100) {
            at.push(usize::MAX); // late: counted, and fails the index check below
        }
        at
    };
    let marks = send(&mut dp, 7000);
    let first = |m: &[usize]| m[..m.len().min(8)].to_vec();
    assert_eq!(
        marks.len(),
        3,
        "{} wakeups, the first at events {:?}",
        marks.len(),
        first(&marks)
    );
    for (got, want) in marks.iter().zip([1725, 3449, 5174]) {
        assert!(
            (want..=want + 2).contains(got),
            "wakeups at events {marks:?}, expected at 1,725, 3,449, 5,174"
        );
    }
    assert_eq!(dp.counters()[Counter::EventsLost as usize], 7000 - 6898);
    let read = std::iter::from_fn(|| ev.try_next()).count();
    assert_eq!(read, 6898, "events the ring held");
    // Drained: the next mark wakes the reader again.
    let marks = send(&mut dp, 1800);
    assert_eq!(
        marks.len(),
        1,
        "{} wakeups after the drain, the first at events {:?}",
        marks.len(),
        first(&marks)
    );
    assert!((1725..=1727).contains(&marks[0]), "{marks:?}");
}

/// The interfaces marked for bpf_redirect_peer: one slot per index modulo 256 (the lowest
/// index of a shared slot gets it), replaced as a whole, cleared when unmarked.
#[test]
fn peer_redirect_marks_share_slots_and_are_replaced() {
    if !in_private_netns("peer_redirect_marks_share_slots_and_are_replaced") {
        return;
    }
    let mut dp = datapath(0);
    let (a, b, c) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 3]);
    assert_eq!(IF_OUT_SLOTS, 256);
    dp.set_peer_redirects(&[(259, a), (3, b), (7, c)]).unwrap();
    assert_eq!(dp.peer_redirects(), vec![(3, b), (7, c)]);
    dp.set_peer_redirects(&[(259, a), (7, c)]).unwrap();
    assert_eq!(dp.peer_redirects(), vec![(7, c), (259, a)]);
    dp.set_peer_redirects(&[]).unwrap();
    assert_eq!(dp.peer_redirects(), vec![]);
}

#[test]
fn fullnat_sources_from_the_vip_with_a_free_port() {
    if !in_private_netns("fullnat_sources_from_the_vip_with_a_free_port") {
        return;
    }
    let mut dp = datapath(0);
    install(&mut dp, &svc(2, 80, PROTO_TCP, 2, 0));
    let (rc, out) = run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, 80, SYN, b""));
    assert_eq!(rc, TC_ACT_OK);
    let o = orig(&dp, 40000, 80, PROTO_TCP);
    let nport = u16::from_be(o.nat_sport);
    assert!(nport >= 1024);
    assert_eq!(out, tcp(ip(VIP, EP1, 6), nport, 8080, SYN, b""));
    assert!(checksums_ok(&out));
    let (_, out) = run(
        &mut dp,
        &tcp(ip(EP1, VIP, 6), 8080, nport, SYN | ACK, b"hi"),
    );
    assert_eq!(out, tcp(ip(VIP, CLIENT, 6), 80, 40000, SYN | ACK, b"hi"));

    // Another client with the same source port gets a different translated port.
    let other = Ipv4Addr::new(198, 51, 100, 3);
    let (_, out2) = run(&mut dp, &tcp(ip(other, VIP, 6), 40000, 80, SYN, b""));
    let o2 = dp
        .ct_get(&CtKey::v4(other, 40000, VIP, 80, PROTO_TCP))
        .unwrap()
        .unwrap();
    assert_ne!(o2.nat_sport, o.nat_sport);
    assert_eq!(
        out2,
        tcp(ip(VIP, EP1, 6), u16::from_be(o2.nat_sport), 8080, SYN, b"")
    );
}

/// With a node source address (`--node-snat`), full NAT leaves from it instead of the VIP:
/// replies come back to that address, and the reply entry turns them back into the VIP.
/// DNAT keeps the client's address. Another node with another source makes disjoint flows.
#[test]
fn fullnat_sources_from_the_nodes_own_address_when_given() {
    if !in_private_netns("fullnat_sources_from_the_nodes_own_address_when_given") {
        return;
    }
    let snat = Ipv4Addr::new(203, 0, 113, 201);
    let mut dp = Datapath::load(&DatapathConfig {
        max_services: 64,
        max_conntrack: 4096,
        node_id: 1,
        fullnat_sources: vec![IpAddr::V4(snat), "2001:db8::201".parse().unwrap()],
        ..Default::default()
    })
    .expect("load datapath");
    install(&mut dp, &svc(2, 80, PROTO_TCP, 2, 0));
    install(&mut dp, &svc(3, 81, PROTO_TCP, 0, 0));
    let (rc, out) = run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, 80, SYN, b""));
    assert_eq!(rc, TC_ACT_OK);
    let o = orig(&dp, 40000, 80, PROTO_TCP);
    let nport = u16::from_be(o.nat_sport);
    assert_eq!(out, tcp(ip(snat, EP1, 6), nport, 8080, SYN, b""));
    assert!(checksums_ok(&out));
    // The reply to the node's address finds the flow and goes back from the VIP.
    let (_, out) = run(
        &mut dp,
        &tcp(ip(EP1, snat, 6), 8080, nport, SYN | ACK, b"hi"),
    );
    assert_eq!(out, tcp(ip(VIP, CLIENT, 6), 80, 40000, SYN | ACK, b"hi"));
    assert!(checksums_ok(&out));
    // A reply to the VIP with that port is no flow of this node.
    let (_, out) = run(&mut dp, &tcp(ip(EP1, VIP, 6), 8080, nport, ACK, b"x"));
    assert_ne!(dest_of(&out), CLIENT);
    // DNAT is untouched by the node source.
    let (_, out) = run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40001, 81, SYN, b""));
    assert_eq!(
        out[26..30],
        CLIENT.octets(),
        "DNAT keeps the client's address"
    );
}

#[test]
fn onearm_sources_from_the_interface_address() {
    if !in_private_netns("onearm_sources_from_the_interface_address") {
        return;
    }
    let mut dp = datapath(0);
    install(&mut dp, &svc(3, 53, PROTO_UDP, 1, 0));
    let (_, out) = run(&mut dp, &udp(ip(CLIENT, VIP, 17), 5353, 53, b"query", true));
    let o = orig(&dp, 5353, 53, PROTO_UDP);
    let nport = u16::from_be(o.nat_sport);
    assert_eq!(out, udp(ip(LB_IF, EP1, 17), nport, 8080, b"query", true));
    assert!(checksums_ok(&out));
    // The packet that opened the flow is counted once, in the entry as inserted.
    assert_eq!((o.packets, o.bytes), (1, 14 + 20 + 8 + 5));
    let (_, out) = run(
        &mut dp,
        &udp(ip(EP1, LB_IF, 17), 8080, nport, b"answer", true),
    );
    assert_eq!(out, udp(ip(VIP, CLIENT, 17), 53, 5353, b"answer", true));
    run(&mut dp, &udp(ip(CLIENT, VIP, 17), 5353, 53, b"again", true));
    assert_eq!(orig(&dp, 5353, 53, PROTO_UDP).packets, 2);
}

#[test]
fn udp_without_checksum_stays_without() {
    if !in_private_netns("udp_without_checksum_stays_without") {
        return;
    }
    let mut dp = datapath(0);
    install(&mut dp, &svc(4, 53, PROTO_UDP, 0, 0));
    let (_, out) = run(&mut dp, &udp(ip(CLIENT, VIP, 17), 5353, 53, b"q", false));
    assert_eq!(out, udp(ip(CLIENT, EP1, 17), 5353, 8080, b"q", false));
}

#[test]
fn icmp_echo_is_balanced_with_identifier_translation() {
    if !in_private_netns("icmp_echo_is_balanced_with_identifier_translation") {
        return;
    }
    let mut dp = datapath(0);
    install(&mut dp, &svc(5, 0, PROTO_ICMP, 2, 0));
    let (_, out) = run(&mut dp, &echo(ip(CLIENT, VIP, 1), 8, 77, 1));
    let k = CtKey::v4(CLIENT, 77, VIP, 0, PROTO_ICMP);
    let o = dp.ct_get(&k).unwrap().unwrap();
    let nid = u16::from_be(o.nat_sport);
    assert_eq!(out, echo(ip(VIP, EP1, 1), 8, nid, 1));
    assert!(checksums_ok(&out));
    let (_, out) = run(&mut dp, &echo(ip(EP1, VIP, 1), 0, nid, 1));
    assert_eq!(out, echo(ip(VIP, CLIENT, 1), 0, 77, 1));
}

/// A UDP or ICMP echo flow is unconfirmed (in the half-open table, not reported to peers)
/// until its endpoint has answered and its client sent again (netfilter's "assured"); then it
/// moves to the conntrack table, reported once (`established`). A lone query and its answer,
/// or a flow only ever one way, stay unconfirmed; every packet is forwarded all along.
#[test]
fn a_datagram_flow_is_confirmed_when_answered_and_continued() {
    if !in_private_netns("a_datagram_flow_is_confirmed_when_answered_and_continued") {
        return;
    }
    let mut dp = datapath(0);
    install(&mut dp, &svc(4, 53, PROTO_UDP, 0, 0));
    install(&mut dp, &svc(5, 0, PROTO_ICMP, 2, 0));
    let mut ev = dp.take_events().unwrap();
    let both = |dp: &Datapath, k: &CtKey| {
        let o = dp.ct_get(k).unwrap().expect("original entry");
        let r = dp.ct_get(&k.peer(&o)).unwrap().expect("reply entry");
        (o, r)
    };
    let flags = |dp: &Datapath, k: &CtKey| {
        let (o, r) = both(dp, k);
        (
            o.flags & (CTF_NEW | CTF_REPLIED),
            r.flags & (CTF_NEW | CTF_REPLIED),
        )
    };
    let kinds = |ev: &mut EventStream| -> Vec<Option<EventKind>> {
        std::iter::from_fn(|| ev.try_next())
            .map(|e| e.kind())
            .collect()
    };

    // UDP (DNAT): query, answer, next query.
    let k = CtKey::v4(CLIENT, 5353, VIP, 53, PROTO_UDP);
    let (rc, out) = run(&mut dp, &udp(ip(CLIENT, VIP, 17), 5353, 53, b"q1", true));
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(out, udp(ip(CLIENT, EP1, 17), 5353, 8080, b"q1", true));
    assert_eq!(flags(&dp, &k), (CTF_NEW, CTF_NEW), "unconfirmed");
    let (_, out) = run(&mut dp, &udp(ip(EP1, CLIENT, 17), 8080, 5353, b"a1", true));
    assert_eq!(out, udp(ip(VIP, CLIENT, 17), 53, 5353, b"a1", true));
    assert_eq!(
        flags(&dp, &k),
        (CTF_NEW | CTF_REPLIED, CTF_NEW | CTF_REPLIED),
        "answered, both entries marked"
    );
    assert_eq!(kinds(&mut ev), vec![], "nothing reported while unconfirmed");
    let (_, out) = run(&mut dp, &udp(ip(CLIENT, VIP, 17), 5353, 53, b"q2", true));
    assert_eq!(out, udp(ip(CLIENT, EP1, 17), 5353, 8080, b"q2", true));
    assert_eq!(flags(&dp, &k), (0, 0), "confirmed: moved to conntrack");
    assert_eq!(kinds(&mut ev), vec![Some(EventKind::Established)]);
    let (o, r) = both(&dp, &k);
    assert_eq!((o.packets, r.packets), (2, 1), "counted across the move");
    let (_, out) = run(&mut dp, &udp(ip(EP1, CLIENT, 17), 8080, 5353, b"a2", true));
    assert_eq!(out, udp(ip(VIP, CLIENT, 17), 53, 5353, b"a2", true));
    assert_eq!(dp.counters()[Counter::CtPromoted as usize], 1);

    // A lone query and its answer; a flow only ever one way: both stay unconfirmed.
    let lone = CtKey::v4(CLIENT, 5354, VIP, 53, PROTO_UDP);
    run(&mut dp, &udp(ip(CLIENT, VIP, 17), 5354, 53, b"q", true));
    run(&mut dp, &udp(ip(EP1, CLIENT, 17), 8080, 5354, b"a", true));
    let oneway = CtKey::v4(CLIENT, 5355, VIP, 53, PROTO_UDP);
    for _ in 0..3 {
        let (_, out) = run(&mut dp, &udp(ip(CLIENT, VIP, 17), 5355, 53, b"log", true));
        assert_eq!(out, udp(ip(CLIENT, EP1, 17), 5355, 8080, b"log", true));
    }
    assert_eq!(
        flags(&dp, &lone),
        (CTF_NEW | CTF_REPLIED, CTF_NEW | CTF_REPLIED)
    );
    assert_eq!(flags(&dp, &oneway), (CTF_NEW, CTF_NEW));
    assert_eq!(both(&dp, &oneway).0.packets, 3);

    // ICMP echo (full NAT, identifier translated): request, reply, next request.
    let ik = CtKey::v4(CLIENT, 77, VIP, 0, PROTO_ICMP);
    run(&mut dp, &echo(ip(CLIENT, VIP, 1), 8, 77, 1));
    let nid = u16::from_be(dp.ct_get(&ik).unwrap().unwrap().nat_sport);
    assert_eq!(flags(&dp, &ik), (CTF_NEW, CTF_NEW));
    let (_, out) = run(&mut dp, &echo(ip(EP1, VIP, 1), 0, nid, 1));
    assert_eq!(out, echo(ip(VIP, CLIENT, 1), 0, 77, 1));
    run(&mut dp, &echo(ip(CLIENT, VIP, 1), 8, 77, 2));
    assert_eq!(flags(&dp, &ik), (0, 0));
    assert_eq!(kinds(&mut ev), vec![Some(EventKind::Established)]);
    let (_, out) = run(&mut dp, &echo(ip(EP1, VIP, 1), 0, nid, 2));
    assert_eq!(out, echo(ip(VIP, CLIENT, 1), 0, 77, 2));
}

#[test]
fn icmp_errors_are_translated_back_to_the_sender() {
    if !in_private_netns("icmp_errors_are_translated_back_to_the_sender") {
        return;
    }
    let mut dp = datapath(0);
    install(&mut dp, &svc(6, 80, PROTO_TCP, 2, 0));
    run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, 80, SYN, b""));
    let (_, fwd) = run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, 80, ACK, b"data"));
    let nport = u16::from_be(orig(&dp, 40000, 80, PROTO_TCP).nat_sport);
    let router = Ipv4Addr::new(10, 10, 10, 1);
    // A router on the backend side cannot forward the translated packet: fragmentation
    // needed, MTU 1400, quoting what the LB sent (VIP:nport -> EP1:8080).
    let err = icmp_error(ip(router, VIP, 1), 3, 4, 1400, &fwd);
    let (rc, out) = run(&mut dp, &err);
    assert_eq!(rc, TC_ACT_OK);
    // The client must see the error about its own packet (CLIENT:40000 -> VIP:80).
    let sent = tcp(ip(CLIENT, VIP, 6), 40000, 80, ACK, b"data");
    let want = icmp_error(ip(router, CLIENT, 1), 3, 4, 1400, &sent);
    // The quoted TCP checksum is not rewritten (it is beyond the 8 bytes every ICMP error
    // quotes); compare everything else and check the checksums that matter.
    assert_eq!(out.len(), want.len());
    assert_eq!(out[..14 + 20 + 8 + 20 + 8], want[..14 + 20 + 8 + 20 + 8]);
    assert!(checksums_ok(&out), "outer IP and ICMP checksums");
    assert_eq!(csum(&out[14 + 20 + 8..14 + 20 + 8 + 20], 0), 0, "quoted IP");
    assert_eq!(dp.counters()[Counter::IcmpErrTranslated as usize], 1);
    let _ = nport;

    // An error about a flow we do not track passes untouched.
    let stray = tcp(ip(CLIENT, EP3, 6), 1, 2, ACK, b"data");
    let err = icmp_error(ip(router, CLIENT, 1), 3, 4, 1400, &stray);
    let (_, out) = run(&mut dp, &err);
    assert_eq!(out, err);
}

#[test]
fn icmp_errors_about_replies_go_to_the_backend() {
    if !in_private_netns("icmp_errors_about_replies_go_to_the_backend") {
        return;
    }
    let mut dp = datapath(0);
    install(&mut dp, &svc(9, 80, PROTO_TCP, 0, 0));
    run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, 80, ACK, b"q"));
    let (_, reply) = run(
        &mut dp,
        &tcp(ip(EP1, CLIENT, 6), 8080, 40000, ACK, b"big answer"),
    );
    // A router on the client side cannot forward the (translated) reply VIP:80 -> CLIENT and
    // tells its source, the VIP. The backend must learn it about its own packet.
    let router = Ipv4Addr::new(198, 51, 100, 254);
    let err = icmp_error(ip(router, VIP, 1), 3, 4, 1280, &reply);
    let (rc, out) = run(&mut dp, &err);
    assert_eq!(rc, TC_ACT_OK);
    let sent = tcp(ip(EP1, CLIENT, 6), 8080, 40000, ACK, b"big answer");
    let want = icmp_error(ip(router, EP1, 1), 3, 4, 1280, &sent);
    assert_eq!(out[..14 + 20 + 8 + 20 + 8], want[..14 + 20 + 8 + 20 + 8]);
    assert!(checksums_ok(&out));
    // Time exceeded is translated the same way.
    let err = icmp_error(ip(router, VIP, 1), 11, 0, 0, &reply);
    let (_, out) = run(&mut dp, &err);
    let want = icmp_error(ip(router, EP1, 1), 11, 0, 0, &sent);
    assert_eq!(out[..14 + 20 + 8 + 20 + 8], want[..14 + 20 + 8 + 20 + 8]);
    assert_eq!(dp.counters()[Counter::IcmpErrTranslated as usize], 2);
}

#[test]
fn pin_directories_differ_per_network_namespace() {
    if !in_private_netns("pin_directories_differ_per_network_namespace") {
        return;
    }
    let base = std::path::Path::new("/sys/fs/bpf/ferrolb");
    let here = ferrolb_bpf::default_pin_dir(base).unwrap();
    let other = std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        ferrolb_bpf::default_pin_dir(base).unwrap()
    })
    .join()
    .unwrap();
    assert_ne!(here, other);
    assert!(here.ends_with(format!("v{LAYOUT_VERSION}")));
}

#[test]
fn fragments_to_a_vip_are_dropped_and_counted() {
    if !in_private_netns("fragments_to_a_vip_are_dropped_and_counted") {
        return;
    }
    let mut dp = datapath(0);
    install(&mut dp, &svc(7, 53, PROTO_UDP, 0, 0));
    let mut first = ip(CLIENT, VIP, 17);
    first.frag = 0x2000; // MF
    let mut later = ip(CLIENT, VIP, 17);
    later.frag = 185; // offset 1480
    for h in [first, later] {
        let (rc, _) = run(&mut dp, &udp(h, 5353, 53, b"frag", true));
        assert_eq!(rc, TC_ACT_SHOT);
    }
    assert_eq!(dp.counters()[Counter::DropFragment as usize], 2);
    let mut elsewhere = ip(CLIENT, EP2, 17);
    elsewhere.frag = 0x2000;
    let p = udp(elsewhere, 5353, 53, b"frag", true);
    let (rc, out) = run(&mut dp, &p);
    assert_eq!((rc, out), (TC_ACT_OK, p));
}

#[test]
fn expired_entries_are_replaced_and_collected() {
    if !in_private_netns("expired_entries_are_replaced_and_collected") {
        return;
    }
    let mut dp = datapath(0);
    let mut s = svc(8, 53, PROTO_UDP, 0, 0);
    s.timeout_s = 1;
    s.eps = vec![(EP1, 8080, 1), (EP2, 8080, 1)];
    install(&mut dp, &s);
    run(&mut dp, &udp(ip(CLIENT, VIP, 17), 5353, 53, b"a", true));
    let k = CtKey::v4(CLIENT, 5353, VIP, 53, PROTO_UDP);
    let o = dp.ct_get(&k).unwrap().unwrap();
    assert_eq!(o.timeout_s, 1);
    assert!(!o.expired(PROTO_UDP, monotonic_ns()));
    // Age both entries by 2 s.
    let peer = k.peer(&o);
    for key in [k, peer] {
        let mut v = dp.ct_get(&key).unwrap().unwrap();
        v.last_ns -= 2_000_000_000;
        dp.ct_insert(&key, &v).unwrap();
    }
    // The next packet starts a new flow: round robin moves it to the other endpoint.
    let (_, out) = run(&mut dp, &udp(ip(CLIENT, VIP, 17), 5353, 53, b"b", true));
    assert_eq!(dest_of(&out), EP2);
    // Age again; the collector removes both entries (and keeps fresh ones).
    for key in [k, dp.ct_get(&k).unwrap().map(|v| k.peer(&v)).unwrap()] {
        let mut v = dp.ct_get(&key).unwrap().unwrap();
        v.last_ns -= 2_000_000_000;
        dp.ct_insert(&key, &v).unwrap();
    }
    run(&mut dp, &udp(ip(CLIENT, VIP, 17), 6000, 53, b"c", true));
    // Two go: the second flow's entries. The first flow's reply entry (EP1) went with its
    // original entry when the second flow replaced it: no orphan.
    assert_eq!(dp.ct_collect(monotonic_ns()), 2);
    assert_eq!(dp.ct_entries().len(), 2);
    // A one-way flow stays while either direction is fresh.
    let k2 = CtKey::v4(CLIENT, 6000, VIP, 53, PROTO_UDP);
    let v2 = dp.ct_get(&k2).unwrap().unwrap();
    let mut r2 = dp.ct_get(&k2.peer(&v2)).unwrap().unwrap();
    r2.last_ns -= 5_000_000_000;
    dp.ct_insert(&k2.peer(&v2), &r2).unwrap();
    assert_eq!(dp.ct_collect(monotonic_ns()), 0);
}

#[test]
fn the_collector_works_on_its_own_handles() {
    if !in_private_netns("the_collector_works_on_its_own_handles") {
        return;
    }
    let mut dp = datapath(0);
    let mut s = svc(15, 53, PROTO_UDP, 0, 0);
    s.timeout_s = 1;
    install(&mut dp, &s);
    run(&mut dp, &udp(ip(CLIENT, VIP, 17), 7000, 53, b"a", true));
    run(&mut dp, &udp(ip(CLIENT, VIP, 17), 7001, 53, b"b", true));
    let mut c = dp.collector().unwrap();
    assert_eq!(c.entries().len(), 4);
    let k = CtKey::v4(CLIENT, 7000, VIP, 53, PROTO_UDP);
    let v = dp.ct_get(&k).unwrap().unwrap();
    for key in [k, k.peer(&v)] {
        let mut e = dp.ct_get(&key).unwrap().unwrap();
        e.last_ns -= 3_000_000_000;
        dp.ct_insert(&key, &e).unwrap();
    }
    let entries = c.entries();
    // The second flow had expired when the table was walked, but between the walk and the
    // removal the client reused its port: a new flow took the original-direction key (its
    // reply entry is another one, toward another backend, so the old reply entry stays
    // idle). The collector decides on the entry as it is now and leaves the new flow alone.
    let k2 = CtKey::v4(CLIENT, 7001, VIP, 53, PROTO_UDP);
    let v2 = dp.ct_get(&k2).unwrap().unwrap();
    let r2 = k2.peer(&v2);
    let mut old_reply = dp.ct_get(&r2).unwrap().unwrap();
    old_reply.last_ns -= 3_000_000_000;
    dp.ct_insert(&r2, &old_reply).unwrap();
    let mut old_orig = v2;
    old_orig.last_ns -= 3_000_000_000;
    let mut snapshot = entries.clone();
    for (key, e) in [(k2, old_orig), (r2, old_reply)] {
        snapshot.retain(|(sk, _)| *sk != key);
        snapshot.push((key, e));
    }
    assert_eq!(c.collect_from(&snapshot, monotonic_ns()).len(), 2);
    // The datapath's own handle sees the result.
    assert!(dp.ct_get(&k).unwrap().is_none());
    assert!(dp.ct_get(&k2).unwrap().is_some(), "the live flow stays");
    assert_eq!(dp.ct_entries().len(), 2);

    // An idle flow a CPU of the datapath holds (FIN_CLAIMED, on either entry: it is replacing
    // the flow at this moment) is left to that CPU; once released, collected.
    let k3 = CtKey::v4(CLIENT, 7002, VIP, 53, PROTO_UDP);
    run(&mut dp, &udp(ip(CLIENT, VIP, 17), 7002, 53, b"c", true));
    let v3 = dp.ct_get(&k3).unwrap().unwrap();
    let r3 = k3.peer(&v3);
    for held in [k3, r3] {
        for key in [k3, r3] {
            let mut e = dp.ct_get(&key).unwrap().unwrap();
            e.last_ns = monotonic_ns() - 3_000_000_000;
            e.fin = if key == held { FIN_CLAIMED } else { 0 };
            dp.ct_insert(&key, &e).unwrap();
        }
        let snapshot = c.entries();
        assert_eq!(
            c.collect_from(&snapshot, monotonic_ns()).len(),
            0,
            "{held:?}"
        );
        assert_eq!(dp.ct_entries().len(), 4, "{held:?}");
    }
    let mut e = dp.ct_get(&r3).unwrap().unwrap();
    e.fin = 0;
    dp.ct_insert(&r3, &e).unwrap();
    let snapshot = c.entries();
    assert_eq!(c.collect_from(&snapshot, monotonic_ns()).len(), 2);
    assert_eq!(dp.ct_entries().len(), 2);

    // The agent's writes (adopting flows, claiming them from a peer: entries it read, maybe
    // while a CPU held one) never store a claim that nobody would release.
    let t = dp.sync_table().unwrap();
    let held = Ct {
        fin: FIN_CLAIMED | 1,
        ..v3
    };
    assert_eq!(t.update_batch(&[(k3, held)]).unwrap(), 1);
    assert_eq!(dp.ct_get(&k3).unwrap().unwrap().fin, 1);
    let mut t = dp.sync_table().unwrap();
    assert_eq!(t.insert_many(&[(r3, held)]), 1);
    assert_eq!(dp.ct_get(&r3).unwrap().unwrap().fin, 1);

    // Batched deletes (a peer's deletes and stale flows): a key not in the table is skipped,
    // not the end of the batch.
    let keys: Vec<CtKey> = (0..5u16)
        .map(|i| CtKey::v4(CLIENT, 50000 + i, VIP, 80, PROTO_TCP))
        .collect();
    let entries: Vec<(CtKey, Ct)> = keys.iter().map(|k| (*k, v3)).collect();
    assert_eq!(t.insert_many(&entries), 5);
    let missing = CtKey::v4(CLIENT, 49999, VIP, 80, PROTO_TCP);
    assert_eq!(
        t.delete_many(&[keys[0], missing, keys[1], keys[2], missing, keys[4]]),
        4
    );
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(dp.ct_get(k).unwrap().is_some(), i == 3, "key {i}");
    }
    assert_eq!(t.delete_many(&[]), 0);
    assert_eq!(t.delete_many(&[keys[3]]), 1);
    assert!(dp.ct_get(&keys[3]).unwrap().is_none());
}

/// The collector takes a flow whose two entries were both idle when it listed the table
/// (read and removed in one step) and puts back what turns out alive since the listing.
#[test]
fn the_collector_puts_back_what_came_alive_since_its_listing() {
    if !in_private_netns("the_collector_puts_back_what_came_alive_since_its_listing") {
        return;
    }
    let mut dp = datapath(0);
    let mut s = svc(16, 53, PROTO_UDP, 0, 0);
    s.timeout_s = 1;
    install(&mut dp, &s);
    let mut c = dp.collector().unwrap();
    // Listed idle, and still so: both entries go, as the listing had them, from either table.
    for confirmed in [true, false] {
        let (k, r) = idle_udp_flow(&mut dp, 7100, 53, confirmed);
        let snapshot = c.entries();
        let mut gone = c.collect_from(&snapshot, monotonic_ns());
        gone.sort_by_key(|(key, _)| *key == r);
        assert_eq!(gone.iter().map(|g| g.0).collect::<Vec<_>>(), vec![k, r]);
        assert!(dp.ct_entries().is_empty());
    }
    let k = CtKey::v4(CLIENT, 7100, VIP, 53, PROTO_UDP);

    // Listed idle, but the reply entry's key belongs to another flow by the time the collector
    // gets there (a NAT port taken over): that entry is put back as it is, and the listed
    // flow's original entry, an orphan now, goes.
    let (_, r) = idle_udp_flow(&mut dp, 7100, 53, true);
    let snapshot = c.entries();
    let mut other = dp.ct_get(&r).unwrap().unwrap();
    other.nat_dport = 7199u16.to_be(); // points at another client port
    other.last_ns = monotonic_ns();
    dp.ct_insert(&r, &other).unwrap();
    let gone = c.collect_from(&snapshot, monotonic_ns());
    assert_eq!(gone.iter().map(|g| g.0).collect::<Vec<_>>(), vec![k]);
    assert_eq!(
        dp.ct_entries(),
        vec![(r, other)],
        "the other flow's entry, untouched"
    );
    dp.ct_delete(&r).unwrap();

    // Listed idle, but its reply direction has been written since (fresh): a one-way flow
    // stays whole, both entries as they were.
    let (_, r) = idle_udp_flow(&mut dp, 7100, 53, true);
    let snapshot = c.entries();
    let mut fresh = dp.ct_get(&r).unwrap().unwrap();
    fresh.last_ns = monotonic_ns();
    dp.ct_insert(&r, &fresh).unwrap();
    let mut before = dp.ct_entries();
    assert_eq!(c.collect_from(&snapshot, monotonic_ns()).len(), 0);
    let mut after = dp.ct_entries();
    before.sort_by_key(|(key, _)| *key == r);
    after.sort_by_key(|(key, _)| *key == r);
    assert_eq!(after, before);

    // A least-connection rule's idle flow, taken whole, no longer counts for its endpoint.
    let mut lc = svc(17, 54, PROTO_UDP, 0, 4);
    lc.timeout_s = 1;
    install(&mut dp, &lc);
    let (k, r) = idle_udp_flow(&mut dp, 7200, 54, true);
    assert_eq!(dp.ep_conns(17, 0), 1);
    let snapshot = c.entries();
    let gone = c.collect_from(&snapshot, monotonic_ns());
    assert!(gone.iter().any(|g| g.0 == k) && gone.iter().any(|g| g.0 == r));
    assert_eq!(dp.ep_conns(17, 0), 0);
}

/// The collector's pass walks the tables a chunk at a time: a flow's two entries listed
/// chunks apart are still removed together (and live flows kept), in either table, and the
/// idle entries waiting for their flow's other entry stay within the bound set, however
/// many idle flows the table holds (past it they are decided one by one, with the same
/// result).
#[test]
fn the_collector_walks_the_table_a_chunk_at_a_time_in_bounded_memory() {
    if !in_private_netns("the_collector_walks_the_table_a_chunk_at_a_time_in_bounded_memory") {
        return;
    }
    let mut dp = Datapath::load(&DatapathConfig {
        max_services: 64,
        max_conntrack: 16384,
        ..Default::default()
    })
    .expect("load datapath");
    let now = monotonic_ns();
    let old = now.saturating_sub(60_000_000_000).max(1);
    // Flow i: a DNAT flow from its own client port, in ct_new (unconfirmed) when `new`.
    let flow = |i: u16, last_ns: u64, new: bool| -> [(CtKey, Ct); 2] {
        let k = CtKey::v4(CLIENT, 10000 + i, VIP, 80, PROTO_TCP);
        let base = Ct {
            svc_id: 1,
            timeout_s: 10,
            state: CtState::TimeWait.as_u8(),
            flags: CTF_LOCAL | if new { CTF_NEW } else { 0 },
            created_ns: last_ns,
            last_ns,
            ..Default::default()
        };
        let o = Ct {
            nat_saddr: addr_words(CLIENT.into()).0,
            nat_daddr: addr_words(EP1.into()).0,
            nat_sport: (10000 + i).to_be(),
            nat_dport: 8080u16.to_be(),
            ..base
        };
        [(k, o), Ct::reply_of(&k, &o)]
    };
    // 2,000 idle flows (300 of them unconfirmed, in ct_new) and 500 live ones.
    let fill = |dp: &mut Datapath| {
        for i in 0..2500u16 {
            let live = i % 5 == 0;
            for (k, v) in flow(i, if live { now } else { old }, i % 7 == 1 && i < 2100) {
                dp.ct_insert(&k, &v).unwrap();
            }
        }
    };
    let live: std::collections::BTreeSet<CtKey> = (0..2500u16)
        .filter(|i| i % 5 == 0)
        .flat_map(|i| flow(i, now, false).map(|e| e.0))
        .collect();
    fill(&mut dp);
    let mut c = dp.collector().unwrap();
    for pending_max in [65_536, 40] {
        c.set_pending_max(pending_max);
        let (mut chunks, mut biggest, mut removed) = (0, 0, Vec::new());
        let stats = c.pass(
            monotonic_ns(),
            64,
            |chunk| {
                chunks += 1;
                biggest = biggest.max(chunk.len());
            },
            |gone| removed.extend_from_slice(gone),
        );
        assert_eq!(stats.listed, 5000, "{stats:?}");
        assert_eq!(stats.removed, 4000, "{stats:?}");
        assert_eq!(removed.len(), 4000);
        assert!(removed.iter().all(|(k, _)| !live.contains(k)));
        let left: std::collections::BTreeSet<CtKey> =
            dp.ct_entries().into_iter().map(|e| e.0).collect();
        assert_eq!(left, live, "every live entry kept, every idle one gone");
        // The walk came in chunks of the size asked (a bucket is never split, so one may run
        // over by a few entries).
        assert!(
            chunks >= 5000 / 80 && biggest <= 80,
            "{chunks} chunks, {biggest} at most"
        );
        if pending_max == 40 {
            assert!(stats.spilled > 0, "{stats:?}");
            assert!(stats.peak_waiting <= 40, "{stats:?}");
        } else {
            assert_eq!(stats.spilled, 0, "{stats:?}");
            assert!(stats.peak_waiting > 40, "{stats:?}");
        }
        fill(&mut dp);
    }
}

/// A new UDP flow from CLIENT:`sport` to the VIP's `dport` (DNAT to EP1:8080), both its
/// entries made idle for 3 s: (its key, its reply key). `confirmed`: answered and asked again
/// first, so that it lives in the conntrack table (else unconfirmed, in the half-open table).
fn idle_udp_flow(dp: &mut Datapath, sport: u16, dport: u16, confirmed: bool) -> (CtKey, CtKey) {
    let q = udp(ip(CLIENT, VIP, 17), sport, dport, b"q", true);
    run(dp, &q);
    if confirmed {
        run(dp, &udp(ip(EP1, CLIENT, 17), 8080, sport, b"a", true));
        run(dp, &q);
    }
    let k = CtKey::v4(CLIENT, sport, VIP, dport, PROTO_UDP);
    let v = dp.ct_get(&k).unwrap().unwrap();
    assert_eq!(v.flags & CTF_NEW == 0, confirmed);
    let r = k.peer(&v);
    for key in [k, r] {
        let mut e = dp.ct_get(&key).unwrap().unwrap();
        e.last_ns = monotonic_ns() - 3_000_000_000;
        dp.ct_insert(&key, &e).unwrap();
    }
    (k, r)
}

fn spread(dp: &mut Datapath, n: u16, proto: u8, port: u16) -> Vec<Ipv4Addr> {
    (0..n)
        .map(|i| {
            let p = if proto == PROTO_TCP {
                tcp(ip(CLIENT, VIP, 6), 30000 + i, port, SYN, b"")
            } else {
                udp(ip(CLIENT, VIP, 17), 30000 + i, port, b"x", true)
            };
            dest_of(&run(dp, &p).1)
        })
        .collect()
}

#[test]
fn selection_algorithms() {
    if !in_private_netns("selection_algorithms") {
        return;
    }
    let mut dp = datapath(0);
    let three = vec![(EP1, 8080, 1), (EP2, 8080, 1), (EP3, 8080, 1)];
    let count = |v: &[Ipv4Addr], a: Ipv4Addr| v.iter().filter(|x| **x == a).count();

    // Round robin: exact spread.
    let mut rr = svc(10, 80, PROTO_TCP, 0, 0);
    rr.eps = three.clone();
    install(&mut dp, &rr);
    let d = spread(&mut dp, 30, PROTO_TCP, 80);
    assert_eq!(
        [count(&d, EP1), count(&d, EP2), count(&d, EP3)],
        [10, 10, 10]
    );

    // Weighted (priority): exact shares 3:1:0... with weights 3,1,1 over 50 flows.
    let mut w = svc(11, 81, PROTO_TCP, 0, 2);
    w.eps = vec![(EP1, 8080, 3), (EP2, 8080, 1), (EP3, 8080, 1)];
    install(&mut dp, &w);
    let d = spread(&mut dp, 50, PROTO_TCP, 81);
    assert_eq!(
        [count(&d, EP1), count(&d, EP2), count(&d, EP3)],
        [30, 10, 10]
    );

    // Hash: the same flow always lands on the same endpoint, and a second datapath (another
    // node) with the same endpoint set in another slot order agrees.
    let mut h = svc(12, 82, PROTO_UDP, 0, 1);
    h.eps = three.clone();
    install(&mut dp, &h);
    let first = spread(&mut dp, 40, PROTO_UDP, 82);
    assert!(count(&first, EP1) > 0 && count(&first, EP2) > 0 && count(&first, EP3) > 0);
    let mut other = datapath(1);
    let mut h2 = svc(3, 82, PROTO_UDP, 0, 1);
    h2.eps = vec![three[2], three[0], three[1]];
    install(&mut other, &h2);
    let again = spread(&mut other, 40, PROTO_UDP, 82);
    assert_eq!(first, again);

    // Persist: one client stays on one endpoint across new flows.
    let mut p = svc(13, 83, PROTO_TCP, 0, 3);
    p.eps = three.clone();
    install(&mut dp, &p);
    let d = spread(&mut dp, 10, PROTO_TCP, 83);
    assert!(d.iter().all(|a| *a == d[0]));

    // Least connections: open flows spread over the three, and a closed flow frees its slot.
    let mut lc = svc(14, 84, PROTO_TCP, 0, 4);
    lc.eps = three;
    install(&mut dp, &lc);
    let d = spread(&mut dp, 3, PROTO_TCP, 84);
    assert_eq!([count(&d, EP1), count(&d, EP2), count(&d, EP3)], [1, 1, 1]);
    assert_eq!(dp.ep_conns(14, 0), 1);
    // Close the flow on EP2 (client port 30001) with a RST from the client.
    let (_, out) = run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 30001, 84, RST, b""));
    let closed = dest_of(&out);
    let idx = [EP1, EP2, EP3].iter().position(|a| *a == closed).unwrap() as u32;
    assert_eq!(dp.ep_conns(14, idx), 0);
    let (_, out) = run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 31000, 84, SYN, b""));
    assert_eq!(dest_of(&out), closed);
}

#[test]
fn endpoint_without_target_port_keeps_the_port_and_no_endpoint_drops() {
    if !in_private_netns("endpoint_without_target_port_keeps_the_port_and_no_endpoint_drops") {
        return;
    }
    let mut dp = datapath(0);
    let mut s = svc(20, 443, PROTO_TCP, 0, 0);
    s.eps = vec![(EP1, 0, 1)];
    install(&mut dp, &s);
    let (_, out) = run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, 443, SYN, b""));
    assert_eq!(out, tcp(ip(CLIENT, EP1, 6), 40000, 443, SYN, b""));

    let mut e = svc(21, 444, PROTO_TCP, 0, 0);
    e.eps = vec![];
    install(&mut dp, &e);
    let (rc, _) = run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, 444, SYN, b""));
    assert_eq!(rc, TC_ACT_SHOT);
    assert_eq!(dp.counters()[Counter::DropNoEndpoint as usize], 1);
}

/// HA: a backend's mid-stream segment to the VIP for a flow this node does not know (the
/// full-NAT reply side after a takeover) is dropped and counted, never handed to the stack,
/// which would reset it. A connection-opening SYN and segments for a local socket still pass.
#[test]
fn unknown_mid_stream_tcp_to_a_vip_is_dropped_not_reset() {
    if !in_private_netns("unknown_mid_stream_tcp_to_a_vip_is_dropped_not_reset") {
        return;
    }
    let mut dp = datapath(0);
    install(&mut dp, &svc(1, 80, PROTO_TCP, 2, 1));
    let no_flow = |dp: &Datapath| dp.counters()[Counter::DropNoFlow as usize];
    for flags in [ACK, ACK | PSH, FIN | ACK, RST, SYN | ACK] {
        let (rc, _) = run(&mut dp, &tcp(ip(EP1, VIP, 6), 8080, 41234, flags, b"x"));
        assert_eq!(rc, TC_ACT_SHOT, "flags {flags:#x}");
    }
    assert_eq!(no_flow(&dp), 5);
    // A SYN to a port with no service: the stack may refuse it (nothing is established).
    let syn = tcp(ip(CLIENT, VIP, 6), 40000, 81, SYN, b"");
    assert_eq!(run(&mut dp, &syn), (TC_ACT_OK, syn.clone()));
    // A local socket owns the segment: it passes.
    let l = std::net::TcpListener::bind("0.0.0.0:5555").unwrap();
    let ack = tcp(ip(CLIENT, VIP, 6), 40001, 5555, ACK, b"");
    assert_eq!(run(&mut dp, &ack), (TC_ACT_OK, ack.clone()));
    drop(l);
    // Not a VIP: untouched.
    let other = tcp(ip(EP1, LB_IF, 6), 8080, 41234, ACK, b"");
    assert_eq!(run(&mut dp, &other), (TC_ACT_OK, other.clone()));
    assert_eq!(no_flow(&dp), 5);
    assert!(dp.ct_entries().is_empty());
}

/// HA: an entry synced from a peer is used however old its timestamp (its lifetime is its
/// origin's), and the collector leaves it alone.
#[test]
fn synced_entries_never_idle_locally() {
    if !in_private_netns("synced_entries_never_idle_locally") {
        return;
    }
    let mut dp = datapath(1);
    let mut s = svc(3, 53, PROTO_UDP, 2, 1);
    s.eps = vec![(EP1, 8080, 1), (EP2, 8080, 1), (EP3, 8080, 1)];
    s.timeout_s = 1;
    install(&mut dp, &s);
    // Node 0's flow, as its sync stream installs it: translation to EP3 from VIP:7777.
    let k = CtKey::v4(CLIENT, 5353, VIP, 53, PROTO_UDP);
    let o = Ct {
        nat_saddr: addr_words(VIP.into()).0,
        nat_daddr: addr_words(EP3.into()).0,
        nat_sport: 7777u16.to_be(),
        nat_dport: 8080u16.to_be(),
        svc_id: 3,
        timeout_s: 1,
        ep_idx: 2,
        origin: 0,
        dir: 0,
        state: CtState::Established.as_u8(),
        flags: CTF_SYNCED,
        mode: 2,
        last_ns: 1,
        created_ns: 1,
        ..Default::default()
    };
    let r = Ct {
        nat_saddr: addr_words(VIP.into()).0,
        nat_daddr: addr_words(CLIENT.into()).0,
        nat_sport: 53u16.to_be(),
        nat_dport: 5353u16.to_be(),
        dir: 1,
        ..o
    };
    dp.ct_insert(&k, &o).unwrap();
    dp.ct_insert(&k.peer(&o), &r).unwrap();
    assert_eq!(
        dp.ct_collect(monotonic_ns()),
        0,
        "synced entries are not collected"
    );
    let (_, out) = run(&mut dp, &udp(ip(CLIENT, VIP, 17), 5353, 53, b"q", true));
    assert_eq!(out, udp(ip(VIP, EP3, 17), 7777, 8080, b"q", true));
    let (_, back) = run(&mut dp, &udp(ip(EP3, VIP, 17), 8080, 7777, b"a", true));
    assert_eq!(back, udp(ip(VIP, CLIENT, 17), 53, 5353, b"a", true));
    assert_eq!(dp.ct_entries().len(), 2, "no new flow was created");
}

fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one CPU; applies to this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0
        );
    }
}

/// The conntrack table never evicts, whichever CPU writes: a writer pinned to one CPU fills
/// it to the brim (no per-CPU share, unlike an LRU with per-CPU lists), and a write beyond
/// its size is refused without pushing anything out.
#[test]
fn the_conntrack_table_never_evicts_whatever_cpu_writes() {
    if !in_private_netns("the_conntrack_table_never_evicts_whatever_cpu_writes") {
        return;
    }
    let dp = datapath(0);
    let cap = dp.capacity().conntrack as usize;
    let entries: Vec<(CtKey, Ct)> = (0..cap + 16)
        .map(|i| {
            let k = CtKey::v4(
                Ipv4Addr::from(0x0a00_0000 + (i as u32 >> 15)),
                1024 + (i & 0x7fff) as u16,
                VIP,
                80,
                PROTO_TCP,
            );
            (k, Ct::default())
        })
        .collect();
    let mut t = dp.sync_table().unwrap();
    pin_to(0);
    assert_eq!(
        t.insert_many(&entries[..cap]),
        cap,
        "one CPU fills the whole table"
    );
    assert_eq!(
        t.insert_many(&entries[cap..]),
        0,
        "beyond its size: refused"
    );
    let kept = dp.ct_entries();
    assert_eq!(kept.len(), cap, "nothing evicted");
    assert!(
        kept.iter()
            .all(|(k, _)| entries[..cap].iter().any(|(e, _)| e == k))
    );
}

fn arp_request(target: Ipv4Addr) -> Vec<u8> {
    let mut p = vec![0xffu8; 6];
    p.extend([2, 0, 0, 0, 0, 9, 0x08, 0x06]);
    p.extend([0, 1, 0x08, 0, 6, 4, 0, 1]);
    p.extend([2, 0, 0, 0, 0, 9]);
    p.extend(CLIENT.octets());
    p.extend([0u8; 6]);
    p.extend(target.octets());
    p
}

/// L2 HA: while the node is a standby (`HA_L2_STANDBY`), ARP requests for a VIP are dropped
/// (and counted) so that only the MASTER answers; other ARP is untouched, and so is all ARP
/// once the flag is cleared.
#[test]
fn a_standby_does_not_answer_arp_for_vips() {
    if !in_private_netns("a_standby_does_not_answer_arp_for_vips") {
        return;
    }
    let mut dp = datapath(1);
    install(&mut dp, &svc(1, 80, PROTO_TCP, 2, 1));
    let vip = arp_request(VIP);
    let other = arp_request(LB_IF);
    assert_eq!(run(&mut dp, &vip), (TC_ACT_OK, vip.clone()));
    dp.set_ha_flags(HA_L2_STANDBY).unwrap();
    assert_eq!(dp.ha_flags(), HA_L2_STANDBY);
    assert_eq!(run(&mut dp, &vip).0, TC_ACT_SHOT);
    assert_eq!(run(&mut dp, &other), (TC_ACT_OK, other.clone()));
    let mut reply = vip.clone();
    reply[21] = 2; // an ARP reply (op 2) is not ours to stop
    assert_eq!(run(&mut dp, &reply), (TC_ACT_OK, reply.clone()));
    assert_eq!(dp.counters()[Counter::ArpSuppressed as usize], 1);
    dp.set_ha_flags(0).unwrap();
    assert_eq!(run(&mut dp, &vip), (TC_ACT_OK, vip.clone()));
}

/// Runs `args` (an `ip` command) in this test thread's namespace; panics with its output.
fn ip_cmd(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "ip {args:?}: {out:?}");
}

fn set_forwarding(iface: &str, on: bool) {
    std::fs::write(
        format!("/proc/sys/net/ipv4/conf/{iface}/forwarding"),
        if on { "1" } else { "0" },
    )
    .unwrap();
}

/// Gives this test's namespace a client-side interface `flb-in` (198.51.100.1/24, where
/// packets arrive, forwarding as given) and an endpoint-side one `flb-out` (10.10.10.1/24,
/// the endpoints on link), a veth pair, both up. Returns `flb-in`'s index.
fn routed(forwarding: bool) -> u32 {
    ip_cmd(&[
        "link", "add", "flb-in", "type", "veth", "peer", "name", "flb-out",
    ]);
    ip_cmd(&["addr", "add", "198.51.100.1/24", "dev", "flb-in"]);
    ip_cmd(&["addr", "add", "10.10.10.1/24", "dev", "flb-out"]);
    ip_cmd(&["link", "set", "flb-in", "up"]);
    ip_cmd(&["link", "set", "flb-out", "up"]);
    set_forwarding("flb-in", forwarding);
    nix::net::if_::if_nametoindex("flb-in").unwrap()
}

/// A host as it comes forwards nothing: the FIB answers "forwarding disabled" for a packet
/// the datapath rewrote, the stack would drop it. The datapath counts each fallback by its
/// reason and charges only forwarded packets to the service and the endpoint.
#[test]
fn fallbacks_to_the_stack_are_counted_by_reason() {
    if !in_private_netns("fallbacks_to_the_stack_are_counted_by_reason") {
        return;
    }
    const TC_ACT_REDIRECT: u32 = 7;
    let ifx = routed(false);
    let mut dp = datapath(0);
    install(&mut dp, &svc(1, 80, PROTO_TCP, 0, 0));
    let c = |dp: &Datapath, k: Counter| dp.counters()[k as usize];

    let syn = tcp(ip(CLIENT, VIP, 6), 40000, 80, SYN, b"");
    let (rc, out) = dp.test_run_on(&syn, ifx).unwrap();
    assert_eq!(rc, TC_ACT_OK, "handed to the stack");
    assert_eq!(out, tcp(ip(CLIENT, EP1, 6), 40000, 8080, SYN, b""));
    assert_eq!(c(&dp, Counter::FallbackFwdDisabled), 1);
    assert_eq!(c(&dp, Counter::Redirected), 0);
    assert_eq!(dp.service_stats(1).packets, 0);
    assert_eq!(dp.endpoint_stats(1, 0).packets, 0);

    // Forwarding on: the same flow is forwarded (the endpoint is on link, its neighbour not
    // yet resolved: redirect through the kernel's neighbour code) and counted as served.
    set_forwarding("flb-in", true);
    let data = tcp(ip(CLIENT, VIP, 6), 40000, 80, ACK, b"hello");
    let (rc, out) = dp.test_run_on(&data, ifx).unwrap();
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(out[22], 63, "TTL decremented like a router");
    assert_eq!(c(&dp, Counter::Redirected), 1);
    assert_eq!(c(&dp, Counter::FallbackFwdDisabled), 1);
    let st = dp.endpoint_stats(1, 0);
    assert_eq!((st.packets, st.bytes), (1, data.len() as u64));
    assert_eq!(dp.service_stats(1), st);
    // The batched reads (metrics) agree with the one-entry reads, in the order asked.
    let (svcs, eps) = dp.stats_many(&[1, 0, 1], &[(1, 1), (1, 0)]).unwrap();
    assert_eq!(svcs, vec![st, dp.service_stats(0), st]);
    assert_eq!(eps, vec![dp.endpoint_stats(1, 1), st]);

    // A TTL that would expire is left to the stack (it sends time-exceeded).
    let mut h = ip(CLIENT, VIP, 6);
    h.ttl = 1;
    let (rc, _) = dp.test_run_on(&tcp(h, 40000, 80, ACK, b"x"), ifx).unwrap();
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(c(&dp, Counter::FallbackTtl), 1);

    // An endpoint this node has no route to.
    let mut lost = svc(2, 81, PROTO_TCP, 0, 0);
    lost.eps = vec![(Ipv4Addr::new(192, 0, 2, 99), 8080, 1)];
    install(&mut dp, &lost);
    let (rc, _) = dp
        .test_run_on(&tcp(ip(CLIENT, VIP, 6), 40001, 81, SYN, b""), ifx)
        .unwrap();
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(c(&dp, Counter::FallbackNoRoute), 1);
    // ... or whose route is unreachable.
    ip_cmd(&["route", "add", "unreachable", "192.0.2.0/24"]);
    let (rc, _) = dp
        .test_run_on(&tcp(ip(CLIENT, VIP, 6), 40002, 81, SYN, b""), ifx)
        .unwrap();
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(c(&dp, Counter::FallbackUnreachable), 1);
    assert_eq!(dp.service_stats(2).packets, 0);
    assert_eq!(c(&dp, Counter::Redirected), 1);
}

/// The FIB's forwarding answers are cached per CPU for at most 50 ms, per question (ingress
/// interface, addresses, protocol, ports): a flow's next packets are forwarded from the cached
/// answer, byte for byte as from the lookup; a changed neighbour reaches them within that
/// time; a packet longer than any the answer was given for asks the FIB again, so a smaller
/// MTU on the way is honoured at once.
#[test]
fn fib_answers_are_cached_briefly_per_question() {
    if !in_private_netns("fib_answers_are_cached_briefly_per_question") {
        return;
    }
    // The cache is per CPU: a thread moved to the other CPU between two runs would meet that
    // CPU's slot, not the answer it just cached.
    pin_to(0);
    const TC_ACT_REDIRECT: u32 = 7;
    let ifx = routed(true);
    let (m1, m2) = ([2u8, 0, 0, 0, 0, 0x11], [2u8, 0, 0, 0, 0, 0x22]);
    let mac = |m: &[u8; 6]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    ip_cmd(&[
        "neigh",
        "replace",
        "10.10.10.11",
        "lladdr",
        &mac(&m1),
        "dev",
        "flb-out",
        "nud",
        "permanent",
    ]);
    let mut dp = datapath(0);
    install(&mut dp, &svc(1, 80, PROTO_TCP, 0, 0));
    let c = |dp: &Datapath, k: Counter| dp.counters()[k as usize];

    let (rc, _) = dp
        .test_run_on(&tcp(ip(CLIENT, VIP, 6), 40000, 80, SYN, b""), ifx)
        .unwrap();
    assert_eq!(rc, TC_ACT_REDIRECT);
    let data = tcp_seq(ip(CLIENT, VIP, 6), 40000, 80, 1, PSH | ACK, &[7u8; 100]);
    // Asked (longer than the SYN the answer was given for), then answered from the cache.
    let (rc, asked) = dp.test_run_on(&data, ifx).unwrap();
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(&asked[..6], &m1, "to the neighbour's MAC");
    let t = std::time::Instant::now();
    let (rc, cached) = dp.test_run_on(&data, ifx).unwrap();
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(
        cached, asked,
        "the cached answer forwards byte for byte alike"
    );

    // The neighbour changes: the cache answers for at most 50 ms more.
    ip_cmd(&[
        "neigh",
        "replace",
        "10.10.10.11",
        "lladdr",
        &mac(&m2),
        "dev",
        "flb-out",
        "nud",
        "permanent",
    ]);
    let (_, soon) = dp.test_run_on(&data, ifx).unwrap();
    let elapsed = t.elapsed();
    if elapsed < std::time::Duration::from_millis(40) {
        assert_eq!(&soon[..6], &m1, "answered from the cache {elapsed:?} after");
    } else {
        println!("the neighbour change took {elapsed:?}: the cache may have expired");
    }
    std::thread::sleep(std::time::Duration::from_millis(60));
    let (rc, later) = dp.test_run_on(&data, ifx).unwrap();
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(
        &later[..6],
        &m2,
        "a changed neighbour reaches the flow within 50 ms"
    );
    assert_eq!(c(&dp, Counter::FallbackFragNeeded), 0);

    // What the agent does when the kernel reports the change (a new FIB generation): the
    // next packet asks again, at once; until then the cache answers.
    let mut inv = dp.fib_invalidator().unwrap();
    let start = inv.current().unwrap();
    for (from, to) in [(&m2, &m1), (&m1, &m2)] {
        // A new generation: asked again, the answer cached from now (t).
        inv.bump().unwrap();
        let t = std::time::Instant::now();
        let (_, asked) = dp.test_run_on(&data, ifx).unwrap();
        assert_eq!(&asked[..6], from);
        ip_cmd(&[
            "neigh",
            "replace",
            "10.10.10.11",
            "lladdr",
            &mac(to),
            "dev",
            "flb-out",
            "nud",
            "permanent",
        ]);
        let (_, before) = dp.test_run_on(&data, ifx).unwrap();
        let elapsed = t.elapsed();
        if elapsed < std::time::Duration::from_millis(40) {
            assert_eq!(&before[..6], from, "not invalidated yet: the cache answers");
        } else {
            println!("the neighbour change took {elapsed:?}: the cache may have expired");
        }
        inv.bump().unwrap();
        let (rc, after) = dp.test_run_on(&data, ifx).unwrap();
        assert_eq!(rc, TC_ACT_REDIRECT);
        assert_eq!(&after[..6], to, "a new generation: asked again at once");
    }
    assert_eq!(inv.current().unwrap(), start.wrapping_add(4));

    // A smaller MTU on the way: a packet longer than any the cached answer was given for asks
    // again and is left to the stack (which sends the ICMP error); shorter ones still go.
    ip_cmd(&["link", "set", "flb-out", "mtu", "600"]);
    let big = tcp_seq(ip(CLIENT, VIP, 6), 40000, 80, 101, PSH | ACK, &[7u8; 1000]);
    let (rc, _) = dp.test_run_on(&big, ifx).unwrap();
    assert_eq!(rc, TC_ACT_OK, "not forwarded past the MTU");
    assert_eq!(c(&dp, Counter::FallbackFragNeeded), 1);
    let (rc, short) = dp.test_run_on(&data, ifx).unwrap();
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(&short[..6], &m2);
    // Another question (another client port): its own answer.
    let (rc, other) = dp
        .test_run_on(&tcp(ip(CLIENT, VIP, 6), 40001, 80, SYN, b""), ifx)
        .unwrap();
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(&other[..6], &m2);
}

/// Where the agent has proven that no answer of the FIB depends on the ports (no policy rule
/// on ports, multipath hashing addresses only), a family's questions are cached by addresses:
/// a new connection between the same two addresses is answered from the first one's lookup.
/// Per family, while the agent's lease runs, and undone with the flag (the next connection asks
/// again, and from then on each port pair is a question of its own).
#[test]
fn fib_answers_are_keyed_by_addresses_where_ports_cannot_matter() {
    if !in_private_netns("fib_answers_are_keyed_by_addresses_where_ports_cannot_matter") {
        return;
    }
    pin_to(0); // the cache is per CPU
    const TC_ACT_REDIRECT: u32 = 7;
    let ifx = routed(true);
    let neigh = |m: u8| {
        let mac = format!("02:00:00:00:00:{m:02x}");
        ip_cmd(&[
            "neigh",
            "replace",
            "10.10.10.11",
            "lladdr",
            &mac,
            "dev",
            "flb-out",
            "nud",
            "permanent",
        ]);
        [2u8, 0, 0, 0, 0, m]
    };
    let m1 = neigh(0x11);
    let mut dp = datapath(0);
    install(&mut dp, &svc(1, 80, PROTO_TCP, 0, 0));
    let mut inv = dp.fib_invalidator().unwrap();
    let mut port = 40000u16;
    let mut syn = |dp: &mut Datapath| {
        port += 1;
        let (rc, out) = dp
            .test_run_on(&tcp(ip(CLIENT, VIP, 6), port, 80, SYN, b""), ifx)
            .unwrap();
        assert_eq!(rc, TC_ACT_REDIRECT, "SYN from port {port}");
        [out[0], out[1], out[2], out[3], out[4], out[5]]
    };
    // (flags, the agent's lease still running, whether a new connection meets the answer
    // cached for the last one.)
    for (flags, leased, by_addresses) in [
        (FIB_PORTS_FREE_V4, true, true),
        (FIB_PORTS_FREE_V6, true, false),
        (FIB_PORTS_FREE_V4 | FIB_PORTS_FREE_V6, true, true),
        // The agent stopped renewing (it no longer hears of new rules): ports again.
        (FIB_PORTS_FREE_V4, false, false),
        (0, true, false),
    ] {
        // A slow `ip` (the cache answers for 50 ms) is tried again, up to 5 times.
        let (asked, now, next) = (0..5)
            .find_map(|_| {
                // A new generation: the first connection asks.
                let until = if leased {
                    monotonic_ns() + 10_000_000_000
                } else {
                    monotonic_ns().saturating_sub(1_000_000_000) // (the datapath reads a coarse clock)
                };
                inv.set_ports_free(flags, until).unwrap();
                let asked = syn(&mut dp);
                let t = std::time::Instant::now();
                let now = neigh(if asked == m1 { 0x22 } else { 0x11 });
                // The neighbour changed without a new generation: only a new question sees it.
                let next = syn(&mut dp);
                let elapsed = t.elapsed();
                if elapsed >= std::time::Duration::from_millis(40) {
                    println!("the neighbour change took {elapsed:?}: tried again");
                    return None;
                }
                Some((asked, now, next))
            })
            .expect("a neighbour change within 40 ms in 5 tries");
        assert_eq!(inv.ports_free(), flags);
        if by_addresses {
            assert_eq!(
                next, asked,
                "flags {flags}: another port, the same question"
            );
        } else {
            assert_eq!(
                next, now,
                "flags {flags}, leased {leased}: another port, another question"
            );
        }
    }
}

#[test]
fn only_allowed_sources_open_flows_per_rule() {
    if !in_private_netns("only_allowed_sources_open_flows_per_rule") {
        return;
    }
    let mut dp = datapath(0);
    // Rule 1 (DNAT, TCP 80): 198.51.100.0/28 and 192.0.2.7/32 among 200 unrelated prefixes.
    let mut s1 = svc(1, 80, PROTO_TCP, 0, 0);
    s1.sources = (0..200u32)
        .map(|i| (Ipv4Addr::from(0x0a00_0000 | (i << 8)), 24))
        .collect();
    s1.sources.push((Ipv4Addr::new(198, 51, 100, 0), 28));
    s1.sources.push((Ipv4Addr::new(192, 0, 2, 7), 32));
    install(&mut dp, &s1);
    // Rule 2 (full NAT, UDP 53) allows only 192.0.2.0/24; rule 3 (TCP 81) everyone.
    let mut s2 = svc(2, 53, PROTO_UDP, 2, 0);
    s2.sources = vec![(Ipv4Addr::new(192, 0, 2, 0), 24)];
    install(&mut dp, &s2);
    install(&mut dp, &svc(3, 81, PROTO_TCP, 0, 0));
    // Many rules: 60 more, each allowing a /32 of its own; the prefixes of one rule never
    // let a source into another.
    for id in 4..64u32 {
        let mut s = svc(id, 1000 + id as u16, PROTO_TCP, 0, 0);
        s.sources = vec![(Ipv4Addr::new(100, 64, 0, id as u8), 32)];
        install(&mut dp, &s);
    }

    let syn = |src: Ipv4Addr, port: u16| tcp(ip(src, VIP, 6), 40000, port, SYN, b"");
    let allowed = [
        CLIENT,                          // 198.51.100.2 in /28
        Ipv4Addr::new(198, 51, 100, 15), // last of the /28
        Ipv4Addr::new(192, 0, 2, 7),
        Ipv4Addr::new(10, 0, 199, 1), // one of the 200 /24s
    ];
    for a in allowed {
        let (rc, out) = run(&mut dp, &syn(a, 80));
        assert_eq!(rc, TC_ACT_OK, "{a} is allowed on rule 1");
        assert_eq!(dest_of(&out), EP1, "{a} is balanced to the endpoint");
    }
    let refused = [
        Ipv4Addr::new(198, 51, 100, 16), // just past the /28
        Ipv4Addr::new(192, 0, 2, 8),
        Ipv4Addr::new(10, 0, 200, 1), // past the 200 /24s
        Ipv4Addr::new(100, 64, 0, 5), // rule 5's source, not rule 1's
    ];
    for a in refused {
        let (rc, _) = run(&mut dp, &syn(a, 80));
        assert_eq!(rc, TC_ACT_SHOT, "{a} is not allowed on rule 1");
        assert!(
            dp.ct_get(&CtKey::v4(a, 40000, VIP, 80, PROTO_TCP))
                .unwrap()
                .is_none(),
            "{a}: no flow"
        );
    }
    // A refused source's mid-stream segment does not get picked up either (DNAT).
    let (rc, _) = run(
        &mut dp,
        &tcp(
            ip(Ipv4Addr::new(192, 0, 2, 8), VIP, 6),
            40001,
            80,
            ACK,
            b"x",
        ),
    );
    assert_eq!(rc, TC_ACT_SHOT);
    assert_eq!(dp.source_drops(1), refused.len() as u64 + 1);

    // Rule 2: 192.0.2.0/24 only, through full NAT.
    let q = |src: Ipv4Addr| udp(ip(src, VIP, 17), 5353, 53, b"q", true);
    let (rc, out) = run(&mut dp, &q(Ipv4Addr::new(192, 0, 2, 200)));
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(dest_of(&out), EP1);
    let (rc, _) = run(&mut dp, &q(CLIENT));
    assert_eq!(rc, TC_ACT_SHOT, "rule 1's sources are not rule 2's");
    assert_eq!(dp.source_drops(2), 1);

    // Rule 3 lists nothing: everyone.
    let (rc, out) = run(&mut dp, &syn(Ipv4Addr::new(203, 0, 113, 99), 81));
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(dest_of(&out), EP1);
    assert_eq!(dp.source_drops(3), 0);

    // Each of the 60 rules: its own /32 passes, its neighbour's does not.
    for id in 4..64u32 {
        let port = 1000 + id as u16;
        let own = Ipv4Addr::new(100, 64, 0, id as u8);
        let other = Ipv4Addr::new(100, 64, 0, id as u8 + 1);
        assert_eq!(run(&mut dp, &syn(own, port)).0, TC_ACT_OK, "rule {id}");
        assert_eq!(run(&mut dp, &syn(other, port)).0, TC_ACT_SHOT, "rule {id}");
        assert_eq!(dp.source_drops(id), 1);
    }
    assert_eq!(
        dp.counter(Counter::DropSource),
        refused.len() as u64 + 1 + 1 + 60
    );

    // An established flow keeps working: the check is on a flow's first packet only.
    let (rc, _) = run(&mut dp, &tcp(ip(CLIENT, VIP, 6), 40000, 80, ACK, b"data"));
    assert_eq!(rc, TC_ACT_OK);
    // Removing a prefix refuses new flows from it at once (the agent also removes the
    // flows already open from it).
    dp.delete_source(1, Ipv4Addr::new(198, 51, 100, 0).into(), 28)
        .unwrap();
    let (rc, _) = run(&mut dp, &syn(Ipv4Addr::new(198, 51, 100, 9), 80));
    assert_eq!(rc, TC_ACT_SHOT);
    assert_eq!(dp.source_entries().iter().filter(|e| e.0 == 1).count(), 201);
}
