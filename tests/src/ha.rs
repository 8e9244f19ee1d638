//! Helpers for the HA pair lab (`containerlab/ha-pair`): bring it up configured as
//! kube-loxilb would (BGP with BFD to the ToR, full-NAT TCP and UDP rules on both nodes), read
//! roles and paths, isolate a node, run the traffic client. Used by the HA tests and the HA
//! benchmark. Helpers panic on failure: they run inside tests.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{TestLab, require, rest};

pub const TOPOLOGY: &str = "containerlab/ha-pair/ha-pair.clab.yml";
pub const VIP: &str = "203.0.113.10";
/// (node, BGP address, ToR address, switch port toward it, ToR port toward it)
pub const LBS: [(&str, &str, &str, &str, &str); 2] = [
    ("lb1", "192.0.2.2", "192.0.2.1", "eth1", "eth2"),
    ("lb2", "192.0.2.6", "192.0.2.5", "eth2", "eth3"),
];

/// One TCP connection from port 41002 to the VIP's echo service, open for a second.
pub const TCP_ONE: &str = "import socket,time\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('',41002))\ns.connect(('203.0.113.10',9000))\ns.sendall(b'm\\n')\ns.recv(100)\ntime.sleep(1)\ns.close()";

pub fn probe_path() -> String {
    crate::repo_root()
        .join("containerlab/lb-single/probe.py")
        .display()
        .to_string()
}

pub fn traffic_path() -> String {
    crate::repo_root()
        .join("containerlab/ha-pair/traffic.py")
        .display()
        .to_string()
}

pub fn rule(name: &str, port: u16, proto: &str) -> String {
    rule_on(VIP, true, name, port, proto)
}

/// A full-NAT Maglev rule on `vip` to the three backends (kube-loxilb's body).
pub fn rule_on(vip: &str, bgp: bool, name: &str, port: u16, proto: &str) -> String {
    json!({"serviceArguments": {"externalIP": vip, "port": port, "protocol": proto, "sel": 1, "mode": 2,
                                "BGP": bgp, "Monitor": false, "name": format!("{name}:llb-inst0")},
           "secondaryIPs": [], "allowedSources": [],
           "endpoints": [{"endpointIP": "10.10.10.11", "targetPort": port, "weight": 1},
                         {"endpointIP": "10.10.10.12", "targetPort": port, "weight": 1},
                         {"endpointIP": "10.10.10.13", "targetPort": port, "weight": 1}]})
    .to_string()
}

/// The lab with both nodes configured and settled: lb1 MASTER, lb2 BACKUP, the ToR's best
/// path lb1 with lb2's path in its table. `ka` is the BFD interval (`100ms`, `50ms`) of the
/// keepalive and of the ToR sessions.
pub fn up(test: &str, label: &str, ka: &str, ferrolb: &str) -> Option<TestLab> {
    let mut programs = crate::FRR_LAB.to_vec();
    programs.extend(["curl", "python3"]);
    if !require(test, &programs) {
        return None;
    }
    let lab =
        TestLab::up_with(TOPOLOGY, label, &[("FERROLB", ferrolb), ("KA", ka)]).expect("lab up");
    let ms: u32 = ka.trim_end_matches("ms").parse().unwrap();
    if ms != 100 {
        let out = lab
            .exec(
                "tor",
                &[
                    "vtysh",
                    "-c",
                    "configure terminal",
                    "-c",
                    "bfd",
                    "-c",
                    "profile fast",
                    "-c",
                    &format!("receive-interval {ms}"),
                    "-c",
                    &format!("transmit-interval {ms}"),
                ],
            )
            .unwrap();
        assert!(out.success(), "{out:?}");
    }
    for (node, me, tor, _, _) in LBS {
        crate::wait_api(&lab, node);
        let g =
            json!({"localAs": 65100, "routerId": me, "setNextHopSelf": true, "listenPort": 179});
        let post =
            |path: &str, body: &Value| rest(&lab, node, "POST", path, Some(&body.to_string()));
        assert_eq!(post("/config/bgp/global", &g).0, 200);
        if ms == 100 {
            // kube-loxilb's neighbour body, no BFD field: the ToR (`neighbor ... bfd`) gets a
            // passive session at the default 100 ms x 3.
            let n = json!({"ipAddress": tor, "remoteAs": 65000, "remotePort": 179, "setMultiHop": false});
            assert_eq!(post("/config/bgp/neigh", &n).0, 200);
        } else {
            // ferrolb's own fields: BFD to the ToR at the keepalive's interval (before the
            // neighbour, which then uses this session), and an active session.
            let b =
                json!({"remoteIp": tor, "sourceIp": me, "interval": ms * 1000, "retryCount": 3});
            assert_eq!(post("/config/bfd", &b).0, 200);
            let n = json!({"ipAddress": tor, "remoteAs": 65000, "remotePort": 179, "setMultiHop": false, "bfd": true});
            assert_eq!(post("/config/bgp/neigh", &n).0, 200);
        }
        for (name, port, proto) in [("ha-tcp", 9000, "tcp"), ("ha-udp", 9001, "udp")] {
            let r = post(
                "/config/loadbalancer",
                &serde_json::from_str(&rule(name, port, proto)).unwrap(),
            );
            assert_eq!(r.0, 200, "{r:?}");
        }
    }
    crate::wait_http_backends(&lab, "lb1", &["10.10.10.11", "10.10.10.12", "10.10.10.13"]);
    wait_roles(&lab, "lb1", Duration::from_secs(20));
    wait_best(&lab, "192.0.2.2", Duration::from_secs(30));
    Some(lab)
}

