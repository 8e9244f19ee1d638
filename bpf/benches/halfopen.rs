//! The half-open table's LRU lists: one common list (the default build) against per-CPU lists
//! (`BPF_F_NO_COMMON_LRU`: the same source built with `-DFLB_CT_NEW_MAP_FLAGS=2` by this
//! benchmark with clang-19), measured in the same run (root; `cargo bench -p ferrolb-bpf --bench
//! halfopen`). Not a test: it prints a table and a JSON summary. The figures behind
//! `docs/decisions/0007-conntrack-tables.md`.
//!
//! - **Eviction under skew**: a half-open table of 8,192 entries on this 2-CPU machine. 200
//!   legitimate half-open flows are opened from CPU 1 and 200 from CPU 0, then spoofed SYNs
//!   arrive on CPU 0 only (a NIC with one queue, or RSS putting a flood on one queue): how many
//!   of each group are still there after 2,000 (4,000 entries: within the table, beyond one
//!   CPU's half) and after 6,000 (12,000 entries: beyond the whole table) flood SYNs.
//! - **New connections, one CPU**: median `BPF_PROG_TEST_RUN` time of a SYN from a new source
//!   (each call a new flow in the half-open table).
//! - **New connections, both CPUs at once**: one thread pinned to each CPU, each sending
//!   50,000 SYNs of its own flows through the program; SYNs per second in all (what a common
//!   list's lock costs under contention).
#![allow(clippy::unwrap_used)]

mod common;

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Instant;

use common::*;
use ferrolb_bpf::maps::{CtKey, PROTO_TCP};
use ferrolb_bpf::{Datapath, DatapathConfig};
use serde_json::{Value, json};

const HALFOPEN: u32 = 8192;
const PORT: u16 = 82; // full NAT

/// The per-CPU-lists variant of the datapath object, built from the same source.
fn per_cpu_lru_object() -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!("flb-halfopen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("lb-per-cpu-lru.o");
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/c");
    let status = Command::new(std::env::var("CLANG").unwrap_or_else(|_| "clang-19".into()))
        .args(include_str!("../c/clang-flags").lines())
        .arg("-DFLB_CT_NEW_MAP_FLAGS=2")
        .arg(format!("-I{src}"))
        .args(["-c", &format!("{src}/lb.bpf.c"), "-o"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "clang-19 failed to build the variant");
    let obj = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    obj
}

fn load(object: Option<&[u8]>) -> Datapath {
    let cfg = DatapathConfig {
        max_services: 64,
        max_conntrack: 1 << 18,
        max_halfopen: HALFOPEN,
        ..Default::default()
    };
    let mut dp = match object {
        Some(o) => Datapath::load_object(&cfg, o),
        None => Datapath::load(&cfg),
    }
    .expect("load datapath");
    install(&mut dp, 1, VIP4.into(), PORT, 2, EP4.into(), LB4.into());
    dp
}

/// The SYN of flow `n` of group `g` (distinct source addresses per group).
fn syn(g: u8, n: u32) -> Vec<u8> {
    let client = Ipv4Addr::new(100, 64 + g, (n >> 8) as u8, n as u8);
    tcp(
        client.into(),
        VIP4.into(),
        1024 + (n % 60_000) as u16,
        PORT,
        0x02,
        &[],
    )
}

fn key(g: u8, n: u32) -> CtKey {
    let client = Ipv4Addr::new(100, 64 + g, (n >> 8) as u8, n as u8);
    CtKey::v4(client, 1024 + (n % 60_000) as u16, VIP4, PORT, PROTO_TCP)
}

fn skew(object: Option<&[u8]>, ifx: u32, flood: u32) -> (u32, u32) {
    let mut dp = load(object);
    let run = dp.test_runner().unwrap();
    pin_to(1);
    for n in 0..200 {
        run.run_timed(&syn(1, n), ifx).unwrap();
    }
    pin_to(0);
    for n in 0..200 {
        run.run_timed(&syn(0, n), ifx).unwrap();
    }
    for n in 0..flood {
        run.run_timed(&syn(9, n), ifx).unwrap();
    }
    let alive = |g: u8| -> u32 {
        (0..200)
            .filter(|n| dp.ct_get(&key(g, *n)).unwrap().is_some())
            .count() as u32
    };
    (alive(1), alive(0))
}

fn syn_cost(object: Option<&[u8]>, ifx: u32) -> f64 {
    let mut dp = load(object);
    let run = dp.test_runner().unwrap();
    pin_to(0);
    // Warm the table's memory first (as the cycles benchmark does), then measure new flows.
    for n in 0..HALFOPEN {
        run.run_timed(&syn(3, n), ifx).unwrap();
    }
    let mut ns: Vec<u32> = (0..20_000)
        .map(|n| run.run_timed(&syn(4, n), ifx).unwrap().1)
        .collect();
    median(&mut ns)
}

fn parallel_rate(object: Option<&[u8]>, ifx: u32) -> f64 {
    let mut dp = load(object);
    let run = dp.test_runner().unwrap();
    let t = Instant::now();
    std::thread::scope(|s| {
        for cpu in 0..2u8 {
            let run = &run;
            s.spawn(move || {
                pin_to(usize::from(cpu));
                for n in 0..50_000 {
                    run.run_timed(&syn(5 + cpu, n), ifx).unwrap();
                }
            });
        }
    });
    100_000.0 / t.elapsed().as_secs_f64()
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        println!("halfopen benchmark skipped: it needs root (network namespace, BPF)");
        return;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        println!("halfopen benchmark skipped: it compares CPUs and this machine has one");
        return;
    }
    let ifx = netns();
    let per_cpu = per_cpu_lru_object();
    let mut rows: Vec<(&str, Value)> = Vec::new();
    for (name, obj) in [
        ("common_list", None),
        ("per_cpu_lists", Some(per_cpu.as_slice())),
    ] {
        let (c1_small, c0_small) = skew(obj, ifx, 2000);
        let (c1_big, c0_big) = skew(obj, ifx, 6000);
        let cost = syn_cost(obj, ifx);
        let rate = parallel_rate(obj, ifx);
        rows.push((
            name,
            json!({
                "flood_2000_survivors_other_cpu": c1_small,
                "flood_2000_survivors_flood_cpu": c0_small,
                "flood_6000_survivors_other_cpu": c1_big,
                "flood_6000_survivors_flood_cpu": c0_big,
                "syn_ns_median": cost,
                "syns_per_s_two_cpus": rate.round(),
            }),
        ));
    }
    println!(
        "{:<14} {:>22} {:>22} {:>10} {:>14}",
        "lists", "flood 2000: cpu1/cpu0", "flood 6000: cpu1/cpu0", "SYN ns", "SYN/s 2 CPUs"
    );
    for (name, v) in &rows {
        println!(
            "{:<14} {:>16}/{:>3} of 200 {:>16}/{:>3} of 200 {:>10} {:>14}",
            name,
            v["flood_2000_survivors_other_cpu"],
            v["flood_2000_survivors_flood_cpu"],
            v["flood_6000_survivors_other_cpu"],
            v["flood_6000_survivors_flood_cpu"],
            v["syn_ns_median"],
            v["syns_per_s_two_cpus"],
        );
    }
    println!(
        "{}",
        json!({"halfopen_entries": HALFOPEN, "cpus": cpus,
               "variants": rows.iter().map(|(n, v)| json!({"lists": n, "figures": v})).collect::<Vec<_>>()})
    );
}
