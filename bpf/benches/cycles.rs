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

mod common;

use std::net::{IpAddr, Ipv4Addr};

use common::*;
use ferrolb_bpf::{Datapath, DatapathConfig, TestRunner};
use serde_json::json;

const PER_ROUND: usize = 2000;

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
    pin_to(0);
    let ifx = netns();

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
            // Open the flow with a full handshake, then time its established data segments.
            handshake(&run, ifx, (client, vip, ep), port);
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
