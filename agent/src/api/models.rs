//! The wire types of the loxilb-compatible REST API and the parser that turns a request body
//! into a validated [`RuleSpec`].
//!
//! Parsing is done by hand from a `serde_json::Value`, not with derived `Deserialize`, so that
//! keys match case-insensitively (kube-loxilb sends `BGP` and `Monitor`), unknown keys are
//! ignored, absent keys are zero, and every error names the field and the reason
//! (`serviceArguments.port: must be 1..=65535, got 0`). Replies use loxilb's exact spelling.

use std::collections::HashSet;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::lb::FlowView;
use crate::model::{
    EndpointSpec, MAX_PROBE_INTERVAL_S, MAX_PROBE_RETRIES, NatMode, Oper, Probe, ProbeKind,
    Protocol, RuleKey, RuleSpec, Selection, Service,
};
pub use crate::model::{FieldError, MAX_ENDPOINTS, MAX_SOURCES, MAX_TIMEOUT_S};

/// Longest rule name, probe request and probe response (bytes).
pub const MAX_TEXT: usize = 256;
/// Longest probe type (`http`, `https`, ...).
pub const MAX_PROBE_TYPE: usize = 16;
/// Longest `privateIP` (kept and echoed, not used).
pub const MAX_PRIVATE_IP: usize = 64;
/// Longest HA instance name (roles, BFD sessions).
pub const MAX_INSTANCE: usize = 64;
use crate::rules::Rule;

/// A protocol as loxilb spells it in bodies and paths (any case).
pub fn parse_protocol(s: &str, field: &str) -> Result<Protocol, FieldError> {
    let lower = s.to_ascii_lowercase();
    match Protocol::from_name(&lower) {
        Some(p) => Ok(p),
        None => Err(FieldError::new(
            field,
            format!("unknown protocol '{lower}' (tcp, udp, sctp, icmp)"),
        )),
    }
}

/// A rule in loxilb's reply shape; `stats(slot)` gives an endpoint's (packets, bytes).
pub fn lb_entry(r: &Rule, stats: impl Fn(u8) -> (u64, u64), warnings: Vec<String>) -> LbEntry {
    let s = &r.service;
    LbEntry {
        service_arguments: LbServiceArgs {
            external_ip: r.key.external_ip.to_string(),
            private_ip: s.private_ip.clone(),
            port: r.key.port,
            port_max: r.key.port_max,
            protocol: r.key.protocol.name().into(),
            // loxilb's numbers are the datapath's codes.
            sel: s.selection.code(),
            mode: s.nat.code(),
            bgp: s.bgp,
            monitor: s.monitor,
            inactive_timeout: s.inactive_timeout_s,
            block: r.key.block,
            managed: s.managed,
            probetype: s.probe.kind.clone(),
            probeport: s.probe.port,
            probereq: s.probe.request.clone(),
            proberesp: s.probe.response.clone(),
            probe_timeout: s.probe.interval_s,
            probe_retries: s.probe.retries,
            security: s.security,
            name: s.name.clone(),
            oper: 0,
            host: r.key.host.clone(),
            proxyprotocolv2: s.proxy_protocol_v2,
            egress: s.egress,
            snat: s.snat,
        },
        secondary_ips: vec![],
        allowed_sources: s
            .allowed_sources
            .iter()
            .map(|n| serde_json::json!({ "prefix": n.to_string() }))
            .collect(),
        endpoints: r
            .endpoints
            .iter()
            .map(|e| {
                let (packets, bytes) = stats(e.slot);
                LbEndpoint {
                    endpoint_ip: e.spec.ip.to_string(),
                    target_port: e.spec.target_port,
                    weight: e.spec.weight,
                    state: if e.down { "inactive" } else { "active" }.into(),
                    counter: format!("{packets}:{bytes}"),
                    snat_ip: (s.nat == NatMode::OneArm)
                        .then(|| e.snat.map(|a| a.to_string()))
                        .flatten(),
                }
            })
            .collect(),
        warnings,
    }
}

/// A flow in loxilb's conntrack reply shape.
pub fn ct_entry(f: &FlowView) -> CtEntry {
    CtEntry {
        destination_ip: f.vip.ip().to_string(),
        source_ip: f.client.ip().to_string(),
        destination_port: f.vip.port(),
        source_port: f.client.port(),
        protocol: f.protocol.clone(),
        conntrack_state: f.state.into(),
        // Socket-address notation: "[v6]:port" keeps IPv6 unambiguous.
        conntrack_act: format!("{}-{}->{}", f.nat.name(), f.nat_source, f.nat_destination),
        packets: f.packets,
        bytes: f.bytes,
        serv_name: f.service.clone(),
        origin: f.origin,
        synced: f.synced,
    }
}

/// Case-insensitive view of a JSON object.
struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: String,
}

impl<'a> Obj<'a> {
    fn new(v: &'a Value, path: &str) -> Result<Obj<'a>, FieldError> {
        match v {
            Value::Object(map) => Ok(Obj {
                map,
                path: path.to_string(),
            }),
            other => Err(FieldError::new(
                path,
                format!("must be an object, got {}", kind(other)),
            )),
        }
    }

    fn field(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        }
    }

