//! End-to-end tests of a single ferrolb node on the `lb-single` lab (containerlab/lb-single):
//! a client, the LB node running the `ferrolb` built by cargo, three backends running real
//! HTTP / TCP echo / UDP echo servers. Requests go through the REST API exactly as kube-loxilb
//! and loxicmd send them. Every lab is torn down when its test ends (pass or fail).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use ferrolb_tests::{TestLab, require};
use serde_json::{Value, json};

const TOPOLOGY: &str = "containerlab/lb-single/lb-single.clab.yml";
const VIP: &str = "203.0.113.10";
const BE: [&str; 3] = ["10.10.10.11", "10.10.10.12", "10.10.10.13"];
const PROBE: &str = "/etc/ferrolb-lab/probe.py";
const FERROLB: &str = env!("CARGO_BIN_EXE_ferrolb");
const FERROCTL: &str = env!("CARGO_BIN_EXE_ferroctl");
const PROGRAMS: &[&str] = &["ip", "ethtool", "sysctl", "curl", "python3", "openssl"];

fn lab(test: &str, label: &str) -> Option<TestLab> {
    if !require(test, PROGRAMS) {
        return None;
    }
    let lab = TestLab::up_with(TOPOLOGY, label, &[("FERROLB", FERROLB)]).expect("lab up");
    wait_ready(&lab);
    Some(lab)
}

fn wait_ready(lab: &TestLab) {
    lab.wait_until("the REST API", Duration::from_secs(20), || {
        Ok(api(lab, "GET", "", None).0 == 200)
    })
    .unwrap();
    ferrolb_tests::wait_http_backends(lab, "lb1", &BE);
}

/// A REST call from inside the LB node: (status, JSON body or Null).
fn api(lab: &TestLab, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    ferrolb_tests::rest(lab, "lb1", method, path, body)
}

fn post(lab: &TestLab, body: &Value) -> (u16, Value) {
    api(lab, "POST", "/config/loadbalancer", Some(&body.to_string()))
}

fn rule(port: u16, proto: &str, sel: u8, mode: u8, eps: &[(&str, u16, u16)]) -> Value {
    json!({
        "serviceArguments": {"externalIP": VIP, "port": port, "protocol": proto,
                             "sel": sel, "mode": mode, "name": format!("test_{proto}{port}:llb-inst0")},
        "endpoints": eps.iter().map(|(ip, p, w)| json!({"endpointIP": ip, "targetPort": p, "weight": w})).collect::<Vec<_>>(),
    })
}

fn all3(port: u16) -> Vec<(&'static str, u16, u16)> {
    BE.iter().map(|b| (*b, port, 1)).collect()
}

fn probe(lab: &TestLab, args: &[&str]) -> Vec<Value> {
    let mut argv = vec!["python3", PROBE];
    argv.extend_from_slice(args);
    let out = lab.exec_ok("client", &argv).unwrap();
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .cloned()
        .unwrap()
}

