//! Source NAT under real traffic on the `lb-single` lab: bulk TCP (iperf3) through DNAT,
//! one-arm and full NAT at MTU 9500 and 1500 never resets and never changes a flow's
//! translation; short connections from a client with a 300-port ephemeral range run through
//! full NAT about as fast as through DNAT, with no port-exhaustion drop. A test binary of its
//! own: the load must not disturb the timing-sensitive tests of other binaries.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ferrolb_tests::ha::metric;
use ferrolb_tests::{TestLab, require};
use serde_json::Value;

const TOPOLOGY: &str = "containerlab/lb-single/lb-single.clab.yml";
const VIP: &str = "203.0.113.10";
const BE: [&str; 3] = ["10.10.10.11", "10.10.10.12", "10.10.10.13"];
const FERROLB: &str = env!("CARGO_BIN_EXE_ferrolb");
const MODES: [(u8, &str); 3] = [(0, "dnat"), (1, "onearm"), (2, "fullnat")];

/// The two tests measure rates and count flows: one at a time, so neither loads the 2 cores
/// under the other.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn lab(test: &str, label: &str, programs: &[&str]) -> Option<TestLab> {
    if !require(test, programs) {
        return None;
    }
    let lab = TestLab::up_with(TOPOLOGY, label, &[("FERROLB", FERROLB)]).expect("lab up");
    lab.wait_until("the REST API", Duration::from_secs(20), || {
        Ok(ferrolb_tests::rest(&lab, "lb1", "GET", "", None).0 == 200)
    })
    .unwrap();
    ferrolb_tests::wait_http_backends(&lab, "lb1", &BE);
    Some(lab)
}

fn add_rule(lab: &TestLab, port: u16, mode: u8, eps: &[&str], target: u16) {
    ferrolb_tests::add_rule(lab, "lb1", (VIP, port, "tcp"), mode, eps, target);
}

