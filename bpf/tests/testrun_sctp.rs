//! SCTP through the datapath with BPF_PROG_TEST_RUN: associations (INIT, INIT ACK, COOKIE
//! ECHO, COOKIE ACK, DATA, SHUTDOWN, SHUTDOWN ACK, SHUTDOWN COMPLETE, ABORT) through DNAT,
//! one-arm and full NAT, IPv4 and IPv6. Packets are built byte by byte with their CRC32c
//! computed from scratch; every rewritten packet's CRC32c is verified the same way (the
//! datapath updates it incrementally), as is the exact packet expected.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

mod common;

use common::*;
use ferrolb_bpf::maps::*;
use ferrolb_bpf::{Datapath, DatapathConfig, lut};

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const EP: Ipv4Addr = Ipv4Addr::new(10, 10, 10, 11);
const LB_IF: Ipv4Addr = Ipv4Addr::new(10, 10, 10, 2);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 2);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xaaaa, 0, 0, 0, 0, 0x10);
const EP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 0x11);
const LB_IF6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 2);

// Chunk types.
const DATA: u8 = 0;
const INIT: u8 = 1;
const INIT_ACK: u8 = 2;
const SACK: u8 = 3;
const ABORT: u8 = 6;
const SHUTDOWN: u8 = 7;
const SHUTDOWN_ACK: u8 = 8;
const COOKIE_ECHO: u8 = 10;
const COOKIE_ACK: u8 = 11;
const SHUTDOWN_COMPLETE: u8 = 14;

/// The client's and the endpoint's initiate tags.
const TAG_C: u32 = 0x1111_2222;
const TAG_E: u32 = 0x3333_4444;

/// CRC32c (Castagnoli), bit by bit, as RFC 9260 appendix A defines it.
fn crc32c(b: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for x in b {
        c ^= u32::from(*x);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82f6_3b78
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// A chunk, padded to 4 bytes.
fn chunk(ty: u8, flags: u8, value: &[u8]) -> Vec<u8> {
    let mut c = vec![ty, flags];
    c.extend(((4 + value.len()) as u16).to_be_bytes());
    c.extend_from_slice(value);
    while c.len() % 4 != 0 {
        c.push(0);
    }
    c
}

/// INIT / INIT ACK: initiate tag, a_rwnd, streams, initial TSN (then, for INIT ACK, a cookie).
fn init(ty: u8, tag: u32) -> Vec<u8> {
    let mut v = tag.to_be_bytes().to_vec();
    v.extend(65535u32.to_be_bytes());
    v.extend(10u16.to_be_bytes());
    v.extend(10u16.to_be_bytes());
    v.extend(1u32.to_be_bytes());
    if ty == INIT_ACK {
        // State cookie parameter (type 7).
        v.extend(7u16.to_be_bytes());
        v.extend(12u16.to_be_bytes());
        v.extend(b"cookie!!");
    }
    chunk(ty, 0, &v)
}

fn data(payload: &[u8]) -> Vec<u8> {
    let mut v = 1u32.to_be_bytes().to_vec(); // TSN
    v.extend(0u16.to_be_bytes()); // stream
    v.extend(0u16.to_be_bytes()); // sequence
    v.extend(60u32.to_be_bytes()); // PPID (NGAP)
    v.extend_from_slice(payload);
    chunk(DATA, 0x03, &v)
}

/// An SCTP packet (common header, CRC32c over it) in an IPv4 or IPv6 frame.
fn sctp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, vtag: u32, chunks: &[u8]) -> Vec<u8> {
    let mut s = Vec::with_capacity(12 + chunks.len());
    s.extend(sport.to_be_bytes());
    s.extend(dport.to_be_bytes());
    s.extend(vtag.to_be_bytes());
    s.extend([0u8; 4]);
    s.extend_from_slice(chunks);
    let c = crc32c(&s);
    s[8..12].copy_from_slice(&c.to_le_bytes());
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    match (src, dst) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            f.extend([0x08, 0x00]);
            let mut h = vec![0u8; 20];
            h[0] = 0x45;
            h[2..4].copy_from_slice(&((20 + s.len()) as u16).to_be_bytes());
            h[8] = 64;
            h[9] = 132;
            h[12..16].copy_from_slice(&a.octets());
            h[16..20].copy_from_slice(&b.octets());
            let c = csum(&h, 0);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend(h);
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            f.extend([0x86, 0xdd]);
            let mut h = vec![0x60, 0, 0, 0];
            h.extend((s.len() as u16).to_be_bytes());
            h.extend([132, 64]);
            h.extend(a.octets());
            h.extend(b.octets());
            f.extend(h);
        }
        _ => panic!("mixed families"),
    }
    f.extend(s);
    f
}

