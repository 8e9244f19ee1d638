//! What the datapath benchmarks share: packets, a service, the namespace they run in.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;

use ferrolb_bpf::maps::*;
use ferrolb_bpf::{Datapath, lut};
use ferrolb_tests::inet_csum as csum;

pub const TC_ACT_REDIRECT: u32 = 7;
pub const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
pub const VIP4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const EP4: Ipv4Addr = Ipv4Addr::new(10, 10, 10, 11);
pub const LB4: Ipv4Addr = Ipv4Addr::new(10, 10, 10, 1);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 2);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xaaaa, 0, 0, 0, 0, 0x10);
pub const EP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 0x11);
pub const LB6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 1);
pub const MODES: [(u8, &str, u16); 3] = [(0, "dnat", 80), (1, "onearm", 81), (2, "fullnat", 82)];

pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {out:?}");
}

pub fn pseudo(src: IpAddr, dst: IpAddr, len: usize) -> u32 {
    pseudo_for(src, dst, 6, len)
}

/// The pseudo header's sum for protocol `proto`.
pub fn pseudo_for(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let words = |a: IpAddr| -> Vec<u8> {
        match a {
            IpAddr::V4(v) => v.octets().to_vec(),
            IpAddr::V6(v) => v.octets().to_vec(),
        }
    };
    let mut s = 0u32;
    for a in [words(src), words(dst)] {
        for w in a.chunks(2) {
            s += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
    }
    s + u32::from(proto) + len as u32
}

/// Ethernet + IPv4/IPv6 + TCP with correct checksums (sequence 1000, acknowledgment 5001).
pub fn tcp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, flags: u8, data: &[u8]) -> Vec<u8> {
    tcp_seq(src, dst, (sport, dport), (1000, 5001), flags, data)
}

/// [`tcp`] with the given (sequence, acknowledgment) numbers.
pub fn tcp_seq(
    src: IpAddr,
    dst: IpAddr,
    (sport, dport): (u16, u16),
    (seq, ack): (u32, u32),
    flags: u8,
    data: &[u8],
) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&ack.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    t.extend_from_slice(data);
    let c = csum(&t, pseudo(src, dst, t.len()));
    t[16..18].copy_from_slice(&c.to_be_bytes());
    frame(src, dst, 6, t)
}

/// Ethernet + IPv4/IPv6 + UDP with correct checksums.
pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    u.extend_from_slice(data);
    let c = csum(&u, pseudo_for(src, dst, 17, u.len()));
    u[6..8].copy_from_slice(&c.to_be_bytes());
    frame(src, dst, 17, u)
}

/// Ethernet and IP headers (IPv4 with its checksum) around the L4 bytes `t` of `proto`.
fn frame(src: IpAddr, dst: IpAddr, proto: u8, t: Vec<u8>) -> Vec<u8> {
    let mut b = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            b.extend([0x08, 0x00]);
            let mut h = vec![0x45, 0];
            h.extend(((20 + t.len()) as u16).to_be_bytes());
            h.extend([0x12, 0x34, 0, 0, 64, proto, 0, 0]);
            h.extend(s.octets());
            h.extend(d.octets());
            let c = csum(&h, 0);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            b.extend(h);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            b.extend([0x86, 0xdd, 0x60, 0, 0, 0]);
            b.extend((t.len() as u16).to_be_bytes());
            b.extend([proto, 64]);
            b.extend(s.octets());
            b.extend(d.octets());
        }
        _ => unreachable!("one family per packet"),
    }
    b.extend(t);
    b
}

pub fn install(
    dp: &mut Datapath,
    id: u32,
    vip: IpAddr,
    port: u16,
    mode: u8,
    ep: IpAddr,
    lb: IpAddr,
) {
    install_for(dp, PROTO_TCP, id, (vip, port, mode), ep, lb);
}

/// [`install`] for protocol `proto`.
pub fn install_for(
    dp: &mut Datapath,
    proto: u8,
    id: u32,
    (vip, port, mode): (IpAddr, u16, u8),
    ep: IpAddr,
    lb: IpAddr,
) {
    let (addr, family) = addr_words(ep);
    let mut be = Backends {
        count: 1,
        ..Default::default()
    };
    be.ep[0] = Ep {
        addr,
        snat_addr: addr_words(lb).0,
        port: 8080,
        weight: 1,
        active: 1,
        pad: [0; 3],
    };
    let table = lut::round_robin(&[lut::LutEndpoint {
        slot: 0,
        identity: addr.iter().flat_map(|w| w.to_ne_bytes()).collect(),
        weight: 1,
    }]);
    be.lut_len = table.len() as u32;
    be.lut[..table.len()].copy_from_slice(&table);
    dp.set_backends(id * 2, &be).unwrap();
    dp.reset_service_state(id).unwrap();
    let vaddr = addr_words(vip).0;
    dp.set_service(
        &SvcKey {
            addr: vaddr,
            port: port.to_be(),
            proto,
            family,
        },
        &Svc {
            id,
            be_slot: id * 2,
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
            addr: vaddr,
            proto,
            family,
            pad: 0,
        },
        &Ranges::default(),
    )
    .unwrap();
}

