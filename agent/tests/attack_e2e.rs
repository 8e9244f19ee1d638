//! Hostile traffic on the `lb-single` lab (issue 16), every sender bounded in count and time:
//! 30 s of connections from one address at the client's highest rate all succeed with no
//! source-NAT port refused; malformed frames are dropped by reason and make no flow; a client reconnecting 1,000 times
//! from one address and port always gets through; three spoofed RSTs with random sequence
//! numbers do not close an idle connection; a flood of 200,000 spoofed SYNs at a full-NAT VIP
//! (more than its two endpoints' 129,024 source ports) leaves running streams intact and new
//! connections succeeding; 150,000 segments without flags and 30,000 stray ACKs make no flow
//! and refuse no one; 100,000 spoofed datagrams at a UDP VIP (answered by its endpoints, never
//! continued) stay out of the conntrack table and refuse no one; 1,000 idle connections to
//! the REST API from one address hold no more than its 64 places. A test binary of its own: the
//! floods must not disturb the timing of other tests.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ferrolb_tests::ha::metric;
use ferrolb_tests::{TestLab, require};
use serde_json::Value;

const TOPOLOGY: &str = "containerlab/lb-single/lb-single.clab.yml";
const VIP: &str = "203.0.113.10";
const BE: [&str; 3] = ["10.10.10.11", "10.10.10.12", "10.10.10.13"];
const CLIENT: &str = "198.51.100.2";
const FERROLB: &str = env!("CARGO_BIN_EXE_ferrolb");
/// Full NAT, two endpoints: the flood's target.
const FLOOD_PORT: u16 = 80;
/// Full NAT, one endpoint: reconnects and the spoofed resets.
const ONE_PORT: u16 = 81;
/// Full NAT, two endpoints' HTTP: the connection-rate stage.
const HTTP_PORT: u16 = 82;
/// Full NAT, UDP, two endpoints' echo: the datagram flood.
const UDP_PORT: u16 = 9001;

fn hostile() -> String {
    ferrolb_tests::repo_root()
        .join("agent/tests/attack/hostile.py")
        .display()
        .to_string()
}

/// Runs hostile.py in the client namespace and parses its JSON line.
fn run(lab: &TestLab, args: &[&str]) -> Value {
    let script = hostile();
    let mut argv = vec!["python3", script.as_str()];
    argv.extend_from_slice(args);
    let out = lab.exec("client", &argv).unwrap();
    assert_eq!(out.code, 0, "hostile.py {args:?}: {}", out.stderr);
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("hostile.py {args:?} printed {:?}: {e}", out.stdout))
}

/// A full-NAT rule.
fn add_rule(lab: &TestLab, port: u16, eps: &[&str], target: u16) {
    ferrolb_tests::add_rule(lab, "lb1", (VIP, port, "tcp"), 2, eps, target);
}

fn m(lab: &TestLab, name: &str) -> f64 {
    metric(lab, "lb1", name).unwrap_or_else(|| panic!("metric {name}"))
}

fn drops(lab: &TestLab, reason: &str) -> f64 {
    m(
        lab,
        &format!("ferrolb_datapath_drops_total{{reason=\"{reason}\"}}"),
    )
}

fn created(lab: &TestLab) -> f64 {
    m(lab, "ferrolb_conntrack_created_total")
}

fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"))
}

