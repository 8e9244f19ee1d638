//! The deployment ferrolb is built for, as loxilb's Gateway API guides set it up
//! (`containerlab/k8s-pair-l2`): an external pair started with loxilb's flags only
//! (`--cluster --self --ka`, L2 mode, a keepalive network of its own), hosts as they come
//! (forwarding off, no bpffs), the VIPs in the clients' subnet, two Kubernetes nodes serving
//! NodePorts, and rules posted with kube-loxilb's exact bodies (`Monitor: true`, one-arm and
//! full NAT). The MASTER dies silently (every frame dropped at the three switches) under 10
//! one-arm and 10 full-NAT TCP streams and UDP flows: every stream survives, the UDP outage is
//! under 400 ms, the client's neighbour entries for the VIPs move to the new MASTER, and the
//! old MASTER comes back as BACKUP.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ferrolb_tests::ha::{
    assert_all_survived, cut_ports, forwarding, mac_of, neighbour_mac, read_traffic, role,
    start_traffic_to, traffic_with_fault, wait_roles,
};
use ferrolb_tests::{TestLab, require, rest, wait_api};
use serde_json::{Value, json};

const FERROLB: &str = env!("CARGO_BIN_EXE_ferrolb");
const TOPOLOGY: &str = "containerlab/k8s-pair-l2/k8s-pair-l2.clab.yml";
const VIP_FULLNAT: &str = "192.168.10.50";
const VIP_ONEARM: &str = "192.168.10.51";
const NODES: [&str; 2] = ["10.20.0.11", "10.20.0.12"];

/// kube-loxilb's body for one port of a LoadBalancer Service with `loxilb.io/liveness: "yes"`
/// (`mode` 2: full NAT; 1: one-arm, `loxilb.io/lbmode: onearm`).
fn kube_loxilb_rule(
    vip: &str,
    svc: &str,
    port: u16,
    node_port: u16,
    proto: &str,
    mode: u8,
) -> String {
    let eps: Vec<Value> = NODES
        .iter()
        .map(|ip| json!({"endpointIP": ip, "targetPort": node_port, "weight": 1, "state": "", "counter": ""}))
        .collect();
    json!({"serviceArguments": {"externalIP": vip, "privateIP": "", "port": port, "protocol": proto,
                                "sel": 0, "mode": mode, "BGP": false, "Monitor": true,
                                "inactiveTimeOut": 1800, "block": 0, "managed": true,
                                "probetype": "", "probeport": 0, "probereq": "", "proberesp": "",
                                "name": format!("default_{svc}:llb-inst0")},
           "secondaryIPs": [], "allowedSources": [], "endpoints": eps})
    .to_string()
}

fn all_active(lab: &TestLab, node: &str) -> bool {
    let (_, v) = rest(lab, node, "GET", "/config/loadbalancer/all", None);
    let rules = v["lbAttr"].as_array().cloned().unwrap_or_default();
    rules.len() == 4
        && rules.iter().all(|r| {
            r["endpoints"]
                .as_array()
                .is_some_and(|e| e.len() == 2 && e.iter().all(|e| e["state"] == "active"))
        })
}

