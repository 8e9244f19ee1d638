//! Prometheus text exposition (`/metrics`, `/netlox/v1/metrics`), rendered from the datapath's
//! counters, the last conntrack census and the agent's own counters. Labels never carry
//! client addresses: cardinality follows rules and endpoints only.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use ferrolb_bpf::maps::{Counter, CtState, EventKind};

use crate::lb::Engine;

#[derive(Default)]
pub struct Metrics {
    api: Mutex<BTreeMap<(String, String, u16), u64>>,
    events: [AtomicU64; 5],
}

impl Metrics {
    pub fn api_request(&self, method: &str, route: &str, status: u16) {
        if let Ok(mut m) = self.api.lock() {
            *m.entry((method.to_string(), route.to_string(), status))
                .or_default() += 1;
        }
    }

    pub fn event(&self, k: EventKind) {
        let i = match k {
            EventKind::Created => 0,
            EventKind::Established => 1,
            EventKind::Closed => 2,
            EventKind::Removed => 3,
            EventKind::NatPressure => 4,
        };
        self.events[i].fetch_add(1, Ordering::Relaxed);
    }
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Labels of a source-NAT pool (addresses of rules and endpoints only, never clients).
fn pool_labels(p: &crate::lb::NatPool) -> String {
    format!(
        "protocol=\"{}\",source=\"{}\",endpoint=\"{}\",endpoint_port=\"{}\"",
        esc(&p.protocol),
        p.source,
        p.endpoint,
        p.port
    )
}

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The whole exposition.
pub fn render(m: &Metrics, e: &Engine) -> String {
    let mut o = String::with_capacity(4096);
    let dp = e.datapath();

    head(
        &mut o,
        "ferrolb_rules_installed",
        "gauge",
        "Load-balancer rules installed.",
    );
    let _ = writeln!(o, "ferrolb_rules_installed {}", e.rules().len());

    // (labels, packets, bytes) per rule and per endpoint.
    let svc: Vec<(String, u64, u64)> = e
        .rules()
        .rules
        .values()
        .map(|r| {
            let st = dp.service_stats(r.id);
            let labels = format!(
                "service=\"{}\",vip=\"{}\",port=\"{}\",protocol=\"{}\"",
                esc(&r.label()),
                r.key.external_ip,
                r.key.port,
                r.key.protocol.name()
            );
            (labels, st.packets, st.bytes)
        })
        .collect();
    let eps: Vec<(String, u64, u64)> = e
        .endpoint_counters()
        .into_iter()
        .map(|(svc, ep, p, b)| (format!("service=\"{}\",endpoint=\"{ep}\"", esc(&svc)), p, b))
        .collect();
    for (rows, what, per) in [(&svc, "service", "rule"), (&eps, "endpoint", "endpoint")] {
        for (unit, pick) in [("packets", 0), ("bytes", 1)] {
            let name = format!("ferrolb_{what}_{unit}_total");
            head(
                &mut o,
                &name,
                "counter",
                &format!(
                    "{} forwarded per {per} (both directions).",
                    if pick == 0 { "Packets" } else { "Bytes" }
                ),
            );
            for (labels, p, b) in rows.iter() {
                let _ = writeln!(o, "{name}{{{labels}}} {}", if pick == 0 { p } else { b });
            }
        }
    }

    head(
        &mut o,
        "ferrolb_conntrack_flows",
        "gauge",
        "Tracked flows by protocol and state (at the last collector pass).",
    );
    for proto in ["tcp", "udp", "icmp"] {
        for st in CtState::ALL {
            if proto != "tcp" && st != CtState::Established {
                continue;
            }
            let n = e
                .census
                .flows
                .get(&(proto.to_string(), st.name()))
                .copied()
                .unwrap_or(0);
            let _ = writeln!(
                o,
                "ferrolb_conntrack_flows{{protocol=\"{proto}\",state=\"{}\"}} {n}",
                st.name()
            );
        }
    }
    let cap = dp.capacity().conntrack;
    head(
        &mut o,
        "ferrolb_conntrack_entries",
        "gauge",
        "Conntrack map entries (two per flow).",
    );
    let _ = writeln!(o, "ferrolb_conntrack_entries {}", e.census.entries);
    head(
        &mut o,
        "ferrolb_conntrack_capacity",
        "gauge",
        "Conntrack map size.",
    );
    let _ = writeln!(o, "ferrolb_conntrack_capacity {cap}");
    head(
        &mut o,
        "ferrolb_conntrack_fill_ratio",
        "gauge",
        "Conntrack entries / capacity.",
    );
    let _ = writeln!(
        o,
        "ferrolb_conntrack_fill_ratio {:.6}",
        e.census.entries as f64 / f64::from(cap.max(1))
    );
    head(
        &mut o,
        "ferrolb_conntrack_collected_total",
        "counter",
        "Expired conntrack entries removed by the collector.",
    );
    let _ = writeln!(
        o,
        "ferrolb_conntrack_collected_total {}",
        e.census.collected_total
    );

    let c = dp.counters();
    head(
        &mut o,
        "ferrolb_datapath_drops_total",
        "counter",
        "Packets the datapath dropped, by reason.",
    );
    for (reason, idx) in [
        ("fragment", Counter::DropFragment),
        ("no_endpoint", Counter::DropNoEndpoint),
        ("nat_ports_exhausted", Counter::DropNatPorts),
        ("rewrite_failed", Counter::DropMalformed),
        ("no_flow", Counter::DropNoFlow),
        ("arp_standby", Counter::ArpSuppressed),
    ] {
        let _ = writeln!(
            o,
            "ferrolb_datapath_drops_total{{reason=\"{reason}\"}} {}",
            c[idx as usize]
        );
    }
    head(
        &mut o,
        "ferrolb_conntrack_created_total",
        "counter",
        "Flows created by the datapath.",
    );
    let _ = writeln!(
        o,
        "ferrolb_conntrack_created_total {}",
        c[Counter::CtCreated as usize]
    );
    head(
        &mut o,
        "ferrolb_icmp_errors_translated_total",
        "counter",
        "ICMP errors about tracked flows translated back to the sender.",
    );
    let _ = writeln!(
        o,
        "ferrolb_icmp_errors_translated_total {}",
        c[Counter::IcmpErrTranslated as usize]
    );
    for (name, help, idx) in [
        (
            "ferrolb_nat_port_hard_allocations_total",
            "Source-NAT port allocations that needed more than 8 probes (a pool filling up).",
            Counter::NatHard,
        ),
        (
            "ferrolb_nat_port_takeovers_total",
            "Source-NAT ports taken over from expired flows that still held them.",
            Counter::NatTakeover,
        ),
    ] {
        head(&mut o, name, "counter", help);
        let _ = writeln!(o, "{name} {}", c[idx as usize]);
    }
    head(
        &mut o,
        "ferrolb_nat_ports_in_use",
        "gauge",
        "Source-NAT ports held by live flows, per pool (translated source, endpoint, \
         endpoint port; at the last collector pass).",
    );
    for (pool, n) in &e.census.nat_pools {
        let _ = writeln!(o, "ferrolb_nat_ports_in_use{{{}}} {n}", pool_labels(pool));
    }
    head(
        &mut o,
        "ferrolb_nat_ports_fill_ratio",
        "gauge",
        "Source-NAT ports in use over the 64512 a pool has (new flows to it fail near 1).",
    );
    for (pool, n) in &e.census.nat_pools {
        let _ = writeln!(
            o,
            "ferrolb_nat_ports_fill_ratio{{{}}} {}",
            pool_labels(pool),
            *n as f64 / f64::from(ferrolb_bpf::maps::NAT_PORTS)
        );
    }
    head(
        &mut o,
        "ferrolb_nd_answered_total",
        "counter",
        "IPv6 neighbour solicitations for VIPs answered by the datapath.",
    );
    let _ = writeln!(
        o,
        "ferrolb_nd_answered_total {}",
        c[Counter::NdAnswered as usize]
    );
    head(
        &mut o,
        "ferrolb_conntrack_events_total",
        "counter",
        "Conntrack events read from the datapath ring buffer, by kind.",
    );
    for (i, k) in [
        "created",
        "established",
        "closed",
        "removed",
        "nat_pressure",
    ]
    .iter()
    .enumerate()
    {
        let _ = writeln!(
            o,
            "ferrolb_conntrack_events_total{{kind=\"{k}\"}} {}",
            m.events[i].load(Ordering::Relaxed)
        );
    }
    head(
        &mut o,
        "ferrolb_conntrack_events_lost_total",
        "counter",
        "Conntrack events lost because the ring buffer was full.",
    );
    let _ = writeln!(
        o,
        "ferrolb_conntrack_events_lost_total {}",
        c[Counter::EventsLost as usize]
    );

    head(
        &mut o,
        "ferrolb_api_requests_total",
        "counter",
        "REST requests by method, route and status.",
    );
    if let Ok(api) = m.api.lock() {
        for ((method, route, status), n) in api.iter() {
            let _ = writeln!(
                o,
                "ferrolb_api_requests_total{{method=\"{method}\",route=\"{}\",status=\"{status}\"}} {n}",
                esc(route)
            );
        }
    }
    head(&mut o, "ferrolb_build_info", "gauge", "Build information.");
    let _ = writeln!(
        o,
        "ferrolb_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    o
}