fn backends(res: &[Value]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in res {
        assert!(r.get("error").is_none(), "request failed: {r}");
        *m.entry(r["backend"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    m
}

fn peer_ip(r: &Value) -> String {
    r["peer"]
        .as_str()
        .unwrap()
        .rsplit_once(':')
        .unwrap()
        .0
        .to_string()
}

#[test]
fn balancing_algorithms_and_nat_modes() {
    let Some(lab) = lab("balancing_algorithms_and_nat_modes", "lbalg") else {
        return;
    };
    // Round robin, DNAT: exact spread; backends see the client.
    assert_eq!(post(&lab, &rule(80, "tcp", 0, 0, &all3(8080))).0, 200);
    let stat = |node: &str, path: &str| -> u64 {
        lab.exec_ok(node, &["cat", path])
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let lb_tx = "/sys/class/net/eth2/statistics/tx_packets";
    let sw_rx = "/sys/class/net/eth1/statistics/rx_packets";
    let (tx0, rx0) = (stat("lb1", lb_tx), stat("sw", sw_rx));
    let res = probe(&lab, &["http", VIP, "80", "30"]);
    // lb1's eth2 is a veth whose other end (sw's eth1) is in another namespace: the datapath
    // hands what it forwards straight to that end (bpf_redirect_peer). sw receives every
    // packet toward the backends (at least 4 per connection); lb1's transmit path sees only
    // what lb1 itself sends (neighbour resolution).
    let (tx, rx) = (stat("lb1", lb_tx) - tx0, stat("sw", sw_rx) - rx0);
    assert!(
        rx >= 120 && tx < 20,
        "30 connections: sw's eth1 received {rx} packets, lb1's eth2 transmitted {tx}"
    );
    assert_eq!(
        backends(&res),
        BTreeMap::from([("be1".into(), 10), ("be2".into(), 10), ("be3".into(), 10)])
    );
    assert!(
        res.iter().all(|r| peer_ip(r) == "198.51.100.2"),
        "DNAT keeps the client address"
    );

    // Full NAT: backends see the VIP.
    assert_eq!(post(&lab, &rule(81, "tcp", 0, 2, &all3(8080))).0, 200);
    let res = probe(&lab, &["http", VIP, "81", "6"]);
    assert_eq!(backends(&res).len(), 3);
    assert!(
        res.iter().all(|r| peer_ip(r) == VIP),
        "full NAT sources from the VIP: {res:?}"
    );

    // One-arm: backends see the LB's interface address.
    assert_eq!(post(&lab, &rule(82, "tcp", 0, 1, &all3(8080))).0, 200);
    let res = probe(&lab, &["http", VIP, "82", "3"]);
    assert!(res.iter().all(|r| peer_ip(r) == "10.10.10.2"), "{res:?}");

    // Priority (weights 3:1:1): exact shares.
    let w = [(BE[0], 8080, 3), (BE[1], 8080, 1), (BE[2], 8080, 1)];
    assert_eq!(post(&lab, &rule(83, "tcp", 2, 0, &w)).0, 200);
    let res = probe(&lab, &["http", VIP, "83", "25"]);
    let shares = backends(&res);
    if shares != BTreeMap::from([("be1".into(), 15), ("be2".into(), 5), ("be3".into(), 5)]) {
        // Exact shares need one selection per connection: show the flows and the
        // datapath's counters to tell which packet made another one.
        let ct = api(&lab, "GET", "/config/conntrack/all", None).1;
        let m = lab
            .exec_ok("lb1", &["curl", "-sf", "http://127.0.0.1:11111/metrics"])
            .unwrap();
        let counters: Vec<&str> = m.lines().filter(|l| l.starts_with("ferrolb_")).collect();
        panic!(
            "weights 3:1:1 over 25 connections gave {shares:?}\nprobe: {res:?}\nconntrack: {ct}\nmetrics: {counters:#?}"
        );
    }

    // Persist: every connection of one client goes to one backend; another client address
    // is pinned too.
    assert_eq!(post(&lab, &rule(84, "tcp", 3, 0, &all3(8080))).0, 200);
    for src in ["198.51.100.2", "198.51.100.3"] {
        let res = probe(&lab, &["http", VIP, "84", "12", "--src", src]);
        assert_eq!(backends(&res).len(), 1, "persist from {src}: {res:?}");
    }

    // Hash (Maglev), UDP: each flow keeps its backend, also after its conntrack entry
    // expired (inactiveTimeOut 1 s), so the choice comes from the hash, not the table.
    let mut h = rule(53, "udp", 1, 2, &all3(9001));
    h["serviceArguments"]["inactiveTimeOut"] = json!(1);
    assert_eq!(post(&lab, &h).0, 200);
    let ports: Vec<String> = (0..12).map(|i| (41000 + i * 7).to_string()).collect();
    let mut args = vec!["udp", VIP, "53", "0"];
    for p in &ports {
        args.extend(["--sport", p]);
    }
    let first = probe(&lab, &args);
    assert!(backends(&first).len() >= 2, "hash spreads flows: {first:?}");
    std::thread::sleep(Duration::from_millis(2500));
    let again = probe(&lab, &args);
    let pick = |v: &[Value]| v.iter().map(|r| r["backend"].clone()).collect::<Vec<_>>();
    assert_eq!(pick(&first), pick(&again), "same flow, same backend");

    // ICMP echo balanced (full NAT) and answered.
    assert_eq!(post(&lab, &rule(1, "icmp", 0, 2, &all3(0))).0, 200);
    lab.exec_ok("client", &["ping", "-c", "3", "-i", "0.2", "-W", "1", VIP])
        .unwrap();

    // Counters show up per endpoint ("packets:bytes") and in metrics.
    let (_, all) = api(&lab, "GET", "/config/loadbalancer/all", None);
    let r80 = all["lbAttr"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["serviceArguments"]["port"] == 80)
        .unwrap();
    for ep in r80["endpoints"].as_array().unwrap() {
        let (p, b) = ep["counter"].as_str().unwrap().split_once(':').unwrap();
        assert!(p.parse::<u64>().unwrap() >= 50, "{ep}");
        assert!(b.parse::<u64>().unwrap() > 0);
        assert_eq!(ep["state"], "active");
    }
    let m = lab
        .exec_ok("lb1", &["curl", "-sf", "http://127.0.0.1:11111/metrics"])
        .unwrap();
    assert!(m.contains("ferrolb_endpoint_packets_total{service=\"test_tcp80:llb-inst0\",endpoint=\"10.10.10.11:8080\"}"));
    assert!(m.contains("ferrolb_rules_installed 7"));
    assert!(!m.contains("198.51.100"), "no client addresses in metrics");

    // A neighbour change on lb1 reaches the agent over rtnetlink, which invalidates the
    // datapath's cached FIB answers (the datapath's side: the FIB cache test in bpf/tests).
    let invalidations = |lab: &TestLab| -> u64 {
        let m = lab
            .exec_ok("lb1", &["curl", "-sf", "http://127.0.0.1:11111/metrics"])
            .unwrap();
        m.lines()
            .find_map(|l| l.strip_prefix("ferrolb_fib_cache_invalidations_total "))
            .unwrap_or_else(|| panic!("no ferrolb_fib_cache_invalidations_total in {m}"))
            .trim()
            .parse()
            .unwrap()
    };
    let before = invalidations(&lab);
    lab.exec_ok(
        "lb1",
        &[
            "ip",
            "neigh",
            "replace",
            "10.10.10.99",
            "lladdr",
            "02:00:00:00:00:99",
            "dev",
            "eth2",
            "nud",
            "permanent",
        ],
    )
    .unwrap();
    lab.wait_until(
        "the agent to invalidate the cached FIB answers",
        Duration::from_secs(5),
        || Ok(invalidations(&lab) > before),
    )
    .unwrap();

    // The FIB cache keys questions by addresses while nothing in lb1's FIB can pick a route
    // by ports (decision 0010): not once a policy rule selects on a port (heard over
    // rtnetlink) or multipath hashes layer 4 (a sysctl, read again every second), and again
    // once they are gone.
    // (IPv4, IPv6) as the metrics say; None while they cannot be read or lack the gauge.
    let by_addresses = |lab: &TestLab| -> Option<(bool, bool)> {
        let m = lab
            .exec_ok("lb1", &["curl", "-sf", "http://127.0.0.1:11111/metrics"])
            .ok()?;
        let of = |family: &str| {
            let name = format!("ferrolb_fib_cache_by_addresses{{family=\"{family}\"}} ");
            m.lines()
                .find_map(|l| l.strip_prefix(name.as_str()))
                .map(|v| v.trim() == "1")
        };
        Some((of("ipv4")?, of("ipv6")?))
    };
    let expect = |lab: &TestLab, want: (bool, bool), after: &str| {
        lab.wait_until(
            &format!("questions keyed by addresses (IPv4, IPv6) = {want:?} {after}"),
            Duration::from_secs(5),
            || Ok(by_addresses(lab) == Some(want)),
        )
        .unwrap_or_else(|e| panic!("{e}; the metrics say {:?}", by_addresses(lab)));
    };
    expect(&lab, (true, true), "at start");
    for (add, del, after) in [
        (
            &["ip", "rule", "add", "dport", "9999", "table", "100"][..],
            &["ip", "rule", "del", "dport", "9999", "table", "100"][..],
            "with an IPv4 rule on a port",
        ),
        (
            &["sysctl", "-qw", "net.ipv4.fib_multipath_hash_policy=1"][..],
            &["sysctl", "-qw", "net.ipv4.fib_multipath_hash_policy=0"][..],
            "with IPv4 multipath hashing layer 4",
        ),
    ] {
        lab.exec_ok("lb1", add).unwrap();
        expect(&lab, (false, true), after);
        lab.exec_ok("lb1", del).unwrap();
        expect(&lab, (true, true), "once that is undone");
    }
}

const VIP6: &str = "2001:db8:aaaa::10";
const BE6: [&str; 3] = ["fd00:10::11", "fd00:10::12", "fd00:10::13"];

fn rule6(port: u16, proto: &str, sel: u8, mode: u8, target: u16) -> Value {
    json!({
        "serviceArguments": {"externalIP": VIP6, "port": port, "protocol": proto,
                             "sel": sel, "mode": mode, "name": format!("test6_{proto}{port}:llb-inst0")},
        "endpoints": BE6.iter().map(|ip| json!({"endpointIP": ip, "targetPort": target, "weight": 1})).collect::<Vec<_>>(),
    })
}

/// "[addr]:port" or "addr:port" -> addr.
fn peer_ip6(r: &Value) -> String {
    peer_ip(r)
        .trim_matches(|c| c == '[' || c == ']')
        .to_string()
}

#[test]
fn ipv6_nat_modes_and_icmpv6() {
    let Some(lab) = lab("ipv6_nat_modes_and_icmpv6", "lb6") else {
        return;
    };
    // DNAT, round robin: exact spread over the IPv6 backends, which see the client.
    assert_eq!(post(&lab, &rule6(80, "tcp", 0, 0, 8080)).0, 200);
    let lo = lab
        .exec_ok("lb1", &["ip", "-6", "addr", "show", "dev", "lo"])
        .unwrap();
    assert!(lo.contains(&format!("{VIP6}/128")), "{lo}");
    let res = probe(&lab, &["http", VIP6, "80", "30"]);
    assert_eq!(
        backends(&res),
        BTreeMap::from([("be1".into(), 10), ("be2".into(), 10), ("be3".into(), 10)])
    );
    assert!(
        res.iter().all(|r| peer_ip6(r) == "2001:db8:100::2"),
        "DNAT keeps the client address: {res:?}"
    );
    // Full NAT: backends see the VIP. One-arm: lb1's address on their segment.
    assert_eq!(post(&lab, &rule6(81, "tcp", 0, 2, 8080)).0, 200);
    let res = probe(&lab, &["http", VIP6, "81", "6"]);
    assert_eq!(backends(&res).len(), 3);
    assert!(res.iter().all(|r| peer_ip6(r) == VIP6), "{res:?}");
    assert_eq!(post(&lab, &rule6(82, "tcp", 0, 1, 8080)).0, 200);
    let res = probe(&lab, &["http", VIP6, "82", "3"]);
    assert!(res.iter().all(|r| peer_ip6(r) == "fd00:10::2"), "{res:?}");

    // TCP streams through full NAT: every line echoed.
    assert_eq!(post(&lab, &rule6(90, "tcp", 0, 2, 9000)).0, 200);
    let streams = probe(&lab, &["stream", VIP6, "90", "1", "--count", "6"]);
    for st in &streams {
        assert!(st["errors"].as_array().unwrap().is_empty(), "{st}");
        assert_eq!(st["sent"], st["echoed"], "{st}");
    }

    // UDP, Maglev hash, full NAT: each flow keeps its backend.
    assert_eq!(post(&lab, &rule6(53, "udp", 1, 2, 9001)).0, 200);
    let ports: Vec<String> = (0..12).map(|i| (42000 + i * 7).to_string()).collect();
    let mut args = vec!["udp", VIP6, "53", "0"];
    for p in &ports {
        args.extend(["--sport", p]);
    }
    let first = probe(&lab, &args);
    assert!(backends(&first).len() >= 2, "hash spreads flows: {first:?}");
    let again = probe(&lab, &args);
    let pick = |v: &[Value]| v.iter().map(|r| r["backend"].clone()).collect::<Vec<_>>();
    assert_eq!(pick(&first), pick(&again), "same flow, same backend");

    // ICMPv6 echo balanced (full NAT, identifier translated) and answered.
    assert_eq!(post(&lab, &rule6(1, "icmp", 0, 2, 0)).0, 200);
    lab.exec_ok(
        "client",
        &["ping", "-6", "-c", "3", "-i", "0.2", "-W", "1", VIP6],
    )
    .unwrap();

    // Conntrack and counters name IPv6 flows; a mixed-family rule is refused.
    let (_, ct) = api(&lab, "GET", "/config/conntrack/all", None);
    let flows = ct["ctAttr"].as_array().unwrap();
    assert!(
        flows
            .iter()
            .any(|f| f["destinationIP"] == VIP6 && f["protocol"] == "icmp"),
        "{ct}"
    );
    let t = lab.exec_ok("lb1", &[FERROCTL, "get", "ct"]).unwrap();
    assert!(t.contains(VIP6), "{t}");
    let mut mixed = rule6(83, "tcp", 0, 0, 8080);
    mixed["endpoints"][1]["endpointIP"] = json!("10.10.10.12");
    let (st, v) = post(&lab, &mixed);
    assert_eq!(st, 400, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("endpoints[1].endpointIP"),
        "{v}"
    );
    assert_eq!(
        api(&lab, "GET", "/config/conntrack/all", None).0,
        200,
        "nothing lost"
    );
    let m = lab
        .exec_ok("lb1", &["curl", "-sf", "http://127.0.0.1:11111/metrics"])
        .unwrap();
    assert!(
        m.contains("ferrolb_endpoint_packets_total{service=\"test6_tcp80:llb-inst0\",endpoint=\"[fd00:10::11]:8080\"}"),
        "{m}"
    );
}

#[test]
fn rest_api_is_loxilb_compatible() {
    let Some(lab) = lab("rest_api_is_loxilb_compatible", "lbapi") else {
        return;
    };
    // kube-loxilb's exact create body (VIP changed to the lab's).
    let kube = r#"{"serviceArguments":{"externalIP":"203.0.113.10","privateIP":"","port":80,
  "protocol":"tcp","sel":0,"mode":2,"BGP":true,"Monitor":false,"inactiveTimeOut":0,"block":0,
  "managed":true,"probetype":"","probeport":0,"probereq":"","proberesp":"",
  "name":"default_nginx-lb:llb-inst0"},"secondaryIPs":[],"allowedSources":[],
  "endpoints":[{"endpointIP":"10.10.10.11","targetPort":8080,"weight":1,"state":"","counter":""}]}"#;
    let (st, v) = api(&lab, "POST", "/config/loadbalancer", Some(kube));
    assert_eq!((st, v["result"].as_str()), (200, Some("Success")));
    // The VIP is on lo now.
    let lo = lab
        .exec_ok("lb1", &["ip", "-o", "addr", "show", "dev", "lo"])
        .unwrap();
    assert!(lo.contains("203.0.113.10/32"), "{lo}");
    // An identical re-post (kube-loxilb reconnect) answers an "exists" error.
    let (st, v) = api(&lab, "POST", "/config/loadbalancer", Some(kube));
    assert_eq!(st, 409);
    assert!(v["message"].as_str().unwrap().contains("exist"), "{v}");
    let res = probe(&lab, &["http", VIP, "80", "2"]);
    assert!(res.iter().all(|r| r["backend"] == "be1"));

    // GET all: loxilb's shape, keys as loxilb spells them.
    let (st, all) = api(&lab, "GET", "/config/loadbalancer/all", None);
    assert_eq!(st, 200);
    let e = &all["lbAttr"][0];
    assert_eq!(e["serviceArguments"]["externalIP"], VIP);
    assert_eq!(e["serviceArguments"]["name"], "default_nginx-lb:llb-inst0");
    assert_eq!(e["serviceArguments"]["bgp"], true);
    assert_eq!(e["endpoints"][0]["endpointIP"], "10.10.10.11");
    assert!(e["endpoints"][0]["counter"].as_str().unwrap().contains(':'));

    // A changed re-post modifies in place (flows kept: see endpoint_removal_keeps_other_flows).
    let kube2 = kube.replace(
        r#"{"endpointIP":"10.10.10.11","targetPort":8080,"weight":1,"state":"","counter":""}"#,
        r#"{"endpointIP":"10.10.10.11","targetPort":8080,"weight":1},{"endpointIP":"10.10.10.12","targetPort":8080,"weight":1}"#,
    );
    let (st, _) = api(&lab, "POST", "/config/loadbalancer", Some(&kube2));
    assert_eq!(st, 200);
    let res = probe(&lab, &["http", VIP, "80", "4"]);
    assert_eq!(backends(&res).len(), 2, "modified rule uses both endpoints");

    // oper 1 attaches, oper 2 detaches.
    let mut att = rule(80, "tcp", 0, 2, &[(BE[2], 8080, 1)]);
    att["serviceArguments"]["oper"] = json!(1);
    att["serviceArguments"]["name"] = json!("default_nginx-lb:llb-inst0");
    assert_eq!(post(&lab, &att).0, 200);
    let (_, all) = api(&lab, "GET", "/config/loadbalancer/all", None);
    assert_eq!(all["lbAttr"][0]["endpoints"].as_array().unwrap().len(), 3);
    att["serviceArguments"]["oper"] = json!(2);
    assert_eq!(post(&lab, &att).0, 200);
    let (_, all) = api(&lab, "GET", "/config/loadbalancer/all", None);
    assert_eq!(all["lbAttr"][0]["endpoints"].as_array().unwrap().len(), 2);

    // Bad input: 400 naming the field, nothing changes.
    let before = api(&lab, "GET", "/config/loadbalancer/all", None).1;
    let bad: &[(&str, &str)] = &[
        ("{not json", "invalid JSON"),
        (
            r#"{"serviceArguments":{"port":80},"endpoints":[]}"#,
            "serviceArguments.externalIP: required",
        ),
        (
            r#"{"serviceArguments":{"externalIP":"203.0.113.10"},"endpoints":[]}"#,
            "serviceArguments.port: required",
        ),
        (
            r#"{"serviceArguments":{"externalIP":"203.0.113.10","port":80}}"#,
            "endpoints: required",
        ),
        (
            r#"{"serviceArguments":{"externalIP":"203.0.113.10","port":0},"endpoints":[]}"#,
            "serviceArguments.port: must be 1..=65535",
        ),
        (
            r#"{"serviceArguments":{"externalIP":"203.0.113.10","port":70000},"endpoints":[]}"#,
            "serviceArguments.port: must be 1..=65535",
        ),
        (
            r#"{"serviceArguments":{"externalIP":"203.0.113.300","port":80},"endpoints":[]}"#,
            "serviceArguments.externalIP",
        ),
        (
            r#"{"serviceArguments":{"externalIP":"203.0.113.10","port":"80"},"endpoints":[]}"#,
            "serviceArguments.port: must be an integer",
        ),
        (
            r#"{"serviceArguments":{"externalIP":"203.0.113.10","port":80,"sel":7},"endpoints":[]}"#,
            "serviceArguments.sel",
        ),
        (
            r#"{"serviceArguments":{"externalIP":"203.0.113.10","port":80,"mode":-1},"endpoints":[]}"#,
            "serviceArguments.mode",
        ),
        (
            r#"{"serviceArguments":{"externalIP":"203.0.113.10","port":80,"mode":3},"endpoints":[]}"#,
            "not supported",
        ),
        (
            r#"{"serviceArguments":{"externalIP":"203.0.113.10","port":80},"endpoints":[{"endpointIP":"10.0.0.1","targetPort":1},{"endpointIP":"10.0.0.1","targetPort":1}]}"#,
            "duplicate endpoint",
        ),
        // Addresses exactly as written; keys differing only in case are ambiguous.
        (
            r#"{"serviceArguments":{"externalIP":"203.0.113.77 ","port":80},"endpoints":[]}"#,
            "serviceArguments.externalIP: '203.0.113.77 ' is not an IP address",
        ),
        (
            r#"{"serviceArguments":{"externalIP":"203.0.113.77","port":1,"Port":70000},"endpoints":[]}"#,
            "given twice",
        ),
        // A VIP that is this node's own address (eth2), or a backend's of a rule in place.
        (
            r#"{"serviceArguments":{"externalIP":"10.10.10.2","port":80},"endpoints":[]}"#,
            "10.10.10.2 is an address of this node (eth2)",
        ),
        (
            r#"{"serviceArguments":{"externalIP":"10.10.10.11","port":7070},"endpoints":[]}"#,
            "10.10.10.11 is an endpoint of lb-rule",
        ),
        (
            r#"{"serviceArguments":{"externalIP":"203.0.113.77","port":80},"endpoints":[{"endpointIP":"203.0.113.10","targetPort":80}]}"#,
            "endpoints[0].endpointIP: 203.0.113.10 is the VIP of lb-rule",
        ),
    ];
    for (body, want) in bad {
        let (st, v) = api(&lab, "POST", "/config/loadbalancer", Some(body));
        assert_eq!(st, 400, "{body} -> {v}");
        let msg = v["message"].as_str().unwrap();
        assert!(msg.contains(want), "{body}: '{msg}' lacks '{want}'");
    }
    let many: Vec<Value> = (0..33)
        .map(|i| json!({"endpointIP": format!("10.0.1.{i}"), "targetPort": 80, "weight": 1}))
        .collect();
    let (st, v) = post(
        &lab,
        &json!({"serviceArguments": {"externalIP": VIP, "port": 90}, "endpoints": many}),
    );
    assert_eq!(st, 400);
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("endpoints: at most 32")
    );
    // Oversized body: refused.
    let huge = format!(
        r#"{{"serviceArguments":{{"externalIP":"{VIP}","port":91,"name":"{}"}},"endpoints":[]}}"#,
        "x".repeat(2 << 20)
    );
    assert_eq!(
        api(&lab, "POST", "/config/loadbalancer", Some(&huge)).0,
        413
    );
    assert_eq!(
        api(&lab, "GET", "/config/loadbalancer/all", None).1,
        before,
        "bad input changed nothing"
    );

    // Deletes: loxilb's paths, query and an ignored body; 404 for what does not exist.
    assert_eq!(post(&lab, &rule(8000, "tcp", 0, 0, &all3(8080))).0, 200);
    let mut range = rule(9000, "tcp", 0, 0, &all3(0));
    range["serviceArguments"]["portMax"] = json!(9010);
    assert_eq!(post(&lab, &range).0, 200);
    let res = probe(&lab, &["http", VIP, "9000", "1"]);
    assert!(
        res[0]["error"].is_string(),
        "range rule keeps port 9000 (no server there): {res:?}"
    );
    assert_eq!(
        api(&lab, "DELETE", "/config/loadbalancer/externalipaddress/203.0.113.10/port/8000/protocol/tcp?bgp=true&block=0", Some(&rule(8000, "tcp", 0, 0, &[]).to_string())).0,
        200
    );
    assert_eq!(
        api(&lab, "DELETE", "/config/loadbalancer/externalipaddress/203.0.113.10/port/8000/protocol/tcp?bgp=true&block=0", None).0,
        404
    );
    assert_eq!(
        api(&lab, "DELETE", "/config/loadbalancer/externalipaddress/203.0.113.10/port/9000/portmax/9010/protocol/tcp", None).0,
        200
    );
    assert_eq!(
        api(
            &lab,
            "DELETE",
            "/config/loadbalancer/externalipaddress/203.0.113.10/port/abc/protocol/tcp",
            None
        )
        .0,
        400
    );
    assert_eq!(
        api(
            &lab,
            "DELETE",
            "/config/loadbalancer/name/no-such-rule",
            None
        )
        .0,
        404
    );
    assert_eq!(
        api(
            &lab,
            "DELETE",
            "/config/loadbalancer/name/default_nginx-lb:llb-inst0",
            None
        )
        .0,
        200
    );

    // Other endpoints kube-loxilb and operators use.
    let (st, ci) = api(&lab, "GET", "/config/cistate/all", None);
    assert_eq!(
        (st, ci["Attr"][0]["state"].as_str()),
        (200, Some("NOT_DEFINED"))
    );
    let (st, ver) = api(&lab, "GET", "/version", None);
    assert_eq!(st, 200);
    assert!(ver["buildInfo"].as_str().unwrap().contains("ferrolb"));
    assert_eq!(api(&lab, "GET", "/config/conntrack/all", None).0, 200);
    for path in ["/metrics", "/netlox/v1/metrics", "/netlox/v1/openapi.yaml"] {
        let out = lab
            .exec_ok(
                "lb1",
                &["curl", "-sf", &format!("http://127.0.0.1:11111{path}")],
            )
            .unwrap();
        assert!(
            out.contains("ferrolb_") || out.contains("openapi: 3"),
            "{path}"
        );
    }
    assert_eq!(api(&lab, "GET", "/no/such/path", None).0, 404);

    // ferroctl, loxicmd style.
    let ctl = |args: &[&str]| {
        let mut argv = vec![FERROCTL];
        argv.extend_from_slice(args);
        lab.exec_ok("lb1", &argv).unwrap()
    };
    ctl(&[
        "create",
        "lb",
        VIP,
        "--tcp=8081:8080",
        "--endpoints=10.10.10.12:1,10.10.10.13:1",
        "--mode",
        "fullnat",
        "--select",
        "hash",
        "--name",
        "ctl",
    ]);
    let table = ctl(&["get", "lb"]);
    assert!(
        table.contains("8081")
            && table.contains("fullnat")
            && table.contains("hash")
            && table.contains("10.10.10.13:8080"),
        "{table}"
    );
    let j: Value = serde_json::from_str(&ctl(&["--json", "get", "lb"])).unwrap();
    assert_eq!(j["lbAttr"].as_array().unwrap().len(), 1);
    // An SCTP rule, created, shown and deleted the same way.
    ctl(&[
        "create",
        "lb",
        VIP,
        "--sctp=38412:9000",
        "--endpoints=10.10.10.12:1",
        "--mode",
        "fullnat",
        "--name",
        "ngap",
    ]);
    let table = ctl(&["get", "lb"]);
    assert!(
        table
            .lines()
            .any(|l| l.contains("38412") && l.contains("sctp") && l.contains("ngap")),
        "{table}"
    );
    ctl(&["delete", "lb", VIP, "--sctp=38412"]);
    assert!(!ctl(&["get", "lb"]).contains("38412"));
    let res = probe(&lab, &["http", VIP, "8081", "4"]);
    assert!(backends(&res).keys().all(|b| b == "be2" || b == "be3"));
    assert!(ctl(&["get", "ct"]).contains("fullnat-203.0.113.10"));
    assert!(ctl(&["get", "ha"]).contains("NOT_DEFINED"));
    assert!(ctl(&["version"]).contains("ferrolb"));
    let flows_8081 = || {
        api(&lab, "GET", "/config/conntrack/all", None).1["ctAttr"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["destinationPort"] == 8081)
            .count()
    };
    assert!(flows_8081() > 0);
    ctl(&["delete", "lb", VIP, "--tcp=8081"]);
    let out = lab
        .exec("lb1", &[FERROCTL, "delete", "lb", VIP, "--tcp=8081"])
        .unwrap();
    assert!(!out.success() && out.stderr.contains("404"), "{out:?}");
    // The deleted rule's flows are flushed (by the flusher thread, right after the answer).
    lab.wait_until(
        "the deleted rule's flows flushed",
        Duration::from_secs(3),
        || Ok(flows_8081() == 0),
    )
    .unwrap();

    // Delete all; the VIP leaves lo.
    assert_eq!(post(&lab, &rule(80, "tcp", 0, 0, &all3(8080))).0, 200);
    assert_eq!(api(&lab, "DELETE", "/config/loadbalancer/all", None).0, 200);
    assert_eq!(
        api(&lab, "GET", "/config/loadbalancer/all", None).1["lbAttr"],
        json!([])
    );
    let lo = lab
        .exec_ok("lb1", &["ip", "-o", "addr", "show", "dev", "lo"])
        .unwrap();
    assert!(!lo.contains("203.0.113.10"), "{lo}");
}

/// Starts the agent on lb1 again (after the test killed it) and waits for its API.
fn start_agent_again(lab: &TestLab) {
    lab.spawn(
        "lb1",
        "ferrolb-restarted",
        &[FERROLB, "--config-path", "/etc/ferrolb/"],
    )
    .unwrap();
    lab.wait_until("the restarted API", Duration::from_secs(20), || {
        Ok(api(lab, "GET", "", None).0 == 200)
    })
    .unwrap();
}

fn read_stream(lab: &TestLab, name: &str) -> Vec<Value> {
    let path = lab.log_dir("client").join(name);
    lab.wait_until(
        "the stream probe to finish",
        Duration::from_secs(30),
        || Ok(path.exists()),
    )
    .unwrap();
    serde_json::from_str::<Value>(&std::fs::read_to_string(&path).unwrap())
        .unwrap()
        .as_array()
        .cloned()
        .unwrap()
}

fn start_streams(lab: &TestLab, port: u16, secs: u32, count: u32, name: &str) {
    lab.spawn(
        "client",
        &format!("{name}-run"),
        &["sh", "-c", &format!(
            "python3 {PROBE} stream {VIP} {port} {secs} --count {count} > /var/log/{name}.tmp && mv /var/log/{name}.tmp /var/log/{name}"
        )],
    )
    .unwrap();
}

#[test]
fn endpoint_removal_keeps_other_flows() {
    let Some(lab) = lab("endpoint_removal_keeps_other_flows", "lbrm") else {
        return;
    };
    assert_eq!(post(&lab, &rule(7000, "tcp", 0, 2, &all3(9000))).0, 200);
    start_streams(&lab, 7000, 4, 3, "streams.json");
    std::thread::sleep(Duration::from_millis(1200));
    // Remove be3 (a changed re-post).
    assert_eq!(
        post(
            &lab,
            &rule(7000, "tcp", 0, 2, &[(BE[0], 9000, 1), (BE[1], 9000, 1)])
        )
        .0,
        200
    );
    let res = read_stream(&lab, "streams.json");
    let on: BTreeMap<String, &Value> = res
        .iter()
        .map(|r| (r["backend"].as_str().unwrap_or("?").to_string(), r))
        .collect();
    assert_eq!(
        on.len(),
        3,
        "the three streams went to three backends: {res:?}"
    );
    for r in &res {
        assert_eq!(r["errors"], json!([]), "{r}");
        assert_eq!(r["sent"], r["echoed"]);
        assert!(r["max_gap_ms"].as_u64().unwrap() < 500, "{r}");
    }
    // New connections avoid the removed endpoint.
    let res = probe(&lab, &["stream", VIP, "7000", "0.2", "--count", "6"]);
    assert!(
        res.iter()
            .all(|r| r["backend"] != "be3" && r["errors"] == json!([])),
        "{res:?}"
    );

    // A new endpoint takes the freed slot with clean counters (not be3's).
    let with_new = [(BE[0], 9000, 1), (BE[1], 9000, 1), (BE[2], 9999, 1)];
    assert_eq!(post(&lab, &rule(7000, "tcp", 0, 2, &with_new)).0, 200);
    let (_, all) = api(&lab, "GET", "/config/loadbalancer/all", None);
    let eps = all["lbAttr"][0]["endpoints"].as_array().unwrap().clone();
    let counter = |ip: &str, port: u16| {
        eps.iter()
            .find(|e| e["endpointIP"] == ip && e["targetPort"] == port)
            .map(|e| e["counter"].as_str().unwrap().to_string())
            .unwrap()
    };
    assert_eq!(counter(BE[2], 9999), "0:0");
    assert_ne!(
        counter(BE[0], 9000),
        "0:0",
        "kept endpoints keep their counters"
    );
}

#[test]
fn restart_restores_rules_and_kill9_keeps_streams() {
    let Some(lab) = lab("restart_restores_rules_and_kill9_keeps_streams", "lbkill") else {
        return;
    };
    assert_eq!(post(&lab, &rule(7000, "tcp", 0, 2, &all3(9000))).0, 200);
    assert_eq!(post(&lab, &rule(80, "tcp", 0, 0, &all3(8080))).0, 200);
    let rules_before = api(&lab, "GET", "/config/loadbalancer/all", None).1["lbAttr"].clone();

    start_streams(&lab, 7000, 5, 2, "kill.json");
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(lab.kill("lb1", "ferrolb").unwrap(), 1);
    // With the agent gone the pinned datapath keeps forwarding.
    std::thread::sleep(Duration::from_millis(1000));
    let res = probe(&lab, &["http", VIP, "80", "3"]);
    assert_eq!(
        backends(&res).len(),
        3,
        "new connections while the agent is down"
    );
    start_agent_again(&lab);
    // Rules restored.
    let mut after = api(&lab, "GET", "/config/loadbalancer/all", None).1["lbAttr"].clone();
    let strip = |v: &mut Value| {
        for r in v.as_array_mut().unwrap() {
            for e in r["endpoints"].as_array_mut().unwrap() {
                e["counter"] = json!("");
            }
        }
    };
    let mut before = rules_before.clone();
    strip(&mut before);
    strip(&mut after);
    assert_eq!(before, after);
    // The restarted agent sees the running streams in its conntrack table.
    let ct = api(&lab, "GET", "/config/conntrack/all", None).1;
    let streams = read_stream(&lab, "kill.json");
    for s in &streams {
        assert_eq!(s["errors"], json!([]), "{s}");
        assert_eq!(s["sent"], s["echoed"]);
        assert!(s["max_gap_ms"].as_u64().unwrap() < 500, "{s}");
        let sport = s["sport"].as_u64().unwrap();
        assert!(
            ct["ctAttr"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["sourcePort"] == sport && c["destinationPort"] == 7000),
            "flow from port {sport} missing in {ct}"
        );
    }
    // Round robin still works after the takeover.
    let res = probe(&lab, &["http", VIP, "80", "3"]);
    assert_eq!(backends(&res).len(), 3);

    // The explicit removal command takes the datapath away: the VIP stops balancing.
    assert_eq!(lab.kill("lb1", "ferrolb").unwrap(), 1);
    let out = lab.exec_ok("lb1", &[FERROLB, "--remove-datapath"]).unwrap();
    assert!(out.contains("removed"), "{out}");
    let res = probe(&lab, &["http", VIP, "80", "1"]);
    assert!(
        res[0]["error"].is_string(),
        "no balancing without a datapath: {res:?}"
    );
}

/// A full state volume (a 3 MiB tmpfs as `--config-path`, inside lb1's own mount namespace):
/// creates answer 507 naming the path, deletes still work (the reserve is released to compact
/// the state), and the agent starts again on the full volume with every rule.
#[test]
fn a_full_state_volume_blocks_neither_delete_nor_restart() {
    let Some(lab) = lab(
        "a_full_state_volume_blocks_neither_delete_nor_restart",
        "lbfull",
    ) else {
        return;
    };
    const DIR: &str = "/var/lib/ferrolb-small";
    assert_eq!(lab.kill("lb1", "ferrolb").unwrap(), 1);
    lab.exec_ok("lb1", &["mkdir", "-p", DIR]).unwrap();
    lab.exec_ok(
        "lb1",
        &[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            "size=3m",
            "ferrolb-small",
            DIR,
        ],
    )
    .unwrap();
    let start = |name: &str| {
        lab.spawn("lb1", name, &[FERROLB, "--config-path", DIR])
            .unwrap();
        lab.wait_until(
            "the API on the small volume",
            Duration::from_secs(20),
            || Ok(api(&lab, "GET", "", None).0 == 200),
        )
        .unwrap();
    };
    start("ferrolb-small");
    for port in 8001..8011u16 {
        assert_eq!(post(&lab, &rule(port, "tcp", 0, 0, &all3(8080))).0, 200);
    }
    // The reserve is held back.
    let ls = lab.exec_ok("lb1", &["ls", "-l", DIR]).unwrap();
    assert!(ls.contains("reserve"), "{ls}");
    // Fill the volume to the last page (what is left in the journal's last page still
    // takes a rule or two).
    for (file, bs) in [("filler", "64k"), ("filler2", "4k")] {
        let _ = lab.exec(
            "lb1",
            &[
                "dd",
                "if=/dev/zero",
                &format!("of={DIR}/{file}"),
                &format!("bs={bs}"),
            ],
        );
    }
    let mut refused = None;
    for port in 8011..8031u16 {
        let (st, v) = post(&lab, &rule(port, "tcp", 0, 0, &all3(8080)));
        if st != 200 {
            refused = Some((port, st, v));
            break;
        }
    }
    let (last, st, v) = refused.expect("a create refused on the full volume");
    assert_eq!(st, 507, "{v}");
    // Nothing of the refused rule stays.
    let (_, all) = api(&lab, "GET", "/config/loadbalancer/all", None);
    assert!(
        !all["lbAttr"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["serviceArguments"]["port"] == last),
        "{all}"
    );
    let msg = v["message"].as_str().unwrap();
    assert!(msg.contains(DIR) && msg.contains("No space left"), "{msg}");
    let journal_len = || -> u64 {
        lab.exec_ok(
            "lb1",
            &["stat", "-c", "%s", &format!("{DIR}/journal.jsonl")],
        )
        .unwrap()
        .trim()
        .parse()
        .unwrap()
    };
    let journal_before = journal_len();
    // Deleting works on the full volume: the first deletes still fit in the journal's last
    // page, then the reserve is released and the state compacted.
    for port in 8001..=8008u16 {
        let (st, v) = api(
            &lab,
            "DELETE",
            &format!("/config/loadbalancer/externalipaddress/{VIP}/port/{port}/protocol/tcp"),
            None,
        );
        assert_eq!(st, 200, "delete {port}: {v}");
    }
    // The state was compacted (short of 4096 entries, only that makes the journal shrink)
    // and the reserve taken again from what the compaction freed.
    let journal_after = journal_len();
    assert!(
        journal_after < journal_before,
        "journal compacted: {journal_before} -> {journal_after} bytes"
    );
    let ls = lab.exec_ok("lb1", &["ls", "-l", DIR]).unwrap();
    assert!(ls.contains("reserve"), "{ls}");
    // And the agent starts again on the still-full volume, with exactly the rules left.
    assert_eq!(lab.kill("lb1", "ferrolb").unwrap(), 1);
    start("ferrolb-small-again");
    let (_, all) = api(&lab, "GET", "/config/loadbalancer/all", None);
    let mut ports: Vec<u64> = all["lbAttr"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["serviceArguments"]["port"].as_u64().unwrap())
        .collect();
    ports.sort();
    assert_eq!(ports, (8009..u64::from(last)).collect::<Vec<u64>>());
    let res = probe(&lab, &["http", VIP, "8009", "1"]);
    assert!(res[0]["backend"].is_string(), "{res:?}");
}

/// `ferroctl` over HTTPS: the agent serves the API with `--tls`, `ferroctl --tls --cacert`
/// verifies the node against its CA; without the CA the certificate is refused.
#[test]
fn ferroctl_speaks_https_to_the_node() {
    let Some(lab) = lab("ferroctl_speaks_https_to_the_node", "lbtls") else {
        return;
    };
    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = Dir(std::env::temp_dir().join(ferrolb_tests::unique_name("ferroctl-tls")));
    std::fs::create_dir_all(&dir.0).unwrap();
    ferrolb_tests::certs(&dir.0, "ca", &["node"]);
    let file = |n: &str| dir.0.join(n).to_string_lossy().into_owned();
    assert_eq!(lab.kill("lb1", "ferrolb").unwrap(), 1);
    lab.spawn(
        "lb1",
        "ferrolb-tls",
        &[
            FERROLB,
            "--config-path",
            "/etc/ferrolb/",
            "--tls",
            "--tls-certificate",
            &file("node.pem"),
            "--tls-key",
            &file("node.key"),
        ],
    )
    .unwrap();
    wait_ready(&lab);
    assert_eq!(post(&lab, &rule(8443, "tcp", 0, 0, &all3(8080))).0, 200);
    let cacert = file("ca.pem");
    let out = lab
        .exec_ok(
            "lb1",
            &[
                FERROCTL, "--tls", "--cacert", &cacert, "--json", "get", "lb",
            ],
        )
        .unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["lbAttr"][0]["serviceArguments"]["port"], 8443, "{v}");
    // Without the node's CA the certificate is not trusted.
    let r = lab
        .exec(
            "lb1",
            &[FERROCTL, "--url", "https://127.0.0.1:8091", "get", "lb"],
        )
        .unwrap();
    assert!(!r.success(), "an unknown issuer must be refused");
}

