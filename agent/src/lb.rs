//! The load-balancer engine: owns the datapath, the rule set, the state store and the VIPs on
//! `lo`, and performs every change in the order that keeps them consistent (see
//! [`crate::rules`]). REST handlers, the garbage collector and metrics go through it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ferrolb_bpf::Datapath;
use ferrolb_bpf::maps::{CtState, MAX_ENDPOINTS};
use tracing::{info, warn};

use crate::api::models::{
    CtEntry, CtList, LbEndpoint, LbEntry, LbList, LbServiceArgs, Protocol, RuleKey, RuleSpec,
};
use crate::rules::{self, Change, Rule, RuleError, RuleSet};
use crate::store::Store;
use crate::vip;

/// Conntrack figures from the last collector pass (metrics read these, not the map).
#[derive(Debug, Clone, Default)]
pub struct CtCensus {
    /// (protocol, state) -> flows (original-direction entries).
    pub flows: BTreeMap<(String, &'static str), u64>,
    pub entries: u64,
    pub collected_total: u64,
}

pub struct Engine {
    dp: Datapath,
    rules: RuleSet,
    store: Store,
    managed_vips: BTreeSet<IpAddr>,
    pub census: CtCensus,
}

impl Engine {
    /// Restores saved rules into the (possibly adopted) datapath and puts VIPs on `lo`.
    pub fn start(mut dp: Datapath, store: Store, adopted: bool) -> anyhow::Result<Engine> {
        let (rules, managed) = store.load()?.unwrap_or_default();
        rules::restore(&mut dp, &rules, adopted)?;
        let managed = vip::sync(&rules.vips(), &managed)?;
        store.save(&rules, &managed)?;
        info!(
            rules = rules.len(),
            adopted,
            "state restored from {}",
            store.path().display()
        );
        Ok(Engine {
            dp,
            rules,
            store,
            managed_vips: managed,
            census: CtCensus::default(),
        })
    }

    pub fn datapath(&self) -> &Datapath {
        &self.dp
    }

    pub fn datapath_mut(&mut self) -> &mut Datapath {
        &mut self.dp
    }

    pub fn rules(&self) -> &RuleSet {
        &self.rules
    }

    /// Create, modify, attach or detach (by `spec.oper`).
    pub fn apply(&mut self, mut spec: RuleSpec) -> Result<(), RuleError> {
        let cap = self.dp.capacity().services;
        // One-arm needs each endpoint's source address; a missing route is the caller's
        // problem, named by endpoint.
        let mut snat = BTreeMap::new();
        if spec.service.mode == 1 {
            for (i, e) in spec.endpoints.iter().enumerate() {
                let src = vip::source_toward(e.ip).map_err(|err| {
                    RuleError::Invalid(crate::api::models::FieldError::new(
                        format!("endpoints[{i}].endpointIP"),
                        format!("one-arm mode needs a route to {}: {err:#}", e.ip),
                    ))
                })?;
                snat.insert(e.ip, src);
            }
        }
        if spec.service.name.is_empty() {
            spec.service.name = String::new();
        }
        let mut change = self.rules.plan(spec, cap)?;
        let fill = |r: &mut Rule| {
            for e in &mut r.endpoints {
                if let Some(s) = snat.get(&e.spec.ip) {
                    e.snat = Some(*s);
                }
            }
        };
        match &mut change {
            Change::Create(r) => fill(r),
            Change::Modify { new, .. } => {
                if new.service.mode == 1 {
                    for e in &mut new.endpoints {
                        if e.snat.is_none() {
                            e.snat = vip::source_toward(e.spec.ip).ok();
                        }
                    }
                }
                fill(new)
            }
        }
        let before = self.rules.clone();
        let mut after = self.rules.clone();
        after.apply(&change);
        if let Err(e) = rules::program(&mut self.dp, &after, &change) {
            warn!(error = %e, "datapath update failed; rolling back");
            self.rollback(&before);
            return Err(RuleError::Internal(format!("datapath update failed: {e}")));
        }
        self.rules = after;
        self.commit(&before)
    }

