//! The domain model: what a load-balancing rule is, in ferrolb's own terms. No loxilb
//! spellings (those live in `api::models`, the REST layer's wire types) and no on-disk format
//! (that is `store::disk`, versioned on its own): a change to either cannot change the other.

use std::fmt;
use std::net::IpAddr;

/// Endpoints per rule (the datapath's `FLB_MAX_ENDPOINTS`).
pub const MAX_ENDPOINTS: usize = ferrolb_bpf::maps::MAX_ENDPOINTS;
/// Ceiling of a rule's inactivity timeout (loxilb's too).
pub const MAX_TIMEOUT_S: u32 = 86_400;
/// Allowed source prefixes per rule (`allowedSources`).
pub const MAX_SOURCES: usize = 1024;
/// The HA instance of a rule whose name does not give one.
pub const DEFAULT_INSTANCE: &str = "llb-inst0";

/// A request that cannot be applied, with the field it is about (named as the caller wrote
/// it) and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> FieldError {
        FieldError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{}: {}", self.field, self.reason)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
    /// Single-homed SCTP (an association is one flow; multihoming is not supported).
    Sctp,
}

impl Protocol {
    pub const ALL: [Protocol; 4] = [Protocol::Tcp, Protocol::Udp, Protocol::Icmp, Protocol::Sctp];

    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
            Protocol::Sctp => "sctp",
        }
    }

    /// Connection-oriented: tracked through a handshake and a close (TCP, SCTP).
    pub fn has_handshake(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Sctp)
    }

    pub fn from_name(s: &str) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| p.name() == s)
    }

    /// The IP protocol number (the datapath's key).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => ferrolb_bpf::maps::PROTO_TCP,
            Protocol::Udp => ferrolb_bpf::maps::PROTO_UDP,
            Protocol::Icmp => ferrolb_bpf::maps::PROTO_ICMP,
            Protocol::Sctp => ferrolb_bpf::maps::PROTO_SCTP,
        }
    }

    pub fn from_number(n: u8) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| p.number() == n)
    }

    /// Inactivity timeout of a rule that sets none (seconds).
    pub fn default_timeout_s(self) -> u32 {
        match self {
            Protocol::Tcp | Protocol::Sctp => 240,
            _ => 20,
        }
    }
}

/// How a new flow picks its endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Selection {
    RoundRobin,
    /// Maglev consistent hashing of the flow's 5-tuple.
    Hash,
    /// Weighted (the weight is the share).
    Priority,
    /// The same client address goes to the same endpoint while it keeps coming.
    Persist,
    LeastConnections,
}

impl Selection {
    pub const ALL: [Selection; 5] = [
        Selection::RoundRobin,
        Selection::Hash,
        Selection::Priority,
        Selection::Persist,
        Selection::LeastConnections,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Selection::RoundRobin => "round-robin",
            Selection::Hash => "hash",
            Selection::Priority => "priority",
            Selection::Persist => "persist",
            Selection::LeastConnections => "least-connections",
        }
    }

    pub fn from_name(s: &str) -> Option<Selection> {
        Selection::ALL.into_iter().find(|x| x.name() == s)
    }

    /// The datapath's selection code.
    pub fn code(self) -> u8 {
        match self {
            Selection::RoundRobin => 0,
            Selection::Hash => 1,
            Selection::Priority => 2,
            Selection::Persist => 3,
            Selection::LeastConnections => 4,
        }
    }

    pub fn from_code(c: u8) -> Option<Selection> {
        Selection::ALL.into_iter().find(|x| x.code() == c)
    }
}

/// How addresses are translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NatMode {
    /// Destination only: the endpoint sees the client's address.
    Dnat,
    /// Source becomes this node's address toward the endpoint.
    OneArm,
    /// Source becomes the VIP.
    FullNat,
}

impl NatMode {
    pub const ALL: [NatMode; 3] = [NatMode::Dnat, NatMode::OneArm, NatMode::FullNat];

    pub fn name(self) -> &'static str {
        match self {
            NatMode::Dnat => "dnat",
            NatMode::OneArm => "onearm",
            NatMode::FullNat => "fullnat",
        }
    }

    pub fn from_name(s: &str) -> Option<NatMode> {
        NatMode::ALL.into_iter().find(|x| x.name() == s)
    }

    /// The datapath's mode code.
    pub fn code(self) -> u8 {
        match self {
            NatMode::Dnat => ferrolb_bpf::maps::MODE_DNAT,
            NatMode::OneArm => ferrolb_bpf::maps::MODE_ONEARM,
            NatMode::FullNat => ferrolb_bpf::maps::MODE_FULLNAT,
        }
    }

    pub fn from_code(c: u8) -> Option<NatMode> {
        NatMode::ALL.into_iter().find(|x| x.code() == c)
    }
}

