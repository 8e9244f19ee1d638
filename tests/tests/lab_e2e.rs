//! End-to-end tests of `ferrolab` labs: real FRR routers in network namespaces.
#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferrolb_lab::ns::{NS_DIR, NodeNs};
use ferrolb_lab::{Lab, LabError, UpOptions};
use ferrolb_tests::{FRR_LAB, TestLab, frr_bfd_status, require, wait_established};

const FRR2: &str = "tests/labs/frr2/frr2.clab.yml";

fn ping(lab: &Lab, node: &str, dst: &str) -> bool {
    lab.exec(node, &["ping", "-c", "1", "-W", "1", dst])
        .is_ok_and(|o| o.success())
}

#[test]
fn frr_pair_establishes_bgp_pings_across_and_detects_a_blackhole() {
    if !require("frr_pair", FRR_LAB) {
        return;
    }
    let lab = TestLab::up(FRR2, "frr2").expect("lab up");
    wait_established(&lab, "r1", "192.0.2.2", Duration::from_secs(30)).expect("BGP up");
    wait_established(&lab, "r2", "192.0.2.1", Duration::from_secs(30)).expect("BGP up");
    lab.wait_until("r1 learns h2's prefix", Duration::from_secs(10), || {
        let v = lab.vtysh_json("r1", "show ip route 198.51.100.128/25 json")?;
        Ok(v.get("198.51.100.128/25").is_some())
    })
    .expect("route");
    lab.wait_until(
        "h1 pings h2 across both routers",
        Duration::from_secs(10),
        || Ok(ping(&lab, "h1", "198.51.100.138")),
    )
    .expect("ping");

    // Per-node pseudo-container: hostname, private /etc (exec wrote /etc/lab-role there only),
    // env from the group, sysfs of the node, interface names and MAC as the file says.
    assert_eq!(lab.exec_ok("h1", &["hostname"]).unwrap().trim(), "h1");
    assert_eq!(
        lab.exec_ok("h1", &["cat", "/etc/lab-role"]).unwrap().trim(),
        "host h1"
    );
    assert!(
        !std::path::Path::new("/etc/lab-role").exists(),
        "exec wrote to the host's /etc"
    );
    assert_eq!(
        lab.exec_ok("r1", &["cat", "/sys/class/net/eth2/address"])
            .unwrap()
            .trim(),
        "02:00:5e:00:01:02"
    );
    assert_eq!(
        lab.exec_ok("r1", &["cat", "/sys/class/net/eth2/mtu"])
            .unwrap()
            .trim(),
        "1500"
    );
    assert_eq!(
        lab.exec_ok("r1", &["cat", "/sys/class/net/eth1/mtu"])
            .unwrap()
            .trim(),
        "9500"
    );
    assert_eq!(
        lab.exec_ok("r1", &["sysctl", "-n", "net.ipv4.ip_forward"])
            .unwrap()
            .trim(),
        "1"
    );
    assert!(
        lab.exec_ok("r1", &["ls", "/run/frr"])
            .unwrap()
            .contains("bgpd.vty")
    );
    assert!(
        lab.log_dir("r1").join("frr/frr.log").exists(),
        "node /var/log is kept in the lab dir"
    );

    // Blackhole r2: r1 must notice within 1 s (BFD 100 ms x 3).
    lab.wait_until("BFD up on r1", Duration::from_secs(10), || {
        Ok(frr_bfd_status(&lab, "r1", "192.0.2.2")? == "up")
    })
    .expect("bfd up");
    let t0 = Instant::now();
    lab.blackhole("r2").expect("blackhole");
    let noticed = lab
        .wait_until("r1 sees r2 down", Duration::from_secs(3), || {
            Ok(frr_bfd_status(&lab, "r1", "192.0.2.2")? != "up")
        })
        .expect("r1 notices the blackhole");
    let noticed_total = t0.elapsed();
    eprintln!("blackhole noticed by r1 after {noticed:?} (total {noticed_total:?})");
    assert!(
        noticed_total < Duration::from_secs(1),
        "took {noticed_total:?}"
    );
    assert!(!ping(&lab, "h1", "198.51.100.138"));
    lab.restore("r2").expect("restore");
    wait_established(&lab, "r1", "192.0.2.2", Duration::from_secs(30))
        .expect("BGP back after restore");

    // Link down / up and kill.
    lab.link_down("r1", "eth2").unwrap();
    assert!(
        lab.exec_ok("r1", &["ip", "link", "show", "eth2"])
            .unwrap()
            .contains("state DOWN")
    );
    lab.link_up("r1", "eth2").unwrap();
    assert_eq!(lab.kill("r2", "bfdd").unwrap(), 1);
    assert!(matches!(
        lab.kill("r2", "no-such-daemon"),
        Err(LabError::Invalid(_))
    ));

    // spawn keeps output in the node's log dir.
    lab.spawn("h2", "hello", &["sh", "-c", "echo started; exec sleep 30"])
        .unwrap();
    lab.wait_until("spawned process logs", Duration::from_secs(5), || {
        Ok(std::fs::read_to_string(lab.log_dir("h2").join("hello.log"))
            .unwrap_or_default()
            .contains("started"))
    })
    .unwrap();
    let exit = lab
        .exec("h1", &["sh", "-c", "echo out; echo err >&2; exit 3"])
        .unwrap();
    assert_eq!(
        (exit.code, exit.stdout.trim(), exit.stderr.trim()),
        (3, "out", "err")
    );
    lab.down().expect("clean teardown");
}

