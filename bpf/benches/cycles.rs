//! Cost per packet of the datapath, measured in isolation (root; `cargo bench -p ferrolb-bpf
//! --bench cycles [-- ROUNDS]`). Not a test: it prints a table and a JSON summary.
//!
//! `BPF_PROG_TEST_RUN`, one call per packet (`repeat` 1: each call runs on a fresh copy of the
//! packet; a larger `repeat` would rerun the *rewritten* packet and measure the miss path), the
//! kernel's own measure of each run. In a network namespace of the benchmark's own with a
//! route and a permanent neighbour entry toward the endpoint, so the FIB lookup succeeds and the
//! packet is redirected, as in production. Cases: an established TCP segment (64 bytes of data)
//! through DNAT, one-arm and full NAT, IPv4 and IPv6; a new connection (a SYN from a new source
//! port each call) through DNAT and full NAT. Baseline, same run, interleaved round by round:
//! the floor program `flb_floor` (header read, `bpf_fib_lookup`, MAC rewrite, `bpf_redirect`)
//! on the packet as ferrolb forwards it. Reported: median ns per packet and the ratio to the
//! floor's median. Both pay the test-run overhead (skb set-up, copies), which makes the ratios
//! conservative.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;

use ferrolb_bpf::maps::*;
use ferrolb_bpf::{Datapath, DatapathConfig, TestRunner, lut};
use ferrolb_tests::inet_csum as csum;
use serde_json::json;

const TC_ACT_REDIRECT: u32 = 7;
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const VIP4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const EP4: Ipv4Addr = Ipv4Addr::new(10, 10, 10, 11);
const LB4: Ipv4Addr = Ipv4Addr::new(10, 10, 10, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 2);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xaaaa, 0, 0, 0, 0, 0x10);
const EP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 0x11);
const LB6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 1);
const MODES: [(u8, &str, u16); 3] = [(0, "dnat", 80), (1, "onearm", 81), (2, "fullnat", 82)];
const PER_ROUND: usize = 2000;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {out:?}");
}

fn pseudo(src: IpAddr, dst: IpAddr, len: usize) -> u32 {
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
    s + 6 + len as u32
}

/// Ethernet + IPv4/IPv6 + TCP with correct checksums.
fn tcp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, flags: u8, data: &[u8]) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&1000u32.to_be_bytes());
    t[8..12].copy_from_slice(&5001u32.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    t.extend_from_slice(data);
    let c = csum(&t, pseudo(src, dst, t.len()));
    t[16..18].copy_from_slice(&c.to_be_bytes());
    let mut b = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            b.extend([0x08, 0x00]);
            let mut h = vec![0x45, 0];
            h.extend(((20 + t.len()) as u16).to_be_bytes());
            h.extend([0x12, 0x34, 0, 0, 64, 6, 0, 0]);
            h.extend(s.octets());
            h.extend(d.octets());
            let c = csum(&h, 0);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            b.extend(h);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            b.extend([0x86, 0xdd, 0x60, 0, 0, 0]);
            b.extend((t.len() as u16).to_be_bytes());
            b.extend([6, 64]);
            b.extend(s.octets());
            b.extend(d.octets());
        }
        _ => unreachable!("one family per packet"),
    }
    b.extend(t);
    b
}

fn install(dp: &mut Datapath, id: u32, vip: IpAddr, port: u16, mode: u8, ep: IpAddr, lb: IpAddr) {
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
            proto: PROTO_TCP,
            family,
        },
        &Svc {
            id,
            be_slot: id * 2,
            timeout_s: 240,
            port_base: port,
            mode,
            sel: 0,
        },
    )
    .unwrap();
    dp.set_ranges(
        &RangeKey {
            addr: vaddr,
            proto: PROTO_TCP,
            family,
            pad: 0,
        },
        &Ranges::default(),
    )
    .unwrap();
}

fn median(v: &mut [u32]) -> f64 {
    v.sort_unstable();
    f64::from(v[v.len() / 2])
}