pub fn role(lab: &TestLab, node: &str) -> String {
    let (_, v) = rest(lab, node, "GET", "/config/cistate/all", None);
    v["Attr"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["instance"] == "llb-inst0"))
        .and_then(|e| e["state"].as_str())
        .unwrap_or("?")
        .to_string()
}

pub fn ha(lab: &TestLab, node: &str) -> Value {
    rest(lab, node, "GET", "/config/ha", None).1
}

/// Waits until `master` is MASTER and the other node BACKUP, both ready.
pub fn wait_roles(lab: &TestLab, master: &str, limit: Duration) -> Duration {
    lab.wait_until(&format!("{master} MASTER, the other BACKUP"), limit, || {
        let roles: Vec<(String, String)> = LBS
            .iter()
            .map(|(n, ..)| (n.to_string(), role(lab, n)))
            .collect();
        Ok(roles.iter().all(|(n, r)| {
            if n == master {
                r == "MASTER"
            } else {
                r == "BACKUP"
            }
        }) && LBS.iter().all(|(n, ..)| ha(lab, n)["ready"] == true))
    })
    .unwrap()
}

pub fn nexthops(lab: &TestLab) -> Vec<String> {
    nexthops_of(lab, VIP)
}

/// The ToR's next hops to `dest` (sorted as the kernel lists them).
pub fn nexthops_of(lab: &TestLab, dest: &str) -> Vec<String> {
    let out = lab
        .exec_ok("tor", &["ip", "-j", "route", "show", dest])
        .unwrap_or_default();
    let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
    let Some(r) = v.get(0) else { return vec![] };
    if let Some(nh) = r["nexthops"].as_array() {
        nh.iter()
            .filter_map(|n| n["gateway"].as_str().map(str::to_string))
            .collect()
    } else {
        r["gateway"]
            .as_str()
            .map(|g| vec![g.to_string()])
            .unwrap_or_default()
    }
}

/// The ToR's BGP paths to the VIP: (next hop, AS path, best).
pub fn bgp_paths(lab: &TestLab) -> Vec<(String, String, bool)> {
    let v = lab
        .vtysh_json("tor", &format!("show bgp ipv4 unicast {VIP}/32 json"))
        .unwrap_or(Value::Null);
    v["paths"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["nexthops"][0]["ip"].as_str().unwrap_or("").to_string(),
                p["aspath"]["string"].as_str().unwrap_or("").to_string(),
                p["bestpath"]["overall"] == true,
            )
        })
        .collect()
}

/// Waits until the ToR's kernel route to the VIP is only via `via`, and its BGP table holds
/// the other node's (prepended) path too.
pub fn wait_best(lab: &TestLab, via: &str, limit: Duration) -> Duration {
    lab.wait_until(&format!("the ToR's best path via {via}"), limit, || {
        let paths = bgp_paths(lab);
        Ok(nexthops(lab) == vec![via.to_string()]
            && paths.len() == 2
            && paths.iter().any(|(nh, _, best)| nh == via && *best))
    })
    .unwrap()
}