/// The stream probe from `node` (`client` or `client2`): one result per connection.
fn streams_from(lab: &TestLab, node: &str, port: u16, secs: &str, count: u32) -> Vec<Value> {
    let out = lab
        .exec_ok(
            node,
            &[
                "python3",
                PROBE,
                "stream",
                VIP,
                &port.to_string(),
                secs,
                "--count",
                &count.to_string(),
            ],
        )
        .unwrap();
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .cloned()
        .unwrap()
}

fn all_echoed(res: &[Value]) -> bool {
    res.iter()
        .all(|r| r["errors"] == json!([]) && r["echoed"].as_u64() > Some(0))
}

fn none_connected(res: &[Value]) -> bool {
    res.iter()
        .all(|r| r["echoed"] == json!(0) && r["errors"] != json!([]))
}

/// kube-loxilb's body for a Service with `spec.loadBalancerSourceRanges`.
fn ranged_rule(sources: &[&str]) -> Value {
    json!({"serviceArguments": {"externalIP": VIP, "privateIP": "", "port": 9000, "protocol": "tcp",
                                "sel": 0, "mode": 2, "BGP": false, "Monitor": true,
                                "inactiveTimeOut": 1800, "block": 0, "managed": true,
                                "probetype": "", "probeport": 0, "probereq": "", "proberesp": "",
                                "name": "default_echo:llb-inst0"},
           "secondaryIPs": [],
           "allowedSources": sources.iter().map(|p| json!({"prefix": p})).collect::<Vec<_>>(),
           "endpoints": BE.iter().map(|b| json!({"endpointIP": b, "targetPort": 9000, "weight": 1,
                                                 "state": "", "counter": ""})).collect::<Vec<_>>()})
}

