//! BGP interop on `containerlab/bgp-ecmp/ferrolb.clab.yml`: an FRR ToR (AS 65000, ECMP, BFD
//! 100 ms x 3) and two ferrolb nodes configured over REST exactly as kube-loxilb does it.
//! Traffic is UDP echo through a one-arm rule, so each reply names the LB node that carried it.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use ferrolb_tests::ha::nexthops;
use ferrolb_tests::{TestLab, require, rest, wait_api};
use serde_json::{Value, json};

const TOPOLOGY: &str = "containerlab/bgp-ecmp/ferrolb.clab.yml";
const FERROLB: &str = env!("CARGO_BIN_EXE_ferrolb");
const FERROCTL: &str = env!("CARGO_BIN_EXE_ferroctl");
const VIP: &str = "203.0.113.10";
const LBS: [(&str, &str, &str); 2] = [
    ("lb1", "192.0.2.2", "192.0.2.1"),
    ("lb2", "192.0.2.6", "192.0.2.5"),
];

fn probe_path() -> String {
    ferrolb_tests::repo_root()
        .join("containerlab/lb-single/probe.py")
        .display()
        .to_string()
}

fn rule() -> String {
    json!({"serviceArguments": {"externalIP": VIP, "port": 9001, "protocol": "udp", "sel": 1, "mode": 1,
                                "BGP": true, "Monitor": false, "name": "default_udp-echo:llb-inst0"},
           "secondaryIPs": [], "allowedSources": [],
           "endpoints": [{"endpointIP": "10.10.10.11", "targetPort": 9001, "weight": 1},
                         {"endpointIP": "10.10.10.12", "targetPort": 9001, "weight": 1},
                         {"endpointIP": "10.10.10.13", "targetPort": 9001, "weight": 1}]})
    .to_string()
}

/// The lab with both LB nodes peering with the ToR (BFD on) and the UDP rule on both.
fn lab(test: &str, label: &str) -> Option<TestLab> {
    lab_on(TOPOLOGY, test, label)
}

fn lab_on(topology: &str, test: &str, label: &str) -> Option<TestLab> {
    let mut programs = ferrolb_tests::FRR_LAB.to_vec();
    programs.extend(["curl", "python3", "bird", "birdc"]);
    if !require(test, &programs) {
        return None;
    }
    let lab = TestLab::up_with(topology, label, &[("FERROLB", FERROLB)]).expect("lab up");
    for (node, me, tor) in LBS {
        wait_api(&lab, node);
        let g =
            json!({"localAs": 65100, "routerId": me, "setNextHopSelf": true, "listenPort": 179});
        assert_eq!(
            rest(
                &lab,
                node,
                "POST",
                "/config/bgp/global",
                Some(&g.to_string())
            )
            .0,
            200
        );
        let n = json!({"ipAddress": tor, "remoteAs": 65000, "remotePort": 179, "setMultiHop": false, "bfd": true});
        assert_eq!(
            rest(
                &lab,
                node,
                "POST",
                "/config/bgp/neigh",
                Some(&n.to_string())
            )
            .0,
            200
        );
        assert_eq!(
            rest(&lab, node, "POST", "/config/loadbalancer", Some(&rule())).0,
            200
        );
    }
    ferrolb_tests::wait_http_backends(&lab, "lb1", &["10.10.10.11", "10.10.10.12", "10.10.10.13"]);
    wait_nexthops(&lab, 2, 20);
    Some(lab)
}

fn wait_nexthops(lab: &TestLab, n: usize, secs: u64) -> Duration {
    lab.wait_until(
        &format!("{n} next hops for the VIP on the ToR"),
        Duration::from_secs(secs),
        || Ok(nexthops(lab).len() == n),
    )
    .unwrap()
}

fn udpflow(lab: &TestLab, vip: &str, seconds: f64, flows: u32) -> Vec<Value> {
    let out = lab
        .exec_ok(
            "client",
            &[
                "python3",
                &probe_path(),
                "udpflow",
                vip,
                "9001",
                &seconds.to_string(),
                "--flows",
                &flows.to_string(),
            ],
        )
        .unwrap();
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .cloned()
        .unwrap()
}

/// Starts `flows` UDP flows to `vip` for `seconds` in the background (results in `name`).
fn spawn_udpflow(lab: &TestLab, vip: &str, seconds: f64, flows: u32, name: &str) {
    lab.spawn(
        "client",
        &format!("{name}-run"),
        &["sh", "-c", &format!(
            "python3 {} udpflow {vip} 9001 {seconds} --flows {flows} > /var/log/{name}.tmp && mv /var/log/{name}.tmp /var/log/{name}",
            probe_path()
        )],
    )
    .unwrap();
}