/// Drops every frame to and from `node` at its neighbours (the ToR's port and the switch's
/// port toward it), or lifts that.
pub fn isolate(lab: &TestLab, node: &str, on: bool) {
    let (_, _, _, sw_port, tor_port) = LBS.iter().find(|l| l.0 == node).copied().unwrap();
    cut_ports(lab, &[("tor", tor_port), ("sw", sw_port)], on);
}

/// Drops every frame in and out of each (node, port) with netdev ingress and egress chains
/// (which also catch AF_PACKET frames such as gratuitous ARP), or lifts that. A table per port:
/// several ports of one node can be cut and lifted independently.
pub fn cut_ports(lab: &TestLab, ports: &[(&str, &str)], on: bool) {
    for (at, port) in ports.iter().copied() {
        let table = format!(
            "flb_fault_{}",
            port.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        );
        let script = if on {
            format!(
                "table netdev {table} {{\n chain in {{ type filter hook ingress device \"{port}\" priority -500; policy drop; }}\n chain out {{ type filter hook egress device \"{port}\" priority -500; policy drop; }}\n}}\n"
            )
        } else {
            format!("delete table netdev {table}\n")
        };
        let out = lab
            .exec_input(at, &["nft", "-f", "-"], Some(script.as_bytes()))
            .unwrap();
        assert!(out.success(), "{at}: {out:?}");
    }
}

/// Starts the traffic client in the background; returns when it has started (its t0).
pub fn start_traffic(lab: &TestLab, name: &str, args: &[&str]) -> Instant {
    start_traffic_to(lab, VIP, name, args)
}

/// [`start_traffic`] to another VIP.
pub fn start_traffic_to(lab: &TestLab, vip: &str, name: &str, args: &[&str]) -> Instant {
    let t0 = lab.log_dir("client").join(format!("{name}.t0"));
    let cmd = format!(
        "python3 {} {vip} {} --t0-file /var/log/{name}.t0 > /var/log/{name}.tmp && mv /var/log/{name}.tmp /var/log/{name}.json",
        traffic_path(),
        args.join(" ")
    );
    lab.spawn("client", &format!("{name}-run"), &["sh", "-c", &cmd])
        .unwrap();
    lab.wait_until(
        "the traffic client to start",
        Duration::from_secs(10),
        || Ok(t0.exists()),
    )
    .unwrap();
    Instant::now()
}

/// Runs the traffic client against `vip`; `at` after it started, runs `fault`; returns the
/// client's report once it finished.
pub fn traffic_with_fault(
    lab: &TestLab,
    vip: &str,
    name: &str,
    args: &[&str],
    at: Duration,
    fault: impl FnOnce(),
) -> Value {
    let t0 = start_traffic_to(lab, vip, name, args);
    std::thread::sleep(at.saturating_sub(t0.elapsed()));
    fault();
    read_traffic(lab, name)
}

