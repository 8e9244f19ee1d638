//! The load-balancer engine: owns the datapath, the rule set, the state store and the VIPs on
//! `lo`, and performs every change in the order that keeps them consistent (see
//! [`crate::rules`]).
//!
//! The engine lives on a thread of its own ([`EngineHandle::spawn`]): everything it does
//! blocks (map updates, rtnetlink, `fdatasync`), so none of it runs on the async workers that
//! carry BGP keepalives and sync heartbeats. REST handlers, the collector and metrics send it
//! jobs and await the answers; rule changes are announced on a watch channel that BGP follows.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use ferrolb_bpf::Datapath;
use ferrolb_bpf::maps::CtState;
use tracing::{info, warn};

use crate::model::{FieldError, NatMode, Protocol, RuleKey, RuleSpec};
use crate::rules::{self, Change, Rule, RuleError, RuleSet};
use crate::store::{Op, Store};
use crate::vip;

/// Conntrack figures from the last collector pass (metrics read these, not the map).
#[derive(Debug, Clone, Default)]
pub struct CtCensus {
    /// (protocol, state) -> flows (original-direction entries).
    pub flows: BTreeMap<(ProtoName, &'static str), u64>,
    /// Source-NAT ports held per pool (live reply entries of one-arm and full-NAT flows).
    pub nat_pools: BTreeMap<NatPool, u64>,
    /// Entries of the conntrack table, and of the half-open table.
    pub entries: u64,
    pub halfopen: u64,
    /// Half-open TCP flows in the conntrack table itself (the in-place budget's).
    pub halfopen_inplace: u64,
    pub collected_total: u64,
    /// Flows of this node first seen by the last pass (created since the pass before).
    pub new_flows: u64,
    /// Per service id, since the rule was created: flows of this node first seen by a pass,
    /// and TCP flows seen reset (RST) by a pass. Sampled as loxilb's exporter samples: a flow
    /// that opens and leaves the table between two passes is not seen.
    pub requests: BTreeMap<u32, u64>,
    pub errors: BTreeMap<u32, u64>,
}

/// A source-NAT port pool: flows translated to one source address toward one endpoint
/// address and port share its 64,512 ports (ICMP: echo identifiers, port 0).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct NatPool {
    pub protocol: ProtoName,
    /// The translated source: the VIP (full NAT) or the node's address (one-arm).
    pub source: IpAddr,
    pub endpoint: IpAddr,
    pub port: u16,
}

/// Flows to remove from conntrack after a rule change. Only flows created before the change
/// go (`before_ns`): a service id or endpoint slot given to a new rule or endpoint since keeps
/// its new flows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flush {
    /// Every flow of these (deleted) services.
    Services { ids: BTreeSet<u32>, before_ns: u64 },
    /// The flows of a service's removed endpoints (UDP and ICMP: TCP drains).
    Endpoints {
        svc: u32,
        slots: Vec<u8>,
        before_ns: u64,
    },
    /// The flows of a service from clients outside its (new) allowed sources.
    Sources {
        svc: u32,
        allowed: Vec<ipnet::IpNet>,
        before_ns: u64,
    },
}

/// The client of a flow, from either of its entries: the original entry's source, or the
/// address a reply is translated back to.
fn flow_client(k: &ferrolb_bpf::maps::CtKey, v: &ferrolb_bpf::maps::Ct) -> IpAddr {
    if v.dir == 0 {
        ferrolb_bpf::maps::words_addr(&k.saddr, k.family)
    } else {
        ferrolb_bpf::maps::words_addr(&v.nat_daddr, k.family)
    }
}

impl Flush {
    fn matches(&self, k: &ferrolb_bpf::maps::CtKey, v: &ferrolb_bpf::maps::Ct) -> bool {
        match self {
            Flush::Sources {
                svc,
                allowed,
                before_ns,
            } => {
                v.svc_id == *svc && v.created_ns < *before_ns && {
                    let c = flow_client(k, v);
                    !allowed.iter().any(|n| n.contains(&c))
                }
            }
            Flush::Services { ids, before_ns } => {
                ids.contains(&v.svc_id) && v.created_ns < *before_ns
            }
            Flush::Endpoints {
                svc,
                slots,
                before_ns,
            } => {
                v.svc_id == *svc
                    && slots.iter().any(|s| u16::from(*s) == v.ep_idx)
                    && v.created_ns < *before_ns
            }
        }
    }
}

/// Removes flows of deleted rules and endpoints on a thread of its own (`ferrolb-flush`), with
/// its own conntrack handles: a delete answers without walking the table, and a burst of
/// deletes shares one walk. Flows of a deleted rule are gone within a walk of the table
/// (milliseconds to a second at a million entries).
pub fn spawn_flusher(
    mut collector: ferrolb_bpf::Collector,
) -> std::io::Result<std::sync::mpsc::Sender<Flush>> {
    let (tx, rx) = std::sync::mpsc::channel::<Flush>();
    std::thread::Builder::new()
        .name("ferrolb-flush".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut reqs = vec![first];
                reqs.extend(rx.try_iter());
                let t = std::time::Instant::now();
                let n = at_low_priority(|| {
                    collector.remove_where(|k, v| reqs.iter().any(|r| r.matches(k, v)))
                });
                info!(
                    requests = reqs.len(),
                    entries = n,
                    ms = t.elapsed().as_millis() as u64,
                    "flows of deleted rules and endpoints flushed"
                );
            }
        })?;
    Ok(tx)
}

/// Runs `f` on the current thread at a lower CPU priority (nice 10), then restores it: bulk
/// work (table walks, listings) yields the CPU to the latency-sensitive tasks (sync, BGP, BFD,
/// REST) on a busy node instead of competing with them as an equal.
pub fn at_low_priority<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: plain syscalls on the calling thread (PRIO_PROCESS with a thread id applies to
    // that thread on Linux).
    let tid = unsafe { libc::gettid() } as libc::id_t;
    let before = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
    unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 10) };
    let r = f();
    // SAFETY: as above; the thread (possibly a reused pool thread) gets its priority back.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, before) };
    r
}

