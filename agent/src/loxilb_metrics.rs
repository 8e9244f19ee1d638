//! loxilb's metric names (`--loxilb-metrics`), beside `ferrolb_*`, so the Grafana dashboards
//! that ship with kube-loxilb (`manifest/in-cluster-grafana`) work unchanged. Same names, types
//! and labels as loxilb's exporter (`api/prometheus` in loxilb, its "legacy" names); the
//! values come from the same snapshot as ferrolb's own series. The mapping, and where a value
//! is more exact than loxilb's sampled one, is in `docs/metrics.md`.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use ferrolb_bpf::maps::Counter;

use crate::metrics::{DatapathSnapshot, counter, gauge};

/// Every name published (the dashboards' queries use each of them).
pub const NAMES: [&str; 23] = [
    "active_conntrack_count",
    "active_flow_count_tcp",
    "active_flow_count_udp",
    "active_flow_count_sctp",
    "new_flow_count",
    "lb_rule_count",
    "healthy_host_count",
    "unhealthy_host_count",
    "processed_bytes",
    "processed_packets",
    "processed_tcp_bytes",
    "processed_udp_bytes",
    "processed_sctp_bytes",
    "total_requests",
    "total_requests_per_service",
    "total_errors",
    "total_errors_per_service",
    "total_fw_drops",
    "total_fw_drops_per_rule",
    "lb_rule_interaction_bytes",
    "lb_rule_interaction_packets",
    "total_load_dists_per_service",
    "endpoint_load_dists_per_service",
];