/// Source ranges from kube-loxilb's body, with two client networks: the allowed one connects,
/// the other is dropped (counted per rule) and never gets a flow; changing the list lets the
/// other in and ends the flows already open from the network no longer allowed; an empty list
/// lets everyone in; a bad CIDR is refused by name and changes nothing.
#[test]
fn allowed_sources_admit_one_client_network_and_refuse_the_other() {
    let Some(lab) = lab(
        "allowed_sources_admit_one_client_network_and_refuse_the_other",
        "lbsrc",
    ) else {
        return;
    };
    let (st, v) = post(&lab, &ranged_rule(&["198.51.100.0/24"]));
    assert_eq!(st, 200, "{v}");
    let (_, all) = api(&lab, "GET", "/config/loadbalancer/all", None);
    assert_eq!(
        all["lbAttr"][0]["allowedSources"],
        json!([{"prefix": "198.51.100.0/24"}])
    );
    let table = lab.exec_ok("lb1", &[FERROCTL, "get", "lb"]).unwrap();
    assert!(
        table.contains("SOURCE RANGES") && table.contains("198.51.100.0/24"),
        "{table}"
    );
    let ok = streams_from(&lab, "client", 9000, "0.3", 3);
    assert!(all_echoed(&ok), "client (allowed): {ok:?}");
    let refused = streams_from(&lab, "client2", 9000, "0.3", 2);
    assert!(
        none_connected(&refused),
        "client2 (not allowed): {refused:?}"
    );
    let from = |ip: &str| {
        ferrolb_tests::ha::lb_ct(&lab, "lb1")
            .iter()
            .filter(|e| e["sourceIP"] == ip)
            .count()
    };
    assert_eq!(from("192.0.2.2"), 0, "a refused source gets no flow");
    let per_rule =
        ferrolb_tests::ha::metric(&lab, "lb1", "ferrolb_service_source_drops_total").unwrap();
    // Two connections, each a SYN and at least one retransmission before its 2 s timeout.
    assert!(per_rule >= 4.0, "per-rule source drops: {per_rule}");
    let reason = ferrolb_tests::ha::metric(
        &lab,
        "lb1",
        "ferrolb_datapath_drops_total{reason=\"source_not_allowed\"}",
    )
    .unwrap();
    assert_eq!(reason, per_rule);

    // kube-loxilb re-posts the whole body when the Service's ranges change.
    start_streams(&lab, 9000, 8, 2, "cut.json");
    lab.wait_until("the client's streams", Duration::from_secs(5), || {
        Ok(from("198.51.100.2") >= 2)
    })
    .unwrap();
    let (st, v) = post(&lab, &ranged_rule(&["192.0.2.0/24"]));
    assert_eq!(st, 200, "{v}");
    lab.wait_until(
        "the flows from the network no longer allowed to end",
        Duration::from_secs(3),
        || Ok(from("198.51.100.2") == 0),
    )
    .unwrap();
    let now_ok = streams_from(&lab, "client2", 9000, "0.3", 2);
    assert!(all_echoed(&now_ok), "client2 (now allowed): {now_ok:?}");
    let now_refused = streams_from(&lab, "client", 9000, "0.3", 1);
    assert!(
        none_connected(&now_refused),
        "client (no longer allowed): {now_refused:?}"
    );
    for r in read_stream(&lab, "cut.json") {
        assert!(
            r["errors"] != json!([]),
            "a stream open from a source no longer allowed ends: {r}"
        );
    }

    // Empty list: everyone.
    assert_eq!(post(&lab, &ranged_rule(&[])).0, 200);
    assert!(all_echoed(&streams_from(&lab, "client", 9000, "0.3", 1)));
    assert!(all_echoed(&streams_from(&lab, "client2", 9000, "0.3", 1)));
    assert!(
        ferrolb_tests::ha::metric(&lab, "lb1", "ferrolb_service_source_drops_total").is_none(),
        "the per-rule series is only for rules that list sources"
    );
    assert!(
        ferrolb_tests::ha::metric(&lab, "lb1", "active_conntrack_count").is_none(),
        "loxilb's names only with --loxilb-metrics"
    );

    // A bad entry: 400 naming it; the rule stays as it was.
    let (st, v) = post(&lab, &ranged_rule(&["192.0.2.0/24", "10.0.0.0/33"]));
    assert_eq!(st, 400, "{v}");
    assert!(
        v.to_string().contains("allowedSources[1].prefix"),
        "the error names the entry: {v}"
    );
    let (_, all) = api(&lab, "GET", "/config/loadbalancer/all", None);
    assert_eq!(all["lbAttr"][0]["allowedSources"], json!([]));

    // A restart keeps the list, in the saved rule and in the datapath.
    assert_eq!(post(&lab, &ranged_rule(&["192.0.2.0/24"])).0, 200);
    assert_eq!(lab.kill("lb1", "ferrolb").unwrap(), 1);
    start_agent_again(&lab);
    let (_, all) = api(&lab, "GET", "/config/loadbalancer/all", None);
    assert_eq!(
        all["lbAttr"][0]["allowedSources"],
        json!([{"prefix": "192.0.2.0/24"}])
    );
    assert!(all_echoed(&streams_from(&lab, "client2", 9000, "0.3", 1)));
    assert!(none_connected(&streams_from(
        &lab, "client", 9000, "0.3", 1
    )));
}

