//! `bench_attach floor|nop IFACE...`: attaches the benchmark's floor program (FIB lookup, MAC
//! rewrite, redirect) or its zero (returns at once: the kernel routes) at TC ingress of each
//! interface in the current network namespace, and keeps them attached until killed. For
//! `scripts/bench_cps_ab.py --aa --baseline-program`, which decomposes ferrolb's cost per
//! connection at the router (the TC hook, a stateless redirect, the flow state). Not a test.

use ferrolb_bpf::{Datapath, DatapathConfig};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((which, ifaces)) = args.split_first().filter(|(_, i)| !i.is_empty()) else {
        eprintln!("usage: bench_attach floor|nop IFACE...");
        std::process::exit(2);
    };
    // Small tables: only the benchmark program runs; the datapath's maps are never used.
    let cfg = DatapathConfig {
        max_conntrack: 1024,
        max_services: 16,
        max_affinity: 1024,
        ..DatapathConfig::default()
    };
    let mut dp = match Datapath::load(&cfg) {
        Ok(dp) => dp,
        Err(e) => {
            eprintln!("bench_attach: load: {e}");
            std::process::exit(1);
        }
    };
    for iface in ifaces {
        if let Err(e) = dp.attach_bench_program(iface, which) {
            eprintln!("bench_attach: {e}");
            std::process::exit(1);
        }
    }
    println!("attached {which} to {}", ifaces.join(" "));
    loop {
        std::thread::park();
    }
}