fn read_flows(lab: &TestLab, name: &str) -> Vec<Value> {
    let path = lab.log_dir("client").join(name);
    lab.wait_until("the probe to finish", Duration::from_secs(60), || {
        Ok(path.exists())
    })
    .unwrap();
    serde_json::from_str::<Value>(&std::fs::read_to_string(&path).unwrap())
        .unwrap()
        .as_array()
        .cloned()
        .unwrap()
}

/// Drops (or stops dropping) every packet in and out of one ToR interface; the link stays up.
fn cut_tor_link(lab: &TestLab, iface: &str, cut: bool) {
    let script = if cut {
        format!(
            "table inet cut {{\n chain pre {{ type filter hook prerouting priority -500; iifname \"{iface}\" drop; }}\n chain post {{ type filter hook postrouting priority -500; oifname \"{iface}\" drop; }}\n chain out {{ type filter hook output priority -500; oifname \"{iface}\" drop; }}\n}}\n"
        )
    } else {
        "delete table inet cut\n".to_string()
    };
    let out = lab
        .exec_input("tor", &["nft", "-f", "-"], Some(script.as_bytes()))
        .unwrap();
    assert!(out.success(), "{out:?}");
}

/// 16 UDP flows, one datagram every 10 ms each, for 5 s; 1.5 s in, lb1's link is cut at the
/// ToR. The flows and the longest gap any of them saw.
fn failover_under_probe(lab: &TestLab, vip: &str, name: &str) -> (Vec<Value>, u64) {
    spawn_udpflow(lab, vip, 5.0, 16, name);
    std::thread::sleep(Duration::from_millis(1500));
    cut_tor_link(lab, "eth2", true);
    let flows = read_flows(lab, name);
    let worst = flows
        .iter()
        .map(|f| f["max_gap_ms"].as_u64().unwrap())
        .max()
        .unwrap();
    (flows, worst)
}

/// 16 UDP flows to `vip` for 6 s; 1 s in, lb2's agent gets SIGTERM (graceful shutdown, then
/// withdrawal). The flows, the datagrams lost and the longest gap of any flow.
fn drain_under_probe(lab: &TestLab, vip: &str, name: &str) -> (Vec<Value>, u64, u64) {
    spawn_udpflow(lab, vip, 6.0, 16, name);
    std::thread::sleep(Duration::from_millis(1000));
    let pid = ferrolb_tests::agent_pid(lab, "lb2");
    lab.exec_ok("lb2", &["kill", "-TERM", &pid.to_string()])
        .unwrap();
    let flows = read_flows(lab, name);
    let lost: u64 = flows
        .iter()
        .map(|f| f["sent"].as_u64().unwrap() - f["answered"].as_u64().unwrap())
        .sum();
    let worst = flows
        .iter()
        .map(|f| f["max_gap_ms"].as_u64().unwrap())
        .max()
        .unwrap();
    let late: u64 = flows.iter().map(|f| f["late"].as_u64().unwrap()).sum();
    eprintln!("{name}: {lost} datagrams lost, {late} answered only after sending stopped");
    (flows, lost, worst)
}

fn best_path_via(lab: &TestLab) -> Vec<String> {
    nexthops(lab)
}

