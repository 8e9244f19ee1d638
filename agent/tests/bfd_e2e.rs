//! BFD interoperability on the `bfd-interop` lab (containerlab/bfd-interop): ferrolb (lb1)
//! against FRR's bfdd, BIRD 2 and a second ferrolb (lb2, peered with `--ka`), driven through
//! the REST API. Every lab is torn down when its test ends.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferrolb_tests::{TestLab, require, rest, wait_api};
use serde_json::{Value, json};

const TOPOLOGY: &str = "containerlab/bfd-interop/bfd-interop.clab.yml";
const FERROLB: &str = env!("CARGO_BIN_EXE_ferrolb");
const FERROCTL: &str = env!("CARGO_BIN_EXE_ferroctl");
const FRR: &str = "10.0.0.2";
const BIRD: &str = "10.0.0.3";
const LB2: &str = "10.0.0.4";
const BIRDC: &[&str] = &["birdc", "-s", "/run/bird/bird.ctl"];

/// The tests of this file run one at a time: they time BFD detection, and one forwards
/// gigabits through lb1 for a minute on a 2-core machine.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn lab(test: &str, label: &str) -> Option<TestLab> {
    lab_with(test, label, "100ms")
}

/// The lab with the lb1-lb2 `--ka` session at `ka` (e.g. "50ms").
fn lab_with(test: &str, label: &str, ka: &str) -> Option<TestLab> {
    let mut programs = ferrolb_tests::FRR_LAB.to_vec();
    programs.extend(["curl", "bird", "birdc", "iperf3"]);
    if !require(test, &programs) {
        return None;
    }
    let lab =
        TestLab::up_with(TOPOLOGY, label, &[("FERROLB", FERROLB), ("KA", ka)]).expect("lab up");
    // BIRD starts before `exec` gives it its address: when its BFD socket could not bind then
    // ("bind: Cannot assign requested address" in bird.log), a protocol restart binds it now.
    let mut argv = BIRDC.to_vec();
    argv.extend(["restart", "bfd1"]);
    let out = lab.exec_ok("bird", &argv).unwrap();
    assert!(out.contains("bfd1"), "{out}");
    for node in ["lb1", "lb2"] {
        wait_api(&lab, node);
    }
    Some(lab)
}

fn session(peer: &str, interval_us: u32, auth: Option<(&str, &str)>) -> String {
    let mut v = json!({"instance": "default", "remoteIp": peer, "sourceIp": "10.0.0.1",
                       "interval": interval_us, "retryCount": 3});
    if let Some((t, k)) = auth {
        v["authType"] = json!(t);
        v["authKeyId"] = json!(1);
        v["authKey"] = json!(k);
    }
    v.to_string()
}

/// `POST /config/bfd` on lb1 for `peer`; must answer 200.
fn add_session(lab: &TestLab, peer: &str, interval_us: u32, auth: Option<(&str, &str)>) {
    let (st, v) = rest(
        lab,
        "lb1",
        "POST",
        "/config/bfd",
        Some(&session(peer, interval_us, auth)),
    );
    assert_eq!(st, 200, "{v}");
}

fn sessions(lab: &TestLab, node: &str) -> Vec<Value> {
    let (st, v) = rest(lab, node, "GET", "/config/bfd/all", None);
    assert_eq!(st, 200, "{v}");
    v["Attr"].as_array().cloned().unwrap_or_default()
}

fn peer(lab: &TestLab, node: &str, ip: &str) -> Value {
    sessions(lab, node)
        .into_iter()
        .find(|s| s["remoteIp"] == ip)
        .unwrap_or(Value::Null)
}

fn wait_state(lab: &TestLab, node: &str, ip: &str, state: &str, secs: u64) {
    lab.wait_until(
        &format!("{node}: session to {ip} {state}"),
        Duration::from_secs(secs),
        || Ok(peer(lab, node, ip)["state"] == state),
    )
    .unwrap();
}

fn frr_peer(lab: &TestLab) -> Value {
    let v = lab.vtysh_json("frr", "show bfd peers json").unwrap();
    v.as_array()
        .and_then(|a| a.iter().find(|p| p["peer"] == "10.0.0.1").cloned())
        .unwrap_or(Value::Null)
}

