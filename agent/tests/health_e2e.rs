//! Endpoint health on the HA pair (`containerlab/ha-pair`: FRR ToR, lb1 MASTER, lb2 BACKUP):
//! rules posted to both nodes with kube-loxilb's exact bodies (`"Monitor": true`, empty
//! `probetype`, `inactiveTimeOut` 1800) for TCP (echo :9000), UDP (echo :9001) and HTTP
//! (:8080), two endpoints each (be1, be2), on a VIP of their own (203.0.113.20, BGP).
//!
//! - be1's servers killed: both nodes take be1 out of every rule within 3 s (measured), and
//!   new TCP, UDP and HTTP connections all go to be2; restarted: back within 3 s.
//! - Each node's verdicts reach its peer: be1 forced down on lb1 alone shows as three
//!   disagreements on both nodes (metric, `peerStates` in `/config/endpoint/all`).
//! - be1's link down (the host vanishes): the same; link up: back.
//! - be1 and be2 both down: new flows to the VIP are dropped and counted (no_endpoint), the
//!   ToR loses the VIP's route; be2 back: the route returns and traffic flows.
//! - The ha-tcp / ha-udp rules on 203.0.113.10 (`Monitor: false`) keep be1 active
//!   throughout (today's behaviour).
//! - Streams to both backends, be1 forced down on both nodes (its streams drain), lb1 fails:
//!   every stream survives on lb2 with the backend it had.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use ferrolb_tests::ha::{self, LBS};
use ferrolb_tests::{TestLab, rest};
use serde_json::{Value, json};

const FERROLB: &str = env!("CARGO_BIN_EXE_ferrolb");
const VIP2: &str = "203.0.113.20";
const SERVERS: &str = "/etc/ferrolb-lab/servers.py";
/// The issue's bound: a dead endpoint out (and a returning one back) within 3 s.
const LIMIT: Duration = Duration::from_secs(3);

fn say(s: String) {
    let _ = writeln!(std::io::stderr(), "{s}");
}

/// kube-loxilb's body for a LoadBalancer service port with `loxilb.io/liveness: "yes"`.
fn kube_loxilb_rule(name: &str, port: u16, proto: &str) -> String {
    json!({"serviceArguments": {"externalIP": VIP2, "privateIP": "", "port": port, "protocol": proto,
                                "sel": 0, "mode": 2, "BGP": true, "Monitor": true,
                                "inactiveTimeOut": 1800, "block": 0, "managed": true,
                                "probetype": "", "probeport": 0, "probereq": "", "proberesp": "",
                                "name": format!("default_{name}:llb-inst0")},
           "secondaryIPs": [], "allowedSources": [],
           "endpoints": [{"endpointIP": "10.10.10.11", "targetPort": port, "weight": 1, "state": "", "counter": ""},
                         {"endpointIP": "10.10.10.12", "targetPort": port, "weight": 1, "state": "", "counter": ""}]})
    .to_string()
}

const RULES: [(&str, u16, &str); 3] = [
    ("echo-tcp", 9000, "tcp"),
    ("echo-udp", 9001, "udp"),
    ("web", 8080, "tcp"),
];

