//! The conntrack collector's pass (`Collector::entries` + `Collector::collect_from`, what the
//! agent runs every `--gc-interval`) over a table of the agent's default size holding `FLOWS`
//! flows (two entries each), half of them idle past their timeout: the time of the walk, of
//! the removal, and the CPU time per removed flow (root; `cargo bench -p ferrolb-bpf --bench
//! collect [-- ROUNDS]`). Not a test: it prints a table and a JSON summary. What a node whose
//! clients open tens of thousands of connections a second pays to forget them.
//!
//! Beside it, every round, the baseline: the collector as it was before (each idle entry read
//! again, its peer read, then deleted from both tables; one entry at a time, through the
//! datapath's public map API), over the same table refilled the same way. The ratio is
//! printed per round.
#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;
use std::time::Instant;

use ferrolb_bpf::maps::{CTF_LOCAL, Ct, CtKey, CtState, PROTO_TCP, addr_words};
use ferrolb_bpf::{Datapath, DatapathConfig, monotonic_ns};
use serde_json::json;

const FLOWS: u32 = 200_000;
const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

/// Flow `i`'s two entries (a DNAT flow to one of 4 endpoints), last seen at `last_ns`.
fn flow(i: u32, last_ns: u64) -> [(CtKey, Ct); 2] {
    let client = Ipv4Addr::from(0x0a40_0000 + (i >> 14));
    let sport = 1024 + (i & 0x3fff) as u16;
    let ep = Ipv4Addr::new(10, 10, 10, 11 + (i % 4) as u8);
    let k = CtKey::v4(client, sport, VIP, 80, PROTO_TCP);
    let base = Ct {
        svc_id: 1,
        timeout_s: 240,
        state: CtState::TimeWait.as_u8(),
        flags: CTF_LOCAL,
        created_ns: last_ns,
        last_ns,
        ..Default::default()
    };
    let o = Ct {
        nat_saddr: addr_words(client.into()).0,
        nat_daddr: addr_words(ep.into()).0,
        nat_sport: sport.to_be(),
        nat_dport: 8080u16.to_be(),
        dir: 0,
        ..base
    };
    let r = Ct {
        nat_saddr: addr_words(VIP.into()).0,
        nat_daddr: addr_words(client.into()).0,
        nat_sport: 80u16.to_be(),
        nat_dport: sport.to_be(),
        dir: 1,
        ..base
    };
    [(k, o), (k.peer(&o), r)]
}

/// The old collector: per idle entry of the listing, read it again (conntrack, then ct_new),
/// read its peer, delete it from both tables. Returns the entries removed.
fn baseline_pass(dp: &mut Datapath, entries: &[(CtKey, Ct)], now: u64) -> usize {
    let mut removed = 0;
    for (k, v) in entries {
        if !v.expired(k.proto, now) {
            continue;
        }
        let Ok(Some(v)) = dp.ct_get(k) else { continue };
        if !v.expired(k.proto, now) {
            continue;
        }
        if let Ok(Some(pv)) = dp.ct_get(&k.peer(&v))
            && !pv.expired(k.proto, now)
        {
            continue;
        }
        if dp.ct_delete(k).is_ok() {
            removed += 1;
        }
    }
    removed
}

fn cpu_s() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn main() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("collect: needs root (eBPF maps); skipped");
        return;
    }
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5)
        .clamp(1, 20);
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
    let mut dp = Datapath::load(&DatapathConfig {
        max_services: 64,
        max_conntrack: 1 << 20,
        ..Default::default()
    })
    .expect("load datapath");
    let now = monotonic_ns();
    let old = now.saturating_sub(600_000_000_000).max(1);
    // The live half, once.
    for i in (0..FLOWS).filter(|i| i % 2 == 1) {
        for (k, v) in flow(i, now) {
            dp.ct_insert(&k, &v).unwrap();
        }
    }
    let mut c = dp.collector().unwrap();
    println!(
        "{FLOWS} flows, half idle; per round: walk, removal, CPU per removed flow; the old collector beside it"
    );
    let mut rows = Vec::new();
    let refill = |dp: &mut Datapath| {
        for i in (0..FLOWS).filter(|i| i % 2 == 0) {
            for (k, v) in flow(i, old) {
                dp.ct_insert(&k, &v).unwrap();
            }
        }
    };
    for r in 0..rounds {
        // The baseline first, on the same table.
        refill(&mut dp);
        let entries = c.entries();
        let b0 = cpu_s();
        let removed = baseline_pass(&mut dp, &entries, monotonic_ns());
        let base_us = (cpu_s() - b0) * 1e6 / (removed as f64 / 2.0);
        assert_eq!(
            removed, FLOWS as usize,
            "the baseline removes every idle entry"
        );
        refill(&mut dp);
        let (t0, c0) = (Instant::now(), cpu_s());
        let entries = c.entries();
        let (t1, c1) = (Instant::now(), cpu_s());
        let removed = c.collect_from(&entries, monotonic_ns()).len();
        let (t2, c2) = (Instant::now(), cpu_s());
        assert_eq!(removed, FLOWS as usize, "every idle entry removed");
        assert_eq!(c.entries().len(), FLOWS as usize, "every live entry kept");
        let walk_ms = (t1 - t0).as_secs_f64() * 1e3;
        let remove_ms = (t2 - t1).as_secs_f64() * 1e3;
        let us_per_flow = (c2 - c1) * 1e6 / (removed as f64 / 2.0);
        println!(
            "round {r}: walk {walk_ms:.1} ms ({:.0} ms CPU) of {} entries, removal {remove_ms:.1} ms, {us_per_flow:.2} us CPU per removed flow; old collector {base_us:.2} us ({:.2}x)",
            (c1 - c0) * 1e3,
            entries.len(),
            us_per_flow / base_us
        );
        rows.push(
            json!({"walk_ms": walk_ms, "remove_ms": remove_ms, "cpu_us_per_flow": us_per_flow,
                         "old_cpu_us_per_flow": base_us, "ratio": us_per_flow / base_us}),
        );
    }
    println!("{}", json!({"flows": FLOWS, "rounds": rows}));
}