/// The offset of the SCTP header in a frame.
fn l4(p: &[u8]) -> usize {
    if p[12] == 0x86 { 14 + 40 } else { 14 + 20 }
}

/// The frame's CRC32c verifies.
fn crc_ok(p: &[u8]) -> bool {
    let mut s = p[l4(p)..].to_vec();
    let got = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
    s[8..12].fill(0);
    crc32c(&s) == got
}

fn ports(p: &[u8]) -> (u16, u16) {
    let o = l4(p);
    (
        u16::from_be_bytes([p[o], p[o + 1]]),
        u16::from_be_bytes([p[o + 2], p[o + 3]]),
    )
}

fn datapath() -> Datapath {
    Datapath::load(&DatapathConfig {
        max_services: 16,
        max_conntrack: 4096,
        ..Default::default()
    })
    .expect("load datapath")
}

/// An SCTP service on the VIP's port 38412 (NGAP) to one endpoint on 9000.
fn install(dp: &mut Datapath, id: u32, vip: IpAddr, ep: IpAddr, snat: IpAddr, mode: u8) {
    let mut be = Backends {
        count: 1,
        ..Default::default()
    };
    be.ep[0] = Ep {
        addr: addr_words(ep).0,
        snat_addr: addr_words(snat).0,
        port: 9000,
        weight: 1,
        active: 1,
        pad: [0; 3],
    };
    let table = lut::round_robin(&[lut::LutEndpoint {
        slot: 0,
        identity: vec![1],
        weight: 1,
    }]);
    be.lut_len = table.len() as u32;
    be.lut[..table.len()].copy_from_slice(&table);
    dp.set_backends(id * 2, &be).unwrap();
    dp.reset_service_state(id).unwrap();
    let (addr, family) = addr_words(vip);
    dp.set_service(
        &SvcKey {
            addr,
            port: 38412u16.to_be(),
            proto: PROTO_SCTP,
            family,
        },
        &Svc {
            id,
            be_slot: id * 2,
            timeout_s: 240,
            port_base: 38412,
            mode,
            sel: 0,
            flags: 0,
        },
    )
    .unwrap();
    dp.set_ranges(
        &RangeKey {
            addr,
            proto: PROTO_SCTP,
            family,
            pad: 0,
        },
        &Ranges::default(),
    )
    .unwrap();
}

struct Assoc {
    client: IpAddr,
    vip: IpAddr,
    ep: IpAddr,
    cport: u16,
}

impl Assoc {
    fn key(&self) -> CtKey {
        CtKey::new(self.client, self.cport, self.vip, 38412, PROTO_SCTP)
    }
}

/// Runs a packet; it must pass with a valid CRC32c. Returns the rewritten packet.
fn pass(dp: &mut Datapath, p: &[u8], what: &str) -> Vec<u8> {
    let (rc, out) = dp.test_run(p).unwrap();
    assert_eq!(rc, TC_ACT_OK, "{what}: verdict");
    assert!(crc_ok(&out), "{what}: CRC32c of the rewritten packet");
    out
}

