//! The desired load-balancer state: rules keyed like loxilb's, validated against each other,
//! persisted, and pushed to the datapath.
//!
//! Every change goes: plan (pure: conflicts, ids, stable endpoint slots) -> datapath (the new
//! endpoint set is written to the service's spare slot, then the service entry switches to
//! it in one map update, so forwarding never sees a half-written set) -> VIPs on `lo` ->
//! persist (atomic). A failure part way is rolled back to the previous state.
//!
//! Endpoints keep their slot (index in the datapath's endpoint array) across modifications,
//! so per-endpoint counters and least-connection counts stay attached to the same endpoint.
//! A removed endpoint's TCP flows are left to drain (as kube-proxy does); its UDP and ICMP
//! flows are flushed so they move to a live endpoint at their next packet.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ferrolb_bpf::Datapath;
use ferrolb_bpf::lut::{self, LutEndpoint};
use ferrolb_bpf::maps::{
    Backends, Ep, MAX_ENDPOINTS, MAX_RANGES, Range, RangeKey, Ranges, SRC_ID_BITS, SVCF_SOURCES,
    SrcKey, Svc, SvcKey, addr_words,
};
use tracing::warn;

use crate::model::{
    EndpointSpec, FieldError, Oper, Protocol, RuleKey, RuleSpec, Selection, Service,
};

/// One endpoint of an installed rule and its slot in the datapath's endpoint array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub spec: EndpointSpec,
    pub slot: u8,
    /// One-arm mode: the source address this node uses toward the endpoint.
    pub snat: Option<IpAddr>,
    /// Inactive: failed its probes or forced down (not saved; the prober decides again).
    /// Gets no new flows.
    pub down: bool,
}

/// An installed rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub key: RuleKey,
    pub service: Service,
    pub endpoints: Vec<Endpoint>,
    /// Datapath service id (index of its counters and selection state).
    pub id: u32,
    /// Which of the service's two endpoint-set slots is live (0 or 1).
    pub flip: u8,
}

impl Rule {
    pub fn be_slot(&self) -> u32 {
        self.id * 2 + u32::from(self.flip)
    }

    pub fn timeout_s(&self) -> u32 {
        if self.service.inactive_timeout_s == 0 {
            self.key.protocol.default_timeout_s()
        } else {
            self.service.inactive_timeout_s
        }
    }

    pub fn is_range(&self) -> bool {
        self.key.port_max > self.key.port
    }

    fn port_span(&self) -> (u16, u16) {
        if self.key.protocol == Protocol::Icmp {
            (0, 0)
        } else {
            (self.key.port, self.key.port_max.max(self.key.port))
        }
    }

    /// The rule's label in metrics and conntrack listings: its name, or its key.
    pub fn label(&self) -> String {
        if self.service.name.is_empty() {
            self.key.to_string()
        } else {
            self.service.name.clone()
        }
    }
}

/// Why a change was refused; the REST layer maps these to status codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleError {
    /// 400
    Invalid(FieldError),
    /// 404
    NotFound(String),
    /// 409; the text contains "exists" for kube-loxilb.
    Exists(String),
    /// 409
    Conflict(String),
    /// 503: no room in the datapath's tables
    Full(String),
    /// 507: the state volume is full (the message names the path)
    NoSpace(String),
    /// 500
    Internal(String),
}

impl std::fmt::Display for RuleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RuleError::Invalid(e) => write!(f, "{e}"),
            RuleError::NotFound(s)
            | RuleError::Exists(s)
            | RuleError::Conflict(s)
            | RuleError::Full(s)
            | RuleError::NoSpace(s)
            | RuleError::Internal(s) => write!(f, "{s}"),
        }
    }
}

/// The rule table (pure: no datapath, no files).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleSet {
    pub rules: BTreeMap<RuleKey, Rule>,
}

/// A planned change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Create(Box<Rule>),
    Modify { old: Box<Rule>, new: Box<Rule> },
}

impl Change {
    /// The rule as it is after the change.
    pub fn rule(&self) -> &Rule {
        match self {
            Change::Create(r) => r,
            Change::Modify { new, .. } => new,
        }
    }

    pub fn rule_mut(&mut self) -> &mut Rule {
        match self {
            Change::Create(r) => r,
            Change::Modify { new, .. } => new,
        }
    }
}

impl RuleSet {
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn get(&self, key: &RuleKey) -> Option<&Rule> {
        self.rules.get(key)
    }

    /// The rules of one VIP: a range of the table (keys order by external IP first), so a
    /// check per change does not walk every rule (10,000 rules created in a row).
    fn of_vip(&self, ip: IpAddr) -> impl Iterator<Item = &Rule> {
        let first = RuleKey {
            external_ip: ip,
            port: 0,
            port_max: 0,
            protocol: Protocol::Tcp,
            block: 0,
            host: String::new(),
        };
        self.rules
            .range(first..)
            .take_while(move |(k, _)| k.external_ip == ip)
            .map(|(_, r)| r)
    }