pub fn median(v: &mut [u32]) -> f64 {
    v.sort_unstable();
    f64::from(v[v.len() / 2])
}

/// Pins this thread to `cpu`.
pub fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one CPU; applies to this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// A network namespace of the process's own (removed with it) with a veth pair: the client
/// side `flb-in` (returned: its ifindex) and the endpoints' side `flb-out`, a route and a
/// permanent neighbour entry toward the endpoint (and toward a router in front of clients in
/// 203.0.113.0/24 and 2001:db8:113::/64), so the FIB lookup succeeds as in production.
pub fn netns() -> u32 {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
    ip(&[
        "link", "add", "flb-in", "type", "veth", "peer", "name", "flb-out",
    ]);
    ip(&["addr", "add", "198.51.100.1/24", "dev", "flb-in"]);
    ip(&[
        "addr",
        "add",
        "2001:db8:100::1/64",
        "dev",
        "flb-in",
        "nodad",
    ]);
    ip(&["addr", "add", "10.10.10.1/24", "dev", "flb-out"]);
    ip(&["addr", "add", "fd00:10::1/64", "dev", "flb-out", "nodad"]);
    ip(&["link", "set", "flb-in", "up"]);
    ip(&["link", "set", "flb-out", "up"]);
    for (ep, ll) in [
        ("10.10.10.11", "02:00:00:00:00:11"),
        ("fd00:10::11", "02:00:00:00:00:11"),
    ] {
        ip(&[
            "neigh",
            "replace",
            ep,
            "lladdr",
            ll,
            "dev",
            "flb-out",
            "nud",
            "permanent",
        ]);
    }
    // Clients in 203.0.113.0/24 and 2001:db8:113::/64 sit behind a router on the client
    // side, so replies to them are forwarded too (the FIB knows the router's MAC).
    for (router, clients) in [
        ("198.51.100.254", "203.0.113.0/24"),
        ("2001:db8:100::fe", "2001:db8:113::/64"),
    ] {
        ip(&[
            "neigh",
            "replace",
            router,
            "lladdr",
            "02:00:00:00:00:fe",
            "dev",
            "flb-in",
            "nud",
            "permanent",
        ]);
        ip(&["route", "add", clients, "via", router, "dev", "flb-in"]);
    }
    std::fs::write("/proc/sys/net/ipv4/conf/flb-in/forwarding", "1").unwrap();
    std::fs::write("/proc/sys/net/ipv6/conf/flb-in/forwarding", "1").unwrap();
    std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1").unwrap();
    nix::net::if_::if_nametoindex("flb-in").unwrap()
}

/// (source address, source port) of a forwarded packet.
pub fn source_of(p: &[u8]) -> (IpAddr, u16) {
    if u16::from_be_bytes([p[12], p[13]]) == 0x86dd {
        let a: [u8; 16] = p[22..38].try_into().unwrap();
        (IpAddr::from(a), u16::from_be_bytes([p[54], p[55]]))
    } else {
        let a: [u8; 4] = p[26..30].try_into().unwrap();
        (IpAddr::from(a), u16::from_be_bytes([p[34], p[35]]))
    }
}

/// Opens a TCP flow from `client`:`cport` to `vip`:`port` through the datapath: its SYN and,
/// when `answered`, the endpoint's SYN-ACK to the translated source and the client's ACK, so
/// that what follows is an established flow. The kernel's time for each packet sent.
pub fn open_flow(
    run: &ferrolb_bpf::TestRunner,
    ifx: u32,
    (client, vip, ep): (IpAddr, IpAddr, IpAddr),
    (cport, port): (u16, u16),
    answered: bool,
) -> [Option<u32>; 3] {
    let syn = tcp_seq(client, vip, (cport, port), (999, 0), 0x02, &[]);
    let (rc, syn_ns, out) = run.run_timed_out(&syn, ifx).unwrap();
    assert_eq!(
        rc, TC_ACT_REDIRECT,
        "the SYN to {vip}:{port} was not forwarded"
    );
    if !answered {
        return [Some(syn_ns), None, None];
    }
    let (nsrc, nport) = source_of(&out);
    let synack = tcp_seq(ep, nsrc, (8080, nport), (5000, 1000), 0x12, &[]);
    let (rc, synack_ns) = run.run_timed(&synack, ifx).unwrap();
    assert_eq!(
        rc, TC_ACT_REDIRECT,
        "the SYN-ACK from {ep} was not forwarded"
    );
    let ack = tcp_seq(client, vip, (cport, port), (1000, 5001), 0x10, &[]);
    let (rc, ack_ns) = run.run_timed(&ack, ifx).unwrap();
    assert_eq!(rc, TC_ACT_REDIRECT, "the handshake's ACK was not forwarded");
    [Some(syn_ns), Some(synack_ns), Some(ack_ns)]
}