    /// Deletes rules by key. Keys that do not exist are a 404 for the caller.
    pub fn delete(&mut self, keys: &[RuleKey]) -> Result<usize, RuleError> {
        if keys.is_empty() {
            return Err(RuleError::NotFound("lb-rule not found".into()));
        }
        let before = self.rules.clone();
        for k in keys {
            let Some(r) = self.rules.rules.remove(k) else {
                continue;
            };
            if let Err(e) = rules::uninstall(&mut self.dp, &self.rules, &r) {
                warn!(error = %e, "datapath delete failed; rolling back");
                self.rollback(&before);
                return Err(RuleError::Internal(format!("datapath update failed: {e}")));
            }
        }
        self.commit(&before)?;
        Ok(keys.len())
    }

    pub fn find(
        &self,
        ip: IpAddr,
        port: u16,
        port_max: Option<u16>,
        proto: Protocol,
        block: Option<u32>,
    ) -> Vec<RuleKey> {
        self.rules.find(ip, port, port_max, proto, block)
    }

    pub fn find_by_name(&self, name: &str) -> Vec<RuleKey> {
        self.rules
            .rules
            .values()
            .filter(|r| r.service.name == name)
            .map(|r| r.key.clone())
            .collect()
    }

    pub fn all_keys(&self) -> Vec<RuleKey> {
        self.rules.rules.keys().cloned().collect()
    }