    /// Plans a create/replace/attach/detach without applying it.
    pub fn plan(&self, spec: RuleSpec, capacity: u32) -> Result<Change, RuleError> {
        if spec.oper != Oper::Detach {
            self.check_addresses(&spec)?;
        }
        let existing = self.rules.get(&spec.key);
        match spec.oper {
            Oper::Attach | Oper::Detach => {
                let Some(old) = existing else {
                    return Err(RuleError::NotFound(format!(
                        "lb-rule {} not found ({} needs an existing rule)",
                        spec.key,
                        if spec.oper == Oper::Attach {
                            "attaching endpoints"
                        } else {
                            "detaching endpoints"
                        }
                    )));
                };
                let mut eps: Vec<EndpointSpec> =
                    old.endpoints.iter().map(|e| e.spec.clone()).collect();
                if spec.oper == Oper::Attach {
                    let mut added = 0;
                    for e in &spec.endpoints {
                        if !eps
                            .iter()
                            .any(|x| x.ip == e.ip && x.target_port == e.target_port)
                        {
                            eps.push(e.clone());
                            added += 1;
                        }
                    }
                    if added == 0 {
                        return Err(RuleError::Exists(format!(
                            "lb-rule {} endpoints exist already",
                            spec.key
                        )));
                    }
                    if eps.len() > MAX_ENDPOINTS {
                        return Err(RuleError::Invalid(FieldError::new(
                            "endpoints",
                            format!(
                                "attaching would give {} endpoints; at most {MAX_ENDPOINTS}",
                                eps.len()
                            ),
                        )));
                    }
                } else {
                    let before = eps.len();
                    eps.retain(|x| {
                        !spec
                            .endpoints
                            .iter()
                            .any(|e| x.ip == e.ip && x.target_port == e.target_port)
                    });
                    if eps.len() == before {
                        return Err(RuleError::NotFound(format!(
                            "none of the endpoints to detach belong to lb-rule {}",
                            spec.key
                        )));
                    }
                }
                let new = Rule {
                    endpoints: assign_slots(&old.endpoints, &eps),
                    flip: old.flip ^ 1,
                    ..old.clone()
                };
                Ok(Change::Modify {
                    old: Box::new(old.clone()),
                    new: Box::new(new),
                })
            }
            _ => {
                if let Some(old) = existing {
                    let same_eps = {
                        let a: BTreeSet<_> = old
                            .endpoints
                            .iter()
                            .map(|e| (e.spec.ip, e.spec.target_port, e.spec.weight))
                            .collect();
                        let b: BTreeSet<_> = spec
                            .endpoints
                            .iter()
                            .map(|e| (e.ip, e.target_port, e.weight))
                            .collect();
                        a == b
                    };
                    if same_eps && old.service == spec.service {
                        return Err(RuleError::Exists(format!("lb-rule {} exists", spec.key)));
                    }
                    let new = Rule {
                        service: spec.service,
                        endpoints: assign_slots(&old.endpoints, &spec.endpoints),
                        flip: old.flip ^ 1,
                        ..old.clone()
                    };
                    return Ok(Change::Modify {
                        old: Box::new(old.clone()),
                        new: Box::new(new),
                    });
                }
                let candidate = Rule {
                    key: spec.key.clone(),
                    service: spec.service,
                    endpoints: assign_slots(&[], &spec.endpoints),
                    id: 0,
                    flip: 0,
                };
                self.check_conflicts(&candidate)?;
                // A bitmap, not a set: this runs for every create (10,000 rules in a row).
                let mut used = vec![false; capacity as usize];
                for r in self.rules.values() {
                    if let Some(u) = used.get_mut(r.id as usize) {
                        *u = true;
                    }
                }
                let id = used
                    .iter()
                    .position(|u| !u)
                    .map(|i| i as u32)
                    .ok_or_else(|| {
                        RuleError::Full(format!(
                            "no room for another rule: all {capacity} datapath services are in use \
                         (start with a larger --max-services)"
                        ))
                    })?;
                Ok(Change::Create(Box::new(Rule { id, ..candidate })))
            }
        }
    }