/// Every metric the Grafana dashboard shipped with kube-loxilb queries
/// (`manifest/in-cluster-grafana/loxilb-grafana.yaml` in kube-loxilb).
const KUBE_LOXILB_DASHBOARD: [&str; 23] = [
    "active_conntrack_count",
    "active_flow_count_sctp",
    "active_flow_count_tcp",
    "active_flow_count_udp",
    "healthy_host_count",
    "unhealthy_host_count",
    "lb_rule_count",
    "new_flow_count",
    "processed_bytes",
    "processed_packets",
    "processed_sctp_bytes",
    "processed_tcp_bytes",
    "processed_udp_bytes",
    "total_errors",
    "total_requests",
    "total_errors_per_service",
    "total_requests_per_service",
    "total_fw_drops_per_rule",
    "total_load_dists_per_service",
    "endpoint_load_dists_per_service",
    "lb_rule_interaction_bytes",
    "total_fw_drops",
    "lb_rule_interaction_packets",
];

/// `--loxilb-metrics`: every name kube-loxilb's dashboard queries is served, beside
/// `ferrolb_*`, with values that follow the traffic; the exposition passes `promtool`.
#[test]
fn loxilb_metric_names_serve_kube_loxilbs_dashboard() {
    let test = "loxilb_metric_names_serve_kube_loxilbs_dashboard";
    if !require(test, PROGRAMS) || !require(test, &["promtool"]) {
        return;
    }
    let bin = format!("{FERROLB} --loxilb-metrics --gc-interval 1");
    let lab = TestLab::up_with(TOPOLOGY, "lbloxm", &[("FERROLB", bin.as_str())]).expect("lab up");
    wait_ready(&lab);
    let (st, v) = post(&lab, &ranged_rule(&["198.51.100.0/24"]));
    assert_eq!(st, 200, "{v}");
    let scrape = || {
        lab.exec_ok("lb1", &["curl", "-sf", "http://127.0.0.1:11111/metrics"])
            .unwrap()
    };
    let value = |text: &str, series: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with([' ', '{']))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    // The probes find the three backends up.
    lab.wait_until("three healthy hosts", Duration::from_secs(20), || {
        Ok(value(&scrape(), "healthy_host_count") == Some(3.0))
    })
    .unwrap();
    // Streams held open across collector passes, and a refused client.
    start_streams(&lab, 9000, 3, 3, "m.json");
    let refused = streams_from(&lab, "client2", 9000, "0.2", 1);
    assert!(none_connected(&refused), "{refused:?}");
    assert!(all_echoed(&read_stream(&lab, "m.json")));
    lab.wait_until("a pass that saw the flows", Duration::from_secs(10), || {
        Ok(value(
            &scrape(),
            "total_requests_per_service{service=\"default_echo:llb-inst0\"}",
        )
        .is_some_and(|n| n >= 3.0))
    })
    .unwrap();
    let text = scrape();
    for name in KUBE_LOXILB_DASHBOARD {
        assert!(value(&text, name).is_some(), "{name} not served:\n{text}");
    }
    let v = |s: &str| value(&text, s).unwrap();
    assert_eq!(v("lb_rule_count"), 1.0);
    assert_eq!(v("unhealthy_host_count"), 0.0);
    assert!(v("processed_bytes") > 0.0 && v("processed_tcp_bytes") == v("processed_bytes"));
    assert!(v("processed_packets") > 0.0);
    assert!(v("total_requests") >= 3.0);
    assert!(v("total_fw_drops_per_rule{fw_rule=\"default_echo:llb-inst0\"}") >= 1.0);
    assert_eq!(
        v("total_fw_drops"),
        v("ferrolb_datapath_drops_total{reason=\"source_not_allowed\"}")
    );
    let ratio_sum: f64 = text
        .lines()
        .filter(|l| l.starts_with("endpoint_load_dists_per_service{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        (ratio_sum - 1.0).abs() < 1e-9,
        "endpoint shares sum to 1: {ratio_sum}"
    );
    assert!(!text.contains("sip="), "client addresses are never labels");
    assert!(
        text.contains("ferrolb_service_packets_total"),
        "ferrolb's own series stay"
    );
    // promtool lints loxilb's own names (counters without `_total`, gauges named `_count`):
    // those complaints are loxilb's naming, kept for its dashboards; anything else (a parse
    // error, a lint about another series) fails.
    let (passed, report) = ferrolb_tests::promtool_check(&text);
    let other: Vec<&str> = report
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| {
            !KUBE_LOXILB_DASHBOARD
                .iter()
                .any(|n| l.starts_with(&format!("{n} ")))
        })
        .collect();
    assert!(other.is_empty(), "promtool: {report}");
    assert!(
        passed || !report.trim().is_empty(),
        "promtool failed silently"
    );
}