#[test]
fn the_external_pair_keeps_one_arm_and_full_nat_streams_through_a_silent_master_death() {
    let test = "the_external_pair_keeps_one_arm_and_full_nat_streams_through_a_silent_master_death";
    if !require(test, &["ip", "nft", "curl", "python3"]) {
        return;
    }
    let lab = TestLab::up_with(
        TOPOLOGY,
        "k8spair",
        &[("FERROLB", FERROLB), ("KA", "100ms")],
    )
    .expect("lab up");
    for node in ["lb1", "lb2"] {
        wait_api(&lab, node);
        // Hosts as they come: forwarding was off; the agent turned it on where it attached.
        for iface in ["eth1", "eth2", "eth3"] {
            assert_eq!(forwarding(&lab, node, iface), "1", "{node} {iface}");
        }
        // The floating one-arm source, once, by the operator (kube-loxilb has no field for
        // it; the agents run with loxilb's flags alone).
        let (st, v) = rest(
            &lab,
            node,
            "POST",
            "/config/onearmsource",
            Some(r#"{"source":"10.20.0.100/24"}"#),
        );
        assert_eq!(st, 200, "{v}");
        for (vip, svc, mode, ports) in [
            (
                VIP_FULLNAT,
                "web",
                2,
                [(80, 30080, "tcp"), (53, 30081, "udp")],
            ),
            (
                VIP_ONEARM,
                "web-onearm",
                1,
                [(80, 31080, "tcp"), (53, 31081, "udp")],
            ),
        ] {
            for (port, node_port, proto) in ports {
                let body =
                    kube_loxilb_rule(vip, &format!("{svc}-{proto}"), port, node_port, proto, mode);
                let (st, v) = rest(&lab, node, "POST", "/config/loadbalancer", Some(&body));
                assert_eq!(st, 200, "{v}");
            }
        }
    }
    wait_roles(&lab, "lb1", Duration::from_secs(20));
    // Liveness probes (Monitor: true, ferrolb's defaults) find both NodePorts up.
    for node in ["lb1", "lb2"] {
        lab.wait_until(
            &format!("{node}: every endpoint active"),
            Duration::from_secs(15),
            || Ok(all_active(&lab, node)),
        )
        .unwrap();
    }
    // One-arm endpoints leave from the floating source; nothing is flagged.
    let (_, all) = rest(&lab, "lb1", "GET", "/config/loadbalancer/all", None);
    for r in all["lbAttr"].as_array().unwrap() {
        assert!(r.get("warnings").is_none(), "{r}");
        if r["serviceArguments"]["mode"] == 1 {
            assert_eq!(r["endpoints"][0]["snatIP"], "10.20.0.100", "{r}");
        }
    }
    let (_, l) = rest(&lab, "lb1", "GET", "/config/onearmsource/all", None);
    assert_eq!(
        l["Attr"],
        json!([{"source": "10.20.0.100/24", "origin": "rest", "endpoints": 4}]),
        "{l}"
    );
    // In use: the source cannot be removed from under the rules.
    let (st, v) = rest(
        &lab,
        "lb1",
        "DELETE",
        "/config/onearmsource/10.20.0.100",
        None,
    );
    assert_eq!(st, 400, "{v}");
    assert!(v.to_string().contains("web-onearm"), "{v}");
    let lb1_mac = mac_of(&lab, "lb1", "eth1");
    let lb2_mac = mac_of(&lab, "lb2", "eth1");
    for vip in [VIP_FULLNAT, VIP_ONEARM] {
        let ping = lab
            .exec("client", &["ping", "-c", "3", "-i", "0.3", "-w", "3", vip])
            .unwrap();
        assert!(ping.success(), "{vip}: {ping:?}");
        assert_eq!(
            neighbour_mac(&lab, "client", vip),
            Some(lb1_mac.clone()),
            "{vip}"
        );
    }

    let args = [
        "--tcp",
        "10",
        "--late",
        "0",
        "--udp",
        "10",
        "--duration",
        "6",
        "--tcp-port",
        "80",
        "--udp-port",
        "53",
    ];
    start_traffic_to(&lab, VIP_ONEARM, "k8sonearm", &args);
    let mut fault_args = args.to_vec();
    fault_args.extend(["--fault-at", "3"]);
    let full = traffic_with_fault(
        &lab,
        VIP_FULLNAT,
        "k8sfullnat",
        &fault_args,
        Duration::from_secs(3),
        || {
            cut_ports(
                &lab,
                &[("swc", "eth2"), ("swn", "eth1"), ("swk", "eth1")],
                true,
            )
        },
    );
    let onearm = read_traffic(&lab, "k8sonearm");
    eprintln!("full NAT: {}", full["summary"]);
    eprintln!("one-arm: {}", onearm["summary"]);
    assert_all_survived(&full, "full NAT through a silent MASTER death");
    assert_all_survived(&onearm, "one-arm through a silent MASTER death");
    for (what, t) in [("full NAT", &full), ("one-arm", &onearm)] {
        assert_eq!(t["summary"]["tcp_streams"], 10, "{what}");
        let outage = t["summary"]["udp_outage_ms"].as_u64().unwrap();
        assert!(outage < 400, "{what}: UDP outage {outage} ms");
    }
    assert_eq!(role(&lab, "lb2"), "MASTER");
    for vip in [VIP_FULLNAT, VIP_ONEARM] {
        assert_eq!(
            neighbour_mac(&lab, "client", vip),
            Some(lb2_mac.clone()),
            "{vip}"
        );
    }
    assert_eq!(
        neighbour_mac(&lab, "kn1", "10.20.0.100"),
        Some(mac_of(&lab, "lb2", "eth2")),
        "the Kubernetes nodes reach the floating one-arm source through lb2"
    );

    // The old MASTER returns: it stays BACKUP.
    cut_ports(
        &lab,
        &[("swc", "eth2"), ("swn", "eth1"), ("swk", "eth1")],
        false,
    );
    wait_roles(&lab, "lb2", Duration::from_secs(15));
    // Its agent restarts with loxilb's flags alone: the REST-made source is restored.
    assert_eq!(lab.kill("lb1", "ferrolb").unwrap(), 1);
    lab.spawn(
        "lb1",
        "ferrolb-again",
        &[
            FERROLB,
            "--config-path",
            "/etc/ferrolb/",
            "--cluster=10.30.0.3",
            "--self=0",
            "--ka=10.30.0.3:10.30.0.2:100ms",
        ],
    )
    .unwrap();
    wait_api(&lab, "lb1");
    let (_, l) = rest(&lab, "lb1", "GET", "/config/onearmsource/all", None);
    assert_eq!(l["Attr"][0]["source"], "10.20.0.100/24", "{l}");
    assert_eq!(l["Attr"][0]["origin"], "rest", "{l}");
    wait_roles(&lab, "lb2", Duration::from_secs(20));
    lab.down().unwrap();
}