fn frr_counters(lab: &TestLab) -> Value {
    let v = lab
        .vtysh_json("frr", "show bfd peers counters json")
        .unwrap();
    v.as_array()
        .and_then(|a| a.iter().find(|p| p["peer"] == "10.0.0.1").cloned())
        .unwrap_or(Value::Null)
}

fn frr_timers(lab: &TestLab, ms: u32) {
    lab.exec_ok(
        "frr",
        &[
            "vtysh",
            "-c",
            "configure terminal",
            "-c",
            "bfd",
            "-c",
            "peer 10.0.0.1 local-address 10.0.0.2",
            "-c",
            &format!("receive-interval {ms}"),
            "-c",
            &format!("transmit-interval {ms}"),
        ],
    )
    .unwrap();
}

fn bird_state(lab: &TestLab) -> String {
    let mut argv = BIRDC.to_vec();
    argv.extend(["show", "bfd", "sessions"]);
    let out = lab.exec_ok("bird", &argv).unwrap();
    out.lines()
        .find(|l| l.starts_with("10.0.0.1"))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("none")
        .to_string()
}

/// Reconfigures BIRD's BFD authentication (`method` as BIRD spells it, or None).
fn bird_auth(lab: &TestLab, method: Option<&str>) {
    let sed = match method {
        Some(m) => format!(
            "sed 's/multiplier 3;/multiplier 3; authentication {m}; password \"secret\" {{ id 1; }};/' /etc/bird/bird.conf > /etc/bird/run.conf"
        ),
        None => "cp /etc/bird/bird.conf /etc/bird/run.conf".to_string(),
    };
    lab.exec_ok("bird", &["sh", "-c", &sed]).unwrap();
    let mut argv = BIRDC.to_vec();
    argv.extend(["configure", "\"/etc/bird/run.conf\""]);
    let out = lab.exec_ok("bird", &argv).unwrap();
    assert!(out.contains("Reconfigured"), "{out}");
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn peers_come_up_agree_on_timers_and_change_them_in_place() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let Some(lab) = lab(
        "peers_come_up_agree_on_timers_and_change_them_in_place",
        "bfdup",
    ) else {
        return;
    };
    // Two ferrolb agents via --ka (both sides started with it).
    wait_state(&lab, "lb1", LB2, "BFDUp", 10);
    wait_state(&lab, "lb2", "10.0.0.1", "BFDUp", 10);

    // FRR and BIRD through the REST API.
    for p in [FRR, BIRD] {
        let (st, v) = rest(
            &lab,
            "lb1",
            "POST",
            "/config/bfd",
            Some(&session(p, 100_000, None)),
        );
        assert_eq!(st, 200, "{v}");
    }
    wait_state(&lab, "lb1", FRR, "BFDUp", 10);
    wait_state(&lab, "lb1", BIRD, "BFDUp", 10);
    lab.wait_until("FRR sees the session up", Duration::from_secs(5), || {
        Ok(frr_peer(&lab)["status"] == "up")
    })
    .unwrap();
    lab.wait_until("BIRD sees the session up", Duration::from_secs(5), || {
        Ok(bird_state(&lab) == "Up")
    })
    .unwrap();

    // Both sides agree on the negotiated timers.
    let ours = peer(&lab, "lb1", FRR);
    let frr = frr_peer(&lab);
    assert_eq!(ours["txIntervalUs"], 100_000);
    assert_eq!(ours["rxIntervalUs"], 100_000);
    assert_eq!(ours["detectTimeUs"], 300_000);
    assert_eq!(frr["remote-transmit-interval"], 100);
    assert_eq!(frr["remote-receive-interval"], 100);
    assert_eq!(frr["remote-detect-multiplier"], 3);
    assert_eq!(ours["remoteDiscriminator"], frr["id"]);
    assert_eq!(ours["localDiscriminator"], frr["remote-id"]);

    // A REST timer change runs a Poll Sequence: FRR sees it, nobody drops.
    let changes = ours["stateChanges"].clone();
    let frr_downs = frr_counters(&lab)["session-down"].clone();
    add_session(&lab, FRR, 50_000, None);
    lab.wait_until("FRR sees our 50 ms", Duration::from_secs(5), || {
        Ok(frr_peer(&lab)["remote-transmit-interval"] == 50)
    })
    .unwrap();
    // FRR's own 100 ms still rules the negotiated rate; then FRR goes to 50 ms x 3 as well.
    assert_eq!(peer(&lab, "lb1", FRR)["txIntervalUs"], 100_000);
    frr_timers(&lab, 50);
    lab.wait_until("negotiated 50 ms", Duration::from_secs(5), || {
        let p = peer(&lab, "lb1", FRR);
        Ok(p["txIntervalUs"] == 50_000 && p["detectTimeUs"] == 150_000)
    })
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        peer(&lab, "lb1", FRR)["stateChanges"],
        changes,
        "no drop on our side"
    );
    assert_eq!(
        frr_counters(&lab)["session-down"],
        frr_downs,
        "no drop on FRR's side"
    );
    assert_eq!(frr_peer(&lab)["status"], "up");

    // ferroctl and metrics.
    let table = lab.exec_ok("lb1", &[FERROCTL, "get", "bfd"]).unwrap();
    assert!(
        table.contains(FRR) && table.contains(BIRD) && table.contains(LB2),
        "{table}"
    );
    let m = lab
        .exec_ok("lb1", &["curl", "-sf", "http://127.0.0.1:11111/metrics"])
        .unwrap();
    assert!(
        m.contains("ferrolb_bfd_session_up{peer=\"10.0.0.2\",instance=\"default\"} 1"),
        "{m}"
    );
    assert!(m.contains("ferrolb_bfd_packets_total{peer=\"10.0.0.3\",direction=\"in\"}"));

    // Bad values answer 400; deleting what is not there, 404; deleting tells the peer.
    for bad in [
        r#"{"remoteIp":"10.0.0.2","sourceIp":"10.0.0.1","interval":5000,"retryCount":3}"#,
        r#"{"remoteIp":"10.0.0.2","sourceIp":"10.0.0.1","interval":100000,"retryCount":0}"#,
        r#"{"remoteIp":"10.0.0.300","sourceIp":"10.0.0.1"}"#,
    ] {
        let (st, v) = rest(&lab, "lb1", "POST", "/config/bfd", Some(bad));
        assert_eq!(st, 400, "{bad}: {v}");
    }
    assert_eq!(
        rest(
            &lab,
            "lb1",
            "DELETE",
            "/config/bfd/remoteIP/10.0.0.99",
            None
        )
        .0,
        404
    );
    assert_eq!(
        rest(
            &lab,
            "lb1",
            "DELETE",
            &format!("/config/bfd/remoteIP/{BIRD}"),
            None
        )
        .0,
        200
    );
    lab.wait_until(
        "BIRD sees the session go down",
        Duration::from_secs(3),
        || Ok(bird_state(&lab) != "Up"),
    )
    .unwrap();
    assert!(peer(&lab, "lb1", BIRD).is_null());
}