/// Everything a lab made, as seen from the host.
struct Footprint {
    namespaces: Vec<NodeNs>,
    pids: Vec<i32>,
    lab_dir: PathBuf,
}

fn footprint(lab: &Lab) -> Footprint {
    let namespaces: Vec<NodeNs> = lab
        .topology()
        .nodes
        .iter()
        .map(|n| NodeNs::new(lab.namespace(&n.name).unwrap()))
        .collect();
    let pids = lab
        .topology()
        .nodes
        .iter()
        .flat_map(|n| lab.processes(&n.name).unwrap())
        .map(|p| p.pid)
        .collect();
    Footprint {
        namespaces,
        pids,
        lab_dir: lab.lab_dir().to_path_buf(),
    }
}

fn assert_gone(f: &Footprint) {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for ns in &f.namespaces {
        assert!(
            !ns.net_path().exists(),
            "{} remains",
            ns.net_path().display()
        );
        assert!(
            !ns.mnt_path().exists(),
            "{} remains",
            ns.mnt_path().display()
        );
        assert!(
            !ns.uts_path().exists(),
            "{} remains",
            ns.uts_path().display()
        );
        assert!(
            !mountinfo.contains(&format!("/{} ", ns.netns)),
            "a mount of {} remains",
            ns.netns
        );
        let links = std::process::Command::new("ip")
            .args(["-o", "link", "show"])
            .output()
            .unwrap();
        assert!(
            !String::from_utf8_lossy(&links.stdout).contains(&ns.netns),
            "a host link refers to {}",
            ns.netns
        );
    }
    assert!(
        !mountinfo.contains(&f.lab_dir.display().to_string()),
        "a mount under the lab dir remains"
    );
    assert!(mountinfo.contains(&format!(" {NS_DIR} ")) || !std::path::Path::new(NS_DIR).exists());
    for pid in &f.pids {
        // Not even a zombie: teardown reaps what it killed.
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} remains"
        );
    }
}

#[test]
fn two_labs_up_at_once_do_not_collide_and_down_leaves_nothing() {
    if !require("two_labs", FRR_LAB) {
        return;
    }
    let a = TestLab::up(FRR2, "a").expect("lab a up");
    let b = TestLab::up(FRR2, "b").expect("lab b up");
    assert_ne!(a.namespace("r1").unwrap(), b.namespace("r1").unwrap());
    for lab in [&a, &b] {
        wait_established(lab, "r1", "192.0.2.2", Duration::from_secs(30)).expect("BGP up");
        lab.wait_until("ping across", Duration::from_secs(15), || {
            Ok(ping(lab, "h1", "198.51.100.138"))
        })
        .unwrap();
    }
    let fa = footprint(&a);
    let fb = footprint(&b);
    assert!(!fa.pids.is_empty() && !fb.pids.is_empty());
    assert!(fa.pids.iter().all(|p| !fb.pids.contains(p)));
    a.down().expect("a down");
    assert_gone(&fa);
    // b is untouched by a's teardown.
    assert!(
        ping(&b, "h1", "198.51.100.138"),
        "lab b broke when lab a went down"
    );
    b.down().expect("b down");
    assert_gone(&fb);
}

