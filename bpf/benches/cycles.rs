//! Cost per packet of the datapath, measured in isolation (root; `cargo bench -p ferrolb-bpf
//! --bench cycles [-- ROUNDS]`, 1-10 rounds of 2,000 packets a case, 5 by default). Not a test: it prints a table and a JSON summary.
//!
//! `BPF_PROG_TEST_RUN`, one call per packet (`repeat` 1: each call runs on a fresh copy of the
//! packet; a larger `repeat` would rerun the *rewritten* packet and measure the miss path), the
//! kernel's own measure of each run. In a network namespace of the benchmark's own with a
//! route and a permanent neighbour entry toward the endpoint, so the FIB lookup succeeds and the
//! packet is redirected, as in production. Cases: an established TCP segment (64 bytes of data)
//! through DNAT, one-arm and full NAT, IPv4 and IPv6; a new connection in each of those, from
//! a new source port each time: a connection that opens (its SYN, the endpoint's SYN-ACK
//! and the client's ACK, each timed; their mean per packet: the flow is made half-open in
//! `conntrack` itself and completes there), and a SYN nobody answers (a SYN flood's path: the
//! in-place budget is filled first, untimed, so these go to the half-open table and fill it); a new UDP flow in each (its first
//! datagram, the endpoint's answer, and the client's next datagram, which confirms the flow
//! and moves it to the conntrack table, each timed). Between rounds the benchmark
//! drains the event ring, as the agent does every few milliseconds. Baseline, same run,
//! interleaved round by round:
//! the floor program `flb_floor` (header read, `bpf_fib_lookup`, MAC rewrite, `bpf_redirect`)
//! on the packet as ferrolb forwards it. Reported: median ns per packet and the ratio to the
//! floor's median. Both pay the test-run overhead (skb set-up, copies, the clock reads), which
//! makes the ratios conservative and machine-dependent: the benchmark also times an empty
//! program (`flb_nop`) and prints a "net" ratio with that cost taken off both sides. `FLB_OBJECT=path` runs a datapath object built elsewhere (a variant of the
//! C source) instead of the one built in; `FLB_INPLACE=N` sets the in-place budget (0: every
//! half-open flow in the half-open table, `ct_new`, moving at its handshake's end);
//! `FLB_PORTS_FREE=0` keys the FIB cache's questions with their ports (by default by
//! addresses, as the agent sets it where no rule or multipath hash uses ports: a new
//! connection's packets are then answered from the answer cached for an earlier one).
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use common::*;
use ferrolb_bpf::maps::{FIB_PORTS_FREE_V4, FIB_PORTS_FREE_V6, PROTO_UDP};
use ferrolb_bpf::{Datapath, DatapathConfig, TestRunner, monotonic_ns};
use serde_json::json;

const PER_ROUND: usize = 2000;
/// The UDP rules listen on the TCP rules' ports plus this.
const UDP_PORTS: u16 = 10;

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

/// Flow `k`'s client: port 1024 + k % 60,000 of an address behind the client-side router
/// (family 0: IPv4, else IPv6) that changes every 60,000 flows.
fn client_of(fam: usize, k: u32) -> (IpAddr, u16) {
    let host = 10 + (k / 60_000 % 200) as u16;
    let addr: IpAddr = if fam == 0 {
        Ipv4Addr::new(203, 0, 113, host as u8).into()
    } else {
        Ipv6Addr::new(0x2001, 0xdb8, 0x113, 0, 0, 0, 0, host).into()
    };
    (addr, 1024 + (k % 60_000) as u16)
}