/// Sets the calling thread's nice value (negative needs CAP_SYS_NICE).
pub fn set_thread_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: a plain syscall on the calling thread.
    let tid = unsafe { libc::gettid() } as libc::id_t;
    // SAFETY: as above.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `SCHED_FIFO` at `priority` for the calling thread.
pub fn set_thread_realtime(priority: u8) -> std::io::Result<()> {
    let param = libc::sched_param {
        sched_priority: i32::from(priority),
    };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A job for the engine's thread.
type Job = Box<dyn FnOnce(&mut Engine) + Send>;

/// The engine's thread stopped (it panicked, or the agent is stopping).
#[derive(Debug, thiserror::Error)]
#[error("the rule engine is not running")]
pub struct EngineGone;

/// Jobs waiting for the engine beyond this make callers wait (back-pressure on bursts).
const QUEUE: usize = 256;

/// The way to the engine's thread. Cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    tx: tokio::sync::mpsc::Sender<Job>,
    rules: tokio::sync::watch::Receiver<u64>,
}

impl EngineHandle {
    /// Moves `engine` onto its own thread.
    pub fn spawn(mut engine: Engine) -> std::io::Result<EngineHandle> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Job>(QUEUE);
        let rules = engine.rules_version.subscribe();
        std::thread::Builder::new()
            .name("ferrolb-engine".into())
            .spawn(move || {
                while let Some(job) = rx.blocking_recv() {
                    job(&mut engine);
                }
            })?;
        Ok(EngineHandle { tx, rules })
    }

    /// Runs `f` on the engine's thread and returns its answer.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Engine) -> R + Send + 'static,
    ) -> Result<R, EngineGone> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Box::new(move |e| {
                let _ = tx.send(f(e));
            }))
            .await
            .map_err(|_| EngineGone)?;
        rx.await.map_err(|_| EngineGone)
    }

    /// [`EngineHandle::call`] from a thread outside the async runtime (the blocking pool).
    pub fn call_blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Engine) -> R + Send + 'static,
    ) -> Result<R, EngineGone> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .blocking_send(Box::new(move |e| {
                let _ = tx.send(f(e));
            }))
            .map_err(|_| EngineGone)?;
        rx.blocking_recv().map_err(|_| EngineGone)
    }

    /// Changes every time the rule set changes.
    pub fn rules_changed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.rules.clone()
    }
}

/// What a collector pass counts (see [`census`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CensusPass {
    /// (protocol, state) -> flows (original-direction entries).
    pub flows: BTreeMap<(ProtoName, &'static str), u64>,
    pub nat_pools: BTreeMap<NatPool, u64>,
    /// Per service id: this node's flows created since the previous pass, and TCP flows
    /// reset since then (in CLOSE, last packet after the previous pass).
    pub created: BTreeMap<u32, u64>,
    pub reset: BTreeMap<u32, u64>,
    /// Half-open TCP flows listed in the conntrack table itself (the in-place budget's).
    pub halfopen_inplace: u64,
}

/// One flow as listed: its original direction, both directions' counters.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowView {
    pub client: SocketAddr,
    pub vip: SocketAddr,
    pub protocol: String,
    pub state: &'static str,
    pub nat: NatMode,
    pub nat_source: SocketAddr,
    pub nat_destination: SocketAddr,
    pub packets: u64,
    pub bytes: u64,
    /// The rule's label.
    pub service: String,
    /// The node (`--self`) that created it.
    pub origin: u16,
    /// Installed from a peer's sync stream.
    pub synced: bool,
}

pub struct Engine {
    dp: Datapath,
    rules: RuleSet,
    store: Store,
    managed_vips: BTreeSet<IpAddr>,
    pub census: CtCensus,
    /// Bumped after every change of the rule set.
    rules_version: tokio::sync::watch::Sender<u64>,
    /// Where conntrack flushes go ([`spawn_flusher`]); done inline without one.
    flusher: Option<std::sync::mpsc::Sender<Flush>>,
    /// Endpoints the prober found dead or an operator forced down.
    health: crate::health::Verdicts,
    /// One-arm source addresses that float with the MASTER role (`--onearm-source`).
    onearm_sources: Vec<ipnet::IpNet>,
    /// This node is in a cluster (`--cluster`): one-arm flows sourced from its own interface
    /// address end at a failover.
    in_cluster: bool,
    /// One-arm rules already warned about that.
    warned_onearm: BTreeSet<String>,
    /// Sources added over REST (the others come from the flag).
    rest_sources: BTreeSet<IpAddr>,
}

/// Floating one-arm sources a node may have (each is an address on `lo` and three ranges
/// entries).
pub const MAX_ONEARM_SOURCES: usize = 256;

/// The ranges keys that make the datapath treat `a` like a VIP.
fn source_range_keys(a: IpAddr) -> Vec<ferrolb_bpf::maps::RangeKey> {
    let family = if a.is_ipv6() { 6 } else { 4 };
    [
        ferrolb_bpf::maps::PROTO_TCP,
        ferrolb_bpf::maps::PROTO_UDP,
        ferrolb_bpf::maps::PROTO_ICMP,
    ]
    .into_iter()
    .map(|proto| ferrolb_bpf::maps::RangeKey {
        addr: ferrolb_bpf::maps::addr_words(a).0,
        proto,
        family,
        pad: 0,
    })
    .collect()
}

/// The warning of a one-arm rule in a cluster whose flows leave from a node's own address.
pub const ONEARM_OWN_SOURCE: &str = "one-arm flows leave from this node's own interface address (no --onearm-source covers the endpoints): they end at a failover";