/// A rule's identity: external IP, port range, protocol, block, host.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleKey {
    pub external_ip: IpAddr,
    pub port: u16,
    /// 0: a single port.
    pub port_max: u16,
    pub protocol: Protocol,
    pub block: u32,
    pub host: String,
}

impl fmt::Display for RuleKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.external_ip, self.port)?;
        if self.port_max > self.port {
            write!(f, "-{}", self.port_max)?;
        }
        write!(f, "/{}", self.protocol.name())?;
        if self.block != 0 {
            write!(f, " block {}", self.block)?;
        }
        if !self.host.is_empty() {
            write!(f, " host {}", self.host)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EndpointSpec {
    pub ip: IpAddr,
    /// 0: the port the client used.
    pub target_port: u16,
    pub weight: u16,
}

/// How an endpoint is probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProbeKind {
    /// Never probed: always active.
    None,
    /// ICMP echo.
    Ping,
    /// A TCP connect (then request/response when given).
    Tcp,
    /// A UDP datagram: an ICMP port-unreachable is down; silence is up unless a response is
    /// expected.
    Udp,
    /// `HEAD /<request>` over HTTP/1.1: status 200 is up.
    Http,
    /// The same over TLS (the certificate is not checked: endpoints are addressed by IP).
    Https,
    /// An SCTP INIT (raw socket: no SCTP stack needed here): an INIT ACK is up (the
    /// association is aborted at once), an ABORT or silence is down.
    Sctp,
}

impl ProbeKind {
    pub const ALL: [ProbeKind; 7] = [
        ProbeKind::None,
        ProbeKind::Ping,
        ProbeKind::Tcp,
        ProbeKind::Udp,
        ProbeKind::Http,
        ProbeKind::Https,
        ProbeKind::Sctp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ProbeKind::None => "none",
            ProbeKind::Ping => "ping",
            ProbeKind::Tcp => "tcp",
            ProbeKind::Udp => "udp",
            ProbeKind::Http => "http",
            ProbeKind::Https => "https",
            ProbeKind::Sctp => "sctp",
        }
    }

    pub fn from_name(s: &str) -> Option<ProbeKind> {
        ProbeKind::ALL.into_iter().find(|k| k.name() == s)
    }

    /// The probe of a rule that names none (loxilb's defaults).
    pub fn default_for(p: Protocol) -> ProbeKind {
        match p {
            Protocol::Tcp => ProbeKind::Tcp,
            Protocol::Udp => ProbeKind::Udp,
            Protocol::Icmp => ProbeKind::Ping,
            Protocol::Sctp => ProbeKind::Sctp,
        }
    }

    /// Whether the probe talks to a port.
    pub fn has_port(self) -> bool {
        !matches!(self, ProbeKind::None | ProbeKind::Ping)
    }
}

/// Probe interval when a rule gives none (`probeTimeout` 0), seconds.
pub const DEFAULT_PROBE_INTERVAL_S: u32 = 1;
/// Consecutive failures before an endpoint is inactive when a rule gives none.
pub const DEFAULT_PROBE_FALL: u32 = 2;
/// Consecutive successes before an inactive endpoint is active again.
pub const PROBE_RISE: u32 = 2;
/// Longest probe interval accepted (seconds).
pub const MAX_PROBE_INTERVAL_S: u32 = 3600;
/// Most consecutive failures accepted (loxilb's ceiling).
pub const MAX_PROBE_RETRIES: u32 = 100;

/// Endpoint health checking as requested.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Probe {
    /// Empty: the default for the rule's protocol.
    pub kind: String,
    /// 0: the endpoint's target port.
    pub port: u16,
    pub request: String,
    pub response: String,
    pub interval_s: u32,
    pub retries: u32,
}

/// What a rule does with its traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub selection: Selection,
    pub nat: NatMode,
    /// Advertise the VIP over BGP.
    pub bgp: bool,
    /// Probe the endpoints.
    pub monitor: bool,
    /// 0: the protocol's default.
    pub inactive_timeout_s: u32,
    pub managed: bool,
    pub probe: Probe,
    pub security: u32,
    /// `<service>:<HA instance>`; may be empty.
    pub name: String,
    pub private_ip: String,
    pub proxy_protocol_v2: bool,
    pub egress: bool,
    pub snat: bool,
    /// Sources that may open flows (network addresses, sorted, no duplicates); empty: every
    /// source. Prefixes of the other family than the rule's VIP are kept (and shown) but
    /// match nothing.
    pub allowed_sources: Vec<ipnet::IpNet>,
}

