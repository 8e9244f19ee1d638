//! Prometheus exposition (`/metrics`, `/netlox/v1/metrics`) through `metrics` +
//! `metrics-exporter-prometheus`: each controller records its series into one scrape's
//! recorder ([`scrape`]), which renders them. Labels never carry client addresses:
//! cardinality follows rules, endpoints, neighbours, sessions and peers only.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use ferrolb_bpf::maps::{Counter, CtState, EventKind};

use crate::lb::Engine;

#[derive(Default)]
pub struct Metrics {
    /// `--loxilb-metrics`: also publish loxilb's metric names (see [`crate::loxilb_metrics`]).
    pub loxilb_names: bool,
    api: Mutex<BTreeMap<(String, String, u16), u64>>,
    events: [AtomicU64; 5],
    restarts: Mutex<BTreeMap<&'static str, u64>>,
    /// The REST API's connections (`listen.rs`).
    pub api_conns: std::sync::Arc<crate::listen::ConnStats>,
}

impl Metrics {
    /// `loxilb_names`: also publish loxilb's metric names.
    pub fn new(loxilb_names: bool) -> Metrics {
        Metrics {
            loxilb_names,
            ..Metrics::default()
        }
    }

    /// A supervised task failed and was restarted.
    pub fn task_restarted(&self, task: &'static str) {
        if let Ok(mut m) = self.restarts.lock() {
            *m.entry(task).or_default() += 1;
        }
    }