/// What an operator should know about a rule: in a cluster, a one-arm rule with an endpoint
/// translated from a node's own address (not a floating `--onearm-source`). Pure.
pub fn rule_warnings(r: &Rule, sources: &[ipnet::IpNet], in_cluster: bool) -> Vec<String> {
    let own = r.service.nat == NatMode::OneArm
        && r.endpoints.iter().any(|e| {
            e.snat
                .is_some_and(|a| !sources.iter().any(|n| n.addr() == a))
        });
    if own && in_cluster {
        vec![ONEARM_OWN_SOURCE.to_string()]
    } else {
        Vec::new()
    }
}

/// The one-arm source of an endpoint: the floating address whose prefix holds it, if one
/// does (the first of its family). Pure.
pub fn floating_source(ep: IpAddr, sources: &[ipnet::IpNet]) -> Option<IpAddr> {
    sources.iter().find(|n| n.contains(&ep)).map(|n| n.addr())
}

impl Engine {
    /// Restores saved rules into the (possibly adopted) datapath and puts VIPs on `lo`.
    pub fn start(mut dp: Datapath, mut store: Store, adopted: bool) -> anyhow::Result<Engine> {
        let (rules, managed) = store.load()?.unwrap_or_default();
        rules::restore(&mut dp, &rules, adopted)?;
        let managed = vip::sync(&rules.vips(), &managed)?;
        if let Err(e) = store.snapshot_at_start(&rules, &managed) {
            if !e.is_no_space() {
                return Err(e.into());
            }
            // A full state volume must not keep the agent down: the loaded state is complete
            // (snapshot + journal); changes answer 507 until there is room.
            warn!(error = %e, "state volume full: starting without compacting the state");
        }
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
            rules_version: tokio::sync::watch::channel(0).0,
            flusher: None,
            health: crate::health::Verdicts::default(),
            onearm_sources: Vec::new(),
            in_cluster: false,
            warned_onearm: BTreeSet::new(),
            rest_sources: BTreeSet::new(),
        })
    }

    /// Floating one-arm sources: each goes on `lo` and gets (empty) ranges entries, so that
    /// the datapath treats it like a VIP: a BACKUP in L2 mode drops ARP requests for it and a
    /// new MASTER announces it; mid-stream TCP to it that matches no flow is dropped, not
    /// reset. Endpoints inside a source's prefix are translated from that address. `rest`:
    /// those added over REST before (saved), after the flags' (a flag's address wins).
    pub fn set_onearm_sources(
        &mut self,
        flags: Vec<ipnet::IpNet>,
        rest: Vec<ipnet::IpNet>,
        in_cluster: bool,
    ) {
        self.in_cluster = in_cluster;
        for n in flags {
            self.install_source(n);
        }
        for n in rest {
            if self.onearm_sources.iter().any(|o| o.addr() == n.addr()) {
                warn!(source = %n, "saved one-arm source ignored: --onearm-source gives that address");
                continue;
            }
            self.install_source(n);
            self.rest_sources.insert(n.addr());
        }
    }

    fn install_source(&mut self, n: ipnet::IpNet) {
        let a = n.addr();
        self.own_address(a, "one-arm source");
        info!(source = %a, prefix = %n.trunc(), "one-arm source floats with the MASTER role");
        self.onearm_sources.retain(|o| o.addr() != a);
        self.onearm_sources.push(n);
        crate::health::set_floating_sources(self.onearm_sources());
    }

    /// A source address this node translates to, that is no VIP (`what` names it in logs):
    /// on `lo`, and marked in the datapath like a VIP.
    fn own_address(&mut self, a: IpAddr, what: &str) {
        if let Err(e) = vip::add(a) {
            warn!(address = %a, error = %e, "cannot put the {what} on lo");
        }
        for key in source_range_keys(a) {
            if let Err(e) = self.dp.set_ranges(&key, &Default::default()) {
                warn!(address = %a, error = %e, "cannot mark the {what} in the datapath");
            }
        }
    }

    /// This node's own full-NAT source address (`--node-snat`): on `lo`, so a packet to it that
    /// matches no flow ends here (a reset or an ICMP error) instead of following the default
    /// route back to the ToR, which routes it here again until its TTL ends; and marked in the
    /// datapath like a VIP (unknown mid-stream TCP to it is dropped).
    pub fn install_node_address(&mut self, a: IpAddr) {
        self.own_address(a, "node source address");
        info!(address = %a, "full-NAT flows of this node leave from its own address");
    }

    /// `POST /config/onearmsource`: a floating one-arm source for endpoints added from now on
    /// (endpoints already installed keep theirs until their rule is posted again).
    pub fn add_onearm_source(&mut self, n: ipnet::IpNet) -> Result<(), RuleError> {
        let a = n.addr();
        if self.onearm_sources.iter().any(|o| o.addr() == a) && !self.rest_sources.contains(&a) {
            return Err(RuleError::Invalid(FieldError::new(
                "source",
                format!("{a} is given by --onearm-source; change the flag to change it"),
            )));
        }
        if self.rules.vips().contains(&a) {
            return Err(RuleError::Invalid(FieldError::new(
                "source",
                format!("{a} is a VIP of a rule, not a source address"),
            )));
        }
        let owner = vip::interface_with(a)
            .map_err(|e| RuleError::Internal(format!("listing this node's addresses: {e:#}")))?;
        if let Some(iface) = owner.filter(|i| i != "lo") {
            return Err(RuleError::Invalid(FieldError::new(
                "source",
                format!(
                    "{a} is an address of this node ({iface}); a floating source must be an address no interface here has"
                ),
            )));
        }
        if !self.rest_sources.contains(&a) && self.onearm_sources.len() >= MAX_ONEARM_SOURCES {
            return Err(RuleError::Invalid(FieldError::new(
                "source",
                format!("at most {MAX_ONEARM_SOURCES} one-arm sources"),
            )));
        }
        self.install_source(n);
        self.rest_sources.insert(a);
        Ok(())
    }

    /// `DELETE /config/onearmsource/{ip}`: only a REST-made source no endpoint uses.
    pub fn remove_onearm_source(&mut self, a: IpAddr) -> Result<(), RuleError> {
        if !self.onearm_sources.iter().any(|o| o.addr() == a) {
            return Err(RuleError::NotFound(format!("no one-arm source {a}")));
        }
        if !self.rest_sources.contains(&a) {
            return Err(RuleError::Invalid(FieldError::new(
                "source",
                format!("{a} is given by --onearm-source; change the flag to remove it"),
            )));
        }
        if let Some(r) = self
            .rules
            .rules
            .values()
            .find(|r| r.endpoints.iter().any(|e| e.snat == Some(a)))
        {
            return Err(RuleError::Invalid(FieldError::new(
                "source",
                format!(
                    "{a} is the source of endpoints of rule '{}' ({}:{}); delete or re-post that rule first",
                    r.service.name, r.key.external_ip, r.key.port
                ),
            )));
        }
        for key in source_range_keys(a) {
            let _ = self.dp.delete_ranges(&key);
        }
        if let Err(e) = vip::del(a) {
            warn!(address = %a, error = %e, "cannot remove the one-arm source from lo");
        }
        self.onearm_sources.retain(|o| o.addr() != a);
        self.rest_sources.remove(&a);
        crate::health::set_floating_sources(self.onearm_sources());
        Ok(())
    }

    /// Every floating source, with whether it came over REST (else from the flag) and how
    /// many endpoints leave from it.
    pub fn onearm_source_list(&self) -> Vec<(ipnet::IpNet, bool, usize)> {
        self.onearm_sources
            .iter()
            .map(|n| {
                let users = self
                    .rules
                    .rules
                    .values()
                    .flat_map(|r| &r.endpoints)
                    .filter(|e| e.snat == Some(n.addr()))
                    .count();
                (*n, self.rest_sources.contains(&n.addr()), users)
            })
            .collect()
    }

    /// The REST-made sources (what `onearm.json` holds).
    pub fn rest_onearm_sources(&self) -> Vec<ipnet::IpNet> {
        self.onearm_sources
            .iter()
            .filter(|n| self.rest_sources.contains(&n.addr()))
            .copied()
            .collect()
    }

    /// What an operator should know about a rule (shown by `GET /config/loadbalancer/all`
    /// and `ferroctl get lb`).
    pub fn rule_warnings(&self, r: &Rule) -> Vec<String> {
        rule_warnings(r, &self.onearm_sources, self.in_cluster)
    }

    pub fn onearm_sources(&self) -> Vec<IpAddr> {
        self.onearm_sources.iter().map(|n| n.addr()).collect()
    }

    /// Conntrack flushes from now on go to `tx` (see [`spawn_flusher`]).
    pub fn set_flusher(&mut self, tx: std::sync::mpsc::Sender<Flush>) {
        self.flusher = Some(tx);
    }

    fn flush(&mut self, f: Flush) {
        let f = match &self.flusher {
            Some(tx) => match tx.send(f) {
                Ok(()) => return,
                Err(e) => e.0,
            },
            None => f,
        };
        let n = self.dp.ct_remove_where(|k, v| f.matches(k, v));
        info!(entries = n, "flows of deleted rules and endpoints flushed");
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

    /// Create, modify, attach or detach (by `spec.oper`). Datapath, VIP and journal change
    /// together or not at all.
    pub fn apply(&mut self, spec: RuleSpec) -> Result<(), RuleError> {
        let cap = self.dp.capacity().services;
        // A new VIP must not be an address of this node's interfaces (lo aside: an operator
        // may provision VIPs there): it would go on lo and take the address from its owner.
        let vip = spec.key.external_ip;
        if !self.managed_vips.contains(&vip)
            && !self.rules.rules.values().any(|r| r.key.external_ip == vip)
        {
            let owner = vip::interface_with(vip).map_err(|e| {
                RuleError::Internal(format!("listing this node's addresses: {e:#}"))
            })?;
            if let Some(iface) = owner.filter(|i| i != "lo") {
                return Err(RuleError::Invalid(FieldError::new(
                    "serviceArguments.externalIP",
                    format!(
                        "{vip} is an address of this node ({iface}); a VIP must be an address no interface here has"
                    ),
                )));
            }
        }
        let mut change = self.rules.plan(spec, cap)?;
        rules::check_source_room(&self.rules, &change, self.dp.capacity().sources)?;
        if let Change::Create(r) = &change {
            self.forget_census(r.id);
        }
        if self.onearm_sources.iter().any(|n| n.addr() == vip) {
            return Err(RuleError::Invalid(FieldError::new(
                "serviceArguments.externalIP",
                format!("{vip} is a one-arm source address (--onearm-source), not a VIP"),
            )));
        }
        // One-arm needs each endpoint's source address (kept for endpoints that stay): a
        // floating one where configured, else the address of the interface toward it.
        if change.rule().service.nat == NatMode::OneArm {
            let floating = self.onearm_sources.clone();
            let mut own_address = false;
            for (i, e) in change.rule_mut().endpoints.iter_mut().enumerate() {
                if e.snat.is_some() {
                    own_address |= floating_source(e.spec.ip, &floating).is_none();
                    continue;
                }
                if let Some(src) = floating_source(e.spec.ip, &floating) {
                    e.snat = Some(src);
                    continue;
                }
                own_address = true;
                let src = vip::source_toward_blocking(e.spec.ip).map_err(|err| {
                    RuleError::Invalid(FieldError::new(
                        format!("endpoints[{i}].endpointIP"),
                        format!("one-arm mode needs a route to {}: {err:#}", e.spec.ip),
                    ))
                })?;
                e.snat = Some(src);
            }
            let name = change.rule().service.name.clone();
            if own_address && self.in_cluster && self.warned_onearm.insert(name.clone()) {
                warn!(rule = %name, "{ONEARM_OWN_SOURCE}");
            }
        }
        // Endpoints already known dead stay out of selection in the new version of the rule.
        self.health.mark(change.rule_mut());
        let rule = change.rule().clone();
        let prev = self.rules.apply(&change);
        let undo_table = |rules: &mut RuleSet| match &prev {
            Some(p) => {
                rules.rules.insert(p.key.clone(), p.clone());
            }
            None => {
                rules.rules.remove(&rule.key);
            }
        };
        if let Err(e) = rules::program(&mut self.dp, &self.rules, &change) {
            warn!(error = %e, "datapath update failed; rolling back");
            undo_table(&mut self.rules);
            rules::revert(&mut self.dp, &self.rules, &change);
            return Err(RuleError::Internal(format!("datapath update failed: {e}")));
        }
        let mut ops = vec![Op::Put {
            rule: Box::new(rule.clone()),
        }];
        let vip = rule.key.external_ip;
        let first_use = !self.managed_vips.contains(&vip)
            && !self
                .rules
                .rules
                .values()
                .any(|r| r.key.external_ip == vip && r.key != rule.key);
        let mut new_vip = false;
        if first_use {
            match vip::add(vip) {
                // Ours only if we put it there: an address already on lo is left alone later.
                Ok(added) => new_vip = added,
                Err(e) => {
                    warn!(error = %e, "VIP update failed; rolling back");
                    undo_table(&mut self.rules);
                    rules::revert(&mut self.dp, &self.rules, &change);
                    return Err(RuleError::Internal(format!("{e:#}")));
                }
            }
        }
        if new_vip {
            self.managed_vips.insert(vip);
            ops.push(Op::Vips {
                add: vec![vip],
                del: vec![],
            });
        }
        if let Err(e) = self.store.record(ops, &self.rules, &self.managed_vips) {
            warn!(error = %e, "saving state failed; rolling back");
            undo_table(&mut self.rules);
            rules::revert(&mut self.dp, &self.rules, &change);
            if new_vip {
                self.managed_vips.remove(&vip);
                let _ = vip::del(vip);
            }
            let msg = format!("saving state failed: {e}");
            if e.is_no_space() {
                return Err(RuleError::NoSpace(msg));
            }
            return Err(RuleError::Internal(msg));
        }
        if let Change::Modify { old, new } = &change
            && !new.service.allowed_sources.is_empty()
            && old.service.allowed_sources != new.service.allowed_sources
        {
            // Flows already open from a source no longer allowed end now, as they would have
            // been refused had they started after the change.
            info!(rule = %new.key, "removing flows from sources no longer allowed");
            self.flush(Flush::Sources {
                svc: new.id,
                allowed: new.service.allowed_sources.clone(),
                before_ns: ferrolb_bpf::monotonic_ns(),
            });
        }
        if let Change::Modify { old, new } = &change {
            let slots = rules::flushed_slots(old, new);
            if !slots.is_empty() {
                info!(rule = %old.key, endpoints = slots.len(), "flushing flows of removed endpoints");
                self.flush(Flush::Endpoints {
                    svc: old.id,
                    slots,
                    before_ns: ferrolb_bpf::monotonic_ns(),
                });
            }
        }
        self.rules_version.send_modify(|v| *v = v.wrapping_add(1));
        Ok(())
    }

    /// Takes the prober's verdicts: rules whose endpoints changed state get a new endpoint
    /// set (written to the spare slot, then switched to, as any change); UDP/ICMP flows of
    /// endpoints that went down are flushed (TCP flows drain), as for a removed endpoint.
    /// Returns the number of rules that changed.
    pub fn set_health(&mut self, v: crate::health::Verdicts) -> usize {
        self.health = v;
        let mut changed = 0;
        let keys: Vec<RuleKey> = self.rules.rules.keys().cloned().collect();
        for key in keys {
            let Some(cur) = self.rules.rules.get(&key) else {
                continue;
            };
            let mut next = cur.clone();
            let (differs, went_down) = self.health.mark(&mut next);
            if !differs {
                continue;
            }
            next.flip ^= 1;
            let res = rules::install(&mut self.dp, &next, false).and_then(|()| {
                let mut after = self.rules.clone();
                after.rules.insert(key.clone(), next.clone());
                rules::sync_ranges_for(&mut self.dp, &after, key.external_ip, key.protocol)
            });
            if let Err(e) = res {
                warn!(rule = %key, error = %e, "datapath update for endpoint health failed; kept the previous set");
                continue;
            }
            let up = next.endpoints.iter().filter(|e| !e.down).count();
            info!(rule = %key, active = up, endpoints = next.endpoints.len(), "endpoint states changed");
            let (svc, proto) = (next.id, key.protocol);
            self.rules.rules.insert(key, next);
            changed += 1;
            if !went_down.is_empty() && proto != Protocol::Tcp {
                self.flush(Flush::Endpoints {
                    svc,
                    slots: went_down,
                    before_ns: ferrolb_bpf::monotonic_ns(),
                });
            }
        }
        if changed > 0 {
            self.rules_version.send_modify(|v| *v = v.wrapping_add(1));
        }
        changed
    }

    /// Deletes rules by key (all or nothing).
    pub fn delete(&mut self, keys: &[RuleKey]) -> Result<usize, RuleError> {
        if keys.is_empty() {
            return Err(RuleError::NotFound("lb-rule not found".into()));
        }
        let mut removed: Vec<Rule> = Vec::new();
        let mut failure = None;
        for k in keys {
            let Some(r) = self.rules.rules.remove(k) else {
                continue;
            };
            if let Err(e) = rules::uninstall(&mut self.dp, &self.rules, &r) {
                self.rules.rules.insert(r.key.clone(), r);
                failure = Some(format!("datapath update failed: {e}"));
                break;
            }
            removed.push(r);
        }
        let mut ops: Vec<Op> = removed
            .iter()
            .map(|r| Op::Del { key: r.key.clone() })
            .collect();
        let mut dropped_vips = Vec::new();
        if failure.is_none() {
            let gone: BTreeSet<IpAddr> = removed
                .iter()
                .map(|r| r.key.external_ip)
                .filter(|ip| {
                    self.managed_vips.contains(ip)
                        && !self.rules.rules.values().any(|r| r.key.external_ip == *ip)
                })
                .collect();
            for ip in gone {
                match vip::del(ip) {
                    Ok(()) => {
                        self.managed_vips.remove(&ip);
                        dropped_vips.push(ip);
                    }
                    Err(e) => {
                        failure = Some(format!("{e:#}"));
                        break;
                    }
                }
            }
            if !dropped_vips.is_empty() {
                ops.push(Op::Vips {
                    add: vec![],
                    del: dropped_vips.clone(),
                });
            }
        }
        let mut no_space = false;
        if failure.is_none()
            && let Err(e) = self
                .store
                .record_shrinking(ops, &self.rules, &self.managed_vips)
        {
            no_space = e.is_no_space();
            failure = Some(format!("saving state failed: {e}"));
        }
        if failure.is_none() {
            // One pass over conntrack for every removed rule's flows, off this thread.
            let ids: BTreeSet<u32> = removed.iter().map(|r| r.id).collect();
            for id in &ids {
                self.forget_census(*id);
            }
            info!(rules = removed.len(), "rules deleted");
            self.flush(Flush::Services {
                ids,
                before_ns: ferrolb_bpf::monotonic_ns(),
            });
        }
        if let Some(msg) = failure {
            warn!(error = %msg, "delete failed; rolling back");
            for ip in dropped_vips {
                if vip::add(ip).is_ok() {
                    self.managed_vips.insert(ip);
                }
            }
            for r in removed {
                let change = Change::Create(Box::new(r.clone()));
                self.rules.apply(&change);
                if let Err(e) = rules::program(&mut self.dp, &self.rules, &change) {
                    warn!(error = %e, rule = %r.key, "could not reinstall a rule");
                }
            }
            if no_space {
                return Err(RuleError::NoSpace(msg));
            }
            return Err(RuleError::Internal(msg));
        }
        self.rules_version.send_modify(|v| *v = v.wrapping_add(1));
        Ok(removed.len())
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

    /// Packets and bytes an endpoint slot of a rule forwarded.
    pub fn endpoint_stats(&self, rule: &Rule, slot: u8) -> (u64, u64) {
        let st = self.dp.endpoint_stats(rule.id, u32::from(slot));
        (st.packets, st.bytes)
    }

    /// Rule labels by datapath service id (for flow listings).
    pub fn labels_by_id(&self) -> std::collections::HashMap<u32, String> {
        self.rules
            .rules
            .values()
            .map(|r| (r.id, r.label()))
            .collect()
    }

    /// Records a collector pass (see [`census`]).
    pub fn set_census(&mut self, pass: CensusPass, entries: u64, halfopen: u64, removed: u64) {
        self.census.flows = pass.flows;
        self.census.nat_pools = pass.nat_pools;
        self.census.entries = entries;
        self.census.halfopen = halfopen;
        self.census.halfopen_inplace = pass.halfopen_inplace;
        self.census.collected_total += removed;
        self.census.new_flows = pass.created.values().sum();
        // Only ids that name a rule now (a deleted rule's flows may outlive it by a pass).
        let ids: BTreeSet<u32> = self.rules.rules.values().map(|r| r.id).collect();
        for (id, n) in pass.created.into_iter().filter(|(id, _)| ids.contains(id)) {
            *self.census.requests.entry(id).or_default() += n;
        }
        for (id, n) in pass.reset.into_iter().filter(|(id, _)| ids.contains(id)) {
            *self.census.errors.entry(id).or_default() += n;
        }
    }

    /// Forgets the sampled per-service totals of `id` (its rule is gone, or the id was given
    /// to a new rule).
    fn forget_census(&mut self, id: u32) {
        self.census.requests.remove(&id);
        self.census.errors.remove(&id);
    }
}

/// Live flows (original-direction entries not idle past their timeout) by protocol and state;
/// per service, this node's flows created after `since_ns` (the previous pass) and TCP flows
/// reset after it.
pub fn census(
    entries: &[(ferrolb_bpf::maps::CtKey, ferrolb_bpf::maps::Ct)],
    now_ns: u64,
    since_ns: u64,
) -> CensusPass {
    let mut pass = CensusPass::default();
    pass.add(entries, now_ns, since_ns);
    pass
}

impl CensusPass {
    /// Counts `entries`, a chunk of the collector's walk, into this pass (see [`census`]).
    pub fn add(
        &mut self,
        entries: &[(ferrolb_bpf::maps::CtKey, ferrolb_bpf::maps::Ct)],
        now_ns: u64,
        since_ns: u64,
    ) {
        census_into(self, entries, now_ns, since_ns)
    }
}

fn census_into(
    pass: &mut CensusPass,
    entries: &[(ferrolb_bpf::maps::CtKey, ferrolb_bpf::maps::Ct)],
    now_ns: u64,
    since_ns: u64,
) {
    use ferrolb_bpf::maps::{CTF_SYNCED, MODE_FULLNAT, MODE_ONEARM, PROTO_ICMP, words_addr};
    for (k, v) in entries {
        let synced = v.flags & CTF_SYNCED != 0;
        let live = synced || !v.expired(k.proto, now_ns);
        if v.dir == 0 && !synced {
            // Clocks of this node only (a synced entry's times are its origin's).
            if v.created_ns > since_ns {
                *pass.created.entry(v.svc_id).or_default() += 1;
            }
            if v.state() == CtState::Close && v.last_ns > since_ns {
                *pass.reset.entry(v.svc_id).or_default() += 1;
            }
        }
        if !live {
            continue;
        }
        if v.dir == 0 {
            *pass
                .flows
                .entry((proto_name(k.proto), v.state().name()))
                .or_default() += 1;
        } else if v.mode == MODE_ONEARM || v.mode == MODE_FULLNAT {
            // A reply entry holds its NAT port: key endpoint:port -> source:port.
            let pool = NatPool {
                protocol: proto_name(k.proto),
                source: words_addr(&k.daddr, k.family),
                endpoint: words_addr(&k.saddr, k.family),
                port: if k.proto == PROTO_ICMP {
                    0
                } else {
                    u16::from_be(k.sport)
                },
            };
            *pass.nat_pools.entry(pool).or_default() += 1;
        }
    }
}

/// "tcp", "udp", "icmp", or the protocol number.
/// One flow as listed, from its original-direction entry `k`/`v` and the reply entry `peer`
/// (whose counters it adds), `labels` naming the rules.
pub fn flow_view(
    k: &ferrolb_bpf::maps::CtKey,
    v: &ferrolb_bpf::maps::Ct,
    peer: Option<&ferrolb_bpf::maps::Ct>,
    labels: &std::collections::HashMap<u32, String>,
) -> FlowView {
    let (rp, rb) = peer.map(|p| (p.packets, p.bytes)).unwrap_or((0, 0));
    let state = match v.state() {
        CtState::Established if k.proto != 6 => "est",
        s => ct_state_name(s),
    };
    FlowView {
        client: SocketAddr::new(k.src(), k.src_port()),
        vip: SocketAddr::new(k.dst(), k.dst_port()),
        protocol: proto_name(k.proto).into_owned(),
        state,
        nat: NatMode::from_code(v.mode).unwrap_or(NatMode::Dnat),
        nat_source: SocketAddr::new(v.nat_src(k.family), u16::from_be(v.nat_sport)),
        nat_destination: SocketAddr::new(v.nat_dst(k.family), u16::from_be(v.nat_dport)),
        packets: v.packets + rp,
        bytes: v.bytes + rb,
        service: labels.get(&v.svc_id).cloned().unwrap_or_default(),
        origin: v.origin,
        synced: v.flags & ferrolb_bpf::maps::CTF_SYNCED != 0,
    }
}

/// A protocol's name as the census and the metrics label it: borrowed for the protocols a
/// rule can have, so that counting a pass's flows allocates nothing per flow.
pub type ProtoName = std::borrow::Cow<'static, str>;

fn proto_name(n: u8) -> ProtoName {
    match crate::model::Protocol::from_number(n) {
        Some(p) => ProtoName::Borrowed(p.name()),
        None => ProtoName::Owned(n.to_string()),
    }
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

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use ferrolb_bpf::maps::{
        CTF_LOCAL, CTF_SYNCED, Ct, CtKey, MODE_DNAT, MODE_FULLNAT, MODE_ONEARM, PROTO_TCP,
        PROTO_UDP,
    };

    use super::*;

    const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
    const EP: Ipv4Addr = Ipv4Addr::new(10, 10, 10, 11);
    const NOW: u64 = 1_000_000_000_000;

    /// A one-arm rule in a cluster is flagged when an endpoint leaves from a node's own
    /// address, not when every endpoint has a floating source; never outside a cluster, and
    /// never for other modes.
    #[test]
    fn onearm_rules_sourced_from_the_node_are_flagged_in_a_cluster() {
        let rs = RuleSet::default();
        let body = |mode: u8| {
            format!(
                r#"{{"serviceArguments":{{"externalIP":"203.0.113.10","port":80,"mode":{mode},"name":"w"}},"endpoints":[{{"endpointIP":"10.10.10.11","targetPort":80}}]}}"#
            )
        };
        let c = rs
            .plan(
                crate::api::models::parse_rule(body(1).as_bytes()).unwrap(),
                16,
            )
            .unwrap();
        let mut r = c.rule().clone();
        let floating: Vec<ipnet::IpNet> = vec!["10.10.10.100/24".parse().unwrap()];
        r.endpoints[0].snat = Some("10.10.10.2".parse().unwrap());
        assert_eq!(rule_warnings(&r, &floating, true), vec![ONEARM_OWN_SOURCE]);
        assert!(rule_warnings(&r, &floating, false).is_empty());
        r.endpoints[0].snat = floating_source(r.endpoints[0].spec.ip, &floating);
        assert_eq!(r.endpoints[0].snat, Some("10.10.10.100".parse().unwrap()));
        assert!(rule_warnings(&r, &floating, true).is_empty());
        let c = rs
            .plan(
                crate::api::models::parse_rule(body(2).as_bytes()).unwrap(),
                16,
            )
            .unwrap();
        assert!(rule_warnings(c.rule(), &[], true).is_empty());
    }

    fn entry(dir: u8, mode: u8, idle_s: u64, flags: u8) -> Ct {
        Ct {
            dir,
            mode,
            flags,
            timeout_s: 240,
            state: CtState::Established.as_u8(),
            last_ns: NOW - idle_s * 1_000_000_000,
            ..Default::default()
        }
    }

    #[test]
    fn flushes_take_only_the_flows_created_before_the_change() {
        let flow = |svc: u32, ep: u16, created: u64| Ct {
            svc_id: svc,
            ep_idx: ep,
            created_ns: created,
            ..Default::default()
        };
        let k0 = CtKey::default();
        let del = Flush::Services {
            ids: [3, 5].into(),
            before_ns: 100,
        };
        assert!(del.matches(&k0, &flow(3, 0, 99)));
        assert!(
            !del.matches(&k0, &flow(3, 0, 100)),
            "a new rule that took id 3 keeps its flows"
        );
        assert!(!del.matches(&k0, &flow(4, 0, 1)));
        let eps = Flush::Endpoints {
            svc: 7,
            slots: vec![2],
            before_ns: 100,
        };
        assert!(eps.matches(&k0, &flow(7, 2, 50)));
        assert!(
            !eps.matches(&k0, &flow(7, 1, 50)),
            "other endpoints keep their flows"
        );
        assert!(
            !eps.matches(&k0, &flow(7, 2, 150)),
            "a new endpoint in the slot keeps its flows"
        );
        assert!(!eps.matches(&k0, &flow(8, 2, 50)));
    }

    #[test]
    fn a_source_flush_takes_both_entries_of_flows_from_clients_no_longer_allowed() {
        let allowed: Vec<ipnet::IpNet> = vec!["198.51.100.0/28".parse().unwrap()];
        let f = Flush::Sources {
            svc: 4,
            allowed,
            before_ns: 100,
        };
        let inside = Ipv4Addr::new(198, 51, 100, 2);
        let outside = Ipv4Addr::new(198, 51, 100, 20);
        for (client, gone) in [(inside, false), (outside, true)] {
            // Full NAT: the original entry is keyed by the client; the reply entry (endpoint
            // -> VIP) translates back to it.
            let orig_k = CtKey::v4(client, 40000, VIP, 80, 6);
            let orig_v = Ct {
                svc_id: 4,
                created_ns: 50,
                dir: 0,
                ..Default::default()
            };
            let reply_k = CtKey::v4(EP, 8080, VIP, 33333, 6);
            let reply_v = Ct {
                svc_id: 4,
                created_ns: 50,
                dir: 1,
                nat_daddr: ferrolb_bpf::maps::addr_words(client.into()).0,
                ..Default::default()
            };
            assert_eq!(f.matches(&orig_k, &orig_v), gone, "{client} original");
            assert_eq!(f.matches(&reply_k, &reply_v), gone, "{client} reply");
            // Another rule's flows, and flows opened after the change, stay.
            let other = Ct {
                svc_id: 5,
                ..orig_v
            };
            assert!(!f.matches(&orig_k, &other));
            let newer = Ct {
                created_ns: 150,
                ..orig_v
            };
            assert!(!f.matches(&orig_k, &newer));
        }
    }

    #[test]
    fn census_samples_this_nodes_new_and_reset_flows_per_service() {
        let since = NOW - 5_000_000_000;
        let flow = |svc: u32, created: u64, last: u64, state: CtState, flags: u8, dir: u8| Ct {
            svc_id: svc,
            created_ns: created,
            last_ns: last,
            state: state.as_u8(),
            flags,
            dir,
            timeout_s: 240,
            ..Default::default()
        };
        let k = |port: u16| CtKey::v4(Ipv4Addr::new(198, 51, 100, 2), port, VIP, 80, PROTO_TCP);
        let est = CtState::Established;
        let entries = vec![
            // New since the last pass: counted once (its reply entry is not).
            (k(1), flow(1, NOW - 1, NOW, est, CTF_LOCAL, 0)),
            (k(2), flow(1, NOW - 1, NOW, est, CTF_LOCAL, 1)),
            // Older: not new.
            (k(3), flow(1, since - 1, NOW, est, CTF_LOCAL, 0)),
            // Reset since the last pass (new too), and one reset before it.
            (
                k(4),
                flow(2, NOW - 2, NOW - 1, CtState::Close, CTF_LOCAL, 0),
            ),
            (
                k(5),
                flow(2, since - 9, since - 1, CtState::Close, CTF_LOCAL, 0),
            ),
            // A peer's flow: its clock is not ours, and it is counted where it was made.
            (k(6), flow(3, NOW - 1, NOW, CtState::Close, CTF_SYNCED, 0)),
        ];
        let pass = census(&entries, NOW, since);
        assert_eq!(pass.created, BTreeMap::from([(1, 1), (2, 1)]));
        assert_eq!(pass.reset, BTreeMap::from([(2, 1)]));
    }

    #[test]
    fn census_counts_live_flows_and_the_nat_ports_they_hold() {
        let client = Ipv4Addr::new(198, 51, 100, 2);
        let reply = |nport: u16, proto: u8| CtKey::v4(EP, 8080, VIP, nport, proto);
        let entries = vec![
            // A live full-NAT TCP flow: its original entry and its reply entry (port 40000).
            (
                CtKey::v4(client, 40000, VIP, 80, PROTO_TCP),
                entry(0, MODE_FULLNAT, 1, CTF_LOCAL),
            ),
            (
                reply(40000, PROTO_TCP),
                entry(1, MODE_FULLNAT, 1, CTF_LOCAL),
            ),
            // Another port of the same pool, synced from a peer (holds the port here too).
            (
                reply(40001, PROTO_TCP),
                entry(1, MODE_FULLNAT, 900, CTF_SYNCED),
            ),
            // Expired: holds nothing.
            (
                reply(40002, PROTO_TCP),
                entry(1, MODE_FULLNAT, 900, CTF_LOCAL),
            ),
            // Same endpoint, UDP: another pool.
            (reply(5353, PROTO_UDP), entry(1, MODE_ONEARM, 1, CTF_LOCAL)),
            // DNAT reply entries hold no NAT port.
            (
                CtKey::v4(EP, 8080, client, 40000, PROTO_TCP),
                entry(1, MODE_DNAT, 1, CTF_LOCAL),
            ),
        ];
        let pass = census(&entries, NOW, 0);
        assert_eq!(pass.flows.values().sum::<u64>(), 1);
        let pool = |protocol: &'static str| NatPool {
            protocol: protocol.into(),
            source: VIP.into(),
            endpoint: EP.into(),
            port: 8080,
        };
        assert_eq!(
            pass.nat_pools,
            BTreeMap::from([(pool("tcp"), 2), (pool("udp"), 1)])
        );
    }
}
