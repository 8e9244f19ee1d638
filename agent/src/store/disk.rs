//! The on-disk format of `state.json` and the journal, versioned on its own: the domain types
//! ([`crate::model`], [`crate::rules::Rule`]) carry no serde, so neither a REST change nor a
//! model refactoring can change what is on disk without a new version here.
//!
//! - v2 (written): selection and NAT mode by name (`"round-robin"`, `"fullnat"`), the probe
//!   settings in a `probe` object.
//! - v1 (read, migrated at the next compaction, which every start does): loxilb's numbers
//!   (`sel`, `mode`) and flat `probe_*` fields, as agents before this format wrote.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::model::{EndpointSpec, NatMode, Probe, Protocol, RuleKey, Selection, Service};
use crate::rules::{Endpoint, Rule};

/// The version this build writes.
pub const VERSION: u32 = 2;
/// Versions this build reads.
pub const READS: [u32; 2] = [1, 2];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskKey {
    pub external_ip: IpAddr,
    pub port: u16,
    pub port_max: u16,
    pub protocol: String,
    pub block: u32,
    pub host: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskProbe {
    pub kind: String,
    pub port: u16,
    pub request: String,
    pub response: String,
    pub interval_s: u32,
    pub retries: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceV2 {
    pub selection: String,
    pub nat: String,
    pub bgp: bool,
    pub monitor: bool,
    pub inactive_timeout_s: u32,
    pub managed: bool,
    pub probe: DiskProbe,
    pub security: u32,
    pub name: String,
    pub private_ip: String,
    pub proxy_protocol_v2: bool,
    pub egress: bool,
    pub snat: bool,
    /// CIDRs (`10.0.0.0/8`); absent in files written before source ranges.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_sources: Vec<String>,
}

/// The service as format v1 wrote it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceV1 {
    pub sel: u8,
    pub mode: u8,
    pub bgp: bool,
    pub monitor: bool,
    pub inactive_timeout_s: u32,
    pub managed: bool,
    pub probe_type: String,
    pub probe_port: u16,
    pub probe_req: String,
    pub probe_resp: String,
    pub probe_timeout: u32,
    pub probe_retries: u32,
    pub security: u32,
    pub name: String,
    pub private_ip: String,
    pub proxy_protocol_v2: bool,
    pub egress: bool,
    pub snat: bool,
}

/// Either version of a service (v2 tried first: its `selection` field is not in v1).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DiskService {
    V2(ServiceV2),
    V1(ServiceV1),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskEndpoint {
    pub ip: IpAddr,
    pub target_port: u16,
    pub weight: u16,
    pub slot: u8,
    #[serde(default)]
    pub snat: Option<IpAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskRule {
    pub key: DiskKey,
    pub service: DiskService,
    pub endpoints: Vec<DiskEndpoint>,
    pub id: u32,
    pub flip: u8,
}

impl From<&RuleKey> for DiskKey {
    fn from(k: &RuleKey) -> DiskKey {
        DiskKey {
            external_ip: k.external_ip,
            port: k.port,
            port_max: k.port_max,
            protocol: k.protocol.name().to_string(),
            block: k.block,
            host: k.host.clone(),
        }
    }
}

impl TryFrom<DiskKey> for RuleKey {
    type Error = String;
    fn try_from(k: DiskKey) -> Result<RuleKey, String> {
        Ok(RuleKey {
            external_ip: k.external_ip,
            port: k.port,
            port_max: k.port_max,
            protocol: Protocol::from_name(&k.protocol)
                .ok_or_else(|| format!("unknown protocol '{}'", k.protocol))?,
            block: k.block,
            host: k.host,
        })
    }
}

impl From<&Service> for DiskService {
    fn from(s: &Service) -> DiskService {
        DiskService::V2(ServiceV2 {
            selection: s.selection.name().to_string(),
            nat: s.nat.name().to_string(),
            bgp: s.bgp,
            monitor: s.monitor,
            inactive_timeout_s: s.inactive_timeout_s,
            managed: s.managed,
            probe: DiskProbe {
                kind: s.probe.kind.clone(),
                port: s.probe.port,
                request: s.probe.request.clone(),
                response: s.probe.response.clone(),
                interval_s: s.probe.interval_s,
                retries: s.probe.retries,
            },
            security: s.security,
            name: s.name.clone(),
            private_ip: s.private_ip.clone(),
            proxy_protocol_v2: s.proxy_protocol_v2,
            egress: s.egress,
            snat: s.snat,
            allowed_sources: s.allowed_sources.iter().map(|n| n.to_string()).collect(),
        })
    }
}

impl TryFrom<DiskService> for Service {
    type Error = String;
    fn try_from(s: DiskService) -> Result<Service, String> {
        Ok(match s {
            DiskService::V2(s) => Service {
                selection: Selection::from_name(&s.selection)
                    .ok_or_else(|| format!("unknown selection '{}'", s.selection))?,
                nat: NatMode::from_name(&s.nat)
                    .ok_or_else(|| format!("unknown NAT mode '{}'", s.nat))?,
                bgp: s.bgp,
                monitor: s.monitor,
                inactive_timeout_s: s.inactive_timeout_s,
                managed: s.managed,
                probe: Probe {
                    kind: s.probe.kind,
                    port: s.probe.port,
                    request: s.probe.request,
                    response: s.probe.response,
                    interval_s: s.probe.interval_s,
                    retries: s.probe.retries,
                },
                security: s.security,
                name: s.name,
                private_ip: s.private_ip,
                proxy_protocol_v2: s.proxy_protocol_v2,
                egress: s.egress,
                snat: s.snat,
                allowed_sources: disk_sources(&s.allowed_sources)?,
            },
            DiskService::V1(s) => Service {
                selection: Selection::from_code(s.sel)
                    .ok_or_else(|| format!("unknown sel {}", s.sel))?,
                nat: NatMode::from_code(s.mode)
                    .ok_or_else(|| format!("unknown mode {}", s.mode))?,
                bgp: s.bgp,
                monitor: s.monitor,
                inactive_timeout_s: s.inactive_timeout_s,
                managed: s.managed,
                probe: Probe {
                    kind: s.probe_type,
                    port: s.probe_port,
                    request: s.probe_req,
                    response: s.probe_resp,
                    interval_s: s.probe_timeout,
                    retries: s.probe_retries,
                },
                security: s.security,
                name: s.name,
                private_ip: s.private_ip,
                proxy_protocol_v2: s.proxy_protocol_v2,
                egress: s.egress,
                snat: s.snat,
                allowed_sources: Vec::new(),
            },
        })
    }
}

/// Stored source prefixes, checked as the REST layer checks them (the file is input too).
fn disk_sources(list: &[String]) -> Result<Vec<ipnet::IpNet>, String> {
    if list.len() > crate::model::MAX_SOURCES {
        return Err(format!(
            "{} allowed sources, at most {}",
            list.len(),
            crate::model::MAX_SOURCES
        ));
    }
    let mut out: Vec<ipnet::IpNet> = list
        .iter()
        .map(|s| {
            s.parse::<ipnet::IpNet>()
                .map(|n| n.trunc())
                .map_err(|_| format!("allowed source '{s}' is not a CIDR"))
        })
        .collect::<Result<_, _>>()?;
    out.sort();
    out.dedup();
    Ok(out)
}

impl From<&Rule> for DiskRule {
    fn from(r: &Rule) -> DiskRule {
        DiskRule {
            key: (&r.key).into(),
            service: (&r.service).into(),
            endpoints: r
                .endpoints
                .iter()
                .map(|e| DiskEndpoint {
                    ip: e.spec.ip,
                    target_port: e.spec.target_port,
                    weight: e.spec.weight,
                    slot: e.slot,
                    snat: e.snat,
                })
                .collect(),
            id: r.id,
            flip: r.flip,
        }
    }
}

impl TryFrom<DiskRule> for Rule {
    type Error = String;
    fn try_from(r: DiskRule) -> Result<Rule, String> {
        Ok(Rule {
            key: r.key.try_into()?,
            service: r.service.try_into()?,
            endpoints: r
                .endpoints
                .into_iter()
                .map(|e| Endpoint {
                    spec: EndpointSpec {
                        ip: e.ip,
                        target_port: e.target_port,
                        weight: e.weight,
                    },
                    slot: e.slot,
                    snat: e.snat,
                    down: false,
                })
                .collect(),
            id: r.id,
            flip: r.flip,
        })
    }
}