    /// A VIP is never an endpoint's address, in this rule or any other: traffic for it would
    /// be balanced away from the backend that owns it (and the VIP put on `lo` would take
    /// the address from the backend's clients on this node).
    fn check_addresses(&self, spec: &RuleSpec) -> Result<(), RuleError> {
        let vip = spec.key.external_ip;
        for (i, e) in spec.endpoints.iter().enumerate() {
            let owner = if e.ip == vip {
                Some(spec.key.to_string())
            } else {
                self.of_vip(e.ip)
                    .next()
                    .map(|r| format!("{} ({})", r.key, r.label()))
            };
            if let Some(owner) = owner {
                return Err(RuleError::Invalid(FieldError::new(
                    format!("endpoints[{i}].endpointIP"),
                    format!("{} is the VIP of lb-rule {owner}", e.ip),
                )));
            }
        }
        // A VIP that other rules have already was checked when it came: every endpoint added
        // since was checked against it (above). Only a new VIP needs the walk.
        if self.of_vip(vip).any(|r| r.key != spec.key) {
            return Ok(());
        }
        if let Some(r) = self
            .rules
            .values()
            .find(|r| r.key != spec.key && r.endpoints.iter().any(|e| e.spec.ip == vip))
        {
            return Err(RuleError::Invalid(FieldError::new(
                "serviceArguments.externalIP",
                format!("{vip} is an endpoint of lb-rule {} ({})", r.key, r.label()),
            )));
        }
        Ok(())
    }

    fn check_conflicts(&self, r: &Rule) -> Result<(), RuleError> {
        let (lo, hi) = r.port_span();
        let mut ranges_here = usize::from(r.is_range());
        for other in self.of_vip(r.key.external_ip) {
            if other.key.protocol != r.key.protocol {
                continue;
            }
            let (olo, ohi) = other.port_span();
            if lo <= ohi && olo <= hi {
                return Err(RuleError::Conflict(format!(
                    "lb-rule {} overlaps lb-rule {} ({})",
                    r.key,
                    other.key,
                    other.label()
                )));
            }
            ranges_here += usize::from(other.is_range());
        }
        if r.is_range() && ranges_here > MAX_RANGES {
            return Err(RuleError::Invalid(FieldError::new(
                "serviceArguments.portMax",
                format!(
                    "at most {MAX_RANGES} port ranges per VIP and protocol ({} {})",
                    r.key.external_ip,
                    r.key.protocol.name()
                ),
            )));
        }
        Ok(())
    }

    /// Puts the changed rule in the table; returns the rule it replaced.
    pub fn apply(&mut self, change: &Change) -> Option<Rule> {
        let r = change.rule();
        self.rules.insert(r.key.clone(), r.clone())
    }

    /// VIPs in use (to be present on `lo`).
    pub fn vips(&self) -> BTreeSet<IpAddr> {
        self.rules.values().map(|r| r.key.external_ip).collect()
    }

    /// Keys of rules matching a DELETE by address/port/protocol (any block when `block` is
    /// None).
    pub fn find(
        &self,
        ip: IpAddr,
        port: u16,
        port_max: Option<u16>,
        proto: Protocol,
        block: Option<u32>,
    ) -> Vec<RuleKey> {
        self.rules
            .keys()
            .filter(|k| {
                k.external_ip == ip
                    && k.port == port
                    && k.protocol == proto
                    && port_max.is_none_or(|m| k.port_max.max(k.port) == m.max(port))
                    && block.is_none_or(|b| k.block == b)
            })
            .cloned()
            .collect()
    }
}

/// Keeps the slot of every endpoint that stays; new endpoints take the lowest free slots.
fn assign_slots(old: &[Endpoint], new: &[EndpointSpec]) -> Vec<Endpoint> {
    let mut used = [false; MAX_ENDPOINTS];
    let mut out: Vec<Option<Endpoint>> = vec![None; new.len()];
    for (i, e) in new.iter().enumerate() {
        if let Some(o) = old
            .iter()
            .find(|o| o.spec.ip == e.ip && o.spec.target_port == e.target_port)
        {
            used[usize::from(o.slot)] = true;
            out[i] = Some(Endpoint {
                spec: e.clone(),
                slot: o.slot,
                snat: o.snat,
                down: o.down,
            });
        }
    }
    for (i, e) in new.iter().enumerate() {
        if out[i].is_none() {
            let slot = used.iter().position(|u| !u).unwrap_or(MAX_ENDPOINTS - 1);
            used[slot] = true;
            out[i] = Some(Endpoint {
                spec: e.clone(),
                slot: slot as u8,
                snat: None,
                down: false,
            });
        }
    }
    out.into_iter().flatten().collect()
}

// --- datapath programming -------------------------------------------------------------------

fn svc_key(r: &Rule) -> SvcKey {
    SvcKey {
        addr: addr_words(r.key.external_ip).0,
        port: if r.key.protocol == Protocol::Icmp {
            0
        } else {
            r.key.port.to_be()
        },
        proto: r.key.protocol.number(),
        family: addr_words(r.key.external_ip).1,
    }
}

