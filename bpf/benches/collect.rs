//! The conntrack collector's pass (`Collector::pass`, what the agent runs every
//! `--gc-interval`: the tables walked a chunk at a time, each chunk's idle flows removed) over
//! a table of the agent's default size holding `FLOWS` flows (two entries each), half of them
//! idle past their timeout: its time, the CPU time per removed flow, and the most heap memory
//! it held at once (root; `cargo bench -p ferrolb-bpf --bench collect [-- ROUNDS]`). Not a
//! test: it prints a table and a JSON summary. What a node whose clients open tens of
//! thousands of connections a second pays to forget them.
//!
//! Beside it, every round, over the same table refilled the same way, two baselines: the pass
//! as the agent ran it before (`Collector::entries`, the whole table listed into memory, then
//! `Collector::collect_from`), and the collector before that (each idle entry read again, its
//! peer read, then deleted from both tables; one entry at a time, through the datapath's
//! public map API). Ratios are printed per round.
#![allow(clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use ferrolb_bpf::maps::{CTF_LOCAL, Ct, CtKey, CtState, PROTO_TCP, addr_words};
use ferrolb_bpf::{COLLECT_CHUNK, Datapath, DatapathConfig, monotonic_ns};
use serde_json::json;

const FLOWS: u32 = 200_000;

/// The system allocator, counting the bytes held and the most held since the last reset.
struct Counting;
static HELD: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: as the caller promised for `l`.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = HELD.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from `alloc` with `l`.
        unsafe { System.dealloc(p, l) };
        HELD.fetch_sub(l.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Starts measuring the most heap memory held from now on, above what is held now.
fn peak_reset() -> usize {
    let held = HELD.load(Ordering::Relaxed);
    PEAK.store(held, Ordering::Relaxed);
    held
}

/// MB held at most since `peak_reset` returned `base`.
fn peak_mb(base: usize) -> f64 {
    PEAK.load(Ordering::Relaxed).saturating_sub(base) as f64 / 1e6
}
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
        ..base
    };
    [(k, o), Ct::reply_of(&k, &o)]
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
    // The live half, once: established (the rule's 240 s timeout outlasts the benchmark).
    for i in (0..FLOWS).filter(|i| i % 2 == 1) {
        for (k, v) in flow(i, now) {
            let v = Ct {
                state: CtState::Established.as_u8(),
                ..v
            };
            dp.ct_insert(&k, &v).unwrap();
        }
    }
    let mut c = dp.collector().unwrap();
    println!(
        "{FLOWS} flows, half idle, in a 1,048,576-entry table; per round: the pass a chunk at a time, then the same table listed whole (the pass before), then the oldest collector"
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
        // The oldest baseline first, on the same table.
        refill(&mut dp);
        let b0 = cpu_s();
        let entries = c.entries();
        let removed = baseline_pass(&mut dp, &entries, monotonic_ns());
        let oldest_us = (cpu_s() - b0) * 1e6 / (removed as f64 / 2.0);
        assert_eq!(
            removed, FLOWS as usize,
            "the baseline removes every idle entry"
        );
        drop(entries);

        // The pass as it was: the whole table listed, then collected.
        refill(&mut dp);
        let base = peak_reset();
        let (t0, c0) = (Instant::now(), cpu_s());
        let entries = c.entries();
        let removed = c.collect_from(&entries, monotonic_ns()).len();
        let (t1, c1) = (Instant::now(), cpu_s());
        let listed_mb = peak_mb(base);
        drop(entries);
        assert_eq!(removed, FLOWS as usize, "every idle entry removed");
        let listed_ms = (t1 - t0).as_secs_f64() * 1e3;
        let listed_us = (c1 - c0) * 1e6 / (removed as f64 / 2.0);

        // Now: a chunk at a time.
        refill(&mut dp);
        let base = peak_reset();
        let (t0, c0) = (Instant::now(), cpu_s());
        let mut gone = 0;
        let stats = c.pass(monotonic_ns(), COLLECT_CHUNK, |_| {}, |g| gone += g.len());
        let (t1, c1) = (Instant::now(), cpu_s());
        let mb = peak_mb(base);
        assert_eq!(gone, FLOWS as usize, "every idle entry removed");
        assert_eq!(stats.removed, gone);
        assert_eq!(c.entries().len(), FLOWS as usize, "every live entry kept");
        let ms = (t1 - t0).as_secs_f64() * 1e3;
        let us_per_flow = (c1 - c0) * 1e6 / (gone as f64 / 2.0);

        // The same with a bound a fifth of the default: what a node pays when more idle
        // flows than the bound holds go in one pass.
        refill(&mut dp);
        c.set_pending_max(13_107);
        let base = peak_reset();
        let c0 = cpu_s();
        let mut gone = 0;
        let tight = c.pass(monotonic_ns(), COLLECT_CHUNK, |_| {}, |g| gone += g.len());
        let tight_us = (cpu_s() - c0) * 1e6 / (gone as f64 / 2.0);
        let tight_mb = peak_mb(base);
        c.set_pending_max(65_536);
        assert_eq!(gone, FLOWS as usize, "every idle entry removed");
        println!(
            "round {r}: pass {ms:.0} ms, {us_per_flow:.2} us CPU per removed flow, {mb:.1} MB held at most ({} waited at most, {} decided alone); \
             listed whole: {listed_ms:.0} ms, {listed_us:.2} us, {listed_mb:.1} MB ({:.2}x CPU, {:.3}x memory); oldest collector {oldest_us:.2} us ({:.2}x); \
             a fifth of the bound: {tight_us:.2} us ({:.2}x), {tight_mb:.1} MB, {} decided alone",
            stats.peak_waiting,
            stats.spilled,
            us_per_flow / listed_us,
            mb / listed_mb,
            us_per_flow / oldest_us,
            tight_us / listed_us,
            tight.spilled
        );
        rows.push(json!({"pass_ms": ms, "cpu_us_per_flow": us_per_flow, "peak_mb": mb,
            "peak_waiting": stats.peak_waiting, "spilled": stats.spilled,
            "listed_ms": listed_ms, "listed_cpu_us_per_flow": listed_us, "listed_peak_mb": listed_mb,
            "oldest_cpu_us_per_flow": oldest_us, "tight_cpu_us_per_flow": tight_us,
            "tight_peak_mb": tight_mb, "tight_spilled": tight.spilled,
            "cpu_ratio": us_per_flow / listed_us, "memory_ratio": mb / listed_mb}));
    }
    println!("{}", json!({"flows": FLOWS, "rounds": rows}));
}