/// (client port -> translation) of the lab client's flows to VIP:port.
fn translations(lab: &TestLab, port: u16) -> BTreeMap<u16, String> {
    ferrolb_tests::ha::lb_ct(lab, "lb1")
        .iter()
        .filter(|e| e["destinationIP"] == VIP && e["destinationPort"] == port)
        .filter(|e| e["conntrackState"] == "est")
        .map(|e| {
            (
                e["sourcePort"].as_u64().unwrap() as u16,
                e["conntrackAct"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn created(lab: &TestLab) -> f64 {
    metric(lab, "lb1", "ferrolb_conntrack_created_total").unwrap()
}

fn drops(lab: &TestLab, reason: &str) -> f64 {
    metric(
        lab,
        "lb1",
        &format!("ferrolb_datapath_drops_total{{reason=\"{reason}\"}}"),
    )
    .unwrap()
}

fn set_mtu(lab: &TestLab, mtu: u32) {
    let mtu = mtu.to_string();
    for (node, ifs) in [
        ("client", &["eth1"][..]),
        ("lb1", &["eth1", "eth2"][..]),
        ("sw", &["eth1", "eth2", "eth3", "eth4"][..]),
        ("be1", &["eth1"][..]),
    ] {
        for i in ifs {
            lab.exec_ok(node, &["ip", "link", "set", i, "mtu", &mtu])
                .unwrap();
        }
    }
}

/// iperf3 (1 and 4 streams, 5 runs each, back to back) through each NAT mode at MTU 9500 and
/// 1500: every run completes without a reset; every flow's translation is the same near the
/// end of the run as near its start; each run creates exactly one flow per connection.
#[test]
fn bulk_tcp_through_every_nat_mode_keeps_its_translation() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(lab) = lab(
        "bulk_tcp_through_every_nat_mode_keeps_its_translation",
        "natbulk",
        &["ip", "ethtool", "sysctl", "curl", "python3", "iperf3"],
    ) else {
        return;
    };
    lab.spawn("be1", "iperf3", &["iperf3", "-s", "-p", "5201"])
        .unwrap();
    for (mode, _) in MODES {
        add_rule(&lab, 5201 + u16::from(mode), mode, &[BE[0]], 5201);
    }
    lab.wait_until("the iperf3 server", Duration::from_secs(10), || {
        Ok(lab
            .exec("be1", &["sh", "-c", "ss -ltn | grep -q ':5201 '"])?
            .code
            == 0)
    })
    .unwrap();
    const RUNS: usize = 5;
    for mtu in [9500, 1500] {
        set_mtu(&lab, mtu);
        for (mode, name) in MODES {
            let port = 5201 + u16::from(mode);
            for streams in [1u32, 4] {
                for run in 0..RUNS {
                    let what = format!("MTU {mtu}, {name}, {streams} stream(s), run {run}");
                    let before = created(&lab);
                    let (report, early, late) = std::thread::scope(|s| {
                        let client = s.spawn(|| {
                            lab.exec(
                                "client",
                                &[
                                    "iperf3",
                                    "-c",
                                    VIP,
                                    "-p",
                                    port.to_string().as_str(),
                                    "-t",
                                    "2",
                                    "-P",
                                    streams.to_string().as_str(),
                                    "-J",
                                ],
                            )
                            .unwrap()
                        });
                        let t0 = Instant::now();
                        std::thread::sleep(Duration::from_millis(700));
                        let early = translations(&lab, port);
                        std::thread::sleep(
                            Duration::from_millis(1900).saturating_sub(t0.elapsed()),
                        );
                        let late = translations(&lab, port);
                        (client.join().unwrap(), early, late)
                    });
                    let v: Value = serde_json::from_str(&report.stdout).unwrap_or(Value::Null);
                    assert!(
                        report.code == 0 && v.get("error").is_none(),
                        "{what}: iperf3 failed: {} {}",
                        v.get("error").unwrap_or(&Value::Null),
                        report.stderr
                    );
                    let bytes = v["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
                    assert!(bytes > 0.0, "{what}: nothing received");
                    // The control connection and the data streams, all live near the start.
                    assert!(
                        early.len() > streams as usize,
                        "{what}: flows near the start {early:?}"
                    );
                    for (cport, act) in &early {
                        assert_eq!(
                            late.get(cport),
                            Some(act),
                            "{what}: client port {cport} changed translation (or vanished)"
                        );
                    }
                    if mode != 0 {
                        assert!(
                            early.values().all(|a| a.starts_with(name)),
                            "{what}: {early:?}"
                        );
                    }
                    let made = created(&lab) - before;
                    assert_eq!(
                        made,
                        f64::from(streams + 1),
                        "{what}: one flow per connection (control + streams)"
                    );
                }
            }
        }
    }
    assert_eq!(drops(&lab, "nat_ports_exhausted"), 0.0);
    lab.down().unwrap();
}

/// wrk with `Connection: close` for `secs` seconds: requests per second.
fn wrk_rate(lab: &TestLab, port: u16, secs: u32) -> f64 {
    let out = lab
        .exec_ok(
            "client",
            &[
                "wrk",
                "-t1",
                "-c8",
                &format!("-d{secs}s"),
                "-H",
                "Connection: close",
                &format!("http://{VIP}:{port}/"),
            ],
        )
        .unwrap();
    out.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no rate in wrk's output: {out}"))
}

/// A client whose ephemeral range is 300 ports (as behind a NAT or a busy proxy) reuses
/// 4-tuples whose previous flow is still in TIME_WAIT at the LB: full NAT keeps up with DNAT
/// (at least 0.8x, same run, alternating) and refuses no connection for want of a port.
#[test]
fn short_connections_from_300_ports_through_full_nat() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(lab) = lab(
        "short_connections_from_300_ports_through_full_nat",
        "natshort",
        &["ip", "ethtool", "sysctl", "curl", "python3", "wrk"],
    ) else {
        return;
    };
    add_rule(&lab, 80, 0, &BE, 8080);
    add_rule(&lab, 82, 2, &BE, 8080);
    // The client closes first (wrk, `Connection: close`), so its own TIME_WAIT would hold
    // its 300 ports for 60 s: like a busy proxy it reuses them (tcp_tw_reuse), while the
    // LB still has the previous flow of the same 4-tuple in TIME_WAIT.
    lab.exec_ok(
        "client",
        &[
            "sysctl",
            "-w",
            "net.ipv4.ip_local_port_range=40000 40299",
            "net.ipv4.tcp_tw_reuse=1",
            "net.ipv4.tcp_tw_reuse_delay=1",
        ],
    )
    .unwrap();
    let (mut dnat, mut full) = (0.0, 0.0);
    for _ in 0..2 {
        dnat += wrk_rate(&lab, 80, 3);
        full += wrk_rate(&lab, 82, 3);
    }
    let exhausted = drops(&lab, "nat_ports_exhausted");
    println!(
        "short connections, 300 client ports: DNAT {:.0} req/s, full NAT {:.0} req/s ({:.2}x), nat_ports_exhausted {exhausted}",
        dnat / 2.0,
        full / 2.0,
        full / dnat
    );
    assert!(dnat > 0.0);
    assert!(
        full >= 0.8 * dnat,
        "full NAT {full:.0} vs DNAT {dnat:.0} (sum of 2 x 3 s)"
    );
    assert_eq!(exhausted, 0.0);
    // The pools' occupancy is exported (the collector passed during the full-NAT runs).
    let m = lab
        .exec_ok("lb1", &["curl", "-sf", "http://127.0.0.1:11111/metrics"])
        .unwrap();
    let pools: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("ferrolb_nat_ports_in_use{"))
        .collect();
    assert!(
        pools
            .iter()
            .any(|l| l.contains(&format!("source=\"{VIP}\"")) && !l.ends_with(" 0")),
        "{pools:?}"
    );
    lab.down().unwrap();
}