/// Endpoint states per rule port on `node`, for `vip`: port -> {endpoint ip: state}.
fn states(lab: &TestLab, node: &str, vip: &str) -> BTreeMap<u64, BTreeMap<String, String>> {
    let (_, v) = rest(lab, node, "GET", "/config/loadbalancer/all", None);
    let mut out = BTreeMap::new();
    for r in v["lbAttr"].as_array().into_iter().flatten() {
        let a = &r["serviceArguments"];
        if a["externalIP"] != vip {
            continue;
        }
        let eps = r["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                (
                    e["endpointIP"].as_str().unwrap().to_string(),
                    e["state"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        out.insert(a["port"].as_u64().unwrap(), eps);
    }
    out
}

/// Waits until on both nodes the monitored rules on `ports` show `ip` in `state`; the time
/// since `start`.
fn wait_ports(
    lab: &TestLab,
    ports: &[u64],
    ip: &str,
    state: &str,
    start: Instant,
    what: &str,
) -> Duration {
    lab.wait_until(what, Duration::from_secs(15), || {
        Ok(LBS.iter().all(|(node, ..)| {
            let s = states(lab, node, VIP2);
            ports
                .iter()
                .all(|p| s.get(p).and_then(|eps| eps.get(ip)).map(String::as_str) == Some(state))
        }))
    })
    .unwrap();
    start.elapsed()
}

/// Every monitored rule; returns (TCP and HTTP time, UDP time).
fn wait_state(
    lab: &TestLab,
    ip: &str,
    state: &str,
    start: Instant,
    what: &str,
) -> (Duration, Duration) {
    let tcp = wait_ports(lab, &[9000, 8080], ip, state, start, what);
    let udp = wait_ports(lab, &[9001], ip, state, start, what);
    (tcp, udp)
}

/// TCP, HTTP and UDP within the issue's 3 s. UDP learns of a dead service from ICMP port
/// unreachables; at one probe a second per node, each node's refusals stay within the
/// backend's rate limit (one a second per peer), so every probe of a dead service is refused.
fn check_times(what: &str, (tcp, udp): (Duration, Duration)) {
    assert!(tcp <= LIMIT, "{what}: TCP/HTTP took {tcp:?}");
    assert!(udp <= LIMIT, "{what}: UDP took {udp:?}");
}

/// N TCP connections to the echo service, each answered as "NAME line": the backends.
const TCP_ECHO: &str = "import json,socket,sys\nout=[]\nfor i in range(int(sys.argv[3])):\n try:\n  s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=2)\n  s.sendall(b'x\\n')\n  out.append({'backend':s.recv(100).split()[0].decode()})\n  s.close()\n except Exception as e:\n  out.append({'error':str(e)})\nprint(json.dumps(out))";

/// New connections from the client: (HTTP backends, TCP backends, UDP backends).
fn backends_seen(lab: &TestLab, n: u32) -> [BTreeMap<String, usize>; 3] {
    let probe = ha::probe_path();
    let n = n.to_string();
    let mut out: [BTreeMap<String, usize>; 3] = Default::default();
    for (i, args) in [
        vec!["python3", probe.as_str(), "http", VIP2, "8080", &n],
        vec!["python3", "-c", TCP_ECHO, VIP2, "9000", &n],
        vec!["python3", probe.as_str(), "udp", VIP2, "9001", &n],
    ]
    .into_iter()
    .enumerate()
    {
        let out_s = lab.exec_ok("client", &args).unwrap();
        for r in serde_json::from_str::<Value>(&out_s)
            .unwrap()
            .as_array()
            .unwrap()
        {
            let b = r["backend"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("error: {}", r["error"]));
            *out[i].entry(b).or_default() += 1;
        }
    }
    out
}

fn only(seen: &[BTreeMap<String, usize>; 3], backend: &str, what: &str) {
    for (svc, m) in ["http", "tcp", "udp"].iter().zip(seen) {
        assert!(
            m.len() == 1 && m.contains_key(backend),
            "{what}: {svc} connections went to {m:?}, not only {backend}"
        );
    }
}

/// Starts `be`'s servers again and returns once all three listen (the clock of "back within
/// 3 s" starts when the endpoint can serve, not when its process was asked to start).
fn restart_servers(lab: &TestLab, be: &str) -> Instant {
    lab.spawn(be, "servers-again", &["python3", SERVERS, be])
        .unwrap();
    lab.wait_until(
        &format!("{be}'s servers to listen"),
        Duration::from_secs(15),
        || {
            let tcp = lab.exec_ok(be, &["ss", "-Hltn"])?;
            let udp = lab.exec_ok(be, &["ss", "-Hlun"])?;
            Ok(tcp.contains("0.0.0.0:9000")
                && tcp.contains("0.0.0.0:8080")
                && udp.contains("0.0.0.0:9001"))
        },
    )
    .unwrap();
    Instant::now()
}

fn vip2_routes(lab: &TestLab) -> usize {
    lab.vtysh_json("tor", &format!("show bgp ipv4 unicast {VIP2}/32 json"))
        .map(|v| v["paths"].as_array().map_or(0, Vec::len))
        .unwrap_or(0)
}

fn drops_no_endpoint(lab: &TestLab, node: &str) -> f64 {
    let out = lab
        .exec_ok(
            node,
            &["curl", "-s", "-m", "5", "http://127.0.0.1:11111/metrics"],
        )
        .unwrap_or_default();
    out.lines()
        .find(|l| {
            l.starts_with("ferrolb_datapath_drops_total{") && l.contains("reason=\"no_endpoint\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn liveness_probes_take_dead_endpoints_out_on_both_nodes() {
    let Some(lab) = ha::up(
        "liveness_probes_take_dead_endpoints_out_on_both_nodes",
        "health",
        "100ms",
        FERROLB,
    ) else {
        return;
    };
    for (node, ..) in LBS {
        for (name, port, proto) in RULES {
            let r = rest(
                &lab,
                node,
                "POST",
                "/config/loadbalancer",
                Some(&kube_loxilb_rule(name, port, proto)),
            );
            assert_eq!(r.0, 200, "{node} {name}: {r:?}");
        }
    }
    let t = Instant::now();
    wait_state(&lab, "10.10.10.11", "active", t, "both endpoints active");
    lab.wait_until(
        "the ToR's route to the monitored VIP",
        Duration::from_secs(30),
        || Ok(vip2_routes(&lab) == 2),
    )
    .unwrap();
    let seen = backends_seen(&lab, 12);
    for (svc, m) in ["http", "tcp", "udp"].iter().zip(&seen) {
        assert!(
            m.keys().all(|b| b == "be1" || b == "be2") && m.len() == 2,
            "{svc}: healthy endpoints share the traffic: {m:?}"
        );
    }
    // Probe objects as loxicmd lists them.
    let (_, eps) = rest(&lab, "lb1", "GET", "/config/endpoint/all", None);
    let attr = eps["Attr"].as_array().unwrap();
    assert!(
        attr.iter().any(|e| e["hostName"] == "10.10.10.11"
            && e["probeType"] == "udp"
            && e["probePort"] == 9001
            && e["currState"] == "ok"),
        "{eps}"
    );

    // 1. be1's servers die (the host stays): out within 3 s on both nodes.
    lab.kill("be1", "python3").unwrap();
    let t = Instant::now();
    let out = wait_state(
        &lab,
        "10.10.10.11",
        "inactive",
        t,
        "be1 inactive on both nodes",
    );
    let seen = backends_seen(&lab, 12);
    only(&seen, "be2", "be1's servers dead");
    // The unmonitored rules on the other VIP keep be1 (Monitor: false = today's behaviour).
    for (node, ..) in LBS {
        for (port, eps) in states(&lab, node, ha::VIP) {
            assert_eq!(
                eps["10.10.10.11"], "active",
                "{node}: unmonitored rule {port}: {eps:?}"
            );
        }
    }
    let (_, eps) = rest(&lab, "lb2", "GET", "/config/endpoint/all", None);
    assert!(
        eps["Attr"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["hostName"] == "10.10.10.11" && e["currState"] == "nok"),
        "{eps}"
    );
    let t = restart_servers(&lab, "be1");
    let back = wait_state(
        &lab,
        "10.10.10.11",
        "active",
        t,
        "be1 active again on both nodes",
    );
    let seen = backends_seen(&lab, 12);
    for (svc, m) in ["http", "tcp", "udp"].iter().zip(&seen) {
        assert!(m.contains_key("be1"), "{svc}: be1 back in use: {m:?}");
    }
    say(format!(
        "liveness: be1's servers killed -> inactive on both nodes in (TCP+HTTP, UDP) {out:?}; restarted -> active in {back:?}"
    ));
    check_times("servers killed", out);
    check_times("servers restarted", back);

    // Each node's verdicts reach its peer in its sync status. The two agree now; be1 forced
    // down on lb1 alone: each node shows the other's verdict beside its own and counts the
    // three targets of be1 as disagreements; green again: they agree.
    let disagree = |node: &str| ha::metric(&lab, node, "ferrolb_endpoint_view_disagreements");
    let agree = |what: &str| {
        lab.wait_until(what, Duration::from_secs(5), || {
            Ok(LBS.iter().all(|&(n, ..)| disagree(n) == Some(0.0)))
        })
        .unwrap()
    };
    agree("both nodes agree on every endpoint");
    let host_state = |node: &str, state: &str| {
        let body = format!(r#"{{"hostName":"10.10.10.11","state":"{state}"}}"#);
        let r = rest(&lab, node, "POST", "/config/endpointhoststate", Some(&body));
        assert_eq!(r.0, 200, "{node}: {r:?}");
    };
    host_state("lb1", "red");
    let seen_at = lab
        .wait_until(
            "lb2 to see lb1's forced-down verdict",
            Duration::from_secs(5),
            || Ok(LBS.iter().all(|&(n, ..)| disagree(n) == Some(3.0))),
        )
        .unwrap();
    let (_, eps) = rest(&lab, "lb2", "GET", "/config/endpoint/all", None);
    let e = eps["Attr"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["hostName"] == "10.10.10.11" && e["probePort"] == 9000)
        .cloned()
        .unwrap();
    assert_eq!(e["currState"], "ok", "{e}");
    assert_eq!(e["peerStates"][0]["peer"], "10.10.10.2:22222", "{e}");
    assert_eq!(e["peerStates"][0]["node"], 0, "{e}");
    assert_eq!(e["peerStates"][0]["state"], "red", "{e}");
    host_state("lb1", "green");
    let agreed = agree("both nodes agree again");
    say(format!(
        "liveness: cluster view: be1 forced down on lb1 alone -> both nodes count 3 disagreements after {seen_at:?}; green -> agreement after {agreed:?}"
    ));

    // 2. be1's host vanishes (link down): the same.
    lab.link_down("be1", "eth1").unwrap();
    let t = Instant::now();
    let out = wait_state(
        &lab,
        "10.10.10.11",
        "inactive",
        t,
        "be1 inactive after its link went down",
    );
    only(&backends_seen(&lab, 12), "be2", "be1's link down");
    lab.link_up("be1", "eth1").unwrap();
    // The link's going down took be1's default route and IPv6 address with it (as on any
    // host): put them back, as the host's network manager would, or be1 cannot answer
    // clients.
    for route in [
        "ip route replace default via 10.10.10.1",
        "ip -6 addr replace fd00:10::11/64 dev eth1 nodad",
        "ip -6 route replace default via fd00:10::1",
    ] {
        let argv: Vec<&str> = route.split(' ').collect();
        let out = lab.exec("be1", &argv).unwrap();
        assert!(out.success(), "{route}: {out:?}");
    }
    let t = Instant::now();
    let back = wait_state(
        &lab,
        "10.10.10.11",
        "active",
        t,
        "be1 active after its link came back",
    );
    let seen = backends_seen(&lab, 12);
    for (svc, m) in ["http", "tcp", "udp"].iter().zip(&seen) {
        assert!(
            m.contains_key("be1"),
            "{svc}: be1 back in use after its link: {m:?}"
        );
    }
    say(format!(
        "liveness: be1's link down -> inactive on both nodes in (TCP+HTTP, UDP) {out:?}; up -> active in {back:?}"
    ));
    check_times("link down", out);
    check_times("link up", back);

    // 3. Every endpoint down: new flows dropped and counted, the VIP withdrawn from the ToR.
    let drops_before = drops_no_endpoint(&lab, "lb1");
    lab.kill("be1", "python3").unwrap();
    lab.kill("be2", "python3").unwrap();
    let t = Instant::now();
    wait_state(&lab, "10.10.10.12", "inactive", t, "be2 inactive");
    wait_state(&lab, "10.10.10.11", "inactive", t, "be1 inactive");
    let gone = lab
        .wait_until(
            "the ToR to lose the VIP's routes",
            Duration::from_secs(10),
            || Ok(vip2_routes(&lab) == 0),
        )
        .unwrap();
    // With no route the ToR cannot deliver: a static route to lb1 shows the datapath's drop.
    let _ = lab.exec(
        "tor",
        &[
            "ip",
            "route",
            "add",
            &format!("{VIP2}/32"),
            "via",
            "192.0.2.2",
        ],
    );
    let out = lab
        .exec("client", &["python3", "-c", "import socket\nok=0\nfor i in range(5):\n s=socket.socket()\n s.settimeout(0.3)\n try:\n  s.connect(('203.0.113.20',9000)); ok+=1\n except Exception: pass\n s.close()\nprint(ok)"])
        .unwrap();
    assert_eq!(
        out.stdout.trim(),
        "0",
        "no connection may succeed with every endpoint down: {out:?}"
    );
    let _ = lab.exec(
        "tor",
        &[
            "ip",
            "route",
            "del",
            &format!("{VIP2}/32"),
            "via",
            "192.0.2.2",
        ],
    );
    let drops = drops_no_endpoint(&lab, "lb1") - drops_before;
    assert!(
        drops >= 5.0,
        "new flows with every endpoint down are dropped and counted: {drops}"
    );
    let t = restart_servers(&lab, "be2");
    wait_state(&lab, "10.10.10.12", "active", t, "be2 active again");
    let readvertised = lab
        .wait_until(
            "the ToR to get the VIP back",
            Duration::from_secs(10),
            || Ok(vip2_routes(&lab) == 2),
        )
        .unwrap();
    only(&backends_seen(&lab, 8), "be2", "be2 back, be1 still dead");
    say(format!(
        "liveness: every endpoint down -> VIP withdrawn from the ToR {gone:?} after both were inactive, {drops} new-flow packets dropped (no_endpoint); be2 back -> re-advertised in {:?}",
        t.elapsed().max(readvertised)
    ));
    let t = restart_servers(&lab, "be1");
    wait_state(&lab, "10.10.10.11", "active", t, "be1 active again");

    // 4. Synced flows keep their endpoint: TCP streams to both backends, then be1 taken out
    // on both nodes (forced down: its servers stay up, so its streams drain while new
    // connections go to be2), then lb1 fails. lb2 carries every stream on to the backend it
    // had, be1's included, although be1 is in none of its selection tables.
    let t0 = ha::start_traffic_to(
        &lab,
        VIP2,
        "keep",
        &[
            "--tcp",
            "16",
            "--late",
            "0",
            "--udp",
            "0",
            "--duration",
            "9",
            "--drain",
            "6",
        ],
    );
    std::thread::sleep(Duration::from_secs(2).saturating_sub(t0.elapsed()));
    for (node, ..) in LBS {
        let r = rest(
            &lab,
            node,
            "POST",
            "/config/endpointhoststate",
            Some(r#"{"hostName":"10.10.10.11","state":"red"}"#),
        );
        assert_eq!(r.0, 200, "{node}: {r:?}");
    }
    let t = Instant::now();
    wait_state(&lab, "10.10.10.11", "inactive", t, "be1 forced down");
    only(&backends_seen(&lab, 6), "be2", "be1 forced down");
    std::thread::sleep(Duration::from_secs(5).saturating_sub(t0.elapsed()));
    ha::isolate(&lab, "lb1", true);
    // (lb1, cut off, stays MASTER in its own eyes: only lb2's role counts.)
    let took = lab
        .wait_until("lb2 MASTER", Duration::from_secs(10), || {
            Ok(ha::role(&lab, "lb2") == "MASTER")
        })
        .unwrap();
    let report = ha::read_traffic(&lab, "keep");
    ha::isolate(&lab, "lb1", false);
    ha::assert_all_survived(&report, "be1 forced down, then lb1 failed");
    let on = |b: &str| {
        report["tcp"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["backend"] == b)
            .count()
    };
    assert!(
        on("be1") > 0 && on("be2") > 0,
        "streams to both backends: {report}"
    );
    say(format!(
        "liveness: {} streams to be1 (forced down: draining) and {} to be2 survived lb1's failure (lb2 MASTER after {took:?})",
        on("be1"),
        on("be2")
    ));

    lab.down().unwrap();
}