#[test]
fn failures_are_detected_in_detection_time() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let Some(lab) = lab("failures_are_detected_in_detection_time", "bfddet") else {
        return;
    };
    add_session(&lab, FRR, 100_000, None);
    wait_state(&lab, "lb1", FRR, "BFDUp", 10);
    std::thread::sleep(Duration::from_millis(500));

    // FRR's node goes silent: ferrolb declares Down within 300 ms + 50 ms.
    let t0 = unix_ms();
    lab.blackhole("frr").unwrap();
    wait_state(&lab, "lb1", FRR, "BFDDown", 3);
    let p = peer(&lab, "lb1", FRR);
    let took = p["lastChangeUnixMs"].as_u64().unwrap() - t0;
    eprintln!("ferrolb detected FRR's silence after {took} ms (detection time 300 ms)");
    assert!(took <= 350, "took {took} ms");
    assert_eq!(p["lastDiag"], "control detection time expired");
    lab.restore("frr").unwrap();
    wait_state(&lab, "lb1", FRR, "BFDUp", 10);
    lab.wait_until("FRR up again", Duration::from_secs(5), || {
        Ok(frr_peer(&lab)["status"] == "up")
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));

    // ferrolb's node goes silent: FRR declares Down within its detection time (polled every
    // few ms from here, so the figure includes up to one poll of delay).
    let start = Instant::now();
    lab.blackhole("lb1").unwrap();
    lab.wait_until("FRR sees the session down", Duration::from_secs(3), || {
        Ok(frr_peer(&lab)["status"] != "up")
    })
    .unwrap();
    let took = start.elapsed();
    eprintln!(
        "FRR detected ferrolb's silence after {} ms (detection time 300 ms)",
        took.as_millis()
    );
    assert!(took <= Duration::from_millis(400), "{took:?}");
    lab.restore("lb1").unwrap();
    lab.wait_until("FRR up after restore", Duration::from_secs(10), || {
        Ok(frr_peer(&lab)["status"] == "up")
    })
    .unwrap();
}

