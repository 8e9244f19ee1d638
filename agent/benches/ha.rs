//! HA benchmarks (root; `cargo bench --bench ha [-- sync|lag|cluster|failover]`). Not tests: they
//! measure, print a JSON summary, and compare against a baseline measured in the same run.
//!
//! - `sync`: bulk resync rate. Node A's datapath holds N flows (inserted into its conntrack
//!   map); node B subscribes and installs them. Real code paths: the map walk, protobuf, gRPC
//!   over loopback, the map inserts on B. Baseline: the map walk alone (what any sync must do).
//! - `lag`: steady-state sync lag. Flows are created in A's datapath by running first packets
//!   (UDP: a TCP flow is synced when its handshake completes, through the same path) through
//!   the program (BPF_PROG_TEST_RUN) at a fixed rate; the agent's event path publishes
//!   them; the time from the packet to the flow being present in B's map is sampled.
//! - `cluster`: sync as the cluster grows, 2 to 8 nodes in this process (full mesh over
//!   loopback, real datapath maps, protobuf and gRPC), each node holding 25,000 flows of its
//!   own. Bulk resync: the last node joins and receives every peer's snapshot (time until it
//!   holds all of them). Sync lag: node 0 publishes 1,000 new flows; time until every peer
//!   holds them (median of 5 rounds). Ratios against the 2-node figures of the same run.
//! - `failover`: the silent death of the MASTER in the `ha-pair` lab (same traffic shape as the
//!   keepalived baseline: 4 TCP streams, 4 UDP flows, fault at 3 s), against keepalived
//!   (VRRPv3, 100 ms adverts) + conntrackd FTFW + nftables NAT (`bench/keepalived-baseline`,
//!   config c) run in the same invocation.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferrolb_agent::ha::{Ha, HaConfig};
use ferrolb_bpf::maps::*;
use ferrolb_bpf::{Datapath, DatapathConfig, lut, monotonic_ns};
use ferrolb_consync::{Config, Consync};
use ferrolb_tests::inet_csum as csum;
use serde_json::{Value, json};

const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

fn datapath(node: u16, conntrack: u32) -> Datapath {
    Datapath::load(&DatapathConfig {
        max_services: 64,
        max_conntrack: conntrack,
        node_id: node,
        ..Default::default()
    })
    .expect("load datapath")
}

fn ha(node: u16, peer: SocketAddr, dp: &Datapath) -> Arc<Ha> {
    Arc::new(Ha::new(
        HaConfig::sync_only(node, vec![peer]),
        dp.sync_table().unwrap(),
        ferrolb_agent::roles::RoleBus::default(),
    ))
}

async fn consync(node: u16, port: u16, peer: u16, ha: &Arc<Ha>) -> Arc<Consync> {
    let cfg = Config::new(
        u32::from(node),
        SocketAddr::from(([127, 0, 0, 1], port)),
        vec![SocketAddr::from(([127, 0, 0, 1], peer))],
    );
    let node: Arc<dyn ferrolb_consync::Node> = ha.clone();
    let cs = Consync::start(cfg, node).await.unwrap();
    let _ = ha.consync.set(cs.clone());
    cs
}

fn private_netns() {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare (needs root)");
    let ok = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "ip link set lo up");
}

/// A full-NAT flow of client `i` as node 0 would have created it.
fn flow(i: u32) -> (CtKey, Ct) {
    let client = Ipv4Addr::from(0x0a40_0000 + (i >> 14));
    let sport = 1024 + (i & 0x3fff) as u16;
    let k = CtKey::v4(client, sport, VIP, 80, PROTO_TCP);
    let now = monotonic_ns();
    let v = Ct {
        nat_saddr: addr_words(VIP.into()).0,
        // One endpoint per 60,000 flows, so every reply key (endpoint, port) is distinct.
        nat_daddr: addr_words(Ipv4Addr::new(10, 10, 10 + (i / 60_000) as u8, 11).into()).0,
        nat_sport: (1024 + (i % 60000) as u16).to_be(),
        nat_dport: 8080u16.to_be(),
        svc_id: 1,
        timeout_s: 240,
        ep_idx: 0,
        origin: 0,
        dir: 0,
        state: CtState::Established.as_u8(),
        flags: CTF_LOCAL,
        mode: 2,
        created_ns: now,
        last_ns: now,
        ..Default::default()
    };
    (k, v)
}