/// A whole association through one service: the handshake, data both ways (a small chunk and
/// one of `big` bytes), and the graceful shutdown; every packet checked.
fn association(dp: &mut Datapath, a: &Assoc, nat_src: IpAddr, big: usize) {
    let up = |vtag: u32, c: &[u8]| sctp(a.client, a.vip, a.cport, 38412, vtag, c);
    // INIT: to the endpoint's port 9000, from the client's port (DNAT) or a NAT port.
    let out = pass(dp, &up(0, &init(INIT, TAG_C)), "INIT");
    let e = dp.ct_get(&a.key()).unwrap().expect("the flow");
    assert_eq!(e.state(), CtState::SynSent);
    assert_ne!(
        e.flags & CTF_NEW,
        0,
        "half-open until the handshake completes"
    );
    let nport = u16::from_be(e.nat_sport);
    assert_eq!(ports(&out), (nport, 9000));
    let expect = sctp(nat_src, a.ep, nport, 9000, 0, &init(INIT, TAG_C));
    assert_eq!(
        out[l4(&out)..],
        expect[l4(&expect)..],
        "INIT: SCTP part exact"
    );
    let down = |vtag: u32, c: &[u8]| sctp(a.ep, nat_src, 9000, nport, vtag, c);
    // INIT ACK back to the client, from the VIP's port.
    let back = pass(dp, &down(TAG_C, &init(INIT_ACK, TAG_E)), "INIT ACK");
    let expect = sctp(
        a.vip,
        a.client,
        38412,
        a.cport,
        TAG_C,
        &init(INIT_ACK, TAG_E),
    );
    assert_eq!(back, expect_with_mac(&back, &expect), "INIT ACK exact");
    assert_eq!(
        dp.ct_get(&a.key()).unwrap().unwrap().state(),
        CtState::SynRecv
    );
    pass(
        dp,
        &up(TAG_E, &chunk(COOKIE_ECHO, 0, b"cookie!!")),
        "COOKIE ECHO",
    );
    pass(dp, &down(TAG_C, &chunk(COOKIE_ACK, 0, b"")), "COOKIE ACK");
    let e = dp.ct_get(&a.key()).unwrap().unwrap();
    assert_eq!(e.state(), CtState::Established);
    assert_eq!(e.flags & CTF_NEW, 0, "moved to conntrack once up");
    let payload = vec![0x5au8; big];
    for (i, p) in [&b"NGSetupRequest"[..], &payload].into_iter().enumerate() {
        let out = pass(dp, &up(TAG_E, &data(p)), &format!("DATA {i} up"));
        assert_eq!(ports(&out), (nport, 9000));
        let back = pass(dp, &down(TAG_C, &data(p)), &format!("DATA {i} down"));
        assert_eq!(ports(&back), (38412, a.cport));
    }
    pass(dp, &down(TAG_C, &chunk(SACK, 0, &[0u8; 12])), "SACK");
    pass(
        dp,
        &up(TAG_E, &chunk(SHUTDOWN, 0, &[0, 0, 0, 1])),
        "SHUTDOWN",
    );
    assert_eq!(
        dp.ct_get(&a.key()).unwrap().unwrap().state(),
        CtState::FinWait
    );
    pass(
        dp,
        &down(TAG_C, &chunk(SHUTDOWN_ACK, 0, b"")),
        "SHUTDOWN ACK",
    );
    pass(
        dp,
        &up(TAG_E, &chunk(SHUTDOWN_COMPLETE, 0, b"")),
        "SHUTDOWN COMPLETE",
    );
    assert_eq!(
        dp.ct_get(&a.key()).unwrap().unwrap().state(),
        CtState::TimeWait
    );
}

/// `expect` with the MAC addresses of `got` (a redirect would set them; the tests' empty
/// namespace has no route, so they stay as sent).
fn expect_with_mac(got: &[u8], expect: &[u8]) -> Vec<u8> {
    let mut e = expect.to_vec();
    e[..12].copy_from_slice(&got[..12]);
    e
}

#[test]
fn sctp_associations_through_every_nat_mode_keep_a_valid_crc32c() {
    if !in_private_netns("sctp_associations_through_every_nat_mode_keep_a_valid_crc32c") {
        return;
    }
    let mut dp = datapath();
    for (id, mode, nat_src) in [
        (1, 0u8, IpAddr::V4(CLIENT)),
        (2, 1, IpAddr::V4(LB_IF)),
        (3, 2, IpAddr::V4(VIP)),
    ] {
        // One service at a time on the VIP's port.
        install(&mut dp, id, VIP.into(), EP.into(), LB_IF.into(), mode);
        for (cport, big) in [(40000 + id as u16, 1400), (41000 + id as u16, 3200)] {
            let a = Assoc {
                client: CLIENT.into(),
                vip: VIP.into(),
                ep: EP.into(),
                cport,
            };
            association(&mut dp, &a, nat_src, big);
        }
    }
    for (id, mode, nat_src) in [(4, 0u8, IpAddr::V6(CLIENT6)), (5, 2, IpAddr::V6(VIP6))] {
        install(&mut dp, id, VIP6.into(), EP6.into(), LB_IF6.into(), mode);
        let a = Assoc {
            client: CLIENT6.into(),
            vip: VIP6.into(),
            ep: EP6.into(),
            cport: 42000 + id as u16,
        };
        association(&mut dp, &a, nat_src, 3000);
    }
    assert_eq!(dp.counter(Counter::SctpTagIgnored), 0);
}