    /// VIPs and the state file follow the rule set; on failure the previous rules are put
    /// back (datapath included).
    fn commit(&mut self, before: &RuleSet) -> Result<(), RuleError> {
        let managed = match vip::sync(&self.rules.vips(), &self.managed_vips) {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "VIP update failed; rolling back");
                self.rollback(before);
                return Err(RuleError::Internal(format!("VIP update failed: {e:#}")));
            }
        };
        self.managed_vips = managed;
        if let Err(e) = self.store.save(&self.rules, &self.managed_vips) {
            warn!(error = %e, "saving state failed; rolling back");
            self.rollback(before);
            return Err(RuleError::Internal(format!("saving state failed: {e}")));
        }
        Ok(())
    }

    fn rollback(&mut self, before: &RuleSet) {
        self.rules = before.clone();
        if let Err(e) = rules::restore(&mut self.dp, &self.rules, true) {
            warn!(error = %e, "rollback of the datapath failed");
        }
        if let Ok(m) = vip::sync(&self.rules.vips(), &self.managed_vips) {
            self.managed_vips = m;
        }
    }

    /// `GET /config/loadbalancer/all`.
    pub fn list(&self) -> LbList {
        let lb_attr = self
            .rules
            .rules
            .values()
            .map(|r| {
                let s = &r.service;
                LbEntry {
                    service_arguments: LbServiceArgs {
                        external_ip: r.key.external_ip.to_string(),
                        private_ip: s.private_ip.clone(),
                        port: r.key.port,
                        port_max: r.key.port_max,
                        protocol: r.key.protocol.as_str().into(),
                        sel: s.sel,
                        mode: s.mode,
                        bgp: s.bgp,
                        monitor: s.monitor,
                        inactive_timeout: s.inactive_timeout_s,
                        block: r.key.block,
                        managed: s.managed,
                        probetype: s.probe_type.clone(),
                        probeport: s.probe_port,
                        probereq: s.probe_req.clone(),
                        proberesp: s.probe_resp.clone(),
                        probe_timeout: s.probe_timeout,
                        probe_retries: s.probe_retries,
                        security: s.security,
                        name: s.name.clone(),
                        oper: 0,
                        host: r.key.host.clone(),
                        proxyprotocolv2: s.proxy_protocol_v2,
                        egress: s.egress,
                        snat: s.snat,
                    },
                    secondary_ips: vec![],
                    allowed_sources: vec![],
                    endpoints: r
                        .endpoints
                        .iter()
                        .map(|e| {
                            let st = self.dp.endpoint_stats(r.id, u32::from(e.slot));
                            LbEndpoint {
                                endpoint_ip: e.spec.ip.to_string(),
                                target_port: e.spec.target_port,
                                weight: e.spec.weight,
                                state: "active".into(),
                                counter: format!("{}:{}", st.packets, st.bytes),
                            }
                        })
                        .collect(),
                }
            })
            .collect();
        LbList { lb_attr }
    }

    /// `GET /config/conntrack/all`: one entry per flow (the original direction), with the
    /// packets and bytes of both directions.
    pub fn conntrack(&self) -> CtList {
        let entries = self.dp.ct_entries();
        let by_key: BTreeMap<_, _> = entries.iter().map(|(k, v)| (key_tuple(k), v)).collect();
        let names: BTreeMap<u32, String> = self
            .rules
            .rules
            .values()
            .map(|r| (r.id, r.label()))
            .collect();
        let mut out = Vec::new();
        for (k, v) in &entries {
            if v.dir != 0 {
                continue;
            }
            let peer = k.peer(v);
            let (rp, rb) = by_key
                .get(&key_tuple(&peer))
                .map(|p| (p.packets, p.bytes))
                .unwrap_or((0, 0));
            let proto = Protocol::from_number(k.proto)
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| k.proto.to_string());
            let mode = match v.mode {
                1 => "onearm",
                2 => "fullnat",
                _ => "dnat",
            };
            let state = match v.state() {
                CtState::Established if k.proto != 6 => "est",
                s => ct_state_name(s),
            };
            out.push(CtEntry {
                destination_ip: k.dst().to_string(),
                source_ip: k.src().to_string(),
                destination_port: k.dst_port(),
                source_port: k.src_port(),
                protocol: proto,
                conntrack_state: state.into(),
                conntrack_act: format!(
                    "{mode}-{}:{}->{}:{}",
                    v.nat_src(k.family),
                    u16::from_be(v.nat_sport),
                    v.nat_dst(k.family),
                    u16::from_be(v.nat_dport)
                ),
                packets: v.packets + rp,
                bytes: v.bytes + rb,
                serv_name: names.get(&v.svc_id).cloned().unwrap_or_default(),
            });
        }
        CtList { ct_attr: out }
    }

    /// One collector pass: removes expired entries and takes the census metrics read.
    pub fn collect(&mut self, now_ns: u64) -> usize {
        let entries = self.dp.ct_entries();
        let mut flows: BTreeMap<(String, &'static str), u64> = BTreeMap::new();
        for (k, v) in &entries {
            if v.dir == 0 && !v.expired(k.proto, now_ns) {
                let p = Protocol::from_number(k.proto)
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_else(|| k.proto.to_string());
                *flows.entry((p, v.state().name())).or_default() += 1;
            }
        }
        let removed = self.dp.ct_collect_from(&entries, now_ns);
        self.census.flows = flows;
        self.census.entries = (entries.len() - removed) as u64;
        self.census.collected_total += removed as u64;
        removed
    }

    /// Per-endpoint figures for metrics: (rule label, vip, port, proto, endpoint, packets,
    /// bytes).
    pub fn endpoint_counters(&self) -> Vec<(String, String, u64, u64)> {
        let mut v = Vec::new();
        for r in self.rules.rules.values() {
            for e in &r.endpoints {
                if usize::from(e.slot) >= MAX_ENDPOINTS {
                    continue;
                }
                let st = self.dp.endpoint_stats(r.id, u32::from(e.slot));
                v.push((
                    r.label(),
                    format!("{}:{}", e.spec.ip, e.spec.target_port),
                    st.packets,
                    st.bytes,
                ));
            }
        }
        v
    }
}

fn key_tuple(k: &ferrolb_bpf::maps::CtKey) -> ([u32; 4], [u32; 4], u16, u16, u8) {
    (k.saddr, k.daddr, k.sport, k.dport, k.proto)
}

/// loxilb-style conntrack state names.
pub fn ct_state_name(s: CtState) -> &'static str {
    match s {
        CtState::None => "new",
        CtState::SynSent => "syn-sent",
        CtState::SynRecv => "syn-recv",
        CtState::Established => "est",
        CtState::FinWait => "fin-wait",
        CtState::TimeWait => "time-wait",
        CtState::Close => "closed",
    }
}