fn bench_sync(n: u32) -> Value {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cap = (n * 2 + 1024).next_power_of_two();
    let mut a = datapath(0, cap);
    let b = datapath(1, cap);
    let t = Instant::now();
    for i in 0..n {
        let (k, v) = flow(i);
        a.ct_insert(&k, &v).unwrap();
    }
    let fill_s = t.elapsed().as_secs_f64();
    // Baseline: walking A's map once (every sync's first step).
    let t = Instant::now();
    let walked = a.ct_entries().len();
    let walk_s = t.elapsed().as_secs_f64();
    assert_eq!(walked as u32, n);
    let (ha_a, ha_b) = (
        ha(0, "127.0.0.1:23002".parse().unwrap(), &a),
        ha(1, "127.0.0.1:23001".parse().unwrap(), &b),
    );
    // Where the time goes: building the snapshot on A, installing it on B (no network).
    use ferrolb_consync::Node;
    let t = Instant::now();
    let mut flows = Vec::new();
    ha_a.own_flows(&mut |c| {
        flows.extend(c);
        true
    });
    let own_s = t.elapsed().as_secs_f64();
    let scratch = datapath(2, cap);
    let ha_c = ha(2, "127.0.0.1:23009".parse().unwrap(), &scratch);
    let t = Instant::now();
    for chunk in flows.chunks(4096) {
        ha_c.apply(0, chunk, &[]);
    }
    let apply_s = t.elapsed().as_secs_f64();
    // The stale sweep's read: every key of the origin's flows this node holds.
    let t = Instant::now();
    let held = ha_c.flows_of(0);
    let held_s = t.elapsed().as_secs_f64();
    assert_eq!(held.len() as u32, n);
    drop(ha_c);
    drop(scratch);
    let (took, again) = rt.block_on(async {
        let ca = consync(0, 23001, 23002, &ha_a).await;
        let t = Instant::now();
        let cb = consync(1, 23002, 23001, &ha_b).await;
        loop {
            let p = &cb.peers()[0];
            if p.synced_once {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(300), "snapshot too slow");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let took = t.elapsed().as_secs_f64();
        // Again, onto a node that holds every flow already (a reconnect after an overflow):
        // the stale sweep now compares every key.
        let t = Instant::now();
        ca.resync();
        loop {
            if cb.peers()[0].snapshots >= 2 {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(300),
                "second snapshot too slow"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (took, t.elapsed().as_secs_f64())
    });
    let installed = b.ct_entries().len() / 2;
    assert_eq!(installed as u32, n, "B holds every flow");
    json!({
        "flows": n,
        "fill_s": fill_s,
        "walk_map_s": walk_s,
        "walk_map_entries_per_s": (n as f64 / walk_s).round(),
        "resync_s": took,
        "snapshot_build_s": own_s,
        "install_s": apply_s,
        "held_keys_walk_s": held_s,
        "resync_flows_per_s": (n as f64 / took).round(),
        "resync_entries_per_s": (2.0 * n as f64 / took).round(),
        "resync_onto_held_s": again,
        "resync_onto_held_entries_per_s": (2.0 * n as f64 / again).round(),
        "ratio_to_map_walk": walk_s / took,
    })
}

// --- packets for the lag benchmark --------------------------------------------------------

/// A UDP datagram (src:sport -> dst:dport, 4 bytes of payload). A flow is synced when it is
/// confirmed: its endpoint answered and its client sent again (a TCP flow, when its handshake
/// completes, through the same event path; a lone query, or a lone SYN, is not synced at all).
fn datagram(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut p = vec![0u8; 14 + 20 + 8 + 4];
    p[12] = 0x08;
    let ip = &mut p[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&32u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = csum(ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let udp = &mut p[34..46];
    udp[0..2].copy_from_slice(&sport.to_be_bytes());
    udp[2..4].copy_from_slice(&dport.to_be_bytes());
    udp[4..6].copy_from_slice(&12u16.to_be_bytes());
    udp[8..12].copy_from_slice(b"ping");
    let mut pseudo = 0u32;
    for w in [src.octets(), dst.octets()] {
        pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]))
            + u32::from(u16::from_be_bytes([w[2], w[3]]));
    }
    pseudo += 17 + 12;
    let c = csum(udp, pseudo);
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    p
}

/// Opens and confirms a full-NAT UDP flow through `dp`: the client's datagram, the endpoint's
/// answer to the translated source, the client's next datagram (the one that confirms it and
/// reports it). False when the datapath dropped the first (no free NAT port).
fn confirmed_flow(dp: &mut Datapath, client: Ipv4Addr, sport: u16) -> bool {
    let q = datagram(client, sport, VIP, 80);
    let (rc, out) = dp.test_run(&q).unwrap();
    if rc == 2 || out.len() < 38 {
        return false;
    }
    let ep = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
    let nport = u16::from_be_bytes([out[34], out[35]]);
    let eport = u16::from_be_bytes([out[36], out[37]]);
    dp.test_run(&datagram(ep, eport, VIP, nport)).unwrap();
    dp.test_run(&q).unwrap();
    true
}

fn install_service(dp: &mut Datapath) {
    let eps = [
        Ipv4Addr::new(10, 10, 10, 11),
        Ipv4Addr::new(10, 10, 10, 12),
        Ipv4Addr::new(10, 10, 10, 13),
    ];
    let mut be = Backends {
        count: eps.len() as u32,
        ..Default::default()
    };
    let mut lut_eps = Vec::new();
    for (i, a) in eps.iter().enumerate() {
        be.ep[i] = Ep {
            addr: addr_words((*a).into()).0,
            snat_addr: [0; 4],
            port: 8080,
            weight: 1,
            active: 1,
            pad: [0; 3],
        };
        let mut identity = a.octets().to_vec();
        identity.extend(8080u16.to_be_bytes());
        lut_eps.push(lut::LutEndpoint {
            slot: i as u8,
            identity,
            weight: 1,
        });
    }
    let table = lut::maglev(&lut_eps);
    be.lut_len = table.len() as u32;
    be.lut[..table.len()].copy_from_slice(&table);
    dp.set_backends(2, &be).unwrap();
    dp.reset_service_state(1).unwrap();
    let addr = addr_words(VIP.into()).0;
    dp.set_service(
        &SvcKey {
            addr,
            port: 80u16.to_be(),
            proto: PROTO_UDP,
            family: FAMILY_V4,
        },
        &Svc {
            id: 1,
            be_slot: 2,
            timeout_s: 240,
            port_base: 80,
            mode: 2,
            sel: 1,
            flags: 0,
        },
    )
    .unwrap();
    dp.set_ranges(
        &RangeKey {
            addr,
            proto: PROTO_UDP,
            family: FAMILY_V4,
            pad: 0,
        },
        &Ranges::default(),
    )
    .unwrap();
}

fn bench_lag(rate: u32, seconds: u32) -> Value {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cap = (rate * seconds * 4 + 4096).next_power_of_two();
    let mut a = datapath(0, cap);
    let mut b = datapath(1, cap);
    install_service(&mut a);
    install_service(&mut b);
    let mut events = a.take_events().unwrap();
    let (ha_a, ha_b) = (
        ha(0, "127.0.0.1:23012".parse().unwrap(), &a),
        ha(1, "127.0.0.1:23011".parse().unwrap(), &b),
    );
    let probe = b.sync_table().unwrap();
    let (_ca, cb) = rt.block_on(async {
        let ca = consync(0, 23011, 23012, &ha_a).await;
        let cb = consync(1, 23012, 23011, &ha_b).await;
        while !cb.peers()[0].synced_once {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (ca, cb)
    });
    // Samples: flow key -> when the packet that confirmed it ran.
    let pending: Arc<Mutex<BTreeMap<CtKey, Instant>>> = Arc::default();
    let lags: Arc<Mutex<Vec<f64>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The agent's event path: drain the ring every 20 ms, publish.
    let pub_ha = ha_a.clone();
    let pub_stop = stop.clone();
    let publisher = std::thread::spawn(move || {
        let mut batch = Vec::new();
        loop {
            // Read the flag first: the pass after it was set drains what is left.
            let stopping = pub_stop.load(std::sync::atomic::Ordering::Relaxed);
            while let Some(e) = events.try_next() {
                batch.push((e.key, e.val));
            }
            if !batch.is_empty() {
                pub_ha.publish_events(&batch, &[]);
                batch.clear();
            }
            if stopping {
                break;
            }
            std::thread::sleep(Duration::from_millis(
                ferrolb_agent::agent::EVENT_POLL_MS_CLUSTER,
            ));
        }
    });
    let (p2, l2, s2) = (pending.clone(), lags.clone(), stop.clone());
    let sampler = std::thread::spawn(move || {
        while !s2.load(std::sync::atomic::Ordering::Relaxed) || !p2.lock().unwrap().is_empty() {
            let keys: Vec<(CtKey, Instant)> =
                p2.lock().unwrap().iter().map(|(k, t)| (*k, *t)).collect();
            for (k, t) in keys {
                if let Ok(Some(_)) = probe.get(&k) {
                    l2.lock().unwrap().push(t.elapsed().as_secs_f64() * 1000.0);
                    p2.lock().unwrap().remove(&k);
                } else if t.elapsed() > Duration::from_secs(5) {
                    p2.lock().unwrap().remove(&k);
                    l2.lock().unwrap().push(f64::INFINITY);
                }
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    });
    let total = rate * seconds;
    let start = Instant::now();
    let mut created = 0u32;
    for i in 0..total {
        let due = start + Duration::from_secs_f64(f64::from(i) / f64::from(rate));
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let client = Ipv4Addr::from(0x0a80_0000 + (i >> 14));
        let sport = 1024 + (i & 0x3fff) as u16;
        if !confirmed_flow(&mut a, client, sport) {
            continue; // dropped (no free NAT port): no flow to sample
        }
        created += 1;
        if i % 20 == 0 {
            pending
                .lock()
                .unwrap()
                .insert(CtKey::v4(client, sport, VIP, 80, PROTO_UDP), Instant::now());
        }
    }
    let achieved = f64::from(total) / start.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    publisher.join().unwrap();
    sampler.join().unwrap();
    let mut l = lags.lock().unwrap().clone();
    l.sort_by(f64::total_cmp);
    let pct = |p: f64| l[((l.len() as f64 - 1.0) * p).round() as usize];
    let missing = l.iter().filter(|x| x.is_infinite()).count();
    std::thread::sleep(Duration::from_millis(500));
    let installed = cb.peers()[0].applied;
    let lost_events = a.counters()[Counter::EventsLost as usize];
    let on_a = a.ct_entries().iter().filter(|(_, v)| v.dir == 0).count();
    let on_b = b.ct_entries().iter().filter(|(_, v)| v.dir == 0).count();

    json!({
        "target_rate_per_s": rate,
        "achieved_rate_per_s": achieved.round(),
        "flows": created,
        "samples": l.len(),
        "missing": missing,
        "lag_ms_p50": pct(0.5),
        "lag_ms_p99": pct(0.99),
        "lag_ms_max": pct(1.0),
        "applied_on_b": installed,
        "flows_on_a": on_a,
        "flows_on_b": on_b,
        "ring_events_lost": lost_events,
        "event_poll_ms": ferrolb_agent::agent::EVENT_POLL_MS_CLUSTER,
    })
}

// --- failover against keepalived + conntrackd --------------------------------------------

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn bench_failover(trials: usize) -> Value {
    let ferrolb = env!("CARGO_BIN_EXE_ferrolb");
    let mut outages = Vec::new();
    let mut tcp_gaps = Vec::new();
    let mut survived = (0u64, 0u64);
    for i in 0..trials {
        let lab = ferrolb_tests::ha::up("bench_failover", &format!("habench{i}"), "100ms", ferrolb)
            .expect("ha-pair lab");
        let t = ferrolb_tests::ha::traffic_with_fault(
            &lab,
            ferrolb_tests::ha::VIP,
            "bench",
            &[
                "--tcp",
                "4",
                "--late",
                "0",
                "--udp",
                "4",
                "--duration",
                "10",
                "--fault-at",
                "3",
            ],
            Duration::from_secs(3),
            || {
                ferrolb_tests::ha::isolate(&lab, "lb1", true);
            },
        );
        let s = &t["summary"];
        eprintln!("ferrolb trial {i}: {s}");
        outages.push(s["udp_outage_ms"].as_f64().unwrap());
        tcp_gaps.push(s["tcp_max_gap_ms"].as_f64().unwrap());
        survived.0 += s["tcp_survived"].as_u64().unwrap();
        survived.1 += s["tcp_streams"].as_u64().unwrap();
        lab.down().unwrap();
    }
    let ferrolb_outage = median(&mut outages.clone());
    let ferrolb_gap = median(&mut tcp_gaps.clone());
    // keepalived VRRPv3 100 ms + conntrackd FTFW + nftables NAT, same machine, same run.
    let script = ferrolb_tests::repo_root().join("bench/keepalived-baseline/run.sh");
    let results = std::env::temp_dir().join(ferrolb_tests::unique_name("ka-bench.json"));
    let out = std::process::Command::new("bash")
        .arg(&script)
        .env("CONFIGS", "c")
        .env("REPEATS", trials.to_string())
        .env("RESULTS", &results)
        .output()
        .expect("run the keepalived baseline");
    let ka: Value = std::fs::read_to_string(&results)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_else(|| {
            panic!(
                "keepalived baseline produced no results: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let _ = std::fs::remove_file(&results);
    let c = &ka["configs"]["c"];
    let ka_outage = c["udp_outage_ms"]["median"].as_f64().unwrap();
    let ka_gap = c["tcp_outage_ms_survivors"]["median"]
        .as_f64()
        .unwrap_or(f64::NAN);
    json!({
        "trials": trials,
        "ferrolb": {
            "udp_outage_ms_median": ferrolb_outage,
            "udp_outage_ms_all": outages,
            "tcp_gap_ms_median": ferrolb_gap,
            "tcp_survived": format!("{}/{}", survived.0, survived.1),
        },
        "keepalived_conntrackd_vrrp3_100ms": {
            "udp_outage_ms_median": ka_outage,
            "udp_outage_ms": c["udp_outage_ms"],
            "tcp_gap_ms_median": ka_gap,
            "tcp_survived": c["tcp_survived"],
            "udp_replies_from_wrong_backend": c["udp_replies_from_wrong_backend_total"],
        },
        "outage_ratio_ferrolb_to_keepalived": ferrolb_outage / ka_outage,
        "tcp_gap_ratio_ferrolb_to_keepalived": ferrolb_gap / ka_gap,
    })
}

// --- cluster: sync as the cluster grows ----------------------------------------------------

fn ha_n(node: u16, peers: Vec<SocketAddr>, dp: &Datapath) -> Arc<Ha> {
    Arc::new(Ha::new(
        HaConfig::sync_only(node, peers),
        dp.sync_table().unwrap(),
        ferrolb_agent::roles::RoleBus::default(),
    ))
}

/// Flow `i` of node `node` (distinct keys and reply keys across nodes).
fn node_flow(node: u16, per_node: u32, i: u32) -> (CtKey, Ct) {
    let (k, v) = flow(u32::from(node) * per_node + i);
    (k, Ct { origin: node, ..v })
}

const CLUSTER_PORT: u16 = 23100;

fn cluster_addr(j: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], CLUSTER_PORT + j as u16))
}

/// One cluster of `n` nodes: (resync seconds of the joining node, median lag seconds).
fn cluster_round(n: usize, per_node: u32) -> (f64, f64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let lag_batch = 1000u32;
    let rounds = 5u32;
    let total = n as u32 * per_node + rounds * lag_batch;
    let cap = (total * 2 + 1024).next_power_of_two();
    let mut dps: Vec<Datapath> = (0..n).map(|j| datapath(j as u16, cap)).collect();
    for (j, dp) in dps.iter_mut().enumerate() {
        for i in 0..per_node {
            let (k, v) = node_flow(j as u16, per_node, i);
            dp.ct_insert(&k, &v).unwrap();
        }
    }
    let has: Vec<Arc<Ha>> = (0..n)
        .map(|j| {
            let peers = (0..n).filter(|p| *p != j).map(cluster_addr).collect();
            ha_n(j as u16, peers, &dps[j])
        })
        .collect();
    let start = |j: usize| {
        let ha = has[j].clone();
        async move {
            let peers = (0..n).filter(|p| *p != j).map(cluster_addr).collect();
            let cfg = Config::new(j as u32, cluster_addr(j), peers);
            let node: Arc<dyn ferrolb_consync::Node> = ha.clone();
            let cs = Consync::start(cfg, node).await.unwrap();
            let _ = ha.consync.set(cs.clone());
            cs
        }
    };
    let wait = |cs: &Arc<Consync>, what: &str| {
        let t = Instant::now();
        let cs = cs.clone();
        let what = what.to_string();
        async move {
            while !cs.peers().iter().all(|p| p.synced_once) {
                assert!(t.elapsed() < Duration::from_secs(300), "{what}: too slow");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    };
    let (resync_s, lags) = rt.block_on(async {
        // Every node but the last, meshed (the last one's subscriptions wait for it).
        let mut cs = Vec::new();
        for j in 0..n - 1 {
            cs.push(start(j).await);
        }
        // The last node joins: it subscribes to every peer and receives their snapshots.
        let t = Instant::now();
        let last = start(n - 1).await;
        wait(&last, "the joining node's snapshots").await;
        let resync_s = t.elapsed().as_secs_f64();
        for c in &cs {
            wait(c, "the mesh").await;
        }
        cs.push(last);
        // Lag: node 0 creates and publishes a batch; every peer must hold all of it.
        let mut lags = Vec::new();
        for r in 0..rounds {
            let batch: Vec<(CtKey, Ct)> = (0..lag_batch)
                .map(|i| node_flow(0, per_node, n as u32 * per_node + r * lag_batch + i))
                .map(|(k, v)| (k, Ct { origin: 0, ..v }))
                .collect();
            let last_key = batch.last().unwrap().0;
            for (k, v) in &batch {
                dps[0].ct_insert(k, v).unwrap();
            }
            let t = Instant::now();
            has[0].publish_events(&batch, &[]);
            loop {
                if dps[1..]
                    .iter()
                    .all(|d| d.ct_get(&last_key).ok().flatten().is_some())
                {
                    break;
                }
                assert!(t.elapsed() < Duration::from_secs(60), "lag round too slow");
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            lags.push(t.elapsed().as_secs_f64());
        }
        (resync_s, lags)
    });
    // Each node holds every other node's flows, synced (both directions); its own were
    // inserted as original-direction entries only.
    let total = (n as u32 * per_node + rounds * lag_batch) as usize;
    for (j, d) in dps.iter().enumerate() {
        let own = per_node as usize
            + if j == 0 {
                (rounds * lag_batch) as usize
            } else {
                0
            };
        let synced = d
            .ct_entries()
            .iter()
            .filter(|(_, v)| v.dir == 0 && v.flags & CTF_SYNCED != 0)
            .count();
        assert_eq!(synced, total - own, "node {j} holds every peer's flow");
    }
    let mut lags = lags;
    (resync_s, median(&mut lags))
}

fn bench_cluster(sizes: &[usize], per_node: u32) -> Value {
    let mut rows = Vec::new();
    let mut base: Option<(f64, f64)> = None;
    for &n in sizes {
        let (resync_s, lag_s) = cluster_round(n, per_node);
        let joined = (n as u32 - 1) * per_node;
        let (b_resync, b_lag) = *base.get_or_insert((resync_s, lag_s));
        rows.push(json!({
            "nodes": n,
            "flows_per_node": per_node,
            "resync_flows": joined,
            "resync_s": resync_s,
            "resync_flows_per_s": (f64::from(joined) / resync_s).round(),
            "resync_ratio_to_2_nodes": resync_s / b_resync,
            "resync_rate_ratio_to_2_nodes": (f64::from(joined) / resync_s) / (f64::from(per_node) / b_resync),
            "lag_1000_flows_ms": lag_s * 1000.0,
            "lag_ratio_to_2_nodes": lag_s / b_lag,
        }));
    }
    json!({
        "rows": rows,
        "bottleneck": "one process, 2 cores: every node's gRPC, protobuf and map writes share them, so the figures grow with the total work of the mesh (N x (N-1) streams), not with one node's",
    })
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let want = |w: &str| args.is_empty() || args.iter().any(|a| a == w);
    let (sync, lag, failover) = (want("sync"), want("lag"), want("failover"));
    let cluster = want("cluster");
    let mut out = serde_json::Map::new();
    if sync || lag || cluster {
        // The in-process parts run in a namespace of their own (loopback only).
        let h = std::thread::spawn(move || {
            private_netns();
            let mut m = serde_json::Map::new();
            if sync {
                m.insert("sync".into(), bench_sync(200_000));
            }
            if lag {
                m.insert("lag".into(), bench_lag(10_000, 5));
            }
            if cluster {
                m.insert(
                    "cluster".into(),
                    bench_cluster(
                        &std::env::var("FLB_CLUSTER_SIZES")
                            .ok()
                            .map(|v| {
                                v.split(',')
                                    .filter_map(|x| x.parse().ok())
                                    .collect::<Vec<usize>>()
                            })
                            .unwrap_or_else(|| vec![2, 3, 4, 6, 8]),
                        25_000,
                    ),
                );
            }
            m
        });
        out.extend(h.join().unwrap());
    }
    if failover {
        out.insert("failover".into(), bench_failover(3));
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&Value::Object(out)).unwrap()
    );
}