impl Service {
    /// The allowed prefixes of `family`'s addresses (the VIP's: the only ones a packet of the
    /// rule can come from).
    pub fn sources_of_family(&self, v6: bool) -> impl Iterator<Item = ipnet::IpNet> + '_ {
        self.allowed_sources
            .iter()
            .copied()
            .filter(move |n| matches!(n, ipnet::IpNet::V6(_)) == v6)
    }

    /// May a flow from `client` be open under this service?
    pub fn source_allowed(&self, client: IpAddr) -> bool {
        self.allowed_sources.is_empty() || self.allowed_sources.iter().any(|n| n.contains(&client))
    }

    /// The probe the endpoints of a rule of protocol `p` get, if any: `monitor` (or a
    /// probe type other than `none`, as loxilb) turns probing on; an empty type is the
    /// protocol's default.
    pub fn probe_kind(&self, p: Protocol) -> Option<ProbeKind> {
        let kind = match self.probe.kind.as_str() {
            "" => ProbeKind::default_for(p),
            k => ProbeKind::from_name(k)?,
        };
        let asked = self.monitor || !self.probe.kind.is_empty();
        if kind == ProbeKind::None || !asked {
            return None;
        }
        Some(kind)
    }

    /// The port a probe of endpoint `ep` talks to: `probeport`, else the endpoint's target
    /// port, else the rule's (first) port, which is where a target port of 0 sends traffic.
    pub fn probe_port(&self, rule_port: u16, ep: &EndpointSpec) -> u16 {
        [self.probe.port, ep.target_port, rule_port]
            .into_iter()
            .find(|p| *p != 0)
            .unwrap_or(0)
    }

    /// The HA instance the rule belongs to: its name after the last `:`.
    pub fn instance(&self) -> &str {
        instance_of(&self.name)
    }
}

/// The HA instance named by a rule name (`svc:instance`), [`DEFAULT_INSTANCE`] without one.
pub fn instance_of(name: &str) -> &str {
    name.rsplit_once(':')
        .map(|(_, i)| i)
        .filter(|i| !i.is_empty())
        .unwrap_or(DEFAULT_INSTANCE)
}

/// What a change request does with the endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Oper {
    /// Create, or replace the rule's service and endpoints.
    Replace,
    /// Add endpoints to an existing rule.
    Attach,
    /// Remove endpoints from an existing rule.
    Detach,
}

/// A validated change request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSpec {
    pub key: RuleKey,
    pub service: Service,
    pub endpoints: Vec<EndpointSpec>,
    pub oper: Oper,
}

/// A full-NAT round-robin service for tests, probing as asked.
#[cfg(test)]
pub(crate) fn test_service(monitor: bool, kind: &str) -> Service {
    Service {
        selection: Selection::RoundRobin,
        nat: NatMode::FullNat,
        bgp: false,
        monitor,
        inactive_timeout_s: 0,
        managed: false,
        probe: Probe {
            kind: kind.into(),
            ..Probe::default()
        },
        security: 0,
        name: String::new(),
        private_ip: String::new(),
        proxy_protocol_v2: false,
        egress: false,
        snat: false,
        allowed_sources: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(monitor: bool, kind: &str) -> Service {
        test_service(monitor, kind)
    }

    #[test]
    fn monitor_or_a_probe_type_turns_probing_on() {
        // kube-loxilb's body: Monitor true, empty probetype -> the protocol's default.
        assert_eq!(
            service(true, "").probe_kind(Protocol::Tcp),
            Some(ProbeKind::Tcp)
        );
        assert_eq!(
            service(true, "").probe_kind(Protocol::Udp),
            Some(ProbeKind::Udp)
        );
        assert_eq!(
            service(true, "").probe_kind(Protocol::Icmp),
            Some(ProbeKind::Ping)
        );
        assert_eq!(service(false, "").probe_kind(Protocol::Tcp), None);
        // An explicit type forces it (as loxilb); none turns it off.
        assert_eq!(
            service(false, "http").probe_kind(Protocol::Tcp),
            Some(ProbeKind::Http)
        );
        assert_eq!(service(true, "none").probe_kind(Protocol::Tcp), None);
    }

    #[test]
    fn names_and_codes_round_trip() {
        for s in Selection::ALL {
            assert_eq!(Selection::from_name(s.name()), Some(s));
            assert_eq!(Selection::from_code(s.code()), Some(s));
        }
        for m in NatMode::ALL {
            assert_eq!(NatMode::from_name(m.name()), Some(m));
            assert_eq!(NatMode::from_code(m.code()), Some(m));
        }
        for p in Protocol::ALL {
            assert_eq!(Protocol::from_name(p.name()), Some(p));
            assert_eq!(Protocol::from_number(p.number()), Some(p));
        }
        for k in ProbeKind::ALL {
            assert_eq!(ProbeKind::from_name(k.name()), Some(k));
        }
        assert_eq!(instance_of("default_svc:inst1"), "inst1");
        assert_eq!(instance_of("svc"), DEFAULT_INSTANCE);
        assert_eq!(instance_of("svc:"), DEFAULT_INSTANCE);
    }
}