    pub fn task_restarts(&self) -> Vec<(&'static str, u64)> {
        self.restarts
            .lock()
            .map(|m| m.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default()
    }

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

/// One scrape: the series are recorded into a fresh `metrics-exporter-prometheus` recorder
/// (the only registry; it escapes label values and writes HELP/TYPE) and rendered. A fresh
/// one per scrape: series of deleted rules, endpoints or sessions disappear at once.
pub fn scrape(record: impl FnOnce()) -> String {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, record);
    handle.render()
}

/// Labels: static names, values from anywhere (escaped by the exporter).
pub type Labels<'a> = &'a [(&'static str, String)];

pub fn gauge(name: &'static str, help: &'static str, labels: Labels<'_>, v: f64) {
    metrics::describe_gauge!(name, help);
    metrics::gauge!(name, labels).set(v);
}

pub fn counter(name: &'static str, help: &'static str, labels: Labels<'_>, v: u64) {
    metrics::describe_counter!(name, help);
    metrics::counter!(name, labels).absolute(v);
}

/// What the datapath metrics need, read on the engine's thread in a few batched syscalls.
#[derive(Debug, Clone, Default)]
pub struct DatapathSnapshot {
    pub rules: usize,
    /// (label, vip, port, protocol, packets, bytes)
    pub services: Vec<(String, String, u16, &'static str, u64, u64)>,
    /// Per service (as `services`): first packets refused for their source; None for rules
    /// that allow every source.
    pub source_drops: Vec<Option<u64>>,
    /// (rule label, endpoint ip:port, packets, bytes, active)
    pub endpoints: Vec<(String, String, u64, u64, bool)>,
    pub census: crate::lb::CtCensus,
    pub counters: Vec<u64>,
    pub conntrack_capacity: u32,
    pub halfopen_capacity: u32,
    /// The in-place budget: half-open TCP flows the conntrack table itself may hold.
    pub halfopen_inplace_capacity: u32,
    /// Distinct endpoints (address, port) of rules that probe them: (up, down).
    pub probed_endpoints: (u64, u64),
    /// Per rule label (as `services`): sampled new flows and resets since the rule was made.
    pub requests: Vec<(String, u64)>,
    pub errors: Vec<(String, u64)>,
}

impl DatapathSnapshot {
    pub fn take(e: &Engine) -> DatapathSnapshot {
        let dp = e.datapath();
        let rules: Vec<&crate::rules::Rule> = e.rules().rules.values().collect();
        let ids: Vec<u32> = rules.iter().map(|r| r.id).collect();
        let eps: Vec<(u32, u32, usize, usize)> = rules
            .iter()
            .enumerate()
            .flat_map(|(ri, r)| {
                r.endpoints
                    .iter()
                    .enumerate()
                    .filter(|(_, ep)| usize::from(ep.slot) < ferrolb_bpf::maps::MAX_ENDPOINTS)
                    .map(move |(ei, ep)| (r.id, u32::from(ep.slot), ri, ei))
            })
            .collect();
        let pairs: Vec<(u32, u32)> = eps.iter().map(|(id, slot, _, _)| (*id, *slot)).collect();
        let (svc, ep) = dp.stats_many(&ids, &pairs).unwrap_or_else(|err| {
            tracing::warn!(error = %err, "batched counter read failed; reading one by one");
            (
                ids.iter().map(|id| dp.service_stats(*id)).collect(),
                pairs
                    .iter()
                    .map(|(id, slot)| dp.endpoint_stats(*id, *slot))
                    .collect(),
            )
        });
        let drops = dp.source_drops_many(&ids).unwrap_or_else(|err| {
            tracing::warn!(error = %err, "batched source-drop read failed; reading one by one");
            ids.iter().map(|id| dp.source_drops(*id)).collect()
        });
        DatapathSnapshot {
            rules: rules.len(),
            source_drops: rules
                .iter()
                .zip(&drops)
                .map(|(r, n)| (!r.service.allowed_sources.is_empty()).then_some(*n))
                .collect(),
            services: rules
                .iter()
                .zip(&svc)
                .map(|(r, st)| {
                    (
                        r.label(),
                        r.key.external_ip.to_string(),
                        r.key.port,
                        r.key.protocol.name(),
                        st.packets,
                        st.bytes,
                    )
                })
                .collect(),
            endpoints: eps
                .iter()
                .zip(&ep)
                .map(|((_, _, ri, ei), st)| {
                    let r = rules[*ri];
                    let e = &r.endpoints[*ei];
                    (
                        r.label(),
                        std::net::SocketAddr::new(e.spec.ip, e.spec.target_port).to_string(),
                        st.packets,
                        st.bytes,
                        !e.down,
                    )
                })
                .collect(),
            probed_endpoints: {
                let mut state: BTreeMap<std::net::SocketAddr, bool> = BTreeMap::new();
                for r in rules
                    .iter()
                    .filter(|r| r.service.probe_kind(r.key.protocol).is_some())
                {
                    for ep in &r.endpoints {
                        let a = std::net::SocketAddr::new(ep.spec.ip, ep.spec.target_port);
                        *state.entry(a).or_insert(false) |= ep.down;
                    }
                }
                let down = state.values().filter(|d| **d).count() as u64;
                (state.len() as u64 - down, down)
            },
            requests: rules
                .iter()
                .map(|r| {
                    (
                        r.label(),
                        e.census.requests.get(&r.id).copied().unwrap_or(0),
                    )
                })
                .collect(),
            errors: rules
                .iter()
                .map(|r| (r.label(), e.census.errors.get(&r.id).copied().unwrap_or(0)))
                .collect(),
            census: e.census.clone(),
            counters: dp.counters().to_vec(),
            conntrack_capacity: dp.capacity().conntrack,
            halfopen_capacity: dp.capacity().halfopen,
            halfopen_inplace_capacity: dp.halfopen_inplace().0,
        }
    }
}

/// Records the datapath's and the agent's own series.
pub fn record(m: &Metrics, d: &DatapathSnapshot) {
    let s = |v: &str| v.to_string();
    gauge(
        "ferrolb_rules_installed",
        "Load-balancer rules installed.",
        &[],
        d.rules as f64,
    );
    for (i, (label, vip, port, proto, p, b)) in d.services.iter().enumerate() {
        let l = [
            ("service", label.clone()),
            ("vip", vip.clone()),
            ("port", port.to_string()),
            ("protocol", s(proto)),
        ];
        counter(
            "ferrolb_service_packets_total",
            "Packets forwarded per rule (both directions).",
            &l,
            *p,
        );
        counter(
            "ferrolb_service_bytes_total",
            "Bytes forwarded per rule (both directions).",
            &l,
            *b,
        );
        if let Some(Some(n)) = d.source_drops.get(i) {
            counter(
                "ferrolb_service_source_drops_total",
                "First packets of new flows dropped because their source is outside the rule's allowed sources (allowedSources); only for rules that list them.",
                &l,
                *n,
            );
        }
    }
    for (svc, ep, p, b, active) in &d.endpoints {
        let l = [("service", svc.clone()), ("endpoint", ep.clone())];
        gauge(
            "ferrolb_endpoint_active",
            "1 while the endpoint takes new flows; 0 when its probes failed or it was forced down.",
            &l,
            f64::from(u8::from(*active)),
        );
        counter(
            "ferrolb_endpoint_packets_total",
            "Packets forwarded per endpoint (both directions).",
            &l,
            *p,
        );
        counter(
            "ferrolb_endpoint_bytes_total",
            "Bytes forwarded per endpoint (both directions).",
            &l,
            *b,
        );
    }
    for proto in ["tcp", "udp", "icmp", "sctp"] {
        for st in CtState::ALL {
            if proto != "tcp" && proto != "sctp" && st != CtState::Established {
                continue;
            }
            let n = d
                .census
                .flows
                .get(&(proto.into(), st.name()))
                .copied()
                .unwrap_or(0);
            gauge(
                "ferrolb_conntrack_flows",
                "Tracked flows by protocol and state (at the last collector pass).",
                &[("protocol", s(proto)), ("state", s(st.name()))],
                n as f64,
            );
        }
    }
    let cap = d.conntrack_capacity;
    gauge(
        "ferrolb_conntrack_entries",
        "Conntrack table entries (two per flow): established TCP, UDP and ICMP flows.",
        &[],
        d.census.entries as f64,
    );
    gauge(
        "ferrolb_conntrack_capacity",
        "Conntrack table size: a new flow is refused when it is full.",
        &[],
        f64::from(cap),
    );
    gauge(
        "ferrolb_conntrack_fill_ratio",
        "Conntrack entries / capacity (new flows are dropped at 1).",
        &[],
        d.census.entries as f64 / f64::from(cap.max(1)),
    );
    gauge(
        "ferrolb_conntrack_halfopen_entries",
        "Half-open table entries (two per flow): flows not yet confirmed (TCP and SCTP before their handshake completes, DNAT pick-ups before the endpoint confirms them, UDP and ICMP echo flows before the endpoint has answered and the client sent again).",
        &[],
        d.census.halfopen as f64,
    );
    gauge(
        "ferrolb_conntrack_halfopen_capacity",
        "Half-open table size (an LRU: when full, the least recently used unconfirmed flows go).",
        &[],
        f64::from(d.halfopen_capacity),
    );
    gauge(
        "ferrolb_conntrack_halfopen_inplace_flows",
        "Half-open TCP flows made in the conntrack table itself (their handshake completes in place); counted in its entries.",
        &[],
        d.census.halfopen_inplace as f64,
    );
    gauge(
        "ferrolb_conntrack_halfopen_inplace_capacity",
        "How many half-open TCP flows the conntrack table itself may hold (--halfopen-inplace); past it, they go to the half-open table.",
        &[],
        f64::from(d.halfopen_inplace_capacity),
    );
    counter(
        "ferrolb_conntrack_collected_total",
        "Expired conntrack entries removed by the collector.",
        &[],
        d.census.collected_total,
    );
    let c = |i: Counter| d.counters.get(i as usize).copied().unwrap_or(0);
    for (reason, idx) in [
        ("fragment", Counter::DropFragment),
        ("no_endpoint", Counter::DropNoEndpoint),
        ("nat_ports_exhausted", Counter::DropNatPorts),
        ("rewrite_failed", Counter::DropMalformed),
        ("no_flow", Counter::DropNoFlow),
        ("arp_standby", Counter::ArpSuppressed),
        ("not_syn", Counter::DropNotSyn),
        ("ip_header", Counter::DropIpHeader),
        ("ip_length", Counter::DropIpLength),
        ("ttl_zero", Counter::DropTtl),
        ("tcp_header", Counter::DropTcpHeader),
        ("tcp_flags", Counter::DropTcpFlags),
        ("udp_length", Counter::DropUdpLength),
        ("vlan_tagged", Counter::DropVlan),
        ("conntrack_full", Counter::DropCtFull),
        ("source_not_allowed", Counter::DropSource),
        ("sctp_header", Counter::DropSctpHeader),
    ] {
        counter(
            "ferrolb_datapath_drops_total",
            "Packets the datapath dropped, by reason.",
            &[("reason", s(reason))],
            c(idx),
        );
    }
    for (reason, idx) in [
        ("no_route", Counter::FallbackNoRoute),
        ("forwarding_disabled", Counter::FallbackFwdDisabled),
        ("unreachable", Counter::FallbackUnreachable),
        ("fragmentation_needed", Counter::FallbackFragNeeded),
        ("ttl_exceeded", Counter::FallbackTtl),
        ("other", Counter::FallbackOther),
    ] {
        counter(
            "ferrolb_datapath_fallbacks_total",
            "Rewritten packets the datapath handed to the kernel stack instead of forwarding them, by the FIB's reason (no_route: no unicast route, or a local destination; forwarding_disabled: forwarding is off on the ingress interface and the stack drops them). Service and endpoint statistics count only forwarded packets.",
            &[("reason", s(reason))],
            c(idx),
        );
    }
    counter(
        "ferrolb_conntrack_created_total",
        "Flows created by the datapath.",
        &[],
        c(Counter::CtCreated),
    );
    counter(
        "ferrolb_conntrack_handshakes_completed_total",
        "Flows confirmed and moved from the half-open table to the conntrack table: TCP and SCTP handshakes completed, DNAT pick-ups confirmed, UDP and ICMP echo flows answered and continued.",
        &[],
        c(Counter::CtPromoted),
    );
    counter(
        "ferrolb_sctp_tag_ignored_total",
        "SCTP chunks that would change an association's state (ABORT, SHUTDOWN, INIT ACK, COOKIE ACK) but carried another verification tag: forwarded, the state unchanged.",
        &[],
        c(Counter::SctpTagIgnored),
    );
    counter(
        "ferrolb_icmp_errors_translated_total",
        "ICMP errors about tracked flows translated back to the sender.",
        &[],
        c(Counter::IcmpErrTranslated),
    );
    counter(
        "ferrolb_nat_port_hard_allocations_total",
        "Source-NAT port allocations that needed more than 8 probes (a pool filling up).",
        &[],
        c(Counter::NatHard),
    );
    counter(
        "ferrolb_nat_port_halfopen_takeovers_total",
        "Source-NAT ports taken from half-open flows idle for seconds while their pool was under pressure (a SYN flood).",
        &[],
        c(Counter::HalfOpenTakeover),
    );
    counter(
        "ferrolb_tcp_state_changes_ignored_total",
        "RSTs and FINs outside the tracked sequence window (forwarded, the flow's state left as it was), and packets (SYNs, mostly) dropped because another CPU was replacing the dead flow they matched at that moment for a packet of the same 4-tuple.",
        &[],
        c(Counter::TcpStateIgnored),
    );
    counter(
        "ferrolb_tcp_out_of_window_total",
        "TCP segments outside the tracked sequence window (forwarded, not used to track the flow).",
        &[],
        c(Counter::TcpOutOfWindow),
    );
    counter(
        "ferrolb_nat_port_takeovers_total",
        "Source-NAT ports taken over from expired flows that still held them.",
        &[],
        c(Counter::NatTakeover),
    );
    for (pool, n) in &d.census.nat_pools {
        let l = [
            ("protocol", pool.protocol.to_string()),
            ("source", pool.source.to_string()),
            ("endpoint", pool.endpoint.to_string()),
            ("endpoint_port", pool.port.to_string()),
        ];
        gauge(
            "ferrolb_nat_ports_in_use",
            "Source-NAT ports held by live flows, per pool (translated source, endpoint, endpoint port; at the last collector pass).",
            &l,
            *n as f64,
        );
        gauge(
            "ferrolb_nat_ports_fill_ratio",
            "Source-NAT ports in use over the 64512 a pool has (new flows to it fail near 1).",
            &l,
            *n as f64 / f64::from(ferrolb_bpf::maps::NAT_PORTS),
        );
    }
    counter(
        "ferrolb_nd_answered_total",
        "IPv6 neighbour solicitations for VIPs answered by the datapath.",
        &[],
        c(Counter::NdAnswered),
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
        counter(
            "ferrolb_conntrack_events_total",
            "Conntrack events read from the datapath ring buffer, by kind.",
            &[("kind", s(k))],
            m.events[i].load(Ordering::Relaxed),
        );
    }
    counter(
        "ferrolb_conntrack_events_lost_total",
        "Conntrack events lost because the ring buffer was full.",
        &[],
        c(Counter::EventsLost),
    );
    if let Ok(api) = m.api.lock() {
        for ((method, route, status), n) in api.iter() {
            counter(
                "ferrolb_api_requests_total",
                "REST requests by method, route and status.",
                &[
                    ("method", method.clone()),
                    ("route", route.clone()),
                    ("status", status.to_string()),
                ],
                *n,
            );
        }
    }
    {
        use crate::listen::Refusal;
        let a = &m.api_conns;
        gauge(
            "ferrolb_api_connections",
            "REST API connections open (HTTP and HTTPS, TLS handshakes included).",
            &[],
            a.open.load(Ordering::Relaxed) as f64,
        );
        for r in [Refusal::Total, Refusal::PerSource] {
            counter(
                "ferrolb_api_connections_refused_total",
                "REST API connections closed at accept, by the limit they met (--api-max-connections, --api-max-connections-per-source).",
                &[("reason", s(r.label()))],
                a.refused(r),
            );
        }
        counter(
            "ferrolb_api_connections_idle_closed_total",
            "REST API connections closed after carrying nothing for --api-idle-timeout.",
            &[],
            a.idle_closed.load(Ordering::Relaxed),
        );
    }
    for (task, n) in m.task_restarts() {
        counter(
            "ferrolb_task_restarts_total",
            "Agent tasks that failed and were restarted, by task.",
            &[("task", s(task))],
            n,
        );
    }
    counter(
        "ferrolb_fib_cache_invalidations_total",
        "Times the datapath's cached FIB answers were invalidated because the kernel reported route, rule, neighbour or link changes.",
        &[],
        crate::fib::INVALIDATIONS.load(std::sync::atomic::Ordering::Relaxed),
    );
    let free = crate::fib::PORTS_FREE.load(std::sync::atomic::Ordering::Relaxed);
    for (family, bit) in [
        ("ipv4", ferrolb_bpf::maps::FIB_PORTS_FREE_V4),
        ("ipv6", ferrolb_bpf::maps::FIB_PORTS_FREE_V6),
    ] {
        gauge(
            "ferrolb_fib_cache_by_addresses",
            "1 when the datapath's FIB cache keys a family's questions by addresses only (no policy rule selects on ports and multipath hashes addresses only), so new connections between known addresses are answered from it.",
            &[("family", s(family))],
            if free & bit != 0 { 1.0 } else { 0.0 },
        );
    }
    gauge(
        "ferrolb_build_info",
        "Build information.",
        &[("version", s(env!("CARGO_PKG_VERSION")))],
        1.0,
    );
}
