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

    // The origin's own deletes (live sync) go the same way: both entries of each flow named
    // by its original key, a flow named twice removed once; a key naming no flow (an
    // unknown protocol) is counted malformed; a flow named by its reply key, by another
    // origin, or already gone is left alone.
    use std::sync::atomic::Ordering::Relaxed;
    let f = &flows[300];
    let reply_key = FlowKey {
        protocol: 6,
        client: f.endpoint,
        client_port: f.endpoint_port,
        vip: f.nat_source,
        vip_port: f.nat_source_port,
    };
    let bogus = FlowKey {
        protocol: 47,
        ..f.key
    };
    let before = ha.counters.malformed.load(Relaxed);
    let deletes = [f.key, f.key, flows[301].key, reply_key, bogus, flows[0].key];
    assert_eq!(ha.apply(2, &[], &[flows[302].key]), 0, "another origin's");
    assert_eq!(ha.apply(0, &[], &deletes), 2);
    assert_eq!(ha.counters.malformed.load(Relaxed), before + 1);
    assert_eq!(ha.counters.deleted.load(Relaxed), 2);
    assert_eq!(dp.ct_entries().len() as u32, 2 * (n - 102));
    let left = ha.flows_of(0);
    assert!(!left.contains(&f.key) && !left.contains(&flows[301].key));
    assert!(left.contains(&flows[302].key));
}

/// Ownership on a real datapath (decision 0009): a peer's version of a flow this node owns
/// replaces it only when its owning direction carried a packet more recently (the flow is then
/// given: synced, the peer's origin); a third node's older version is refused too; and a
/// synced copy that carries its owning direction here is claimed back by the collector's pass.
#[test]
fn the_most_recent_version_of_a_flow_wins_and_traffic_claims_it_back() {
    if !ferrolb_tests::private_netns(
        "the_most_recent_version_of_a_flow_wins_and_traffic_claims_it_back",
    ) {
        return;
    }
    use ferrolb_agent::ha::flows::entries_of;
    use ferrolb_bpf::maps::{CTF_LOCAL, CTF_SYNCED};
    use std::sync::atomic::Ordering::Relaxed;
    let mut dp = Datapath::load(&DatapathConfig {
        max_services: 64,
        max_conntrack: 4096,
        node_id: 1,
        ..Default::default()
    })
    .expect("load datapath");
    let peers = vec![
        "127.0.0.1:1".parse().unwrap(),
        "127.0.0.1:2".parse().unwrap(),
    ];
    let ha = Arc::new(Ha::new(
        HaConfig::sync_only(1, peers),
        dp.sync_table().unwrap(),
        ferrolb_agent::roles::RoleBus::default(),
    ));
    // Our own flow, its last packet now.
    let now = ferrolb_bpf::monotonic_ns();
    let f = Flow {
        origin: 1,
        idle_ms: 0,
        ..flow(7)
    };
    let [(k, o), (rk, r)] = entries_of(&f, now, |_, _, _| (1, 0)).unwrap();
    let local = |v: ferrolb_bpf::maps::Ct| ferrolb_bpf::maps::Ct {
        flags: CTF_LOCAL,
        ..v
    };
    dp.ct_insert(&rk, &local(r)).unwrap();
    dp.ct_insert(&k, &local(o)).unwrap();
    let held = |dp: &Datapath| dp.ct_get(&k).unwrap().unwrap();
    // Node 0's version whose last packet was 5 s ago: stale, refused.
    ha.apply(
        0,
        &[Flow {
            origin: 0,
            idle_ms: 5_000,
            ..flow(7)
        }],
        &[],
    );
    assert_eq!((held(&dp).origin, held(&dp).flags), (1, CTF_LOCAL));
    assert_eq!(ha.counters.skipped_local.load(Relaxed), 1);
    // A version stamped later than our last packet: the flow is given to node 0.
    std::thread::sleep(std::time::Duration::from_millis(20));
    ha.apply(
        0,
        &[Flow {
            origin: 0,
            idle_ms: 0,
            ..flow(7)
        }],
        &[],
    );
    assert_eq!((held(&dp).origin, held(&dp).flags), (0, CTF_SYNCED));
    assert_eq!(ha.counters.handoffs_given.load(Relaxed), 1);
    // A third node's older version does not take it from node 0; a newer one does.
    ha.apply(
        2,
        &[Flow {
            origin: 2,
            idle_ms: 5_000,
            ..flow(7)
        }],
        &[],
    );
    assert_eq!(held(&dp).origin, 0);
    std::thread::sleep(std::time::Duration::from_millis(20));
    ha.apply(
        2,
        &[Flow {
            origin: 2,
            idle_ms: 0,
            ..flow(7)
        }],
        &[],
    );
    assert_eq!(held(&dp).origin, 2);
    // Its owning direction (the client's packets: full NAT from the VIP) arrives here again.
    let mut v = held(&dp);
    v.packets = 3;
    v.last_ns = ferrolb_bpf::monotonic_ns();
    dp.ct_insert(&k, &v).unwrap();
    let entries = dp.ct_entries();
    let (claimed, orphans) = ha.ownership_pass(&entries, std::time::Duration::from_secs(10));
    assert_eq!((claimed, orphans), (1, 0));
    let mine = held(&dp);
    assert_eq!(
        (mine.origin, mine.flags & (CTF_LOCAL | CTF_SYNCED)),
        (1, CTF_LOCAL)
    );
    let reply = dp.ct_get(&rk).unwrap().unwrap();
    assert_eq!((reply.origin, reply.flags & CTF_SYNCED), (1, 0));
    assert_eq!(ha.counters.handoffs_taken.load(Relaxed), 1);
    // A copy of a live peer that saw nothing here is neither claimed nor an orphan.
    ha.apply(
        2,
        &[Flow {
            origin: 2,
            idle_ms: 0,
            ..flow(8)
        }],
        &[],
    );
    let entries = dp.ct_entries();
    assert_eq!(
        ha.ownership_pass(&entries, std::time::Duration::from_secs(10)),
        (0, 0)
    );
}