#[test]
fn floods_and_forgeries_leave_the_vip_serving() {
    let test = "floods_and_forgeries_leave_the_vip_serving";
    if !require(test, &["ip", "curl", "python3", "wrk", "sysctl"]) {
        return;
    }
    let lab = TestLab::up_with(TOPOLOGY, "attack", &[("FERROLB", FERROLB)]).expect("lab up");
    ferrolb_tests::wait_api(&lab, "lb1");
    ferrolb_tests::wait_http_backends(&lab, "lb1", &BE);
    add_rule(&lab, FLOOD_PORT, &BE[..2], 9000);
    add_rule(&lab, ONE_PORT, &BE[..1], 9000);
    add_rule(&lab, HTTP_PORT, &BE[..2], 8080);
    let vip_port = |p: u16| p.to_string();
    // The rules answer before anything hostile starts.
    let warm = run(
        &lab,
        &["probe", VIP, &vip_port(FLOOD_PORT), "50", "0.5", "1000"],
    );
    assert_eq!(n(&warm, "fail"), 0, "{warm}");

    // 0. 30 s of new connections from one client address, as fast as the client makes them
    //    (wrk, `Connection: close`; the client reuses its ports like a busy proxy): none fails
    //    and none is refused for want of a source-NAT port.
    lab.exec_ok("client", &["sysctl", "-w", "net.ipv4.tcp_tw_reuse=1"])
        .unwrap();
    let exhausted0 = drops(&lab, "nat_ports_exhausted");
    let out = lab
        .exec_ok(
            "client",
            &[
                "wrk",
                "-t1",
                "-c16",
                "-d30s",
                "-H",
                "Connection: close",
                &format!("http://{VIP}:{HTTP_PORT}/"),
            ],
        )
        .unwrap();
    let rate: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no rate in wrk's output: {out}"));
    let exhausted = drops(&lab, "nat_ports_exhausted") - exhausted0;
    println!(
        "30 s of connections from one address: {rate:.0}/s, nat_ports_exhausted drops {exhausted}"
    );
    assert!(rate > 0.0);
    assert!(
        !out.contains("Socket errors") && !out.contains("Non-2xx"),
        "failed connections: {out}"
    );
    assert_eq!(exhausted, 0.0);

    std::thread::scope(|s| {
        // 1. Three spoofed RSTs with random sequence numbers on an idle connection; it still
        //    works after 30 s idle (a closed flow would have expired after 10 s, and a
        //    mid-stream segment never opens a full-NAT flow again).
        let ignored0 = m(&lab, "ferrolb_tcp_state_changes_ignored_total");
        let rst = s.spawn(|| run(&lab, &["rst_idle", VIP, &vip_port(ONE_PORT), "3", "30"]));
        std::thread::sleep(Duration::from_secs(1));

        // 2. Malformed frames, straight onto lb1's link: each dropped under its reason, no
        //    flow.
        let mac = lab
            .exec_ok("lb1", &["cat", "/sys/class/net/eth1/address"])
            .unwrap();
        let reasons = [
            "ip_header",
            "ip_length",
            "ttl_zero",
            "tcp_header",
            "tcp_flags",
            "udp_length",
            "vlan_tagged",
        ];
        let before: Vec<f64> = reasons.iter().map(|r| drops(&lab, r)).collect();
        let c0 = created(&lab);
        let sent = run(
            &lab,
            &[
                "malformed",
                "eth1",
                mac.trim(),
                CLIENT,
                VIP,
                &vip_port(FLOOD_PORT),
            ],
        );
        std::thread::sleep(Duration::from_millis(300));
        for (r, b) in reasons.iter().zip(&before) {
            let got = drops(&lab, r) - b;
            println!("malformed {r}: sent {}, dropped {got}", n(&sent, r));
            assert_eq!(got, n(&sent, r) as f64, "reason {r}");
        }
        assert_eq!(created(&lab), c0, "a malformed frame made a flow");

        // 3. One client address and port, 1,000 connections one after the other (each
        //    closed with a reset before the next): all succeed. The port is outside the
        //    ephemeral range the connection-rate stage just went through (its TIME_WAIT
        //    sockets would refuse the bind).
        let re = run(
            &lab,
            &["reconnect", VIP, &vip_port(ONE_PORT), "20000", "1000"],
        );
        println!("reconnects from one port: {re}");
        assert_eq!(n(&re, "ok"), 1000, "{re}");

        let rst = rst.join().unwrap();
        println!("spoofed resets on an idle flow: {rst}");
        assert_eq!(rst["ok"], true, "the connection died: {rst}");
        let ignored = m(&lab, "ferrolb_tcp_state_changes_ignored_total") - ignored0;
        assert!(ignored >= 3.0, "ignored state changes {ignored}");
    });

    // 4. 200,000 spoofed SYNs in ~12 s at the two-endpoint full-NAT VIP (its pools hold
    //    129,024 ports) while 5 streams run and a client opens a connection every 100 ms.
    let take0 = m(&lab, "ferrolb_nat_port_halfopen_takeovers_total");
    let exhausted0 = drops(&lab, "nat_ports_exhausted");
    let (flood, probe, streams) = std::thread::scope(|s| {
        let streams = s.spawn(|| run(&lab, &["streams", VIP, &vip_port(FLOOD_PORT), "5", "15"]));
        std::thread::sleep(Duration::from_millis(500));
        let probe = s.spawn(|| {
            run(
                &lab,
                &["probe", VIP, &vip_port(FLOOD_PORT), "100", "13", "1000"],
            )
        });
        let flood = run(
            &lab,
            &[
                "flood",
                "syn",
                VIP,
                &vip_port(FLOOD_PORT),
                "200000",
                "17000",
                "16",
            ],
        );
        (flood, probe.join().unwrap(), streams.join().unwrap())
    });
    let taken = m(&lab, "ferrolb_nat_port_halfopen_takeovers_total") - take0;
    let exhausted = drops(&lab, "nat_ports_exhausted") - exhausted0;
    println!(
        "SYN flood: {flood}; connections during it: {probe}; streams: {streams}; half-open ports taken over: {taken}; nat_ports_exhausted drops: {exhausted}"
    );
    assert!(
        n(&flood, "sent") >= 190_000,
        "the flood fell short: {flood}"
    );
    let (ok, fail) = (n(&probe, "ok"), n(&probe, "fail"));
    assert!(
        ok + fail >= 100 && fail * 100 <= ok + fail,
        "fewer than 99 % of connections during the flood succeeded: {probe}"
    );
    assert_eq!(n(&streams, "intact"), 5, "{streams}");
    assert!(
        taken > 0.0,
        "the flood never filled a pool (no half-open port taken)"
    );
    let after = run(
        &lab,
        &["probe", VIP, &vip_port(FLOOD_PORT), "100", "2", "1000"],
    );
    assert_eq!(n(&after, "fail"), 0, "right after the flood: {after}");

    // 5. 150,000 segments without flags and 30,000 stray ACKs: no flow, no refusal.
    let flags0 = drops(&lab, "tcp_flags");
    let notsyn0 = drops(&lab, "not_syn");
    let c0 = created(&lab);
    let (null, ack, probe) = std::thread::scope(|s| {
        let probe = s.spawn(|| {
            run(
                &lab,
                &["probe", VIP, &vip_port(FLOOD_PORT), "100", "10", "1000"],
            )
        });
        let null = run(
            &lab,
            &[
                "flood",
                "null",
                VIP,
                &vip_port(FLOOD_PORT),
                "150000",
                "17000",
                "12",
            ],
        );
        let ack = run(
            &lab,
            &[
                "flood",
                "ack",
                VIP,
                &vip_port(FLOOD_PORT),
                "30000",
                "17000",
                "4",
            ],
        );
        (null, ack, probe.join().unwrap())
    });
    std::thread::sleep(Duration::from_millis(300));
    let flagless = drops(&lab, "tcp_flags") - flags0;
    let stray = drops(&lab, "not_syn") - notsyn0;
    let made = created(&lab) - c0;
    println!(
        "flag-less: {null} -> {flagless} dropped; stray ACKs: {ack} -> {stray} dropped; flows made {made}; connections: {probe}"
    );
    assert_eq!(n(&probe, "fail"), 0, "{probe}");
    let attempts = (n(&probe, "ok") + n(&probe, "fail")) as f64;
    assert!(made <= attempts, "{made} flows for {attempts} connections");
    assert!(
        flagless >= 0.99 * n(&null, "sent") as f64,
        "{flagless} of {null}"
    );
    assert!(stray >= 0.99 * n(&ack, "sent") as f64, "{stray} of {ack}");

    // 6. 100,000 spoofed datagrams in ~6 s at a full-NAT UDP VIP whose endpoints echo every
    //    one (the answers go to the spoofed sources; nobody continues a flow): they churn the
    //    half-open table and never reach the conntrack table, whose fill stays what the
    //    legitimate flows make; at least 99 % of the connections opened meanwhile succeed (the
    //    load generators share the 2 cores: a SYN retransmitted past the 1 s deadline counts
    //    as a failure), and all of them right after.
    ferrolb_tests::add_rule(&lab, "lb1", (VIP, UDP_PORT, "udp"), 2, &BE[..2], 9001);
    let entries0 = m(&lab, "ferrolb_conntrack_entries");
    let full0 = drops(&lab, "conntrack_full");
    let (udp, probe) = std::thread::scope(|s| {
        let probe = s.spawn(|| {
            run(
                &lab,
                &["probe", VIP, &vip_port(FLOOD_PORT), "100", "7", "1000"],
            )
        });
        let udp = run(
            &lab,
            &[
                "flood",
                "udp",
                VIP,
                &vip_port(UDP_PORT),
                "100000",
                "17000",
                "8",
            ],
        );
        (udp, probe.join().unwrap())
    });
    // The collector's next pass counts them (every 5 s).
    lab.wait_until(
        "a collector pass after the datagram flood",
        Duration::from_secs(12),
        || Ok(m(&lab, "ferrolb_conntrack_halfopen_entries") >= 50_000.0),
    )
    .unwrap();
    let entries = m(&lab, "ferrolb_conntrack_entries");
    let halfopen = m(&lab, "ferrolb_conntrack_halfopen_entries");
    println!(
        "datagram flood: {udp}; conntrack entries {entries0} -> {entries}, half-open entries {halfopen}; connections: {probe}"
    );
    assert!(
        n(&udp, "sent") >= 95_000,
        "the datagram flood fell short: {udp}"
    );
    let (ok, fail) = (n(&probe, "ok"), n(&probe, "fail"));
    assert!(
        ok + fail >= 60 && fail * 100 <= ok + fail,
        "fewer than 99 % of connections during the datagram flood succeeded: {probe}"
    );
    assert!(
        entries <= entries0 + 1_000.0,
        "the datagram flood reached the conntrack table: {entries0} -> {entries}"
    );
    assert_eq!(drops(&lab, "conntrack_full"), full0);
    let after = run(
        &lab,
        &["probe", VIP, &vip_port(FLOOD_PORT), "100", "2", "1000"],
    );
    assert_eq!(
        n(&after, "fail"),
        0,
        "right after the datagram flood: {after}"
    );

    // 7. 1,000 idle connections to the REST API from one address (a stranger who reaches
    //    the port): all but its 64 are closed at accept and counted, the agent holds no more
    //    descriptors than those 64 take, and the API answers another address meanwhile.
    let agent = ferrolb_tests::agent_pid(&lab, "lb1");
    let fds = || {
        std::fs::read_dir(format!("/proc/{agent}/fd"))
            .unwrap()
            .count()
    };
    let fds0 = fds();
    let refused0 = m(
        &lab,
        "ferrolb_api_connections_refused_total{reason=\"max_per_source\"}",
    );
    let (held, fds_held, other) = std::thread::scope(|s| {
        let held = s.spawn(|| run(&lab, &["hold", "198.51.100.1", "11111", "1000", "4"]));
        std::thread::sleep(Duration::from_secs(2));
        let fds_held = fds();
        let other = lab.exec(
            "client2",
            &[
                "curl",
                "-sf",
                "-m",
                "2",
                "http://192.0.2.1:11111/netlox/v1/config/loadbalancer/all",
            ],
        );
        (held.join().unwrap(), fds_held, other.unwrap())
    });
    let refused = m(
        &lab,
        "ferrolb_api_connections_refused_total{reason=\"max_per_source\"}",
    ) - refused0;
    println!(
        "1,000 idle API connections from one address: {held}; refused {refused}; agent descriptors {fds0} -> {fds_held}"
    );
    assert_eq!(
        n(&held, "opened") + n(&held, "connect_failed"),
        1000,
        "{held}"
    );
    assert!(n(&held, "held") <= 64, "{held}");
    assert!(refused >= 936.0, "refused {refused}");
    assert!(
        fds_held <= fds0 + 64 + 16,
        "the agent holds {fds_held} descriptors (was {fds0})"
    );
    assert!(
        other.success() && other.stdout.contains("lbAttr"),
        "the API did not answer another address: {}",
        other.stderr
    );
    lab.down().unwrap();
}