    fn get(&self, name: &str) -> Option<&'a Value> {
        field(self.map, name)
    }

    fn int(&self, name: &str, min: i64, max: i64) -> Result<Option<i64>, FieldError> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        let field = self.field(name);
        let n = match v {
            Value::Number(n) => n
                .as_i64()
                .ok_or_else(|| FieldError::new(&field, format!("must be an integer, got {n}")))?,
            other => {
                return Err(FieldError::new(
                    &field,
                    format!("must be an integer, got {}", kind(other)),
                ));
            }
        };
        if n < min || n > max {
            return Err(FieldError::new(
                &field,
                format!("must be {min}..={max}, got {n}"),
            ));
        }
        Ok(Some(n))
    }

    fn string(&self, name: &str) -> Result<Option<&'a str>, FieldError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(other) => Err(FieldError::new(
                self.field(name),
                format!("must be a string, got {}", kind(other)),
            )),
        }
    }

    /// A string of at most `max` bytes (what is stored and echoed back is bounded).
    fn string_max(&self, name: &str, max: usize) -> Result<Option<&'a str>, FieldError> {
        let v = self.string(name)?;
        if let Some(s) = v
            && s.len() > max
        {
            return Err(FieldError::new(
                self.field(name),
                format!("at most {max} bytes, got {}", s.len()),
            ));
        }
        Ok(v)
    }

    fn boolean(&self, name: &str) -> Result<bool, FieldError> {
        match self.get(name) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(FieldError::new(
                self.field(name),
                format!("must be true or false, got {}", kind(other)),
            )),
        }
    }

    fn array(&self, name: &str) -> Result<Option<&'a Vec<Value>>, FieldError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(other) => Err(FieldError::new(
                self.field(name),
                format!("must be a list, got {}", kind(other)),
            )),
        }
    }
}

/// Parses a request body as JSON. Keys are matched without regard to case (as loxilb's Go
/// decoder does), so one object holding two keys that differ only in case (`"port"` and
/// `"Port"`) is ambiguous: refused, naming both, instead of one silently winning.
pub fn parse_json(body: &[u8]) -> Result<Value, FieldError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| FieldError::new("", format!("invalid JSON: {e}")))?;
    check_keys(&v, "")?;
    Ok(v)
}

/// [`parse_json`] for a body that must be an object.
pub fn body_object(body: &[u8]) -> Result<Map<String, Value>, FieldError> {
    match parse_json(body)? {
        Value::Object(o) => Ok(o),
        other => Err(FieldError::new(
            "",
            format!("body must be an object, got {}", kind(&other)),
        )),
    }
}