/// Records loxilb's series from `d`.
pub fn record(d: &DatapathSnapshot) {
    let s = |v: &str| v.to_string();
    // Flows: loxilb counts every tracked flow not in its "closed" state.
    let mut by_proto: BTreeMap<&str, u64> = BTreeMap::new();
    for ((proto, state), n) in &d.census.flows {
        if *state != "closed" {
            *by_proto.entry(proto.as_ref()).or_default() += n;
        }
    }
    gauge(
        "active_conntrack_count",
        "Number of active established connections from clients to targets.",
        &[],
        by_proto.values().sum::<u64>() as f64,
    );
    for (name, proto) in [
        ("active_flow_count_tcp", "tcp"),
        ("active_flow_count_udp", "udp"),
        ("active_flow_count_sctp", "sctp"),
    ] {
        gauge(
            name,
            "Number of concurrent flows (or connections) of the protocol from clients to targets.",
            &[],
            by_proto.get(proto).copied().unwrap_or(0) as f64,
        );
    }
    gauge(
        "new_flow_count",
        "The number of new connections from clients to targets observed in the last conntrack pass.",
        &[],
        d.census.new_flows as f64,
    );
    gauge(
        "lb_rule_count",
        "Total number of load balancing rules.",
        &[],
        d.rules as f64,
    );
    let (up, down) = d.probed_endpoints;
    gauge(
        "healthy_host_count",
        "Number of healthy targets (probed endpoints that answer).",
        &[],
        up as f64,
    );
    gauge(
        "unhealthy_host_count",
        "Number of unhealthy targets (probed endpoints that failed their probes).",
        &[],
        down as f64,
    );

    // Traffic: the datapath's exact per-rule counters (both directions).
    let mut bytes: BTreeMap<&str, u64> = BTreeMap::new();
    let mut packets = 0u64;
    for (_, _, _, proto, p, b) in &d.services {
        *bytes.entry(proto).or_default() += b;
        packets += p;
    }
    counter(
        "processed_bytes",
        "The total number of bytes processed by the load balancer, including protocol and IP headers.",
        &[],
        bytes.values().sum(),
    );
    counter(
        "processed_packets",
        "The total number of packets processed by the load balancer.",
        &[],
        packets,
    );
    for (name, proto) in [
        ("processed_tcp_bytes", "tcp"),
        ("processed_udp_bytes", "udp"),
        ("processed_sctp_bytes", "sctp"),
    ] {
        counter(
            name,
            "The total number of bytes of the protocol processed by the load balancer, including its headers.",
            &[],
            bytes.get(proto).copied().unwrap_or(0),
        );
    }

    // Requests and errors.
    let c = |i: Counter| d.counters.get(i as usize).copied().unwrap_or(0);
    counter(
        "total_requests",
        "New sessions (flows created by the datapath; exact, not sampled).",
        &[],
        c(Counter::CtCreated),
    );
    for (label, n) in &d.requests {
        counter(
            "total_requests_per_service",
            "New sessions per service, sampled by the conntrack passes (a flow opened and gone between two passes is not seen).",
            &[("service", label.clone())],
            *n,
        );
    }
    counter(
        "total_errors",
        "Errored sessions: TCP flows seen reset (RST) by the conntrack passes.",
        &[],
        d.errors.iter().map(|(_, n)| n).sum(),
    );
    for (label, n) in &d.errors {
        counter(
            "total_errors_per_service",
            "Errored sessions per service: TCP flows seen reset (RST) by the conntrack passes.",
            &[("service", label.clone())],
            *n,
        );
    }

    // Firewall drops: loxilb enforces allowedSources with firewall rules; here the rule's own
    // source check. Gauges holding the cumulative count, as loxilb's.
    gauge(
        "total_fw_drops",
        "Cumulative packets dropped because their source is not allowed (allowedSources).",
        &[],
        c(Counter::DropSource) as f64,
    );
    for ((label, ..), n) in d.services.iter().zip(&d.source_drops) {
        if let Some(n) = n {
            gauge(
                "total_fw_drops_per_rule",
                "Cumulative packets dropped per rule because their source is not allowed (allowedSources).",
                &[("fw_rule", label.clone())],
                *n as f64,
            );
        }
    }

    // Per endpoint: loxilb labels (service, sip, dip); client addresses are never labels
    // here (unbounded cardinality), so sip is absent and the series sum over clients, which
    // is how the dashboards query them (by service, by dip).
    let mut per_ep: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    for (svc, ep, p, b, _) in &d.endpoints {
        let dip = ep
            .parse::<SocketAddr>()
            .map(|a| a.ip().to_string())
            .unwrap_or_else(|_| ep.clone());
        let e = per_ep.entry((svc.clone(), dip)).or_default();
        e.0 += p;
        e.1 += b;
    }
    let mut svc_bytes: BTreeMap<&str, u64> = BTreeMap::new();
    for ((svc, dip), (p, b)) in &per_ep {
        let l = [("service", svc.clone()), ("dip", dip.clone())];
        counter(
            "lb_rule_interaction_bytes",
            "Total bytes exchanged between the load balancer and an endpoint, per service.",
            &l,
            *b,
        );
        counter(
            "lb_rule_interaction_packets",
            "Total packets exchanged between the load balancer and an endpoint, per service.",
            &l,
            *p,
        );
        *svc_bytes.entry(svc.as_str()).or_default() += b;
    }
    let all: u64 = svc_bytes.values().sum();
    for ((svc, dip), (_, b)) in &per_ep {
        let total = svc_bytes.get(svc.as_str()).copied().unwrap_or(0);
        gauge(
            "endpoint_load_dists_per_service",
            "Ratio of traffic distribution across backend endpoints per service (bytes since the rule was made).",
            &[("service", svc.clone()), ("dip", s(dip))],
            ratio(*b, total),
        );
    }
    for (svc, b) in &svc_bytes {
        gauge(
            "total_load_dists_per_service",
            "Ratio of total traffic distribution across services (bytes since each rule was made).",
            &[("service", s(svc))],
            ratio(*b, all),
        );
    }
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every name is rendered from a snapshot with one rule of each kind, with the values the
    /// snapshot implies.
    #[test]
    fn every_name_is_published_with_loxilb_meanings() {
        let mut d = DatapathSnapshot {
            rules: 2,
            services: vec![
                (
                    "default_web:llb-inst0".into(),
                    "203.0.113.10".into(),
                    80,
                    "tcp",
                    10,
                    1000,
                ),
                ("dns".into(), "203.0.113.10".into(), 53, "udp", 4, 200),
            ],
            source_drops: vec![Some(7), None],
            endpoints: vec![
                (
                    "default_web:llb-inst0".into(),
                    "10.10.10.11:8080".into(),
                    6,
                    750,
                    true,
                ),
                (
                    "default_web:llb-inst0".into(),
                    "10.10.10.12:8080".into(),
                    4,
                    250,
                    false,
                ),
                ("dns".into(), "10.10.10.11:53".into(), 4, 200, true),
            ],
            counters: vec![0; ferrolb_bpf::maps::COUNTERS],
            probed_endpoints: (1, 1),
            requests: vec![("default_web:llb-inst0".into(), 5), ("dns".into(), 2)],
            errors: vec![("default_web:llb-inst0".into(), 1), ("dns".into(), 0)],
            ..Default::default()
        };
        d.counters[Counter::CtCreated as usize] = 9;
        d.counters[Counter::DropSource as usize] = 7;
        d.census.flows.insert(("tcp".into(), "established"), 3);
        d.census.flows.insert(("tcp".into(), "closed"), 2);
        d.census.flows.insert(("udp".into(), "established"), 1);
        d.census.new_flows = 4;
        let text = crate::metrics::scrape(|| record(&d));
        let value = |series: &str| -> f64 {
            text.lines()
                .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{series} not in\n{text}"))
        };
        for name in NAMES {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{'])),
                "{name} missing:\n{text}"
            );
        }
        assert_eq!(value("active_conntrack_count"), 4.0);
        assert_eq!(value("active_flow_count_tcp"), 3.0);
        assert_eq!(value("active_flow_count_sctp"), 0.0);
        assert_eq!(value("new_flow_count"), 4.0);
        assert_eq!(value("lb_rule_count"), 2.0);
        assert_eq!(value("healthy_host_count"), 1.0);
        assert_eq!(value("unhealthy_host_count"), 1.0);
        assert_eq!(value("processed_bytes"), 1200.0);
        assert_eq!(value("processed_packets"), 14.0);
        assert_eq!(value("processed_tcp_bytes"), 1000.0);
        assert_eq!(value("processed_udp_bytes"), 200.0);
        assert_eq!(value("total_requests"), 9.0);
        assert_eq!(
            value("total_requests_per_service{service=\"default_web:llb-inst0\"}"),
            5.0
        );
        assert_eq!(value("total_errors"), 1.0);
        assert_eq!(value("total_fw_drops"), 7.0);
        assert_eq!(
            value("total_fw_drops_per_rule{fw_rule=\"default_web:llb-inst0\"}"),
            7.0
        );
        assert!(!text.contains("fw_rule=\"dns\""), "no sources, no series");
        assert_eq!(
            value(
                "lb_rule_interaction_bytes{service=\"default_web:llb-inst0\",dip=\"10.10.10.11\"}"
            ),
            750.0
        );
        assert_eq!(
            value(
                "endpoint_load_dists_per_service{service=\"default_web:llb-inst0\",dip=\"10.10.10.12\"}"
            ),
            0.25
        );
        assert_eq!(
            value("total_load_dists_per_service{service=\"dns\"}"),
            200.0 / 1200.0
        );
        assert!(!text.contains("sip="), "client addresses are never labels");
    }
}
