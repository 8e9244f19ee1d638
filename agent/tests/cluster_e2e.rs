//! Clusters of three on `containerlab/cluster3/cluster3.clab.yml`: an FRR ToR (BFD 100 ms x 3 on
//! the BGP sessions) and three ferrolb nodes started with `--cluster=<the two others>
//! --self=<0|1|2> --ka=<both peers>`, configured over REST as kube-loxilb does it. Real TCP
//! line-echo streams and UDP flows run while nodes die silently (every frame dropped at their
//! neighbours).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ferrolb_tests::ha::{
    VIP, assert_all_survived, cut_ports, nexthops, role, rule, traffic_with_fault,
};
use ferrolb_tests::{TestLab, rest, wait_api};
use serde_json::{Value, json};

const FERROLB: &str = env!("CARGO_BIN_EXE_ferrolb");
const TOPOLOGY: &str = "containerlab/cluster3/cluster3.clab.yml";
/// (node, its ToR-side address, the ToR's address, the ToR's port to it, the switch's port).
const NODES: [(&str, &str, &str, &str, &str); 3] = [
    ("lb1", "192.0.2.2", "192.0.2.1", "eth2", "eth1"),
    ("lb2", "192.0.2.6", "192.0.2.5", "eth3", "eth2"),
    ("lb3", "192.0.2.10", "192.0.2.9", "eth4", "eth3"),
];

fn up(test: &str, label: &str) -> Option<TestLab> {
    let mut programs = ferrolb_tests::FRR_LAB.to_vec();
    programs.extend(["curl", "python3", "nft"]);
    if !ferrolb_tests::require(test, &programs) {
        return None;
    }
    let lab = TestLab::up_with(TOPOLOGY, label, &[("FERROLB", FERROLB)]).expect("lab up");
    for (node, me, tor, _, _) in NODES {
        wait_api(&lab, node);
        let post =
            |path: &str, body: &Value| rest(&lab, node, "POST", path, Some(&body.to_string()));
        let g =
            json!({"localAs": 65100, "routerId": me, "setNextHopSelf": true, "listenPort": 179});
        assert_eq!(post("/config/bgp/global", &g).0, 200);
        let n =
            json!({"ipAddress": tor, "remoteAs": 65000, "remotePort": 179, "setMultiHop": false});
        assert_eq!(post("/config/bgp/neigh", &n).0, 200);
        for (name, port, proto) in [("c3-tcp", 9000, "tcp"), ("c3-udp", 9001, "udp")] {
            let r = post(
                "/config/loadbalancer",
                &serde_json::from_str(&rule(name, port, proto)).unwrap(),
            );
            assert_eq!(r.0, 200, "{node}: {r:?}");
        }
    }
    ferrolb_tests::wait_http_backends(&lab, "lb1", &["10.10.10.11", "10.10.10.12", "10.10.10.13"]);
    Some(lab)
}

/// The roles of the live nodes: `master` MASTER, the others BACKUP, all ready.
fn wait_master(lab: &TestLab, master: &str, live: &[&str]) {
    lab.wait_until(
        &format!("{master} MASTER, {live:?} BACKUP"),
        Duration::from_secs(20),
        || {
            Ok(live.iter().all(|n| {
                role(lab, n) == if *n == master { "MASTER" } else { "BACKUP" }
                    && rest(lab, n, "GET", "/config/ha", None).1["ready"] == true
            }))
        },
    )
    .unwrap();
}

fn wait_route_via(lab: &TestLab, via: &str) {
    lab.wait_until(
        &format!("the ToR's route to the VIP via {via} alone"),
        Duration::from_secs(20),
        || Ok(nexthops(lab) == vec![via.to_string()]),
    )
    .unwrap();
}

fn isolate(lab: &TestLab, node: &str) {
    let (_, _, _, tor_port, sw_port) = NODES.iter().find(|n| n.0 == node).copied().unwrap();
    cut_ports(lab, &[("tor", tor_port), ("sw", sw_port)], true);
}

/// Active-backup with three nodes (`--ka` to both peers): exactly one MASTER at a cold start
/// (the lowest `--self`), the ToR's single best path on it; the MASTER dies silently under 30
/// TCP streams and 10 UDP flows -> the next `--self` takes over, every stream survives; that
/// one dies too -> the last node serves everything, every stream survives again.
#[test]
fn three_node_active_backup_survives_two_deaths_in_turn() {
    let test = "three_node_active_backup_survives_two_deaths_in_turn";
    let Some(lab) = up(test, "c3ab") else {
        return;
    };
    wait_master(&lab, "lb1", &["lb1", "lb2", "lb3"]);
    wait_route_via(&lab, "192.0.2.2");
    let args = [
        "--tcp",
        "30",
        "--late",
        "0",
        "--udp",
        "10",
        "--duration",
        "7",
        "--fault-at",
        "3",
    ];
    for (dead, next, live, via) in [
        ("lb1", "lb2", &["lb2", "lb3"][..], "192.0.2.6"),
        ("lb2", "lb3", &["lb3"][..], "192.0.2.10"),
    ] {
        let t = traffic_with_fault(&lab, VIP, dead, &args, Duration::from_secs(3), || {
            isolate(&lab, dead)
        });
        let s = &t["summary"];
        eprintln!("three nodes, {dead} dies silently: {s}");
        assert_all_survived(&t, &format!("{dead} dies"));
        assert_eq!(s["tcp_streams"], 30);
        let outage = s["udp_outage_ms"].as_u64().unwrap();
        assert!(outage < 600, "{dead} dies: UDP outage {outage} ms");
        wait_master(&lab, next, live);
        wait_route_via(&lab, via);
    }
    lab.down().unwrap();
}