#[test]
fn ecmp_rule_changes_and_roles() {
    let Some(lab) = lab("ecmp_rule_changes_and_roles", "bgpecmp") else {
        return;
    };
    // Flows spread over both LB nodes (one-arm: the backend sees which node it was).
    let flows = udpflow(&lab, VIP, 1.0, 16);
    let mut by_lb = std::collections::BTreeMap::new();
    for f in &flows {
        assert_eq!(f["sent"], f["answered"], "{f}");
        for p in f["peers"].as_object().unwrap().keys() {
            *by_lb.entry(p.clone()).or_insert(0) += 1;
        }
    }
    assert_eq!(by_lb.len(), 2, "flows on both LB nodes: {by_lb:?}");

    // Rule deleted on lb2 (kube-loxilb's delete, with its body): one next hop; re-added: two.
    let (st, _) = rest(
        &lab,
        "lb2",
        "DELETE",
        &format!(
            "/config/loadbalancer/externalipaddress/{VIP}/port/9001/protocol/udp?bgp=true&block=0"
        ),
        Some(&rule()),
    );
    assert_eq!(st, 200);
    wait_nexthops(&lab, 1, 5);
    assert_eq!(nexthops(&lab), vec!["192.0.2.2".to_string()]);
    assert_eq!(
        rest(&lab, "lb2", "POST", "/config/loadbalancer", Some(&rule())).0,
        200
    );
    wait_nexthops(&lab, 2, 5);

    // lb2 BACKUP: the ToR's best path is lb1; lb2's path stays in its table with a longer AS path.
    let backup = json!({"instance": "llb-inst0", "state": "BACKUP", "vip": "0.0.0.0"}).to_string();
    let master = json!({"instance": "llb-inst0", "state": "MASTER", "vip": "0.0.0.0"}).to_string();
    assert_eq!(
        rest(&lab, "lb2", "POST", "/config/cistate", Some(&backup)).0,
        200
    );
    assert_eq!(
        rest(&lab, "lb1", "POST", "/config/cistate", Some(&master)).0,
        200
    );
    wait_nexthops(&lab, 1, 5);
    assert_eq!(best_path_via(&lab), vec!["192.0.2.2".to_string()]);
    let t = lab
        .vtysh_json("tor", &format!("show bgp ipv4 unicast {VIP}/32 json"))
        .unwrap();
    let paths = t["paths"].as_array().unwrap();
    assert_eq!(paths.len(), 2, "{t}");
    let backup_path = paths
        .iter()
        .find(|p| p["nexthops"][0]["ip"] == "192.0.2.6")
        .unwrap();
    assert_eq!(backup_path["aspath"]["string"], "65100 65100 65100 65100");
    assert_eq!(backup_path["metric"], 200);
    let (_, ci) = rest(&lab, "lb2", "GET", "/config/cistate/all", None);
    assert_eq!(ci["Attr"][0]["state"], "BACKUP");
    // Switch roles: the best path flips within 1 s.
    let start = Instant::now();
    assert_eq!(
        rest(&lab, "lb1", "POST", "/config/cistate", Some(&backup)).0,
        200
    );
    assert_eq!(
        rest(&lab, "lb2", "POST", "/config/cistate", Some(&master)).0,
        200
    );
    lab.wait_until("best path via lb2", Duration::from_secs(3), || {
        Ok(best_path_via(&lab) == vec!["192.0.2.6".to_string()])
    })
    .unwrap();
    let flip = start.elapsed();
    eprintln!(
        "role switch reached the ToR's kernel route in {} ms",
        flip.as_millis()
    );
    assert!(flip <= Duration::from_secs(1), "{flip:?}");

    // Route policy from the global settings: communities reach the ToR with the next UPDATE.
    let g = json!({"localAs": 65100, "routerId": "192.0.2.2", "communities": ["65100:10"],
                   "largeCommunities": ["65100:1:2"]});
    assert_eq!(
        rest(
            &lab,
            "lb1",
            "POST",
            "/config/bgp/global",
            Some(&g.to_string())
        )
        .0,
        200
    );
    lab.wait_until("communities on the ToR", Duration::from_secs(5), || {
        let t = lab.vtysh_json("tor", &format!("show bgp ipv4 unicast {VIP}/32 json"))?;
        Ok(t["paths"].as_array().into_iter().flatten().any(|p| {
            p["nexthops"][0]["ip"] == "192.0.2.2"
                && p["community"]["string"] == "65100:10"
                && p["largeCommunity"]["string"] == "65100:1:2"
        }))
    })
    .unwrap();

    // ferroctl and metrics.
    let t = lab.exec_ok("lb1", &[FERROCTL, "get", "bgp"]).unwrap();
    assert!(t.contains("192.0.2.1") && t.contains("Established"), "{t}");
    let r = lab
        .exec_ok("lb1", &[FERROCTL, "get", "bgp", "routes"])
        .unwrap();
    assert!(r.contains("203.0.113.10/32") && r.contains("200"), "{r}");
    let m = lab
        .exec_ok("lb1", &["curl", "-sf", "http://127.0.0.1:11111/metrics"])
        .unwrap();
    assert!(
        m.contains("ferrolb_bgp_session_established{neighbor=\"192.0.2.1\"} 1"),
        "{m}"
    );
    assert!(m.contains("ferrolb_bgp_prefixes{neighbor=\"192.0.2.1\",direction=\"advertised\"} 1"));

    // Bad input names the field.
    for (body, want) in [
        (r#"{"ipAddress":"192.0.2.1"}"#, "remoteAs"),
        (r#"{"ipAddress":"192.0.2.x","remoteAs":65000}"#, "ipAddress"),
        (
            r#"{"ipAddress":"192.0.2.1","remoteAs":65000,"holdTime":2}"#,
            "holdTime",
        ),
    ] {
        let (st, v) = rest(&lab, "lb1", "POST", "/config/bgp/neigh", Some(body));
        assert_eq!(st, 400, "{body}");
        assert!(v["message"].as_str().unwrap().contains(want), "{v}");
    }
    let (st, v) = rest(
        &lab,
        "lb1",
        "POST",
        "/config/bgp/global",
        Some(r#"{"localAs":0,"routerId":"1.1.1.1"}"#),
    );
    assert_eq!(st, 400, "{v}");
    assert_eq!(
        rest(
            &lab,
            "lb1",
            "DELETE",
            "/config/bgp/neigh/192.0.2.99?remoteAs=65000",
            None
        )
        .0,
        404
    );
}

#[test]
fn bfd_failover_and_drain() {
    let Some(lab) = lab("bfd_failover_and_drain", "bgpfail") else {
        return;
    };
    // lb1 goes silent while 16 flows send a datagram every 10 ms: the flows on lb1 see one
    // outage, under 500 ms (BFD 300 ms, then the ToR's route change). The cut is made on the
    // ToR's side of lb1's link (all IP both ways, carrier kept): an nft blackhole on lb1
    // itself would not stop its TC datapath, which forwards before netfilter sees a packet.
    let (flows, worst) = failover_under_probe(&lab, VIP, "fail.json");
    eprintln!("BFD-backed failover: longest gap of any flow {worst} ms");
    assert!(worst < 500, "{flows:?}");
    assert!(
        worst >= 200,
        "the cut must have cost a detection time: {flows:?}"
    );
    assert!(flows.iter().all(|f| f["answered"].as_u64().unwrap() > 0));
    cut_tor_link(&lab, "eth2", false);
    wait_nexthops(&lab, 2, 15);

    // Drain lb2 with SIGTERM: the probe loses nothing.
    let (flows, lost, worst) = drain_under_probe(&lab, VIP, "drain.json");
    eprintln!("drain: {lost} datagrams lost, longest gap {worst} ms");
    assert_eq!(lost, 0, "{flows:?}");
    assert_eq!(
        nexthops(&lab),
        vec!["192.0.2.2".to_string()],
        "lb2 withdrew"
    );
}

#[test]
fn malformed_update_is_treated_as_withdraw() {
    let Some(lab) = lab("malformed_update_is_treated_as_withdraw", "bgp7606") else {
        return;
    };
    let speaker = ferrolb_tests::repo_root().join("containerlab/bgp-ecmp/test_speaker.py");
    lab.spawn(
        "client",
        "speaker",
        &[
            "python3",
            &speaker.display().to_string(),
            "65001",
            "198.51.100.2",
            "15",
        ],
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let n = json!({"ipAddress": "198.51.100.2", "remoteAs": 65001});
    assert_eq!(
        rest(
            &lab,
            "lb1",
            "POST",
            "/config/bgp/neigh",
            Some(&n.to_string())
        )
        .0,
        200
    );
    let find = || {
        rest(&lab, "lb1", "GET", "/config/bgp/neigh/all", None).1["bgpNeiAttr"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["ipAddress"] == "198.51.100.2")
            .cloned()
            .unwrap()
    };
    lab.wait_until(
        "the malformed UPDATE handled",
        Duration::from_secs(10),
        || {
            let n = find();
            Ok(n["state"] == "Established" && n["treatAsWithdraw"] == 1 && n["updatesIn"] == 2)
        },
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let n = find();
    assert_eq!(n["state"], "Established", "no reset: {n}");
    assert_eq!(
        n["prefixesReceived"], 1,
        "only the valid UPDATE's prefix: {n}"
    );
    let log = std::fs::read_to_string(lab.log_dir("client").join("speaker.log")).unwrap();
    assert!(!log.contains("NOTIFICATION"), "{log}");
}

/// The same with BIRD 2 as the ToR: ECMP through `merge paths`, the BACKUP path losing on AS
/// path length, and BFD-backed failover.
#[test]
fn bird_tor_ecmp_roles_and_failover() {
    let Some(lab) = lab_on(
        "containerlab/bgp-ecmp/ferrolb-bird.clab.yml",
        "bird_tor_ecmp_roles_and_failover",
        "bgpbird",
    ) else {
        return;
    };
    let flows = udpflow(&lab, VIP, 1.0, 16);
    let mut lbs = std::collections::BTreeSet::new();
    for f in &flows {
        assert_eq!(f["sent"], f["answered"], "{f}");
        lbs.extend(f["peers"].as_object().unwrap().keys().cloned());
    }
    assert_eq!(
        lbs.len(),
        2,
        "flows on both LB nodes through BIRD's ECMP route"
    );
    let backup = json!({"instance": "llb-inst0", "state": "BACKUP"}).to_string();
    let master = json!({"instance": "llb-inst0", "state": "MASTER"}).to_string();
    assert_eq!(
        rest(&lab, "lb2", "POST", "/config/cistate", Some(&backup)).0,
        200
    );
    wait_nexthops(&lab, 1, 5);
    assert_eq!(nexthops(&lab), vec!["192.0.2.2".to_string()]);
    assert_eq!(
        rest(&lab, "lb2", "POST", "/config/cistate", Some(&master)).0,
        200
    );
    wait_nexthops(&lab, 2, 5);

    let (flows, worst) = failover_under_probe(&lab, VIP, "bird-fail.json");
    eprintln!("BIRD ToR, BFD-backed failover: longest gap of any flow {worst} ms");
    assert!((200..500).contains(&worst), "{flows:?}");
    cut_tor_link(&lab, "eth2", false);
    wait_nexthops(&lab, 2, 20);
}

fn neighbor_state(lab: &TestLab, node: &str, ip: &str) -> String {
    rest(lab, node, "GET", "/config/bgp/neigh/all", None).1["bgpNeiAttr"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["ipAddress"] == ip)
        .and_then(|n| n["state"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// TCP MD5 (RFC 2385) and GTSM (RFC 5082) against FRR: a wrong key gets no session, the right
/// key with GTSM does.
#[test]
fn md5_and_ttl_security_with_frr() {
    let Some(lab) = lab("md5_and_ttl_security_with_frr", "bgpmd5") else {
        return;
    };
    // The ToR only accepts (set first, so it opens no connection of its own once the keys
    // are in place): what is tested is our connection, not one it opens to our listener.
    for cmds in [
        &["neighbor 192.0.2.2 passive"][..],
        &[
            "neighbor 192.0.2.2 password lbsecret",
            "neighbor 192.0.2.2 ttl-security hops 1",
        ][..],
    ] {
        let mut argv = vec![
            "vtysh",
            "-c",
            "configure terminal",
            "-c",
            "router bgp 65000",
        ];
        for c in cmds {
            argv.extend(["-c", c]);
        }
        lab.exec_ok("tor", &argv).unwrap();
        std::thread::sleep(Duration::from_secs(1));
    }
    let post = |password: &str, ttl: bool| {
        let n = json!({"ipAddress": "192.0.2.1", "remoteAs": 65000, "bfd": true, "password": password, "ttlSecurity": ttl});
        assert_eq!(
            rest(
                &lab,
                "lb1",
                "POST",
                "/config/bgp/neigh",
                Some(&n.to_string())
            )
            .0,
            200
        );
    };
    // (FRR applies its minimum TTL only once a connection is accepted, so whether a TTL-64
    // session gets through is a race on its side; GTSM itself is tested in bgp/src/socket.rs.)
    // Wrong key with GTSM: still nothing.
    post("wrong", true);
    std::thread::sleep(Duration::from_secs(4));
    assert_ne!(
        neighbor_state(&lab, "lb1", "192.0.2.1"),
        "Established",
        "MD5 must be required"
    );
    // Both right: the session comes up and lb1's next hop is back on the ToR.
    post("lbsecret", true);
    lab.wait_until(
        "Established with MD5 and GTSM",
        Duration::from_secs(15),
        || Ok(neighbor_state(&lab, "lb1", "192.0.2.1") == "Established"),
    )
    .unwrap();
    wait_nexthops(&lab, 2, 10);
    // The key is kept owner-only on disk.
    let mode = lab
        .exec_ok("lb1", &["stat", "-c", "%a", "/etc/ferrolb/bgp.json"])
        .unwrap();
    assert_eq!(mode.trim(), "600");
}

/// A passive neighbour waits for the ToR's connection; an active one with the ToR connecting
/// too resolves the collision (§6.8) to one stable session.
#[test]
fn passive_neighbour_and_collisions() {
    let Some(lab) = lab("passive_neighbour_and_collisions", "bgppass") else {
        return;
    };
    let in_state_s = |lab: &TestLab| {
        rest(lab, "lb1", "GET", "/config/bgp/neigh/all", None).1["bgpNeiAttr"][0]["updowntime"]
            .as_u64()
            .unwrap_or(0)
    };
    // Active (the default), the ToR connecting as well: one session, and it stays up.
    assert_eq!(neighbor_state(&lab, "lb1", "192.0.2.1"), "Established");
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(neighbor_state(&lab, "lb1", "192.0.2.1"), "Established");
    assert!(in_state_s(&lab) >= 5, "no flap in 5 s");
    let established = lab
        .exec_ok(
            "lb1",
            &[
                "ss",
                "-tnH",
                "state",
                "established",
                "( sport = :179 or dport = :179 )",
            ],
        )
        .unwrap();
    assert_eq!(
        established.lines().count(),
        1,
        "one BGP connection: {established}"
    );

    // Passive: the session is re-made by the ToR connecting to our port 179.
    let n = json!({"ipAddress": "192.0.2.1", "remoteAs": 65000, "bfd": true, "passive": true});
    assert_eq!(
        rest(
            &lab,
            "lb1",
            "POST",
            "/config/bgp/neigh",
            Some(&n.to_string())
        )
        .0,
        200
    );
    lab.wait_until(
        "Established as a passive peer",
        Duration::from_secs(15),
        || Ok(neighbor_state(&lab, "lb1", "192.0.2.1") == "Established"),
    )
    .unwrap();
    let conn = lab
        .exec_ok(
            "lb1",
            &["ss", "-tnH", "state", "established", "( sport = :179 )"],
        )
        .unwrap();
    assert_eq!(
        conn.lines().count(),
        1,
        "the ToR's connection to our 179: {conn}"
    );
    wait_nexthops(&lab, 2, 10);
}

// ---------------------------------------------------------------------------------------
// IPv6: /128 VIPs over IPv6 sessions (MP_REACH_NLRI), the same lab with IPv6 addressing.

const VIP6: &str = "2001:db8:aaaa::10";
/// (node, its address toward the ToR, the ToR's address, its address toward the backends)
const LBS6: [(&str, &str, &str, &str); 2] = [
    ("lb1", "2001:db8:2:1::2", "2001:db8:2:1::1", "fd00:10::2"),
    ("lb2", "2001:db8:2:2::2", "2001:db8:2:2::1", "fd00:10::3"),
];

fn rules6() -> [String; 2] {
    let eps = |port: u16| {
        json!([{"endpointIP": "fd00:10::11", "targetPort": port, "weight": 1},
               {"endpointIP": "fd00:10::12", "targetPort": port, "weight": 1},
               {"endpointIP": "fd00:10::13", "targetPort": port, "weight": 1}])
    };
    [
        json!({"serviceArguments": {"externalIP": VIP6, "port": 9001, "protocol": "udp", "sel": 1,
                                    "mode": 1, "BGP": true, "name": "default_udp6:llb-inst0"},
               "endpoints": eps(9001)})
        .to_string(),
        json!({"serviceArguments": {"externalIP": VIP6, "port": 80, "protocol": "tcp", "sel": 0,
                                    "mode": 1, "BGP": true, "name": "default_http6:llb-inst0"},
               "endpoints": eps(8080)})
        .to_string(),
    ]
}

/// The ToR's kernel next hops for the IPv6 VIP.
fn nexthops6(lab: &TestLab) -> Vec<String> {
    let out = lab
        .exec_ok("tor", &["ip", "-6", "-j", "route", "show", VIP6])
        .unwrap_or_default();
    let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
    let Some(r) = v.get(0) else { return vec![] };
    let mut gws: Vec<String> = match r["nexthops"].as_array() {
        Some(nh) => nh
            .iter()
            .filter_map(|n| n["gateway"].as_str().map(str::to_string))
            .collect(),
        None => r["gateway"]
            .as_str()
            .map(|g| vec![g.to_string()])
            .unwrap_or_default(),
    };
    gws.sort();
    gws
}

fn wait_nexthops6(lab: &TestLab, want: &[&str], secs: u64) -> Duration {
    let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    lab.wait_until(
        &format!("next hops {want:?} for {VIP6} on the ToR"),
        Duration::from_secs(secs),
        || Ok(nexthops6(lab) == want),
    )
    .unwrap()
}

/// The IPv4 lab plus, on both LB nodes, an IPv6 neighbour (BFD on) and the IPv6 rules.
fn lab6(topology: &str, test: &str, label: &str) -> Option<TestLab> {
    let lab = lab_on(topology, test, label)?;
    for (node, _, tor, _) in LBS6 {
        let n = json!({"ipAddress": tor, "remoteAs": 65000, "bfd": true}).to_string();
        let (st, v) = rest(&lab, node, "POST", "/config/bgp/neigh", Some(&n));
        assert_eq!(st, 200, "{v}");
        for r in rules6() {
            let (st, v) = rest(&lab, node, "POST", "/config/loadbalancer", Some(&r));
            assert_eq!(st, 200, "{v}");
        }
    }
    let t = wait_nexthops6(&lab, &[LBS6[0].1, LBS6[1].1], 30);
    eprintln!(
        "IPv6 VIP on the ToR with two next hops {} ms after the rules",
        t.as_millis()
    );
    Some(lab)
}

/// IPv6 UDP flows through the VIP: every datagram answered; the LB addresses backends saw.
fn udpflow6(lab: &TestLab, seconds: f64, flows: u32) -> std::collections::BTreeSet<String> {
    let flows = udpflow(lab, VIP6, seconds, flows);
    let mut lbs = std::collections::BTreeSet::new();
    for f in &flows {
        assert!(f["sent"].as_u64().unwrap() > 0, "{f}");
        assert_eq!(f["sent"], f["answered"], "{f}");
        lbs.extend(f["peers"].as_object().unwrap().keys().cloned());
    }
    lbs
}

#[test]
fn ipv6_vips_ecmp_roles_and_bfd_failover_with_frr() {
    let Some(lab) = lab6(
        TOPOLOGY,
        "ipv6_vips_ecmp_roles_and_bfd_failover_with_frr",
        "bgp6",
    ) else {
        return;
    };
    // The VIP is on lo as a /128; the ToR holds both paths, learnt over the IPv6 sessions.
    let lo = lab
        .exec_ok("lb1", &["ip", "-6", "addr", "show", "dev", "lo"])
        .unwrap();
    assert!(lo.contains(&format!("{VIP6}/128")), "{lo}");
    let t = lab
        .vtysh_json("tor", &format!("show bgp ipv6 unicast {VIP6}/128 json"))
        .unwrap();
    let paths = t["paths"].as_array().unwrap();
    assert_eq!(paths.len(), 2, "{t}");
    // The IPv4 sessions carry no IPv6 route and the IPv6 sessions no IPv4 one.
    let v4 = lab
        .vtysh_json("tor", &format!("show bgp ipv4 unicast {VIP}/32 json"))
        .unwrap();
    assert!(
        v4["paths"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| !p["nexthops"][0]["ip"].as_str().unwrap_or("").contains(':')),
        "{v4}"
    );

    // UDP and TCP through the IPv6 VIP, spread over both LB nodes (one-arm: each backend sees
    // the address of the node that carried the flow).
    let lbs = udpflow6(&lab, 1.0, 16);
    assert_eq!(
        lbs,
        [LBS6[0].3, LBS6[1].3]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        "flows on both LB nodes"
    );
    let out = lab
        .exec_ok(
            "client",
            &["python3", &probe_path(), "http", VIP6, "80", "12"],
        )
        .unwrap();
    let gets: Vec<Value> = serde_json::from_str(&out).unwrap();
    let backends: std::collections::BTreeSet<&str> = gets
        .iter()
        .map(|g| g["backend"].as_str().unwrap_or("error"))
        .collect();
    assert_eq!(
        backends,
        ["be1", "be2", "be3"].into_iter().collect(),
        "{gets:?}"
    );
    let ct = rest(&lab, "lb1", "GET", "/config/conntrack/all", None).1;
    assert!(
        ct.to_string().contains(VIP6),
        "IPv6 flows in lb1's conntrack: {ct}"
    );

    // BFD runs over the IPv6 sessions too (FRR's view).
    lab.wait_until(
        "FRR's IPv6 BFD sessions up",
        Duration::from_secs(10),
        || {
            let b = lab.vtysh_json("tor", "show bfd peers json")?;
            Ok(LBS6.iter().all(|(_, me, _, _)| {
                b.as_array()
                    .into_iter()
                    .flatten()
                    .any(|p| p["peer"] == *me && p["status"] == "up")
            }))
        },
    )
    .unwrap();

    // Rule deleted on lb2: one next hop; re-added: two.
    let (st, v) = rest(
        &lab,
        "lb2",
        "DELETE",
        &format!("/config/loadbalancer/externalipaddress/{VIP6}/port/9001/protocol/udp"),
        None,
    );
    assert_eq!(st, 200, "{v}");
    let (st, v) = rest(
        &lab,
        "lb2",
        "DELETE",
        &format!("/config/loadbalancer/externalipaddress/{VIP6}/port/80/protocol/tcp"),
        None,
    );
    assert_eq!(st, 200, "{v}");
    wait_nexthops6(&lab, &[LBS6[0].1], 5);
    for r in rules6() {
        assert_eq!(
            rest(&lab, "lb2", "POST", "/config/loadbalancer", Some(&r)).0,
            200
        );
    }
    wait_nexthops6(&lab, &[LBS6[0].1, LBS6[1].1], 5);

    // lb2 BACKUP: the best path is lb1; lb2's is kept with the longer AS path and MED 200.
    let backup = json!({"instance": "llb-inst0", "state": "BACKUP"}).to_string();
    assert_eq!(
        rest(&lab, "lb2", "POST", "/config/cistate", Some(&backup)).0,
        200
    );
    wait_nexthops6(&lab, &[LBS6[0].1], 5);
    let t = lab
        .vtysh_json("tor", &format!("show bgp ipv6 unicast {VIP6}/128 json"))
        .unwrap();
    let backup_path = t["paths"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["nexthops"][0]["ip"] == LBS6[1].1)
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(
        backup_path["aspath"]["string"], "65100 65100 65100 65100",
        "{t}"
    );
    assert_eq!(backup_path["metric"], 200, "{t}");
    let master = json!({"instance": "llb-inst0", "state": "MASTER"}).to_string();
    assert_eq!(
        rest(&lab, "lb2", "POST", "/config/cistate", Some(&master)).0,
        200
    );
    wait_nexthops6(&lab, &[LBS6[0].1, LBS6[1].1], 5);

    // ferroctl and metrics show the IPv6 neighbour and route.
    let t = lab.exec_ok("lb1", &[FERROCTL, "get", "bgp"]).unwrap();
    assert!(t.contains(LBS6[0].2), "{t}");
    let r = lab
        .exec_ok("lb1", &[FERROCTL, "get", "bgp", "routes"])
        .unwrap();
    assert!(r.contains(&format!("{VIP6}/128")), "{r}");
    let m = lab
        .exec_ok("lb1", &["curl", "-sf", "http://127.0.0.1:11111/metrics"])
        .unwrap();
    let adv = format!(
        "ferrolb_bgp_prefixes{{neighbor=\"{}\",direction=\"advertised\"}} 1",
        LBS6[0].2
    );
    assert!(m.contains(&adv), "{m}");

    // Silent death of lb1's link: the IPv6 probe's outage is bounded by BFD over IPv6.
    let (flows, worst) = failover_under_probe(&lab, VIP6, "fail6.json");
    eprintln!("IPv6 VIP, BFD-backed failover: longest gap of any flow {worst} ms");
    assert!(worst < 500, "{flows:?}");
    assert!(
        worst >= 200,
        "the cut must have cost a detection time: {flows:?}"
    );
    cut_tor_link(&lab, "eth2", false);
    wait_nexthops6(&lab, &[LBS6[0].1, LBS6[1].1], 20);

    // Drain lb2 with SIGTERM (graceful shutdown, then MP_UNREACH): the IPv6 probe loses nothing.
    let (flows, lost, _) = drain_under_probe(&lab, VIP6, "drain6.json");
    eprintln!("IPv6 drain: {lost} datagrams lost");
    assert_eq!(lost, 0, "{flows:?}");
    assert_eq!(nexthops6(&lab), vec![LBS6[0].1.to_string()], "lb2 withdrew");
}

#[test]
fn ipv6_vips_ecmp_with_bird() {
    let Some(lab) = lab6(
        "containerlab/bgp-ecmp/ferrolb-bird.clab.yml",
        "ipv6_vips_ecmp_with_bird",
        "bgp6bird",
    ) else {
        return;
    };
    let lbs = udpflow6(&lab, 1.0, 16);
    assert_eq!(
        lbs.len(),
        2,
        "flows on both LB nodes through BIRD's ECMP route: {lbs:?}"
    );
    let backup = json!({"instance": "llb-inst0", "state": "BACKUP"}).to_string();
    assert_eq!(
        rest(&lab, "lb2", "POST", "/config/cistate", Some(&backup)).0,
        200
    );
    wait_nexthops6(&lab, &[LBS6[0].1], 5);
    let master = json!({"instance": "llb-inst0", "state": "MASTER"}).to_string();
    assert_eq!(
        rest(&lab, "lb2", "POST", "/config/cistate", Some(&master)).0,
        200
    );
    wait_nexthops6(&lab, &[LBS6[0].1, LBS6[1].1], 5);
}