#[test]
fn failed_up_removes_what_it_made_and_down_is_idempotent() {
    if !require("failed_up", FRR_LAB) {
        return;
    }
    let dir = std::env::temp_dir()
        .join("ferrolb-tests")
        .join(ferrolb_tests::unique_name("bad"));
    std::fs::create_dir_all(&dir).unwrap();
    let topo = dir.join("bad.clab.yml");
    // The second node's exec fails after namespaces and links exist.
    std::fs::write(
        &topo,
        "name: bad\ntopology:\n  defaults: {kind: linux, cmd: sleep 60}\n  nodes:\n    a: {exec: ['ip addr add 192.0.2.1/30 dev eth1']}\n    b: {exec: ['ip addr add not-an-address dev eth1']}\n  links:\n    - endpoints: [a:eth1, b:eth1]\n",
    )
    .unwrap();
    let name = ferrolb_tests::unique_name("bad");
    let opts = UpOptions {
        name: Some(name.clone()),
        lab_dir: Some(dir.join("lab")),
        strict_exec: true,
        ..Default::default()
    };
    let err = Lab::up(&topo, opts.clone()).expect_err("exec failure must fail a strict up");
    assert!(
        err.to_string()
            .contains("node b: 'ip addr add not-an-address dev eth1' failed"),
        "{err}"
    );
    let t = opts.load_topology(&topo).unwrap();
    let f = Footprint {
        namespaces: t
            .nodes
            .iter()
            .map(|n| NodeNs::new(t.namespace_of(&n.name)))
            .collect(),
        pids: Vec::new(),
        lab_dir: dir.join("lab"),
    };
    assert_gone(&f);
    assert!(ferrolb_lab::registry::load(&name).unwrap().is_none());
    // Non-strict: the lab comes up and reports the failure; down twice is fine.
    let lab = Lab::up(
        &topo,
        UpOptions {
            strict_exec: false,
            ..opts
        },
    )
    .expect("non-strict up");
    assert_eq!(lab.exec_log().iter().filter(|o| !o.success()).count(), 1);
    let f = footprint(&lab);
    assert_eq!(f.pids.len(), 2, "one cmd per node");
    lab.down().unwrap();
    assert_gone(&f);
    ferrolb_lab::destroy(&name, Some(&t)).expect("second down is a no-op");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn containerlab_bgp_ecmp_gives_the_tor_two_paths() {
    if !require("containerlab_topologies", FRR_LAB) {
        return;
    }
    // (ha-pair runs ferrolb on its LB nodes: agent/tests/ha_e2e.rs.)
    let lab = TestLab::up("containerlab/bgp-ecmp/bgp-ecmp.clab.yml", "ecmp").expect("bgp-ecmp up");
    for peer in ["192.0.2.2", "192.0.2.6"] {
        wait_established(&lab, "tor", peer, Duration::from_secs(30)).expect("ToR sessions");
    }
    lab.wait_until(
        "ToR has both paths to the VIP",
        Duration::from_secs(15),
        || {
            let v = lab.vtysh_json("tor", "show bgp ipv4 unicast 203.0.113.10/32 json")?;
            Ok(v["paths"].as_array().map_or(0, Vec::len) == 2)
        },
    )
    .unwrap();
    lab.wait_until("client pings the VIP", Duration::from_secs(10), || {
        Ok(ping(&lab, "client", "203.0.113.10"))
    })
    .unwrap();
    for be in ["10.10.10.11", "10.10.10.12", "10.10.10.13"] {
        assert!(
            ping(&lab, "lb1", be) && ping(&lab, "lb2", be),
            "backend {be} unreachable"
        );
    }
    lab.wait_until("kernel ECMP route", Duration::from_secs(10), || {
        Ok(lab
            .exec_ok("tor", &["ip", "route", "show", "203.0.113.10"])?
            .matches("nexthop via")
            .count()
            == 2)
    })
    .unwrap();
}

#[test]
fn stages_wait_for_healthcheck_and_startup_delay_order_the_nodes() {
    if !require("stages", &["ip", "ethtool", "sysctl", "date"]) {
        return;
    }
    let dir = std::env::temp_dir()
        .join("ferrolb-tests")
        .join(ferrolb_tests::unique_name("stages"));
    std::fs::create_dir_all(&dir).unwrap();
    let topo = dir.join("stages.clab.yml");
    // b is listed first, so only its wait-for keeps it from configuring before a.
    // b configures only once a is healthy (a's healthcheck passes ~0.5 s after its exec);
    // c starts 1 s late by startup-delay and holds up nobody.
    std::fs::write(
        &topo,
        r#"name: stages
topology:
  defaults: {kind: linux, image: alpine:3, cmd: sleep 60}
  nodes:
    b:
      exec: ["sh -c 'date +%s%N > /var/log/start'"]
      stages:
        configure:
          wait-for: [{node: a, stage: healthy}]
          exec: [{command: "sh -c 'date +%s%N > /var/log/stage-exit'", phase: on-exit}]
    a:
      exec: ["sh -c 'sleep 0.5; date +%s%N > /var/log/done'"]
      healthcheck: {test: ["CMD-SHELL", "test -f /var/log/done"], interval: 1, retries: 5}
    c:
      startup-delay: 1
      exec: ["sh -c 'date +%s%N > /var/log/start'"]
  links:
    - endpoints: [a:eth1, b:eth1]
"#,
    )
    .unwrap();
    let opts = UpOptions {
        name: Some(ferrolb_tests::unique_name("stages")),
        lab_dir: Some(dir.join("lab")),
        strict_exec: true,
        ..Default::default()
    };
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let lab = Lab::up(&topo, opts).expect("up");
    let read = |node: &str, f: &str| -> u128 {
        std::fs::read_to_string(lab.log_dir(node).join(f))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let (a_done, b_start, b_exit, c_start) = (
        read("a", "done"),
        read("b", "start"),
        read("b", "stage-exit"),
        read("c", "start"),
    );
    assert!(b_start > a_done, "b configured before a was healthy");
    assert!(b_exit >= b_start, "on-exit ran before the stage's exec");
    assert!(c_start >= t0 + 1_000_000_000, "startup-delay not honoured");
    // c's delay did not hold up a and b: they were done well before c started.
    assert!(
        a_done < c_start && b_start < c_start,
        "a={a_done} b={b_start} c={c_start}"
    );
    lab.down().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