#[test]
fn sctp_abort_closes_only_with_the_association_tag() {
    if !in_private_netns("sctp_abort_closes_only_with_the_association_tag") {
        return;
    }
    let mut dp = datapath();
    let mut ignored = 0;
    for (id, mode, nat_src) in [
        (1, 0u8, IpAddr::V4(CLIENT)),
        (2, 1, IpAddr::V4(LB_IF)),
        (3, 2, IpAddr::V4(VIP)),
    ] {
        install(&mut dp, id, VIP.into(), EP.into(), LB_IF.into(), mode);
        let a = Assoc {
            client: CLIENT.into(),
            vip: VIP.into(),
            ep: EP.into(),
            cport: 40000 + id as u16,
        };
        let up = |vtag: u32, c: &[u8]| sctp(a.client, a.vip, a.cport, 38412, vtag, c);
        pass(&mut dp, &up(0, &init(INIT, TAG_C)), "INIT");
        let nport = u16::from_be(dp.ct_get(&a.key()).unwrap().unwrap().nat_sport);
        let down = |vtag: u32, c: &[u8]| sctp(EP.into(), nat_src, 9000, nport, vtag, c);
        pass(&mut dp, &down(TAG_C, &init(INIT_ACK, TAG_E)), "INIT ACK");
        pass(
            &mut dp,
            &up(TAG_E, &chunk(COOKIE_ECHO, 0, b"c")),
            "COOKIE ECHO",
        );
        pass(
            &mut dp,
            &down(TAG_C, &chunk(COOKIE_ACK, 0, b"")),
            "COOKIE ACK",
        );
        // A forged ABORT (a guessed tag) is forwarded (the endpoint discards it) but changes
        // nothing here; so does one with the T bit and a wrong tag.
        pass(
            &mut dp,
            &up(0xdead_beef, &chunk(ABORT, 0, b"")),
            "forged ABORT",
        );
        pass(
            &mut dp,
            &up(TAG_E, &chunk(ABORT, 1, b"")),
            "ABORT, T bit, own tag",
        );
        ignored += 2;
        assert_eq!(
            dp.ct_get(&a.key()).unwrap().unwrap().state(),
            CtState::Established,
            "mode {mode}"
        );
        assert_eq!(dp.counter(Counter::SctpTagIgnored), ignored);
        // The endpoint's ABORT with the T bit carries its own tag (what the client's packets
        // carry): accepted, and translated back with a valid CRC32c.
        let back = pass(&mut dp, &down(TAG_E, &chunk(ABORT, 1, b"")), "ABORT");
        assert_eq!(ports(&back), (38412, a.cport));
        assert_eq!(
            dp.ct_get(&a.key()).unwrap().unwrap().state(),
            CtState::Close,
            "mode {mode}"
        );
        // A new INIT on the closed association's ports starts a new one.
        pass(&mut dp, &up(0, &init(INIT, TAG_C + 1)), "new INIT");
        assert_eq!(
            dp.ct_get(&a.key()).unwrap().unwrap().state(),
            CtState::SynSent
        );
        // The service gives the port up for the next mode.
        let (addr, family) = addr_words(VIP.into());
        dp.delete_service(&SvcKey {
            addr,
            port: 38412u16.to_be(),
            proto: PROTO_SCTP,
            family,
        })
        .unwrap();
    }
}