#[test]
fn authentication_interoperates_with_bird() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let Some(lab) = lab("authentication_interoperates_with_bird", "bfdauth") else {
        return;
    };
    for (bird, ours) in [
        ("keyed sha1", "keyed-sha1"),
        ("meticulous keyed sha1", "meticulous-keyed-sha1"),
    ] {
        bird_auth(&lab, Some(bird));
        add_session(&lab, BIRD, 100_000, Some((ours, "secret")));
        std::thread::sleep(Duration::from_millis(300));
        wait_state(&lab, "lb1", BIRD, "BFDUp", 10);
        lab.wait_until("BIRD up with auth", Duration::from_secs(5), || {
            Ok(bird_state(&lab) == "Up")
        })
        .unwrap();
        let p = peer(&lab, "lb1", BIRD);
        // Packets keep coming and passing authentication.
        let before = p["packetsIn"].as_u64().unwrap();
        let drops = p["droppedAuth"].as_u64().unwrap();
        std::thread::sleep(Duration::from_secs(1));
        let p = peer(&lab, "lb1", BIRD);
        assert!(p["packetsIn"].as_u64().unwrap() >= before + 5, "{p}");
        assert_eq!(p["droppedAuth"].as_u64().unwrap(), drops, "{ours}: {p}");
        assert_eq!(p["state"], "BFDUp");
    }
    // A wrong key: the session goes down and stays down, and both sides count the drops.
    add_session(
        &lab,
        BIRD,
        100_000,
        Some(("meticulous-keyed-sha1", "wrong")),
    );
    wait_state(&lab, "lb1", BIRD, "BFDDown", 5);
    std::thread::sleep(Duration::from_secs(2));
    let p = peer(&lab, "lb1", BIRD);
    assert_eq!(p["state"], "BFDDown");
    assert!(p["droppedAuth"].as_u64().unwrap() >= 3, "{p}");
    assert_ne!(bird_state(&lab), "Up");
    let log = std::fs::read_to_string(lab.log_dir("bird").join("bird.log")).unwrap_or_default();
    assert!(
        log.contains("Authentication failed"),
        "BIRD counts them too"
    );
    let m = lab
        .exec_ok("lb1", &["curl", "-sf", "http://127.0.0.1:11111/metrics"])
        .unwrap();
    let auth_drops: u64 = m
        .lines()
        .find(|l| l.starts_with("ferrolb_bfd_drops_total{reason=\"auth\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(auth_drops >= 3);
    // Unauthenticated ferrolb against an authenticating BIRD: down as well.
    add_session(&lab, BIRD, 100_000, None);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(peer(&lab, "lb1", BIRD)["state"], "BFDDown");
}

#[test]
fn stable_at_50ms_while_forwarding() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // lb1 and lb2 run their --ka session at 50 ms from the flags.
    let Some(lab) = lab_with("stable_at_50ms_while_forwarding", "bfdstab", "50ms") else {
        return;
    };
    add_session(&lab, FRR, 50_000, None);
    add_session(&lab, BIRD, 50_000, None);
    // A --ka session is HA's failure detector: REST may neither change nor delete it.
    let lb1 =
        json!({"remoteIp": LB2, "sourceIp": "10.0.0.1", "interval": 200_000, "retryCount": 3});
    let (st, v) = rest(&lab, "lb1", "POST", "/config/bfd", Some(&lb1.to_string()));
    assert_eq!(st, 409, "{v}");
    assert!(v["message"].as_str().unwrap().contains("--ka"), "{v}");
    let (st, v) = rest(
        &lab,
        "lb1",
        "DELETE",
        &format!("/config/bfd/remoteIP/{LB2}"),
        None,
    );
    assert_eq!(st, 409, "{v}");
    frr_timers(&lab, 50);
    // BIRD at 50 ms too.
    lab.exec_ok(
        "bird",
        &[
            "sh",
            "-c",
            "sed 's/100 ms/50 ms/g' /etc/bird/bird.conf > /etc/bird/run.conf",
        ],
    )
    .unwrap();
    let mut argv = BIRDC.to_vec();
    argv.extend(["configure", "\"/etc/bird/run.conf\""]);
    lab.exec_ok("bird", &argv).unwrap();
    for p in [FRR, BIRD, LB2] {
        wait_state(&lab, "lb1", p, "BFDUp", 10);
    }
    lab.wait_until("all at 50 ms", Duration::from_secs(10), || {
        Ok(sessions(&lab, "lb1").iter().all(|s| {
            s["state"] == "BFDUp" && s["txIntervalUs"] == 50_000 && s["detectTimeUs"] == 150_000
        }))
    })
    .unwrap();
    // lb1 load-balances iperf3 from h1 to h2 through a VIP while the sessions run.
    let rule = json!({"serviceArguments": {"externalIP": "203.0.113.20", "port": 5201, "protocol": "tcp", "mode": 0},
                      "endpoints": [{"endpointIP": "192.0.2.6", "targetPort": 5201, "weight": 1}]});
    assert_eq!(
        rest(
            &lab,
            "lb1",
            "POST",
            "/config/loadbalancer",
            Some(&rule.to_string())
        )
        .0,
        200
    );
    let before: Vec<(Value, Value)> = sessions(&lab, "lb1")
        .iter()
        .map(|s| (s["remoteIp"].clone(), s["stateChanges"].clone()))
        .collect();
    // lb2 came up either Down->Init->Up or, when lb1's first packet already said Init,
    // Down->Up directly (RFC 5880 6.8.6): one or two changes, and none after that.
    wait_state(&lab, "lb2", "10.0.0.1", "BFDUp", 10);
    let lb2_before = peer(&lab, "lb2", "10.0.0.1");
    assert_eq!(lb2_before["state"], "BFDUp");
    let lb2_changes = lb2_before["stateChanges"].as_u64().unwrap();
    assert!(
        (1..=2).contains(&lb2_changes),
        "lb2 came up with one or two state changes, not {lb2_changes}"
    );
    let frr_downs = frr_counters(&lab)["session-down"].clone();
    let start = Instant::now();
    let out = lab
        .exec_ok("h1", &["iperf3", "-c", "203.0.113.20", "-t", "60", "-J"])
        .unwrap();
    let gbps =
        serde_json::from_str::<Value>(&out).unwrap()["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap()
            / 1e9;
    let m = lab
        .exec_ok("lb1", &["curl", "-sf", "http://127.0.0.1:11111/metrics"])
        .unwrap();
    let metric = |name: &str| -> f64 {
        m.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} in lb1's metrics"))
    };
    let late_ms = metric("ferrolb_bfd_timer_late_max_seconds") * 1000.0;
    eprintln!(
        "60 s at 50 ms x 3 while forwarding {gbps:.2} Gbit/s through lb1; its BFD timers ran at \
         most {late_ms:.1} ms late ({} late runs)",
        metric("ferrolb_bfd_timers_late_total")
    );
    assert_eq!(
        metric("ferrolb_bfd_thread_rt_priority"),
        10.0,
        "the BFD thread runs SCHED_FIFO"
    );
    assert!(start.elapsed() >= Duration::from_secs(60));
    assert!(gbps > 0.1, "traffic flowed: {gbps} Gbit/s");
    let after: Vec<(Value, Value)> = sessions(&lab, "lb1")
        .iter()
        .map(|s| (s["remoteIp"].clone(), s["stateChanges"].clone()))
        .collect();
    assert_eq!(before, after, "zero state changes on lb1");
    assert_eq!(
        frr_counters(&lab)["session-down"],
        frr_downs,
        "zero downs on FRR"
    );
    assert_eq!(bird_state(&lab), "Up");
    let lb2_after = peer(&lab, "lb2", "10.0.0.1");
    assert_eq!(lb2_after["state"], "BFDUp");
    assert_eq!(
        lb2_after["stateChanges"], lb2_changes,
        "zero state changes on lb2"
    );
}
