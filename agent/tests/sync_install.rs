//! The agent's side of a bulk resync on a real datapath (root, a private network namespace):
//! a snapshot's chunks, applied from one thread, are written by one pinned thread per CPU and
//! every flow lands (the conntrack table never evicts), and the stale sweep removes exactly
//! the flows the snapshot did not carry.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use ferrolb_agent::ha::{Ha, HaConfig};
use ferrolb_bpf::{Datapath, DatapathConfig};
use ferrolb_consync::{Flow, FlowKey, Node};

const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

fn flow(i: u32) -> Flow {
    Flow {
        key: FlowKey {
            protocol: 6,
            client: IpAddr::V4(Ipv4Addr::from(0x0a40_0000 + (i >> 14))),
            client_port: 1024 + (i & 0x3fff) as u16,
            vip: IpAddr::V4(VIP),
            vip_port: 80,
        },
        nat_source: IpAddr::V4(VIP),
        nat_source_port: 1024 + (i % 60_000) as u16,
        // One endpoint per 60,000 flows: every reply key is distinct.
        endpoint: IpAddr::V4(Ipv4Addr::new(10, 10, 10, 11 + (i / 60_000) as u8)),
        endpoint_port: 8080,
        mode: 2,
        state: 3,
        fin: 0,
        timeout_s: 240,
        origin: 0,
        age_ms: 1_000,
        idle_ms: 10,
    }
}

fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one CPU set; applies to this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

#[test]
fn a_snapshot_installs_in_parallel_and_the_sweep_removes_only_stale_flows() {
    if !ferrolb_tests::private_netns(
        "a_snapshot_installs_in_parallel_and_the_sweep_removes_only_stale_flows",
    ) {
        return;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let dp = Datapath::load(&DatapathConfig {
        max_services: 64,
        max_conntrack: 65_536,
        node_id: 1,
        ..Default::default()
    })
    .expect("load datapath");
    let ha = Arc::new(Ha::new(
        HaConfig::sync_only(1, vec!["127.0.0.1:1".parse().unwrap()]),
        dp.sync_table().unwrap(),
        ferrolb_agent::roles::RoleBus::default(),
    ));
    // Three quarters of the table (two entries a flow), applied from one thread on CPU 0.
    let cap = dp.capacity().conntrack;
    let n = cap * 3 / 8;
    let flows: Vec<Flow> = (0..n).map(flow).collect();
    if cpus >= 2 {
        pin_to(0);
    }
    let mut installed = 0;
    for chunk in flows.chunks(4096) {
        installed += ha.apply(0, chunk, &[]);
    }
    assert_eq!(installed, u64::from(n), "every flow applied");
    assert_eq!(
        dp.ct_entries().len() as u32,
        2 * n,
        "no entry evicted ({cpus} CPUs)"
    );
    // The sweep's read sees every flow of origin 0 and none of another origin.
    let held = ha.flows_of(0);
    assert_eq!(held.len() as u32, n);
    assert!(ha.flows_of(2).is_empty());
    // A later snapshot carries all but the first 100: those go, with both entries.
    let stale: Vec<FlowKey> = flows[..100].iter().map(|f| f.key).collect();
    assert_eq!(ha.remove_stale(0, &stale), 100);
    assert_eq!(dp.ct_entries().len() as u32, 2 * (n - 100));
    let left: HashSet<FlowKey> = ha.flows_of(0);
    assert!(stale.iter().all(|k| !left.contains(k)));
    // Removing them again, or naming them as another origin's, removes nothing.
    assert_eq!(ha.remove_stale(0, &stale), 0);
    assert_eq!(ha.remove_stale(2, &[flows[200].key]), 0);
    assert_eq!(dp.ct_entries().len() as u32, 2 * (n - 100));
}