#[test]
fn sctp_flows_open_only_with_a_well_formed_init() {
    if !in_private_netns("sctp_flows_open_only_with_a_well_formed_init") {
        return;
    }
    let mut dp = datapath();
    install(&mut dp, 1, VIP.into(), EP.into(), LB_IF.into(), 0);
    let up =
        |cport: u16, vtag: u32, c: &[u8]| sctp(CLIENT.into(), VIP.into(), cport, 38412, vtag, c);
    let mut bundled = init(INIT, TAG_C);
    bundled.extend(data(b"x"));
    let mut truncated = up(40003, 0, &init(INIT, TAG_C));
    // The IP length cuts the INIT chunk short.
    let l = truncated.len() - 8;
    truncated.truncate(l);
    truncated[16..18].copy_from_slice(&((l - 14) as u16).to_be_bytes());
    truncated[24..26].fill(0);
    let c = csum(&truncated[14..34], 0);
    truncated[24..26].copy_from_slice(&c.to_be_bytes());
    for (what, p, counter) in [
        (
            "DATA without a flow",
            up(40000, TAG_E, &data(b"x")),
            Counter::DropNotSyn,
        ),
        (
            "INIT with a tag",
            up(40001, 7, &init(INIT, TAG_C)),
            Counter::DropSctpHeader,
        ),
        (
            "INIT bundled with DATA",
            up(40002, 0, &bundled),
            Counter::DropSctpHeader,
        ),
        (
            "INIT chunk past the packet",
            truncated,
            Counter::DropSctpHeader,
        ),
    ] {
        let before = dp.counter(counter);
        let (rc, _) = dp.test_run(&p).unwrap();
        assert_eq!(rc, TC_ACT_SHOT, "{what}");
        assert_eq!(dp.counter(counter), before + 1, "{what}: counted");
    }
    // The endpoint's side of a flow this node does not know (a full-NAT reply to the VIP
    // after a failover, before the sync): dropped, not left to the stack, whose answer
    // (ABORT, or ICMP protocol unreachable) would end the association.
    let before = dp.counter(Counter::DropNoFlow);
    let reply = sctp(EP.into(), VIP.into(), 9000, 33333, TAG_C, &data(b"x"));
    assert_eq!(dp.test_run(&reply).unwrap().0, TC_ACT_SHOT);
    assert_eq!(dp.counter(Counter::DropNoFlow), before + 1);
    // SCTP to another address is not ours: it passes.
    let other = sctp(EP.into(), LB_IF.into(), 9000, 33333, TAG_C, &data(b"x"));
    assert_eq!(dp.test_run(&other).unwrap().0, TC_ACT_OK);
    assert!(dp.ct_entries().is_empty(), "no flow from any of them");
}

#[test]
fn icmp_errors_about_sctp_flows_are_translated() {
    if !in_private_netns("icmp_errors_about_sctp_flows_are_translated") {
        return;
    }
    let mut dp = datapath();
    install(&mut dp, 1, VIP.into(), EP.into(), LB_IF.into(), 2);
    let init_p = sctp(
        CLIENT.into(),
        VIP.into(),
        40000,
        38412,
        0,
        &init(INIT, TAG_C),
    );
    let out = pass(&mut dp, &init_p, "INIT");
    let (nport, _) = ports(&out);
    // The endpoint's path says "fragmentation needed" about the translated INIT.
    let mut icmp = vec![3u8, 4, 0, 0, 0, 0];
    icmp.extend(1400u16.to_be_bytes());
    icmp.extend_from_slice(&out[14..14 + 28]);
    let c = csum(&icmp, 0);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut err = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
    let mut h = vec![0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    h[8] = 64;
    h[9] = 1;
    h[12..16].copy_from_slice(&Ipv4Addr::new(10, 10, 10, 1).octets());
    h[16..20].copy_from_slice(&VIP.octets());
    let hc = csum(&h, 0);
    h[10..12].copy_from_slice(&hc.to_be_bytes());
    err.extend(h);
    err.extend(icmp);
    let before = dp.counter(Counter::IcmpErrTranslated);
    let (rc, back) = dp.test_run(&err).unwrap();
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(dp.counter(Counter::IcmpErrTranslated), before + 1);
    // To the client, quoting its own packet: client:40000 -> VIP:38412.
    assert_eq!(&back[30..34], &CLIENT.octets());
    let q = 14 + 20 + 8;
    assert_eq!(&back[q + 12..q + 16], &CLIENT.octets());
    assert_eq!(&back[q + 16..q + 20], &VIP.octets());
    assert_eq!(
        (
            u16::from_be_bytes([back[q + 20], back[q + 21]]),
            u16::from_be_bytes([back[q + 22], back[q + 23]])
        ),
        (40000, 38412)
    );
    assert_ne!(nport, 0);
    assert_eq!(csum(&back[14 + 20..], 0), 0, "ICMP checksum");
    assert_eq!(csum(&back[14..34], 0), 0, "outer IP checksum");
}