pub fn read_traffic(lab: &TestLab, name: &str) -> Value {
    let path = lab.log_dir("client").join(format!("{name}.json"));
    lab.wait_until(
        "the traffic client to finish",
        Duration::from_secs(60),
        || Ok(path.exists()),
    )
    .unwrap();
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// Every TCP stream survived (intact, in order, one backend) and every UDP flow resumed.
pub fn assert_all_survived(t: &Value, what: &str) {
    let s = &t["summary"];
    for st in t["tcp"].as_array().unwrap() {
        assert!(
            st["errors"] == json!([])
                && st["sent"] == st["echoed"]
                && st["in_order"] == true
                && st["backend_changed"] == false,
            "{what}: TCP stream did not survive: {st}"
        );
    }
    assert_eq!(s["tcp_survived"], s["tcp_streams"], "{what}: {s}");
    assert_eq!(s["udp_resumed"], s["udp_flows"], "{what}: {s}");
    assert_eq!(s["udp_backend_changed"], 0, "{what}: {s}");
}

/// Prints a traffic run's summary under `what` and asserts that every one of its `streams`
/// TCP streams and every UDP flow survived, with the UDP outage below `max_outage_ms` when
/// given. Returns the outage.
pub fn assert_run(t: &Value, what: &str, streams: u64, max_outage_ms: Option<u64>) -> u64 {
    let s = &t["summary"];
    eprintln!("{what}: {s}");
    assert_all_survived(t, what);
    assert_eq!(s["tcp_streams"], streams, "{what}: {s}");
    let outage = s["udp_outage_ms"].as_u64().unwrap_or(u64::MAX);
    if let Some(max) = max_outage_ms {
        assert!(outage < max, "{what}: UDP outage {outage} ms");
    }
    outage
}

pub fn lb_ct(lab: &TestLab, node: &str) -> Vec<Value> {
    rest(lab, node, "GET", "/config/conntrack/all", None).1["ctAttr"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

pub fn metric(lab: &TestLab, node: &str, name: &str) -> Option<f64> {
    let out = lab
        .exec_ok(
            node,
            &["curl", "-s", "-m", "5", "http://127.0.0.1:11111/metrics"],
        )
        .ok()?;
    out.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

pub const L2_TOPOLOGY: &str = "containerlab/ha-l2/ha-l2.clab.yml";
pub const L2_VIP: &str = "192.168.10.50";

/// The L2 pair (`ha-l2`): rules (no BGP) on both nodes, lb1 MASTER, lb2 BACKUP.
pub fn up_l2(test: &str, label: &str, ka: &str, ferrolb: &str) -> Option<TestLab> {
    if !require(test, &["ip", "nft", "ethtool", "sysctl", "curl", "python3"]) {
        return None;
    }
    let lab =
        TestLab::up_with(L2_TOPOLOGY, label, &[("FERROLB", ferrolb), ("KA", ka)]).expect("lab up");
    for node in ["lb1", "lb2"] {
        crate::wait_api(&lab, node);
        for (name, port, proto) in [("l2-tcp", 9000, "tcp"), ("l2-udp", 9001, "udp")] {
            let body = rule_on(L2_VIP, false, name, port, proto);
            let r = rest(&lab, node, "POST", "/config/loadbalancer", Some(&body));
            assert_eq!(r.0, 200, "{r:?}");
        }
    }
    crate::wait_http_backends(&lab, "lb1", &["10.10.10.11", "10.10.10.12", "10.10.10.13"]);
    wait_roles(&lab, "lb1", Duration::from_secs(20));
    Some(lab)
}

/// The MAC address `node` has for `ip` in its neighbour table (None when unresolved).
pub fn neighbour_mac(lab: &TestLab, node: &str, ip: &str) -> Option<String> {
    let out = lab.exec_ok(node, &["ip", "-j", "neigh", "show", ip]).ok()?;
    let v: Value = serde_json::from_str(&out).ok()?;
    v.get(0)?["lladdr"].as_str().map(str::to_string)
}

/// The MAC address of `iface` in `node`.
pub fn mac_of(lab: &TestLab, node: &str, iface: &str) -> String {
    let out = lab
        .exec_ok(node, &["ip", "-j", "link", "show", iface])
        .unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    v[0]["address"].as_str().unwrap().to_string()
}

/// The agent's command line on `node` of the HA pair lab (as the topology starts it), for
/// restarting it; the second value is the node's `--self`.
pub fn agent_command(node: &str, ka: &str, ferrolb: &str) -> (Vec<String>, u16) {
    let (me, peer, id) = match node {
        "lb1" => ("10.10.10.2", "10.10.10.3", 0),
        _ => ("10.10.10.3", "10.10.10.2", 1),
    };
    let argv = [
        ferrolb.to_string(),
        "-b".into(),
        "--config-path".into(),
        "/etc/ferrolb/".into(),
        "--bgp-drain-seconds".into(),
        "2".into(),
        format!("--cluster={peer}"),
        format!("--self={id}"),
        format!("--ka={peer}:{me}:{ka}"),
    ];
    (argv.to_vec(), id)
}

/// `node`'s IPv4 forwarding setting of `iface` (`all` for the node-wide one).
pub fn forwarding(lab: &TestLab, node: &str, iface: &str) -> String {
    lab.exec_ok(
        node,
        &[
            "cat",
            &format!("/proc/sys/net/ipv4/conf/{iface}/forwarding"),
        ],
    )
    .unwrap()
    .trim()
    .to_string()
}