fn range_key(ip: IpAddr, proto: Protocol) -> RangeKey {
    RangeKey {
        addr: addr_words(ip).0,
        proto: proto.number(),
        family: addr_words(ip).1,
        pad: 0,
    }
}

fn svc_value(r: &Rule) -> Svc {
    Svc {
        id: r.id,
        be_slot: r.be_slot(),
        timeout_s: r.timeout_s(),
        port_base: r.key.port,
        mode: r.service.nat.code(),
        sel: r.service.selection.code(),
        flags: if r.service.allowed_sources.is_empty() {
            0
        } else {
            SVCF_SOURCES
        },
    }
}

/// The prefixes of a rule the datapath holds: those of its VIP's family (a packet of the rule
/// comes from no other).
fn datapath_sources(r: &Rule) -> BTreeSet<ipnet::IpNet> {
    r.service
        .sources_of_family(r.key.external_ip.is_ipv6())
        .collect()
}

/// Source-table entries a rule takes (its list has no duplicates).
pub fn source_entries(r: &Rule) -> usize {
    r.service
        .sources_of_family(r.key.external_ip.is_ipv6())
        .count()
}

/// Is there room in the datapath's source table (`capacity` entries) for `change`?
pub fn check_source_room(rules: &RuleSet, change: &Change, capacity: u32) -> Result<(), RuleError> {
    let r = change.rule();
    let want = source_entries(r);
    if want == 0 {
        return Ok(());
    }
    let others: usize = rules
        .rules
        .values()
        .filter(|o| o.key != r.key)
        .map(source_entries)
        .sum();
    if others + want > capacity as usize {
        return Err(RuleError::Full(format!(
            "allowedSources: no room for {want} more prefixes: the datapath's source table holds \
             {capacity} across all rules and {others} are in use"
        )));
    }
    Ok(())
}

fn add_sources<'a>(
    dp: &mut Datapath,
    id: u32,
    nets: impl IntoIterator<Item = &'a ipnet::IpNet>,
) -> Result<(), ferrolb_bpf::BpfError> {
    for n in nets {
        dp.set_source(id, n.addr(), n.prefix_len())?;
    }
    Ok(())
}

fn del_sources<'a>(
    dp: &mut Datapath,
    id: u32,
    nets: impl IntoIterator<Item = &'a ipnet::IpNet>,
) -> Result<(), ferrolb_bpf::BpfError> {
    for n in nets {
        dp.delete_source(id, n.addr(), n.prefix_len())?;
    }
    Ok(())
}