/// `rounds` x PER_ROUND timed runs of `packet`, alternating with the floor on `floor_packet`.
fn measure(
    run: &TestRunner,
    floor: &TestRunner,
    ifx: u32,
    rounds: usize,
    packet: impl Fn(usize) -> Vec<u8>,
    floor_packet: &[u8],
) -> (f64, f64) {
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    let mut n = 0;
    for _ in 0..rounds {
        for _ in 0..PER_ROUND {
            let (rc, ns) = run.run_timed(&packet(n), ifx).unwrap();
            assert_eq!(
                rc, TC_ACT_REDIRECT,
                "the datapath did not forward case packet {n}"
            );
            ours.push(ns);
            n += 1;
        }
        for _ in 0..PER_ROUND {
            let (rc, ns) = floor.run_timed(floor_packet, ifx).unwrap();
            assert_eq!(rc, TC_ACT_REDIRECT, "the floor did not forward");
            base.push(ns);
        }
    }
    (median(&mut ours), median(&mut base))
}

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5);
    if !nix::unistd::geteuid().is_root() {
        println!("cycles benchmark skipped: it needs root (network namespace, BPF)");
        return;
    }
    // One CPU, a namespace of our own (removed with the process).
    // SAFETY: a zeroed cpu_set_t with one CPU; applies to this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
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
    std::fs::write("/proc/sys/net/ipv4/conf/flb-in/forwarding", "1").unwrap();
    std::fs::write("/proc/sys/net/ipv6/conf/flb-in/forwarding", "1").unwrap();
    std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1").unwrap();
    let ifx = nix::net::if_::if_nametoindex("flb-in").unwrap();

    let mut dp = Datapath::load(&DatapathConfig {
        max_services: 64,
        max_conntrack: 1 << 19,
        ..Default::default()
    })
    .expect("load datapath");
    let fams: [(&str, IpAddr, IpAddr, IpAddr, IpAddr); 2] = [
        ("ipv4", CLIENT4.into(), VIP4.into(), EP4.into(), LB4.into()),
        ("ipv6", CLIENT6.into(), VIP6.into(), EP6.into(), LB6.into()),
    ];
    let mut id = 1;
    for (_, _, vip, ep, lb) in fams {
        for (mode, _, port) in MODES {
            install(&mut dp, id, vip, port, mode, ep, lb);
            id += 1;
        }
    }
    let run = dp.test_runner().unwrap();
    let floor = dp.floor_runner().unwrap();
    let data = [0x61u8; 64];
    let mut rows = Vec::new();
    for (fam, client, vip, ep, _) in fams {
        let floor_pkt = tcp(client, ep, 40000, 8080, 0x18, &data);
        for (_, mode, port) in MODES {
            // Open the flow, then time its established data segments.
            let (rc, _) = run
                .run_timed(&tcp(client, vip, 40000, port, 0x02, &[]), ifx)
                .unwrap();
            assert_eq!(
                rc, TC_ACT_REDIRECT,
                "{fam} {mode}: the SYN was not forwarded"
            );
            let est = tcp(client, vip, 40000, port, 0x18, &data);
            let (ns, base) = measure(&run, &floor, ifx, rounds, |_| est.clone(), &floor_pkt);
            rows.push((format!("established {fam} {mode}"), ns, base));
        }
    }
    // New connections: a SYN from a new client port (and address, past 60,000) each call.
    // The table's memory is warmed first (as many flows as a measured case makes, then
    // deleted, as the collector deletes expired flows): the first use of each entry of a
    // fresh map costs ~7 us, a cold-memory effect a running node does not see.
    let warm = |n: usize| {
        let k = (2 << 20) + n as u32;
        let client = Ipv4Addr::new(198, 51, 100, 10 + (k / 60_000 % 200) as u8);
        tcp(
            client.into(),
            VIP4.into(),
            1024 + (k % 60_000) as u16,
            82,
            0x02,
            &[],
        )
    };
    for n in 0..rounds * PER_ROUND * 2 {
        run.run_timed(&warm(n), ifx).unwrap();
    }
    let removed = dp.ct_remove_where(|k, _| k.dport == 82u16.to_be() || k.sport == 8080u16.to_be());
    assert!(
        removed >= rounds * PER_ROUND * 2,
        "warm-up flows removed: {removed}"
    );
    for (mode, port) in [("dnat", 80u16), ("fullnat", 82)] {
        let floor_pkt = tcp(CLIENT4.into(), EP4.into(), 40000, 8080, 0x02, &[]);
        let base_port = if mode == "dnat" { 0u32 } else { 1 << 20 };
        let syn = |n: usize| {
            let k = base_port + n as u32;
            let client = Ipv4Addr::new(198, 51, 100, 10 + (k / 60_000 % 200) as u8);
            tcp(
                client.into(),
                VIP4.into(),
                1024 + (k % 60_000) as u16,
                port,
                0x02,
                &[],
            )
        };
        let (ns, base) = measure(&run, &floor, ifx, rounds, syn, &floor_pkt);
        rows.push((format!("new connection ipv4 {mode}"), ns, base));
    }
    println!("{:<34} {:>8} {:>8} {:>7}", "case", "ns", "floor", "ratio");
    for (name, ns, base) in &rows {
        println!("{name:<34} {ns:>8.0} {base:>8.0} {:>6.2}x", ns / base);
    }
    let summary: Vec<_> = rows
        .iter()
        .map(|(name, ns, base)| json!({"case": name, "ns": ns, "floor_ns": base, "ratio": ns / base}))
        .collect();
    println!(
        "{}",
        json!({"rounds": rounds, "per_round": PER_ROUND, "cases": summary,
               "note": "median of the kernel's BPF_PROG_TEST_RUN duration, one call per packet, CPU 0; the floor on the packet as forwarded, interleaved"})
    );
}