/// Every object in `v` (nested ones too) has keys that differ in more than case.
fn check_keys(v: &Value, path: &str) -> Result<(), FieldError> {
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match v {
        Value::Object(m) => {
            let mut seen: std::collections::HashMap<String, &str> =
                std::collections::HashMap::with_capacity(m.len());
            for (k, child) in m {
                if let Some(first) = seen.insert(k.to_ascii_lowercase(), k) {
                    return Err(FieldError::new(
                        join(k),
                        format!(
                            "given twice, as '{first}' and '{k}' (keys are not case-sensitive)"
                        ),
                    ));
                }
                check_keys(child, &join(k))?;
            }
            Ok(())
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                check_keys(child, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// A field of a JSON object, its name matched without regard to case; `null` is absent.
pub fn field<'a>(o: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    o.get(name)
        .or_else(|| {
            o.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
        })
        .filter(|v| !v.is_null())
}

/// An IP address exactly as written: no surrounding spaces, no zone, nothing after it.
pub fn strict_ip(s: &str, name: &str) -> Result<IpAddr, FieldError> {
    s.parse()
        .map_err(|_| FieldError::new(name, format!("'{s}' is not an IP address")))
}

pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn parse_ip(s: &str, field: &str) -> Result<IpAddr, FieldError> {
    let ip = strict_ip(s, field)?;
    if let IpAddr::V6(v6) = ip {
        if v6.to_ipv4_mapped().is_some() {
            return Err(FieldError::new(
                field,
                format!("{ip} is an IPv4-mapped IPv6 address: write the IPv4 address"),
            ));
        }
        if v6.is_unicast_link_local() {
            return Err(FieldError::new(
                field,
                format!(
                    "{ip} is link-local (fe80::/10), which needs an interface: use a global or unique-local address"
                ),
            ));
        }
    }
    if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
        return Err(FieldError::new(
            field,
            format!("{ip} cannot be used here (unspecified, loopback or multicast)"),
        ));
    }
    Ok(ip)
}

/// Parses and validates a `LoadbalanceEntry` body.
pub fn parse_rule(body: &[u8]) -> Result<RuleSpec, FieldError> {
    let v = parse_json(body)?;
    let top = Obj::new(&v, "")?;
    let sa_v = top.get("serviceArguments").ok_or_else(|| {
        FieldError::new("serviceArguments", "required (with externalIP and port)")
    })?;
    let sa = Obj::new(sa_v, "serviceArguments")?;

    let ext = sa
        .string("externalIP")?
        .ok_or_else(|| FieldError::new(sa.field("externalIP"), "required"))?;
    let external_ip = parse_ip(ext, &sa.field("externalIP"))?;
    let port = sa
        .int("port", 1, 65535)?
        .ok_or_else(|| FieldError::new(sa.field("port"), "required"))? as u16;
    let port_max = sa.int("portMax", 0, 65535)?.unwrap_or(0) as u16;
    if port_max != 0 && port_max < port {
        return Err(FieldError::new(
            sa.field("portMax"),
            format!("must be 0 or >= port ({port}), got {port_max}"),
        ));
    }
    let protocol = match sa.string("protocol")? {
        None | Some("") => Protocol::Tcp,
        Some(p) => parse_protocol(p, &sa.field("protocol"))?,
    };
    if protocol == Protocol::Icmp && port_max != 0 {
        return Err(FieldError::new(
            sa.field("portMax"),
            "icmp rules have no port range",
        ));
    }
    let sel = sa.int("sel", i64::MIN, i64::MAX)?.unwrap_or(0);
    let selection = match sel {
        0..=4 => Selection::from_code(sel as u8).unwrap_or(Selection::RoundRobin),
        5 | 6 => {
            return Err(FieldError::new(
                sa.field("sel"),
                format!(
                    "{sel} (n2/n3 L7 selection) is not supported; use 0 rr, 1 hash, 2 priority, 3 persist or 4 lc"
                ),
            ));
        }
        _ => {
            return Err(FieldError::new(
                sa.field("sel"),
                format!(
                    "{sel} is not a selection algorithm; use 0 rr, 1 hash, 2 priority, 3 persist or 4 lc"
                ),
            ));
        }
    };
    let mode = sa.int("mode", i64::MIN, i64::MAX)?.unwrap_or(0);
    let nat = match mode {
        0..=2 => NatMode::from_code(mode as u8).unwrap_or(NatMode::Dnat),
        3 => {
            return Err(FieldError::new(
                sa.field("mode"),
                "3 (dsr) is not supported yet; use 0 default (DNAT), 1 onearm or 2 fullnat",
            ));
        }
        4 | 5 => {
            return Err(FieldError::new(
                sa.field("mode"),
                format!(
                    "{mode} ({}) is not supported; use 0 default (DNAT), 1 onearm or 2 fullnat",
                    if mode == 4 { "fullproxy" } else { "hostonearm" }
                ),
            ));
        }
        _ => {
            return Err(FieldError::new(
                sa.field("mode"),
                format!("{mode} is not a NAT mode; use 0 default (DNAT), 1 onearm or 2 fullnat"),
            ));
        }
    };
    let timeout = sa
        .int("inactiveTimeOut", 0, i64::from(MAX_TIMEOUT_S))?
        .unwrap_or(0) as u32;
    let block = sa.int("block", 0, i64::from(u32::MAX))?.unwrap_or(0) as u32;
    let oper = match sa.int("oper", 0, 2)?.unwrap_or(0) {
        1 => Oper::Attach,
        2 => Oper::Detach,
        _ => Oper::Replace,
    };
    let host = sa.string("host")?.unwrap_or("").to_string();
    if !host.is_empty() {
        return Err(FieldError::new(
            sa.field("host"),
            "host-based (L7) rules are not supported; leave it empty",
        ));
    }
    let probe_port = sa.int("probeport", 0, 65535)?.unwrap_or(0) as u16;
    let probe_kind = sa
        .string_max("probetype", MAX_PROBE_TYPE)?
        .unwrap_or("")
        .to_ascii_lowercase();
    if !probe_kind.is_empty() && ProbeKind::from_name(&probe_kind).is_none() {
        return Err(FieldError::new(
            sa.field("probetype"),
            format!(
                "unknown probe type '{probe_kind}' (none, ping, tcp, udp, http, https, or empty for the protocol's default)"
            ),
        ));
    }
    let service = Service {
        selection,
        nat,
        bgp: sa.boolean("bgp")?,
        monitor: sa.boolean("monitor")?,
        inactive_timeout_s: timeout,
        managed: sa.boolean("managed")?,
        probe: Probe {
            kind: probe_kind,
            port: probe_port,
            request: sa
                .string_max("probereq", MAX_TEXT)?
                .unwrap_or("")
                .to_string(),
            response: sa
                .string_max("proberesp", MAX_TEXT)?
                .unwrap_or("")
                .to_string(),
            interval_s: sa
                .int("probeTimeout", 0, i64::from(MAX_PROBE_INTERVAL_S))?
                .unwrap_or(0) as u32,
            retries: sa
                .int("probeRetries", 0, i64::from(MAX_PROBE_RETRIES))?
                .unwrap_or(0) as u32,
        },
        security: sa.int("security", 0, i64::from(u32::MAX))?.unwrap_or(0) as u32,
        name: sa.string_max("name", MAX_TEXT)?.unwrap_or("").to_string(),
        private_ip: sa
            .string_max("privateIP", MAX_PRIVATE_IP)?
            .unwrap_or("")
            .to_string(),
        proxy_protocol_v2: sa.boolean("proxyprotocolv2")?,
        egress: sa.boolean("egress")?,
        snat: sa.boolean("snat")?,
        allowed_sources: Vec::new(),
    };
    if service.proxy_protocol_v2 {
        return Err(FieldError::new(
            sa.field("proxyprotocolv2"),
            "PROXY protocol needs a proxy mode, which is not supported",
        ));
    }
    if service.egress || service.snat {
        return Err(FieldError::new(
            sa.field(if service.egress { "egress" } else { "snat" }),
            "egress/SNAT rules are not supported yet",
        ));
    }
    if let Some(a) = top.array("secondaryIPs")?
        && !a.is_empty()
    {
        return Err(FieldError::new(
            "secondaryIPs",
            "secondary IPs (SCTP multihoming) are not supported: an SCTP rule serves \
             single-homed associations (one address per side)",
        ));
    }
    let service = Service {
        allowed_sources: parse_sources(&top)?,
        ..service
    };

    let eps = top
        .array("endpoints")?
        .ok_or_else(|| FieldError::new("endpoints", "required (a list, may be empty)"))?;
    if eps.len() > MAX_ENDPOINTS {
        return Err(FieldError::new(
            "endpoints",
            format!(
                "at most {MAX_ENDPOINTS} endpoints per rule, got {}",
                eps.len()
            ),
        ));
    }
    let mut endpoints = Vec::with_capacity(eps.len());
    let mut seen = HashSet::new();
    for (i, e) in eps.iter().enumerate() {
        let o = Obj::new(e, &format!("endpoints[{i}]"))?;
        let ip_s = o
            .string("endpointIP")?
            .ok_or_else(|| FieldError::new(o.field("endpointIP"), "required"))?;
        let ip = parse_ip(ip_s, &o.field("endpointIP"))?;
        if ip.is_ipv6() != external_ip.is_ipv6() {
            return Err(FieldError::new(
                o.field("endpointIP"),
                format!(
                    "{ip} and externalIP {external_ip} are of different families: a rule forwards within one family (no NAT46/NAT64)"
                ),
            ));
        }
        let target_port = o.int("targetPort", 0, 65535)?.unwrap_or(0) as u16;
        let weight = o.int("weight", 0, 65535)?.unwrap_or(0) as u16;
        if !seen.insert((ip, target_port)) {
            return Err(FieldError::new(
                o.field("endpointIP"),
                format!("duplicate endpoint {ip}:{target_port}"),
            ));
        }
        endpoints.push(EndpointSpec {
            ip,
            target_port,
            weight,
        });
    }
    if port_max != 0 && u32::from(port_max) - u32::from(port) > 0 {
        for (i, e) in endpoints.iter().enumerate() {
            if e.target_port != 0 && u32::from(e.target_port) + u32::from(port_max - port) > 65535 {
                return Err(FieldError::new(
                    format!("endpoints[{i}].targetPort"),
                    "target port plus the rule's port range exceeds 65535",
                ));
            }
        }
    }
    check_probe(&sa, &service, protocol, port, &endpoints)?;
    Ok(RuleSpec {
        key: RuleKey {
            external_ip,
            port,
            port_max: if port_max == port { 0 } else { port_max },
            protocol,
            block,
            host,
        },
        service,
        endpoints,
        oper,
    })
}

/// `allowedSources`: `[{"prefix": "10.0.0.0/8"}, ...]` (Kubernetes'
/// `loadBalancerSourceRanges`). Host bits are dropped (`10.1.2.3/8` is `10.0.0.0/8`, as Go's
/// `net.ParseCIDR` reads it); duplicates are one; the result is sorted.
fn parse_sources(top: &Obj<'_>) -> Result<Vec<ipnet::IpNet>, FieldError> {
    let Some(list) = top.array("allowedSources")? else {
        return Ok(Vec::new());
    };
    if list.len() > MAX_SOURCES {
        return Err(FieldError::new(
            "allowedSources",
            format!(
                "at most {MAX_SOURCES} prefixes per rule, got {}",
                list.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        let o = Obj::new(v, &format!("allowedSources[{i}]")).map_err(|_| {
            FieldError::new(
                format!("allowedSources[{i}]"),
                format!(
                    "must be an object like {{\"prefix\": \"10.0.0.0/8\"}}, got {}",
                    kind(v)
                ),
            )
        })?;
        let field = o.field("prefix");
        let text = o
            .string("prefix")?
            .ok_or_else(|| FieldError::new(&field, "required (a CIDR such as 10.0.0.0/8)"))?;
        let net = match text.parse::<ipnet::IpNet>() {
            Ok(n) => n.trunc(),
            Err(_) if text.parse::<IpAddr>().is_ok() => {
                let len = if text.contains(':') { 128 } else { 32 };
                return Err(FieldError::new(
                    &field,
                    format!("'{text}' has no prefix length: write {text}/{len} for one address"),
                ));
            }
            Err(_) => {
                return Err(FieldError::new(
                    &field,
                    format!(
                        "'{text}' is not a CIDR (address/length, such as 10.0.0.0/8 or 2001:db8::/32)"
                    ),
                ));
            }
        };
        out.push(net);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Probe fields that cannot be probed: a port given to a probe without one, or no port at all
/// for one that needs it.
fn check_probe(
    sa: &Obj<'_>,
    service: &Service,
    protocol: Protocol,
    port: u16,
    endpoints: &[EndpointSpec],
) -> Result<(), FieldError> {
    let explicit = ProbeKind::from_name(&service.probe.kind);
    if let Some(k) = explicit
        && !k.has_port()
        && service.probe.port != 0
    {
        return Err(FieldError::new(
            sa.field("probeport"),
            format!("a {} probe has no port; leave it 0", k.name()),
        ));
    }
    let Some(kind) = service.probe_kind(protocol) else {
        return Ok(());
    };
    if !kind.has_port() {
        return Ok(());
    }
    for (i, e) in endpoints.iter().enumerate() {
        if service.probe_port(port, e) == 0 {
            return Err(FieldError::new(
                sa.field("probeport"),
                format!(
                    "a {} probe needs a port: probeport, endpoints[{i}].targetPort and the rule's port are all 0",
                    kind.name()
                ),
            ));
        }
    }
    Ok(())
}

// --- replies (loxilb spelling) ----------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LbServiceArgs {
    #[serde(rename = "externalIP")]
    pub external_ip: String,
    #[serde(rename = "privateIP")]
    pub private_ip: String,
    pub port: u16,
    #[serde(rename = "portMax")]
    pub port_max: u16,
    pub protocol: String,
    pub sel: u8,
    pub mode: u8,
    pub bgp: bool,
    pub monitor: bool,
    #[serde(rename = "inactiveTimeOut")]
    pub inactive_timeout: u32,
    pub block: u32,
    pub managed: bool,
    pub probetype: String,
    pub probeport: u16,
    pub probereq: String,
    pub proberesp: String,
    #[serde(rename = "probeTimeout")]
    pub probe_timeout: u32,
    #[serde(rename = "probeRetries")]
    pub probe_retries: u32,
    pub security: u32,
    pub name: String,
    pub oper: u8,
    pub host: String,
    pub proxyprotocolv2: bool,
    pub egress: bool,
    pub snat: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LbEndpoint {
    #[serde(rename = "endpointIP")]
    pub endpoint_ip: String,
    #[serde(rename = "targetPort")]
    pub target_port: u16,
    pub weight: u16,
    pub state: String,
    pub counter: String,
    /// ferrolb: the source address one-arm traffic to this endpoint leaves from.
    #[serde(rename = "snatIP", default, skip_serializing_if = "Option::is_none")]
    pub snat_ip: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LbEntry {
    #[serde(rename = "serviceArguments")]
    pub service_arguments: LbServiceArgs,
    #[serde(rename = "secondaryIPs")]
    pub secondary_ips: Vec<Value>,
    #[serde(rename = "allowedSources")]
    pub allowed_sources: Vec<Value>,
    pub endpoints: Vec<LbEndpoint>,
    /// ferrolb: what an operator should know about this rule (e.g. one-arm flows that end
    /// at a failover).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LbList {
    #[serde(rename = "lbAttr")]
    pub lb_attr: Vec<LbEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CtEntry {
    #[serde(rename = "destinationIP")]
    pub destination_ip: String,
    #[serde(rename = "sourceIP")]
    pub source_ip: String,
    #[serde(rename = "destinationPort")]
    pub destination_port: u16,
    #[serde(rename = "sourcePort")]
    pub source_port: u16,
    pub protocol: String,
    #[serde(rename = "conntrackState")]
    pub conntrack_state: String,
    #[serde(rename = "conntrackAct")]
    pub conntrack_act: String,
    pub packets: u64,
    pub bytes: u64,
    #[serde(rename = "servName")]
    pub serv_name: String,
    /// ferrolb: the node id (`--self`) that created the flow.
    #[serde(default)]
    pub origin: u16,
    /// ferrolb: installed from a peer's sync stream (not created here).
    #[serde(default)]
    pub synced: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CtList {
    #[serde(rename = "ctAttr")]
    pub ct_attr: Vec<CtEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CiState {
    pub instance: String,
    pub state: String,
    pub vip: String,
    pub sync: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CiList {
    #[serde(rename = "Attr")]
    pub attr: Vec<CiState>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Version {
    pub version: String,
    #[serde(rename = "buildInfo")]
    pub build_info: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(body: &str) -> String {
        parse_rule(body.as_bytes()).unwrap_err().to_string()
    }

    const KUBE_LOXILB: &str = r#"{"serviceArguments":{"externalIP":"123.123.123.1","privateIP":"","port":80,
  "protocol":"tcp","sel":0,"mode":2,"BGP":true,"Monitor":false,"inactiveTimeOut":0,"block":0,
  "managed":true,"probetype":"","probeport":0,"probereq":"","proberesp":"",
  "name":"default_nginx-lb:llb-inst0"},"secondaryIPs":[],"allowedSources":[],
  "endpoints":[{"endpointIP":"192.168.80.10","targetPort":31234,"weight":1,"state":"","counter":""}]}"#;

    #[test]
    fn addresses_are_strict_and_keys_differing_in_case_are_refused() {
        let e = err(r#"{"serviceArguments":{"externalIP":"10.77.2.2 ","port":80}}"#);
        assert!(
            e.contains("serviceArguments.externalIP") && e.contains("'10.77.2.2 '"),
            "{e}"
        );
        let e = err(
            r#"{"serviceArguments":{"externalIP":"20.0.0.1","port":80},"endpoints":[{"endpointIP":" 10.0.0.1","targetPort":80}]}"#,
        );
        assert!(e.contains("endpoints[0].endpointIP"), "{e}");
        let e = err(r#"{"serviceArguments":{"externalIP":"20.0.0.1","port":1,"Port":70000}}"#);
        assert!(
            e.contains("serviceArguments.port") && e.contains("'Port'") && e.contains("'port'"),
            "{e}"
        );
        let e = err(
            r#"{"serviceArguments":{"externalIP":"20.0.0.1","port":80},"endpoints":[{"endpointIP":"10.0.0.1","targetPort":80,"TARGETPORT":81}]}"#,
        );
        assert!(e.contains("endpoints[0]."), "{e}");
        let e = err(
            r#"{"serviceArguments":{"externalIP":"20.0.0.1","port":80},"ServiceArguments":{}}"#,
        );
        assert!(e.contains("given twice"), "{e}");
        // The same body with one spelling of each key parses.
        let ok = parse_rule(br#"{"serviceArguments":{"externalIP":"20.0.0.1","Port":80},"endpoints":[{"endpointIP":"10.0.0.1","TargetPort":80}]}"#);
        assert!(ok.is_ok(), "{:?}", ok.err());
    }

    #[test]
    fn kube_loxilb_create_body_parses() {
        let r = parse_rule(KUBE_LOXILB.as_bytes()).unwrap();
        assert_eq!(r.key.external_ip.to_string(), "123.123.123.1");
        assert_eq!(r.key.port, 80);
        assert_eq!(r.key.protocol, Protocol::Tcp);
        assert_eq!(r.service.nat, NatMode::FullNat);
        assert!(r.service.bgp, "BGP matched case-insensitively");
        assert!(r.service.managed);
        assert_eq!(r.service.name, "default_nginx-lb:llb-inst0");
        assert_eq!(
            r.endpoints,
            vec![EndpointSpec {
                ip: "192.168.80.10".parse().unwrap(),
                target_port: 31234,
                weight: 1
            }]
        );
    }

    #[test]
    fn unknown_keys_are_ignored_and_absent_keys_are_zero() {
        let r = parse_rule(
            br#"{"serviceArguments":{"externalIP":"20.20.20.1","port":2020,"path_prefix":"/",
            "backend_protocol":"http","mtls_frontend":{"x":1}},"endpoints":[{"endpointIP":"31.31.31.1","targetPort":8080,"weight":1}]}"#,
        )
        .unwrap();
        assert_eq!(r.service.selection, Selection::RoundRobin);
        assert_eq!(r.oper, Oper::Replace);
        assert!(!r.service.managed);
        assert_eq!(r.key.protocol, Protocol::Tcp);
    }

    #[test]
    fn bad_input_names_the_field() {
        let base =
            |sa: &str, eps: &str| format!(r#"{{"serviceArguments":{{{sa}}},"endpoints":{eps}}}"#);
        let ep = r#"[{"endpointIP":"10.0.0.1","targetPort":80,"weight":1}]"#;
        let cases = [
            ("{", "invalid JSON"),
            ("[]", "must be an object"),
            (r#"{"endpoints":[]}"#, "serviceArguments: required"),
            (
                &base(r#""port":80"#, ep),
                "serviceArguments.externalIP: required",
            ),
            (
                &base(r#""externalIP":"1.2.3.4""#, ep),
                "serviceArguments.port: required",
            ),
            (
                &base(r#""externalIP":"1.2.3.4","port":80"#, "null"),
                "endpoints: required",
            ),
            (
                &base(r#""externalIP":"1.2.3.4","port":0"#, ep),
                "serviceArguments.port: must be 1..=65535, got 0",
            ),
            (
                &base(r#""externalIP":"1.2.3.4","port":65536"#, ep),
                "serviceArguments.port: must be 1..=65535, got 65536",
            ),
            (
                &base(r#""externalIP":"1.2.3.4","port":"80""#, ep),
                "serviceArguments.port: must be an integer, got a string",
            ),
            (
                &base(r#""externalIP":"1.2.3.999","port":80"#, ep),
                "serviceArguments.externalIP: '1.2.3.999' is not an IP address",
            ),
            (
                &base(r#""externalIP":"1.2.3.4","port":80,"sel":7"#, ep),
                "serviceArguments.sel: 7 is not a selection algorithm",
            ),
            (
                &base(r#""externalIP":"1.2.3.4","port":80,"sel":6"#, ep),
                "serviceArguments.sel: 6 (n2/n3",
            ),
            (
                &base(r#""externalIP":"1.2.3.4","port":80,"mode":-1"#, ep),
                "serviceArguments.mode: -1 is not a NAT mode",
            ),
            (
                &base(r#""externalIP":"1.2.3.4","port":80,"mode":3"#, ep),
                "serviceArguments.mode: 3 (dsr) is not supported yet",
            ),
            (
                &base(r#""externalIP":"1.2.3.4","port":80,"mode":4"#, ep),
                "serviceArguments.mode: 4 (fullproxy) is not supported",
            ),
            (
                &base(r#""externalIP":"1.2.3.4","port":80,"protocol":"dccp""#, ep),
                "serviceArguments.protocol: unknown protocol 'dccp' (tcp, udp, sctp, icmp)",
            ),
            (
                &base(r#""externalIP":"1.2.3.4","port":80,"probetype":"smtp""#, ep),
                "serviceArguments.probetype: unknown probe type 'smtp'",
            ),
            (
                &base(r#""externalIP":"1.2.3.4","port":80,"probeRetries":-1"#, ep),
                "serviceArguments.probeRetries: must be 0..=100",
            ),
            (
                &base(
                    r#""externalIP":"1.2.3.4","port":80,"probeTimeout":3601"#,
                    ep,
                ),
                "serviceArguments.probeTimeout: must be 0..=3600",
            ),
            (
                &base(
                    r#""externalIP":"1.2.3.4","port":80,"probetype":"ping","probeport":8080"#,
                    ep,
                ),
                "serviceArguments.probeport: a ping probe has no port",
            ),
            (
                &base(r#""externalIP":"1.2.3.4","port":80,"bgp":"yes""#, ep),
                "serviceArguments.bgp: must be true or false",
            ),
            (
                &base(
                    r#""externalIP":"1.2.3.4","port":80,"inactiveTimeOut":86401"#,
                    ep,
                ),
                "serviceArguments.inactiveTimeOut: must be 0..=86400",
            ),
            (
                &base(r#""externalIP":"1.2.3.4","port":80,"portMax":79"#, ep),
                "serviceArguments.portMax: must be 0 or >= port",
            ),
            (
                &base(
                    r#""externalIP":"1.2.3.4","port":80"#,
                    r#"[{"endpointIP":"10.0.0.1","targetPort":80},{"endpointIP":"10.0.0.1","targetPort":80}]"#,
                ),
                "endpoints[1].endpointIP: duplicate endpoint 10.0.0.1:80",
            ),
            (
                &base(
                    r#""externalIP":"1.2.3.4","port":80"#,
                    r#"[{"targetPort":80}]"#,
                ),
                "endpoints[0].endpointIP: required",
            ),
            (
                &base(
                    r#""externalIP":"1.2.3.4","port":80"#,
                    r#"[{"endpointIP":"x","targetPort":80}]"#,
                ),
                "endpoints[0].endpointIP: 'x' is not an IP address",
            ),
            (
                &base(
                    r#""externalIP":"1.2.3.4","port":80"#,
                    r#"[{"endpointIP":"10.0.0.1","targetPort":-5}]"#,
                ),
                "endpoints[0].targetPort: must be 0..=65535",
            ),
            (
                &base(r#""externalIP":"1.2.3.4","port":80"#, r#"{"a":1}"#),
                "endpoints: must be a list",
            ),
            (
                &base(r#""externalIP":"2001:db8::1","port":80"#, ep),
                "endpoints[0].endpointIP: 10.0.0.1 and externalIP 2001:db8::1 are of different families",
            ),
            (
                &base(r#""externalIP":"::ffff:1.2.3.4","port":80"#, ep),
                "serviceArguments.externalIP: ::ffff:1.2.3.4 is an IPv4-mapped IPv6 address",
            ),
            (
                &base(
                    r#""externalIP":"2001:db8::1","port":80"#,
                    r#"[{"endpointIP":"fe80::1"}]"#,
                ),
                "endpoints[0].endpointIP: fe80::1 is link-local",
            ),
        ];
        for (body, want) in cases {
            let got = err(body);
            assert!(
                got.starts_with(want) || got.contains(want),
                "{body}\n  got: {got}\n want: {want}"
            );
        }
        let many: Vec<String> = (0..33)
            .map(|i| format!(r#"{{"endpointIP":"10.0.1.{i}","targetPort":80,"weight":1}}"#))
            .collect();
        let body = base(
            r#""externalIP":"1.2.3.4","port":80"#,
            &format!("[{}]", many.join(",")),
        );
        assert_eq!(
            err(&body),
            "endpoints: at most 32 endpoints per rule, got 33"
        );
    }

    /// What a fuzzer would do, deterministically and in CI: mutated and truncated bodies and
    /// every field swapped for every JSON type must give Ok or a FieldError, never a panic.
    #[test]
    fn mutated_bodies_never_panic() {
        let base = KUBE_LOXILB.as_bytes();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let mut b = base.to_vec();
            for _ in 0..(next() % 4 + 1) {
                let i = (next() as usize) % b.len();
                match next() % 3 {
                    0 => b[i] = next() as u8,
                    1 => {
                        b.insert(i, b"{}[]\":,-0e9"[(next() % 11) as usize]);
                    }
                    _ => b.truncate(i.max(1)),
                }
            }
            let _ = parse_rule(&b);
        }
        let v: Value = serde_json::from_str(KUBE_LOXILB).unwrap();
        let keys: Vec<String> = v["serviceArguments"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        let subs = [
            json!(null),
            json!(true),
            json!(-1),
            json!(1e300),
            json!(18446744073709551615u64),
            json!("x"),
            json!([]),
            json!({}),
        ];
        for k in &keys {
            for sub in &subs {
                let mut m = v.clone();
                m["serviceArguments"][k] = sub.clone();
                let _ = parse_rule(m.to_string().as_bytes());
                let mut e = v.clone();
                e["endpoints"][0]["targetPort"] = sub.clone();
                e["endpoints"][0]["endpointIP"] = sub.clone();
                let _ = parse_rule(e.to_string().as_bytes());
            }
        }
    }

    #[test]
    fn reply_shapes_use_loxilb_spelling() {
        let e = LbEndpoint {
            endpoint_ip: "1.1.1.1".into(),
            target_port: 80,
            weight: 1,
            state: "active".into(),
            counter: "1:60".into(),
            snat_ip: None,
        };
        let v = serde_json::to_value(&e).unwrap();
        assert!(v.get("snatIP").is_none(), "only for one-arm endpoints");
        assert_eq!(v["endpointIP"], "1.1.1.1");
        assert_eq!(v["targetPort"], 80);
        assert_eq!(v["counter"], "1:60");
    }

    fn with_sources(sources: &str) -> String {
        format!(
            r#"{{"serviceArguments":{{"externalIP":"1.2.3.4","port":80}},
               "endpoints":[{{"endpointIP":"10.0.0.1","targetPort":80}}],
               "allowedSources":{sources}}}"#
        )
    }

    #[test]
    fn allowed_sources_are_read_as_networks_and_bad_ones_named() {
        let r = parse_rule(
            with_sources(
                r#"[{"prefix":"10.1.2.3/8"},{"prefix":"192.0.2.0/24"},{"Prefix":"10.0.0.0/8"},
                    {"prefix":"2001:db8::/32"}]"#,
            )
            .as_bytes(),
        )
        .unwrap();
        let got: Vec<String> = r
            .service
            .allowed_sources
            .iter()
            .map(|n| n.to_string())
            .collect();
        // Host bits dropped, duplicates one, sorted; the other family kept (matches nothing).
        assert_eq!(got, ["10.0.0.0/8", "192.0.2.0/24", "2001:db8::/32"]);
        assert!(r.service.source_allowed("10.200.0.1".parse().unwrap()));
        assert!(!r.service.source_allowed("11.0.0.1".parse().unwrap()));
        assert_eq!(r.service.sources_of_family(false).count(), 2);
        // Empty or absent: everyone.
        for body in [with_sources("[]"), with_sources("null")] {
            let r = parse_rule(body.as_bytes()).unwrap();
            assert!(r.service.allowed_sources.is_empty());
            assert!(r.service.source_allowed("11.0.0.1".parse().unwrap()));
        }
        let many: Vec<String> = (0..=MAX_SOURCES)
            .map(|i| format!(r#"{{"prefix":"10.{}.{}.0/24"}}"#, i / 256, i % 256))
            .collect();
        let many = format!("[{}]", many.join(","));
        for (sources, want) in [
            (
                r#"[{"prefix":"10.0.0.0/8"},{"prefix":"10.0.0.0/33"}]"#,
                "allowedSources[1].prefix: '10.0.0.0/33' is not a CIDR",
            ),
            (
                r#"[{"prefix":"10.0.0.1"}]"#,
                "allowedSources[0].prefix: '10.0.0.1' has no prefix length: write 10.0.0.1/32",
            ),
            (
                r#"[{"prefix":"2001:db8::1"}]"#,
                "allowedSources[0].prefix: '2001:db8::1' has no prefix length: write 2001:db8::1/128",
            ),
            (
                r#"[{"prefix":" 10.0.0.0/8"}]"#,
                "allowedSources[0].prefix: ' 10.0.0.0/8' is not a CIDR",
            ),
            (
                r#"[{"prefix":8}]"#,
                "allowedSources[0].prefix: must be a string",
            ),
            (r#"[{}]"#, "allowedSources[0].prefix: required"),
            (
                r#"["10.0.0.0/8"]"#,
                r#"allowedSources[0]: must be an object like {"prefix": "10.0.0.0/8"}, got a string"#,
            ),
            (
                r#"{"prefix":"10.0.0.0/8"}"#,
                "allowedSources: must be a list",
            ),
            (
                &many,
                "allowedSources: at most 1024 prefixes per rule, got 1025",
            ),
        ] {
            let err = parse_rule(with_sources(sources).as_bytes()).unwrap_err();
            assert!(err.to_string().starts_with(want), "{sources}: {err}");
        }
    }
}