/// The endpoint set and lookup table of a rule.
pub fn backends(r: &Rule) -> Backends {
    let mut be = Backends::default();
    let mut lut_eps = Vec::with_capacity(r.endpoints.len());
    let mut count = 0u32;
    for e in &r.endpoints {
        let s = usize::from(e.slot);
        if s >= MAX_ENDPOINTS {
            continue;
        }
        be.ep[s] = Ep {
            addr: addr_words(e.spec.ip).0,
            snat_addr: e.snat.map(|a| addr_words(a).0).unwrap_or_default(),
            port: e.spec.target_port,
            weight: e.spec.weight,
            active: u8::from(!e.down),
            pad: [0; 3],
        };
        count = count.max(s as u32 + 1);
        // An inactive endpoint keeps its slot (its counters, its drained flows) but is in no
        // table: Maglev rebuilds without it, which moves only its own share.
        if e.down {
            continue;
        }
        let mut identity = match e.spec.ip {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        identity.extend(e.spec.target_port.to_be_bytes());
        lut_eps.push(LutEndpoint {
            slot: e.slot,
            identity,
            weight: e.spec.weight,
        });
    }
    be.count = count;
    let table = match r.service.selection {
        Selection::Hash => lut::maglev(&lut_eps),
        Selection::Priority => lut::weighted(&lut_eps),
        _ => lut::round_robin(&lut_eps),
    };
    be.lut_len = table.len() as u32;
    be.lut[..table.len()].copy_from_slice(&table);
    be
}

/// The endpoint slots of `old` whose UDP/ICMP flows go when `old` becomes `new` (removed or
/// replaced endpoints; TCP flows drain instead, as kube-proxy's do).
pub fn flushed_slots(old: &Rule, new: &Rule) -> Vec<u8> {
    if old.key.protocol == Protocol::Tcp {
        return Vec::new();
    }
    old.endpoints
        .iter()
        .filter(|o| {
            !new.endpoints
                .iter()
                .any(|n| n.slot == o.slot && n.spec == o.spec)
        })
        .map(|o| o.slot)
        .collect()
}

/// Writes one rule into the datapath: its endpoint set into the spare slot, then the service
/// entry pointing at it (the atomic switch). `fresh` resets the id's counters and selection
/// state (a new rule, or a restart that found no state).
pub fn install(dp: &mut Datapath, r: &Rule, fresh: bool) -> Result<(), ferrolb_bpf::BpfError> {
    if fresh {
        dp.reset_service_state(r.id)?;
        dp.reset_stats(r.id)?;
    }
    dp.set_backends(r.be_slot(), &backends(r))?;
    if !r.is_range() {
        dp.set_service(&svc_key(r), &svc_value(r))?;
    }
    Ok(())
}

fn ranges_for(rules: &RuleSet, ip: IpAddr, proto: Protocol) -> Option<Ranges> {
    let mut out: Option<Ranges> = None;
    for r in rules.of_vip(ip).filter(|r| r.key.protocol == proto) {
        let e = out.get_or_insert_with(Ranges::default);
        if r.is_range()
            && let Some(slot) = e.r.iter_mut().find(|x| x.hi == 0)
        {
            *slot = Range {
                lo: r.key.port,
                hi: r.key.port_max,
                pad: 0,
                svc: svc_value(r),
            };
        }
    }
    out
}

/// Rewrites the ranges entry of one (VIP, protocol): its port ranges, or removes it when no
/// rule uses the pair. The entry also marks the address as a VIP for the fragment rule.
pub fn sync_ranges_for(
    dp: &mut Datapath,
    rules: &RuleSet,
    ip: IpAddr,
    proto: Protocol,
) -> Result<(), ferrolb_bpf::BpfError> {
    match ranges_for(rules, ip, proto) {
        Some(v) => dp.set_ranges(&range_key(ip, proto), &v),
        None => dp.delete_ranges(&range_key(ip, proto)),
    }
}

/// Makes every ranges entry match `rules` (start-up).
pub fn sync_ranges(dp: &mut Datapath, rules: &RuleSet) -> Result<(), ferrolb_bpf::BpfError> {
    let pairs: BTreeSet<(IpAddr, Protocol)> = rules
        .rules
        .values()
        .map(|r| (r.key.external_ip, r.key.protocol))
        .collect();
    let want: BTreeSet<RangeKey> = pairs.iter().map(|(ip, p)| range_key(*ip, *p)).collect();
    for k in dp.range_keys() {
        if !want.contains(&k) {
            dp.delete_ranges(&k)?;
        }
    }
    for (ip, p) in pairs {
        sync_ranges_for(dp, rules, ip, p)?;
    }
    Ok(())
}

/// Applies a planned change to the datapath; `rules_after` already holds the new rule.
pub fn program(
    dp: &mut Datapath,
    rules_after: &RuleSet,
    change: &Change,
) -> Result<(), ferrolb_bpf::BpfError> {
    let key = match change {
        Change::Create(r) => {
            // Prefixes first, then the service that refers to them.
            add_sources(dp, r.id, &datapath_sources(r))?;
            install(dp, r, true)?;
            &r.key
        }
        Change::Modify { old, new } => {
            // Added prefixes before the switch, removed ones after it: a source in both lists
            // is never refused, one in neither never allowed.
            let (was, now) = (datapath_sources(old), datapath_sources(new));
            add_sources(dp, new.id, now.difference(&was))?;
            // A slot that now holds another endpoint starts with clean counters.
            for n in &new.endpoints {
                let same = old.endpoints.iter().any(|o| {
                    o.slot == n.slot
                        && o.spec.ip == n.spec.ip
                        && o.spec.target_port == n.spec.target_port
                });
                if !same {
                    dp.reset_endpoint(new.id, u32::from(n.slot))?;
                }
            }
            // `new` lives in the spare slot (plan flipped it): write it, then switch.
            install(dp, new, false)?;
            del_sources(dp, new.id, was.difference(&now))?;
            // Flows of removed UDP/ICMP endpoints go after the change is saved (the engine
            // asks for it: `flushed_slots`).
            if old.service.selection == Selection::Persist {
                dp.affinity_flush(old.id);
            }
            &new.key
        }
    };
    sync_ranges_for(dp, rules_after, key.external_ip, key.protocol)
}

/// Undoes [`program`] after a later step failed; `rules_before` is the table without the
/// change.
pub fn revert(dp: &mut Datapath, rules_before: &RuleSet, change: &Change) {
    let res = match change {
        Change::Create(r) => uninstall(dp, rules_before, r),
        Change::Modify { old, new } => {
            let (was, now) = (datapath_sources(old), datapath_sources(new));
            add_sources(dp, old.id, &was)
                .and_then(|()| install(dp, old, false))
                .and_then(|()| del_sources(dp, old.id, now.difference(&was)))
                .and_then(|()| {
                    sync_ranges_for(dp, rules_before, old.key.external_ip, old.key.protocol)
                })
        }
    };
    if let Err(e) = res {
        warn!(error = %e, "reverting the datapath failed");
    }
}

/// Removes a rule from the datapath (its flows are flushed by the caller, in one pass for
/// all removed rules).
pub fn uninstall(
    dp: &mut Datapath,
    rules_after: &RuleSet,
    r: &Rule,
) -> Result<(), ferrolb_bpf::BpfError> {
    if !r.is_range() {
        dp.delete_service(&svc_key(r))?;
    }
    sync_ranges_for(dp, rules_after, r.key.external_ip, r.key.protocol)?;
    del_sources(dp, r.id, &datapath_sources(r))?;
    if r.service.selection == Selection::Persist {
        dp.affinity_flush(r.id);
    }
    Ok(())
}

/// Makes the source table hold exactly the rules' prefixes: missing ones added (before the
/// services are rewritten), stray ones (a rule deleted while the agent was down, another
/// family's leftovers) removed after.
fn restore_sources(
    dp: &mut Datapath,
    rules: &RuleSet,
    pass: SourcePass,
) -> Result<(), ferrolb_bpf::BpfError> {
    let want: BTreeSet<(u32, SrcKey)> = rules
        .rules
        .values()
        .flat_map(|r| {
            datapath_sources(r).into_iter().map(move |n| {
                (
                    SRC_ID_BITS + u32::from(n.prefix_len()),
                    SrcKey {
                        svc_id_be: r.id.to_be(),
                        addr: addr_words(n.addr()).0,
                    },
                )
            })
        })
        .collect();
    match pass {
        SourcePass::Add => {
            let have: BTreeSet<(u32, SrcKey)> = dp
                .source_entries()
                .into_iter()
                .map(|(_, l, k)| (l, k))
                .collect();
            for (len, k) in want.difference(&have) {
                dp.set_source_raw(*len, *k)?;
            }
        }
        SourcePass::RemoveStray => {
            for (_, len, k) in dp.source_entries() {
                if !want.contains(&(len, k)) {
                    dp.delete_source_raw(len, k)?;
                }
            }
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum SourcePass {
    Add,
    RemoveStray,
}

/// Makes the datapath match `rules` after a start: every rule is rewritten where it is (same
/// id, same slot, same contents, so adopted flows are undisturbed) and stale services are
/// removed. `adopted` is false when the maps were just created.
pub fn restore(
    dp: &mut Datapath,
    rules: &RuleSet,
    adopted: bool,
) -> Result<(), ferrolb_bpf::BpfError> {
    let want: BTreeSet<SvcKey> = rules
        .rules
        .values()
        .filter(|r| !r.is_range())
        .map(svc_key)
        .collect();
    for k in dp.service_keys() {
        if !want.contains(&k) {
            warn!(?k, "removing a datapath service no rule describes");
            dp.delete_service(&k)?;
        }
    }
    restore_sources(dp, rules, SourcePass::Add)?;
    for r in rules.rules.values() {
        install(dp, r, !adopted)?;
    }
    sync_ranges(dp, rules)?;
    restore_sources(dp, rules, SourcePass::RemoveStray)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::models::parse_rule;

    fn spec(json: &str) -> RuleSpec {
        parse_rule(json.as_bytes()).unwrap()
    }

    #[test]
    fn the_source_table_is_shared_by_all_rules_and_bounded() {
        let with = |port: u16, n: usize| {
            let s: Vec<String> = (0..n)
                .map(|i| format!(r#"{{"prefix":"10.{}.{}.0/24"}}"#, i / 256, i % 256))
                .collect();
            spec(&format!(
                r#"{{"serviceArguments":{{"externalIP":"20.20.20.1","port":{port}}},
                    "endpoints":[{{"endpointIP":"10.0.0.1","targetPort":80}}],
                    "allowedSources":[{}, {{"prefix":"2001:db8::/32"}}]}}"#,
                s.join(",")
            ))
        };
        let mut rs = RuleSet::default();
        let c = rs.plan(with(80, 600), 16).unwrap();
        // Only the VIP's family takes entries: 600, not 601.
        assert_eq!(source_entries(c.rule()), 600);
        check_source_room(&rs, &c, 1000).unwrap();
        rs.apply(&c);
        let c2 = rs.plan(with(81, 500), 16).unwrap();
        let e = check_source_room(&rs, &c2, 1000).unwrap_err();
        assert!(
            matches!(&e, RuleError::Full(m) if m.starts_with("allowedSources: no room for 500 more prefixes") && m.contains("600 are in use")),
            "{e}"
        );
        // Replacing a rule's list counts the rule once.
        let c3 = rs.plan(with(80, 900), 16).unwrap();
        check_source_room(&rs, &c3, 1000).unwrap();
        assert_eq!(svc_value(c3.rule()).flags, SVCF_SOURCES);
        let plain = rs
            .plan(spec(&body(82, &[("10.0.0.1", 80, 1)], "")), 16)
            .unwrap();
        assert_eq!(svc_value(plain.rule()).flags, 0);
    }

    fn body(port: u16, eps: &[(&str, u16, u16)], extra: &str) -> String {
        let e: Vec<String> = eps
            .iter()
            .map(|(ip, p, w)| format!(r#"{{"endpointIP":"{ip}","targetPort":{p},"weight":{w}}}"#))
            .collect();
        format!(
            r#"{{"serviceArguments":{{"externalIP":"20.20.20.1","port":{port}{extra}}},"endpoints":[{}]}}"#,
            e.join(",")
        )
    }

    #[test]
    fn a_vip_is_never_an_endpoint_address() {
        let mut rs = RuleSet::default();
        let c = rs
            .plan(spec(&body(80, &[("10.0.0.1", 8080, 1)], "")), 16)
            .unwrap();
        rs.apply(&c);
        // A VIP equal to another rule's endpoint.
        let e = rs
            .plan(
                spec(r#"{"serviceArguments":{"externalIP":"10.0.0.1","port":81},"endpoints":[{"endpointIP":"10.0.0.9","targetPort":80}]}"#),
                16,
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("serviceArguments.externalIP")
                && e.contains("endpoint of lb-rule 20.20.20.1:80"),
            "{e}"
        );
        // An endpoint equal to another rule's VIP, or to its own.
        let e = rs
            .plan(
                spec(r#"{"serviceArguments":{"externalIP":"20.20.20.2","port":81},"endpoints":[{"endpointIP":"10.0.0.2","targetPort":80},{"endpointIP":"20.20.20.1","targetPort":80}]}"#),
                16,
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("endpoints[1].endpointIP") && e.contains("is the VIP of"),
            "{e}"
        );
        let e = rs
            .plan(spec(&body(82, &[("20.20.20.1", 80, 1)], "")), 16)
            .unwrap_err()
            .to_string();
        assert!(e.contains("endpoints[0].endpointIP"), "{e}");
        // Attaching such an endpoint is refused too; detaching is not checked.
        let e = rs
            .plan(
                spec(&body(80, &[("20.20.20.1", 80, 1)], r#","oper":1"#)),
                16,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("is the VIP of"), "{e}");
        // Another port of the same VIP and a new endpoint are fine.
        assert!(
            rs.plan(spec(&body(443, &[("10.0.0.3", 8443, 1)], "")), 16)
                .is_ok()
        );
    }

    #[test]
    fn identical_repost_exists_changed_repost_modifies() {
        let mut rs = RuleSet::default();
        let b = body(80, &[("10.0.0.1", 8080, 1), ("10.0.0.2", 8080, 1)], "");
        let c = rs.plan(spec(&b), 16).unwrap();
        assert!(matches!(c, Change::Create(ref r) if r.id == 0));
        rs.apply(&c);
        let again = rs.plan(spec(&b), 16).unwrap_err();
        assert!(again.to_string().contains("exists"), "{again}");
        // Same endpoints in another order: still identical.
        let b2 = body(80, &[("10.0.0.2", 8080, 1), ("10.0.0.1", 8080, 1)], "");
        assert!(matches!(rs.plan(spec(&b2), 16), Err(RuleError::Exists(_))));
        // Drop one endpoint, add another: the kept one keeps its slot, the new one takes the
        // freed slot.
        let b3 = body(80, &[("10.0.0.3", 8080, 1), ("10.0.0.2", 8080, 1)], "");
        let Change::Modify { old, new } = rs.plan(spec(&b3), 16).unwrap() else {
            panic!("expected a modification")
        };
        assert_eq!(old.id, new.id);
        let slot = |r: &Rule, ip: &str| {
            r.endpoints
                .iter()
                .find(|e| e.spec.ip.to_string() == ip)
                .map(|e| e.slot)
        };
        assert_eq!(slot(&new, "10.0.0.2"), slot(&old, "10.0.0.2"));
        assert_eq!(slot(&new, "10.0.0.3"), slot(&old, "10.0.0.1"));
    }

    #[test]
    fn attach_and_detach() {
        let mut rs = RuleSet::default();
        rs.apply(
            &rs.plan(spec(&body(80, &[("10.0.0.1", 80, 1)], "")), 16)
                .unwrap(),
        );
        let att = rs
            .plan(spec(&body(80, &[("10.0.0.2", 80, 1)], r#","oper":1"#)), 16)
            .unwrap();
        rs.apply(&att);
        assert_eq!(rs.rules.values().next().unwrap().endpoints.len(), 2);
        let det = rs
            .plan(spec(&body(80, &[("10.0.0.1", 80, 1)], r#","oper":2"#)), 16)
            .unwrap();
        rs.apply(&det);
        let r = rs.rules.values().next().unwrap();
        assert_eq!(r.endpoints.len(), 1);
        assert_eq!(r.endpoints[0].slot, 1);
        let missing = rs
            .plan(spec(&body(81, &[("10.0.0.1", 80, 1)], r#","oper":1"#)), 16)
            .unwrap_err();
        assert!(matches!(missing, RuleError::NotFound(_)));
    }

    /// The checks look at one VIP's range of the table: neighbours (lower and higher
    /// addresses, both families, other blocks and hosts) neither hide nor add a conflict.
    #[test]
    fn a_vips_rules_are_found_among_its_neighbours() {
        let mut rs = RuleSet::default();
        let mk = |vip: &str, port: u16, extra: &str| {
            spec(&format!(
                r#"{{"serviceArguments":{{"externalIP":"{vip}","port":{port}{extra}}},"endpoints":[]}}"#
            ))
        };
        for (vip, port, extra) in [
            ("20.20.20.0", 80, ""),
            ("20.20.20.1", 70, r#","portMax":90,"block":3"#),
            ("20.20.20.1", 100, r#","protocol":"udp""#),
            ("20.20.20.2", 80, ""),
            ("2001:db8::1", 80, ""),
        ] {
            let c = rs.plan(mk(vip, port, extra), 16).unwrap();
            rs.apply(&c);
        }
        let ip: IpAddr = "20.20.20.1".parse().unwrap();
        assert_eq!(rs.of_vip(ip).count(), 2);
        let e = rs.plan(mk("20.20.20.1", 85, ""), 16).unwrap_err();
        assert!(matches!(e, RuleError::Conflict(_)), "{e}");
        assert!(rs.plan(mk("20.20.20.1", 100, ""), 16).is_ok());
        let e = rs.plan(mk("20.20.20.1", 100, r#","protocol":"udp","block":1"#), 16);
        assert!(matches!(e, Err(RuleError::Conflict(_))), "{e:?}");
        // A new VIP that is another rule's endpoint, and one that is not.
        let c = rs
            .plan(spec(&body(200, &[("10.9.9.9", 80, 1)], "")), 16)
            .unwrap();
        rs.apply(&c);
        let e = rs.plan(mk("10.9.9.9", 80, ""), 16).unwrap_err().to_string();
        assert!(
            e.contains("is an endpoint of lb-rule 20.20.20.1:200"),
            "{e}"
        );
        assert!(rs.plan(mk("10.9.9.8", 80, ""), 16).is_ok());
    }

    #[test]
    fn overlapping_rules_conflict_and_ids_run_out() {
        let mut rs = RuleSet::default();
        rs.apply(
            &rs.plan(spec(&body(80, &[], r#","portMax":90"#)), 2)
                .unwrap(),
        );
        let e = rs.plan(spec(&body(85, &[], "")), 2).unwrap_err();
        assert!(matches!(e, RuleError::Conflict(_)), "{e}");
        // Another block with the same port still collides in the datapath.
        let e = rs
            .plan(spec(&body(80, &[], r#","portMax":90,"block":1"#)), 2)
            .unwrap_err();
        assert!(matches!(e, RuleError::Conflict(_)), "{e}");
        rs.apply(&rs.plan(spec(&body(91, &[], "")), 2).unwrap());
        let e = rs.plan(spec(&body(92, &[], "")), 2).unwrap_err();
        assert!(matches!(e, RuleError::Full(_)), "{e}");
        // Another protocol on the same port is fine.
        assert!(
            rs.plan(spec(&body(80, &[], r#","protocol":"udp""#)), 3)
                .is_ok()
        );
    }

    #[test]
    fn backends_table_matches_selection() {
        let mut rs = RuleSet::default();
        rs.apply(
            &rs.plan(
                spec(&body(
                    80,
                    &[("10.0.0.1", 80, 3), ("10.0.0.2", 80, 1)],
                    r#","sel":2"#,
                )),
                4,
            )
            .unwrap(),
        );
        let be = backends(rs.rules.values().next().unwrap());
        assert_eq!(be.count, 2);
        assert_eq!(be.lut_len, 4);
        let r = rs.rules.values().next().unwrap().clone();
        let mut h = r.clone();
        h.service.selection = Selection::Hash;
        assert_eq!(backends(&h).lut_len as usize, ferrolb_bpf::maps::LUT_SIZE);
        let mut rr = r;
        rr.service.selection = Selection::RoundRobin;
        assert_eq!(backends(&rr).lut_len, 2);
    }
}