/// `rounds` rounds of PER_ROUND new flows (`flow(k)` opens flow `k`, from `k0` on, and returns
/// the kernel's time for each of its packets), each round followed by PER_ROUND runs of the
/// floor on `floor_pkt` and a drain of the event ring. Returns the times per packet position
/// and the floor's median.
fn timed_flows(
    rounds: usize,
    k0: u32,
    (floor, floor_pkt, ifx): (&TestRunner, &[u8], u32),
    drain: &mut dyn FnMut(),
    flow: &mut dyn FnMut(u32) -> [Option<u32>; 3],
) -> ([Vec<u32>; 3], f64) {
    let mut ns: [Vec<u32>; 3] = Default::default();
    let mut base = Vec::new();
    for r in 0..rounds {
        for i in 0..PER_ROUND {
            for (v, t) in ns.iter_mut().zip(flow(k0 + (r * PER_ROUND + i) as u32)) {
                v.extend(t);
            }
        }
        for _ in 0..PER_ROUND {
            let (rc, ns) = floor.run_timed(floor_pkt, ifx).unwrap();
            assert_eq!(rc, TC_ACT_REDIRECT, "the floor did not forward");
            base.push(ns);
        }
        drain();
    }
    (ns, median(&mut base))
}

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5)
        // The tables' room: the unanswered SYNs take 12 x 2,000 x ROUNDS half-open entries.
        .clamp(1, 10);
    if !nix::unistd::geteuid().is_root() {
        println!("cycles benchmark skipped: it needs root (network namespace, BPF)");
        return;
    }
    pin_to(0);
    let ifx = netns();

    let cfg = DatapathConfig {
        max_services: 64,
        max_conntrack: 1 << 20,
        halfopen_inplace: std::env::var("FLB_INPLACE")
            .ok()
            .and_then(|v| v.parse().ok()),
        ..Default::default()
    };
    let mut dp = match std::env::var("FLB_OBJECT") {
        Ok(path) => Datapath::load_object(&cfg, &std::fs::read(path).unwrap()),
        Err(_) => Datapath::load(&cfg),
    }
    .expect("load datapath");
    // The FIB cache keys questions by addresses, as the agent sets it on a node whose FIB
    // cannot pick a route by ports (no such policy rule, multipath hashing addresses: the
    // kernel's defaults); FLB_PORTS_FREE=0 keys them with their ports too.
    let ports_free = match std::env::var("FLB_PORTS_FREE").as_deref() {
        Ok("0") => 0,
        _ => FIB_PORTS_FREE_V4 | FIB_PORTS_FREE_V6,
    };
    if let Err(e) = dp
        .fib_invalidator()
        .and_then(|mut inv| inv.set_ports_free(ports_free, monotonic_ns() + 3_600_000_000_000))
    {
        println!("FIB cache keyed with ports (an object without the flag?): {e}");
    }
    let fams: [(&str, IpAddr, IpAddr, IpAddr, IpAddr); 2] = [
        ("ipv4", CLIENT4.into(), VIP4.into(), EP4.into(), LB4.into()),
        ("ipv6", CLIENT6.into(), VIP6.into(), EP6.into(), LB6.into()),
    ];
    let mut id = 1;
    for (_, _, vip, ep, lb) in fams {
        for (mode, _, port) in MODES {
            install(&mut dp, id, vip, port, mode, ep, lb);
            install_for(
                &mut dp,
                PROTO_UDP,
                id + 6,
                (vip, port + UDP_PORTS, mode),
                ep,
                lb,
            );
            id += 1;
        }
    }
    let run = dp.test_runner().unwrap();
    // The agent's part: it drains the event ring every few milliseconds. Here, after each
    // round (2,000 connections make ~300 KiB of events, the ring holds 1 MiB); without a
    // reader the ring would fill and every later event would fail to be written.
    let mut events = dp.take_events().expect("the event ring");
    let mut drain = || while events.try_next().is_some() {};
    let floor = dp.floor_runner().unwrap();
    let data = [0x61u8; 64];
    // What a BPF_PROG_TEST_RUN call costs by itself here (both programs pay it), per family:
    // an empty program on the floor's packet. An object without it (FLB_OBJECT= an older
    // build) reports none.
    let nop_ns: Option<[f64; 2]> = dp.nop_runner().ok().map(|nop| {
        fams.map(|(_, client, _, ep, _)| {
            let pkt = tcp(client, ep, 40000, 8080, 0x18, &data);
            let mut t: Vec<u32> = (0..rounds * PER_ROUND)
                .map(|_| nop.run_timed(&pkt, ifx).unwrap().1)
                .collect();
            median(&mut t)
        })
    });
    let mut rows = Vec::new();
    for (fam, client, vip, ep, _) in fams {
        let floor_pkt = tcp(client, ep, 40000, 8080, 0x18, &data);
        for (_, mode, port) in MODES {
            // Open the flow with a full handshake, then time its established data segments.
            open_flow(&run, ifx, (client, vip, ep), (40000, port), true);
            let est = tcp(client, vip, 40000, port, 0x18, &data);
            let (ns, base) = measure(&run, &floor, ifx, rounds, |_| est.clone(), &floor_pkt);
            rows.push((format!("established {fam} {mode}"), ns, base));
        }
    }
    // Opens flow `k` of family `fam` to the VIP's `port` (from `client_of(fam, k)`): its SYN
    // and, when `answered`, the endpoint's SYN-ACK to the translated source and the client's
    // ACK. The kernel's time for each packet.
    let open = |fam: usize, k: u32, port: u16, answered: bool| -> [Option<u32>; 3] {
        let (vip, ep): (IpAddr, IpAddr) = if fam == 0 {
            (VIP4.into(), EP4.into())
        } else {
            (VIP6.into(), EP6.into())
        };
        let (client, cport) = client_of(fam, k);
        open_flow(&run, ifx, (client, vip, ep), (cport, port), answered)
    };
    // New connections, each case from 4-tuples of its own. Both tables are first run through
    // as many flows as the answered cases make (answered, so that they reach `conntrack`, then
    // deleted, as the collector deletes expired flows): their free elements are then scattered
    // in memory as on a node that has run for a while. In a fresh map they come in address
    // order, and the handshake's last ACK (two insertions into `conntrack`) cost ~40 % less
    // (414-499 ns against 776-787 here): a flattering figure.
    let total = rounds * PER_ROUND;
    for k in 0..6 * total {
        open(0, (2 << 20) + k as u32, 82, true);
    }
    let removed = dp.ct_remove_where(|k, _| k.dport == 82u16.to_be() || k.sport == 8080u16.to_be());
    assert!(removed >= 12 * total, "warm-up flows removed: {removed}");
    drain();
    // (a) A connection that opens: SYN, the endpoint's SYN-ACK, the client's ACK, each timed.
    //     The flow is made half-open in `conntrack` and its ACK establishes it there (with
    //     FLB_INPLACE=0: made in `ct_new`, and the ACK moves it to `conntrack`).
    // (b) A SYN never answered (a SYN flood's path): the in-place budget is filled first
    //     (untimed), then the half-open table fills with flows nobody completes (up to 120,000
    //     entries of its 262,144 at 10 rounds).
    let mut block = 8u32;
    for (case, answered) in [("answered", true), ("unanswered", false)] {
        if !answered {
            let (limit, _) = dp.halfopen_inplace();
            for k in 0..limit {
                open(0, (7 << 20) + k, 80, false); // DNAT: it takes no NAT port
            }
            drain();
            assert_eq!(
                dp.halfopen_inplace().1,
                i64::from(limit),
                "the budget is full"
            );
        }
        for (f, (fam, client, _, ep, _)) in fams.into_iter().enumerate() {
            let floor_pkt = tcp(client, ep, 40000, 8080, 0x02, &[]);
            for (_, mode, port) in MODES {
                let k0 = block << 20;
                block += 1;
                let (ns, base) = timed_flows(
                    rounds,
                    k0,
                    (&floor, &floor_pkt, ifx),
                    &mut drain,
                    &mut |k| open(f, k, port, answered),
                );
                let [mut syn, mut synack, mut ack] = ns;
                let syn = median(&mut syn);
                rows.push((format!("new connection {fam} {mode}, {case}"), syn, base));
                if answered {
                    let (synack, ack) = (median(&mut synack), median(&mut ack));
                    rows.push(("  its SYN-ACK".into(), synack, base));
                    rows.push(("  its ACK".into(), ack, base));
                    rows.push((
                        "  all three, per packet".into(),
                        (syn + synack + ack) / 3.0,
                        base,
                    ));
                }
            }
        }
    }
    // (c) A new UDP flow: the client's first datagram, the endpoint's answer to the translated
    //     source, the client's next datagram (it confirms the flow: the move to `conntrack`).
    for (f, (fam, client0, vip, ep, _)) in fams.into_iter().enumerate() {
        let floor_pkt = udp(client0, ep, 40000, 8080, b"query");
        for (_, mode, port) in MODES {
            let port = port + UDP_PORTS;
            let k0 = block << 20;
            block += 1;
            let (ns, base) = timed_flows(
                rounds,
                k0,
                (&floor, &floor_pkt, ifx),
                &mut drain,
                &mut |k| {
                    let (client, cport) = client_of(f, k);
                    let q = udp(client, vip, cport, port, b"query");
                    let (rc, t0, out) = run.run_timed_out(&q, ifx).unwrap();
                    assert_eq!(rc, TC_ACT_REDIRECT, "the first datagram was not forwarded");
                    let (nsrc, nport) = source_of(&out);
                    let a = udp(ep, nsrc, 8080, nport, b"answer");
                    let (rc, t1) = run.run_timed(&a, ifx).unwrap();
                    assert_eq!(rc, TC_ACT_REDIRECT, "the answer was not forwarded");
                    let (rc, t2) = run.run_timed(&q, ifx).unwrap();
                    assert_eq!(rc, TC_ACT_REDIRECT, "the next datagram was not forwarded");
                    [Some(t0), Some(t1), Some(t2)]
                },
            );
            let [mut first, mut answer, mut next] = ns;
            let (first, answer, next) =
                (median(&mut first), median(&mut answer), median(&mut next));
            rows.push((format!("new UDP flow {fam} {mode}, first"), first, base));
            rows.push(("  its answer".into(), answer, base));
            rows.push(("  the next datagram (confirms)".into(), next, base));
            rows.push((
                "  all three, per packet".into(),
                (first + answer + next) / 3.0,
                base,
            ));
        }
    }
    // Each row's test-run cost: its family's (a sub-row, "  its ...", is its case's).
    let mut fam = 0;
    let zero: Vec<Option<f64>> = rows
        .iter()
        .map(|(name, _, _)| {
            if !name.starts_with(' ') {
                fam = usize::from(name.contains("ipv6"));
            }
            nop_ns.map(|n| n[fam])
        })
        .collect();
    if let Some([v4, v6]) = nop_ns {
        println!(
            "BPF_PROG_TEST_RUN's own cost per call here (an empty program): IPv4 {v4:.0} ns, IPv6 {v6:.0} ns; \
             'net' is the ratio with it taken off both sides"
        );
    }
    println!(
        "{:<34} {:>8} {:>8} {:>7} {:>7}",
        "case", "ns", "floor", "ratio", "net"
    );
    let net = |ns: f64, base: f64, z: Option<f64>| z.map(|z| (ns - z) / (base - z).max(1.0));
    for ((name, ns, base), z) in rows.iter().zip(&zero) {
        let n = net(*ns, *base, *z).map_or("-".into(), |r| format!("{r:.2}x"));
        println!(
            "{name:<34} {ns:>8.0} {base:>8.0} {:>6.2}x {n:>7}",
            ns / base
        );
    }
    let summary: Vec<_> = rows
        .iter()
        .zip(&zero)
        .map(|((name, ns, base), z)| {
            json!({"case": name, "ns": ns, "floor_ns": base, "ratio": ns / base,
                   "test_run_ns": z, "net_ratio": net(*ns, *base, *z)})
        })
        .collect();
    println!(
        "{}",
        json!({"rounds": rounds, "per_round": PER_ROUND, "fib_ports_free": ports_free, "cases": summary,
               "note": "median of the kernel's BPF_PROG_TEST_RUN duration, one call per packet, CPU 0; the floor on the packet as forwarded, interleaved; net: both less an empty program's time"})
    );
}
