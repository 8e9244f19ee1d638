//! HA: cluster roles (`--cluster`, `--self`, `--ka`) and the agent's side of conntrack sync.
//!
//! - **Sync** ([`ferrolb_consync`]): this node serves the flows its datapath created (origin =
//!   `--self`) and installs its peers' flows flagged synced. Events from the datapath's ring
//!   buffer become upserts, the collector's removals become deletes; a lost event forces a
//!   resync.
//! - **Roles with `--ka`** are decided by the nodes: a (re)starting node is BACKUP and not
//!   ready until its first snapshot from every peer arrived (or [`HaConfig::join_timeout`]
//!   passed, which it logs); then, if no live peer is MASTER, the lowest node id among itself
//!   and its live peers takes MASTER with a term above every term it has seen. A MASTER that
//!   hears of a MASTER with a higher term (or the same term and a lower id) steps down, so
//!   after a partition heals the most recently promoted node keeps the role. A peer is dead
//!   when its BFD session (once up) goes down, or, without BFD, when its sync channel is
//!   silent; a sync channel cut while BFD stays up is counted and alarmed, not a failover.
//! - **Takeover** adopts the dead (or handing-over) peer's synced entries: they become this
//!   node's own, age from now, and are published to the remaining peers. They are already in
//!   the datapath map, so no packet waits for a commit step.
//! - **Without `--ka`**, roles come from `POST /config/cistate` (kube-loxilb); becoming MASTER
//!   there adopts every synced entry.
//! - **Ownership while every node lives** ([`ownership`], decision 0009): a node that carries a
//!   synced flow's owning direction claims it through the sync channel; of two versions of a
//!   flow, the one whose owning direction carried a packet last wins. With `--node-snat`,
//!   each node's status carries its full-NAT source address and its peers advertise it as a
//!   backup route.

pub mod control;
pub mod cpus;
pub mod election;
pub mod flows;
pub mod garp;
pub mod ownership;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ferrolb_bpf::SyncTable;
use ferrolb_bpf::maps::{
    CTF_LOCAL, CTF_NEW, CTF_SYNCED, Ct, CtKey, CtState, FIN_HALFOPEN, PROTO_SCTP, PROTO_TCP,
};
use ferrolb_bpf::monotonic_ns;
use ferrolb_consync::{Change, Consync, Flow, FlowKey, Node, pb};
use tracing::{info, warn};

pub use crate::model::DEFAULT_INSTANCE;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    NotDefined,
    Master,
    Backup,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::NotDefined => "NOT_DEFINED",
            Role::Master => "MASTER",
            Role::Backup => "BACKUP",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s.to_ascii_uppercase().as_str() {
            "MASTER" => Some(Role::Master),
            "BACKUP" => Some(Role::Backup),
            "NOT_DEFINED" => Some(Role::NotDefined),
            _ => None,
        }
    }

    fn pb(self) -> pb::Role {
        match self {
            Role::NotDefined => pb::Role::NotDefined,
            Role::Master => pb::Role::Master,
            Role::Backup => pb::Role::Backup,
        }
    }
}

#[derive(Debug, Clone)]
pub struct HaConfig {
    pub node_id: u16,
    /// Roles decided by the nodes (`--ka` given).
    pub ka: bool,
    /// Sync peers (`--cluster`) and, for each, the BFD peer address that watches it.
    pub peers: Vec<(SocketAddr, Option<IpAddr>)>,
    pub join_timeout: Duration,
    /// Without BFD, a peer whose sync channel is silent this long is dead.
    pub silent_dead: Duration,
    /// L2 mode (no BGP): only the MASTER answers ARP for the VIPs, and it sends gratuitous
    /// ARP when it takes over.
    pub l2: bool,
    /// This node's own full-NAT source addresses (`--node-snat`).
    pub node_snat: Vec<IpAddr>,
}

impl HaConfig {
    /// Sync with `peers` and nothing else: no `--ka` (roles from REST), no BFD, the default
    /// timeouts, BGP mode, no node source address. Tests and benchmarks start from it.
    pub fn sync_only(node_id: u16, peers: Vec<SocketAddr>) -> HaConfig {
        HaConfig {
            node_id,
            ka: false,
            peers: peers.into_iter().map(|p| (p, None)).collect(),
            join_timeout: Duration::from_secs(5),
            silent_dead: Duration::from_secs(1),
            l2: false,
            node_snat: Vec::new(),
        }
    }
}

/// What this node knows of one peer.
#[derive(Debug, Clone, Default)]
pub struct PeerView {
    pub node_id: Option<u32>,
    pub status: Option<pb::NodeStatus>,
    pub connected: bool,
    pub heard: Option<Instant>,
    pub bfd_peer: Option<IpAddr>,
    pub bfd_up: bool,
    pub bfd_was_up: bool,
    pub alive: bool,
    /// A status arrived since the peer was last declared dead (until then a MASTER does not
    /// advertise itself as preferred: the peer may have been promoted meanwhile).
    pub fresh_status: bool,
    /// It was declared dead while this node was already MASTER: it may have been promoted
    /// on its side of a partition, with a higher term.
    pub may_outrank: bool,
    /// When the peer was last known alive (its last sync batch): the failover figure starts
    /// there.
    pub last_alive: Option<Instant>,
    pub sync_cuts: u64,
    /// The peer reported our own node id (logged once).
    pub same_id_reported: bool,
    /// The peer reported a term above [`TERM_LIMIT`] (logged once).
    pub term_refused: bool,
}

/// Terms above this are refused wherever they come from (peer statuses, Handover requests), so
/// `term + 1` can never wrap.
pub const TERM_LIMIT: u64 = 1 << 48;

/// The term this node takes in a planned switchover, or why the request is refused. The
/// caller must be the MASTER it says it is: `claimed` is the term it reports as MASTER in
/// its own status stream (`reported`). Terms never wrap: a term with no successor is refused.
pub fn handover_term(
    ours: u64,
    max_seen: u64,
    reported: Option<u64>,
    claimed: u64,
) -> Result<u64, String> {
    match reported {
        None => return Err("the caller is not MASTER in its own status".into()),
        Some(t) if t != claimed => {
            return Err(format!(
                "term {claimed} is not the caller's MASTER term ({t})"
            ));
        }
        Some(_) => {}
    }
    let next = ours.max(max_seen).max(claimed).saturating_add(1);
    if next > TERM_LIMIT {
        return Err(format!("term {claimed} is beyond the limit ({TERM_LIMIT})"));
    }
    Ok(next)
}

/// What one evaluation decided (see [`step`]).
#[derive(Debug, Default, PartialEq)]
pub struct Step {
    /// Peers declared dead now: (address, node id, last known alive).
    pub newly_dead: Vec<(SocketAddr, Option<u32>, Option<Instant>)>,
    /// Became MASTER: why, and when the old MASTER was last known alive.
    pub promote: Option<(String, Option<Instant>)>,
    /// Stepped down to BACKUP: why.
    pub demote: Option<String>,
    /// Became ready now: after how long, and whether every peer's first sync completed
    /// (false: the join timeout passed).
    pub ready: Option<(Duration, bool)>,
}

/// The HA core, pure: from the state (peer views updated by BFD and sync events) and the
/// time, decides liveness, readiness and the role, and updates the state. No I/O: the
/// caller ([`Ha::evaluate`]) logs, announces and adopts flows. `joined`: every peer's first
/// snapshot has arrived.
fn step(st: &mut State, cfg: &HaConfig, now: Instant, joined: bool) -> Step {
    let mut out = Step::default();
    let was_master = st.role == Role::Master;
    for (addr, v) in st.peers.iter_mut() {
        let fresh = v.connected
            && v.heard
                .is_some_and(|h| now.duration_since(h) < cfg.silent_dead);
        let alive = if v.bfd_was_up { v.bfd_up } else { fresh };
        if alive {
            // The last moment it was known alive: its last batch (heartbeats every 100 ms), or
            // now when nothing was heard yet.
            v.last_alive = Some(v.heard.filter(|_| v.connected).unwrap_or(now));
        }
        if v.alive && !alive {
            out.newly_dead.push((*addr, v.node_id, v.last_alive));
            v.fresh_status = false;
            v.may_outrank = was_master;
        }
        v.alive = alive;
    }
    if !cfg.ka {
        return out;
    }
    if !st.ready {
        let waited = now.duration_since(st.started);
        if joined {
            st.ready = true;
            out.ready = Some((waited, true));
        } else if waited >= cfg.join_timeout {
            st.ready = true;
            out.ready = Some((waited, false));
        }
    }
    let peak = st.peers.values().map(PeerView::max_term).max().unwrap_or(0);
    st.max_term_seen = st.max_term_seen.max(peak);
    let facts: Vec<election::PeerFacts> = st
        .peers
        .values()
        .map(|v| election::PeerFacts {
            node_id: v.node_id,
            alive: v.alive,
            fresh: v.fresh_status,
            master_term: v.master_term(),
        })
        .collect();
    match election::decide(u32::from(cfg.node_id), st.role, st.term, st.ready, &facts) {
        election::Decision::Stay => {}
        election::Decision::Demote { node, term } => {
            out.demote = Some(format!(
                "node {node} is MASTER with term {term} (ours {})",
                st.term
            ));
            st.role = Role::Backup;
            st.term = st.term.max(st.max_term_seen);
            st.since = now;
            st.transitions += 1;
        }
        election::Decision::Promote => {
            let last = out.newly_dead.iter().filter_map(|d| d.2).max().or_else(|| {
                st.peers
                    .values()
                    .filter(|v| !v.alive)
                    .filter_map(|v| v.last_alive)
                    .max()
            });
            let reason = if out.newly_dead.is_empty() {
                "no live MASTER".to_string()
            } else {
                format!(
                    "peer(s) {:?} dead",
                    out.newly_dead.iter().map(|d| d.0).collect::<Vec<_>>()
                )
            };
            st.role = Role::Master;
            st.term = st
                .max_term_seen
                .max(st.term)
                .saturating_add(1)
                .min(TERM_LIMIT + 1);
            st.max_term_seen = st.term;
            st.since = now;
            st.transitions += 1;
            out.promote = Some((reason, last));
        }
    }
    out
}

impl PeerView {
    fn master_term(&self) -> Option<u64> {
        let s = self.status.as_ref()?;
        s.instances
            .iter()
            .filter(|i| i.role == pb::Role::Master as i32)
            .map(|i| i.term)
            .max()
    }

    fn max_term(&self) -> u64 {
        self.status
            .as_ref()
            .map(|s| s.instances.iter().map(|i| i.term).max().unwrap_or(0))
            .unwrap_or(0)
    }
}

#[derive(Debug)]
struct State {
    /// Node-wide role and term under `--ka`.
    role: Role,
    term: u64,
    since: Instant,
    /// Per-instance roles without `--ka` (from cistate).
    external: BTreeMap<String, Role>,
    ready: bool,
    started: Instant,
    peers: BTreeMap<SocketAddr, PeerView>,
    max_term_seen: u64,
    transitions: u64,
    last_failover_s: Option<f64>,
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct HaCounters {
    pub installed: AtomicU64,
    pub skipped_local: AtomicU64,
    pub malformed: AtomicU64,
    pub deleted: AtomicU64,
    pub stale_removed: AtomicU64,
    pub adopted: AtomicU64,
    pub published: AtomicU64,
    pub event_resyncs: AtomicU64,
    /// Peers' flows this node claimed (it carries their owning direction now).
    pub handoffs_taken: AtomicU64,
    /// Own flows given to a peer that carries them now.
    pub handoffs_given: AtomicU64,
    /// Dead peers' flows nobody carried, removed once idle past their timeout.
    pub orphans_removed: AtomicU64,
}

pub struct Ha {
    pub cfg: HaConfig,
    state: Mutex<State>,
    table: Mutex<SyncTable>,
    pub consync: OnceLock<Arc<Consync>>,
    /// Roles changed: BGP and the L2 follower subscribe (see [`crate::roles::RoleBus`]).
    roles: crate::roles::RoleBus,
    /// Something happened that may change roles.
    pub wake: tokio::sync::Notify,
    pub counters: HaCounters,
    /// Where the next bulk write starts (see [`cpus`]).
    cpu_cursor: std::sync::atomic::AtomicUsize,
    /// This node's endpoint-health verdicts, carried in its status.
    health_view: OnceLock<crate::health::view::SharedView>,
}

/// One instance's role, as reported.
#[derive(Debug, Clone)]
pub struct InstanceRole {
    pub instance: String,
    pub role: Role,
    pub term: u64,
}

impl State {
    /// A node that just started: BACKUP and joining under `--ka`, every peer unknown.
    fn new(cfg: &HaConfig, now: Instant) -> State {
        State {
            role: if cfg.ka {
                Role::Backup
            } else {
                Role::NotDefined
            },
            term: 0,
            since: now,
            external: BTreeMap::new(),
            ready: !cfg.ka,
            started: now,
            peers: cfg
                .peers
                .iter()
                .map(|(a, bfd)| {
                    (
                        *a,
                        PeerView {
                            bfd_peer: *bfd,
                            ..Default::default()
                        },
                    )
                })
                .collect(),
            max_term_seen: 0,
            transitions: 0,
            last_failover_s: None,
        }
    }
}

impl Ha {
    pub fn new(cfg: HaConfig, table: SyncTable, roles: crate::roles::RoleBus) -> Ha {
        Ha {
            state: Mutex::new(State::new(&cfg, Instant::now())),
            table: Mutex::new(table),
            consync: OnceLock::new(),
            roles,
            wake: tokio::sync::Notify::new(),
            counters: HaCounters::default(),
            cpu_cursor: std::sync::atomic::AtomicUsize::new(0),
            health_view: OnceLock::new(),
            cfg,
        }
    }

    /// The endpoint-health view this node's status carries to its peers.
    pub fn set_health_view(&self, v: crate::health::view::SharedView) {
        let _ = self.health_view.set(v);
    }

    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn tbl(&self) -> std::sync::MutexGuard<'_, SyncTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The role of `instance` (the node's role under `--ka`).
    pub fn role(&self, instance: &str) -> Role {
        let st = self.st();
        if self.cfg.ka {
            st.role
        } else {
            st.external
                .get(instance)
                .copied()
                .unwrap_or(Role::NotDefined)
        }
    }

    /// The role BGP advertises: a MASTER that has not yet heard a peer which came back from
    /// the dead, and died while this node was already MASTER (so it may have been promoted
    /// on its side of a partition), advertises as BACKUP: a healed partition never pulls
    /// traffic to a node before it learnt whether it was superseded.
    pub fn advertised_role(&self, instance: &str) -> Role {
        if !self.cfg.ka {
            return self.role(instance);
        }
        let st = self.st();
        if st.role == Role::Master
            && st
                .peers
                .values()
                .any(|v| v.alive && !v.fresh_status && v.may_outrank)
        {
            return Role::Backup;
        }
        st.role
    }

    /// Walks the conntrack table a chunk at a time on handles of its own, so a long walk (a
    /// snapshot being sent, the stale sweep's read) does not hold the lock that installs and
    /// claims take; on the shared handles if they cannot be reopened.
    fn walk(&self, f: impl FnMut(&[(CtKey, Ct)]) -> bool) {
        let reader = self.tbl().reopen();
        match reader {
            Ok(r) => r.walk(4096, f),
            Err(e) => {
                warn!(error = %e, "conntrack: no handles of its own for a walk; walking under the lock");
                self.tbl().walk(4096, f);
            }
        }
    }

    /// Node ids of the peers that are dead now.
    fn dead_peers(&self) -> BTreeSet<u16> {
        self.st()
            .peers
            .values()
            .filter(|v| !v.alive)
            .filter_map(|v| v.node_id.and_then(|i| u16::try_from(i).ok()))
            .collect()
    }

    fn master_anywhere(&self) -> bool {
        let st = self.st();
        if self.cfg.ka {
            st.role == Role::Master
        } else {
            st.external.values().any(|r| *r == Role::Master)
        }
    }

    /// Roles of the given instances (plus the default one), for cistate and BGP.
    pub fn roles(&self, instances: &BTreeSet<String>) -> Vec<InstanceRole> {
        let st = self.st();
        let mut all: BTreeSet<String> = instances.clone();
        all.insert(DEFAULT_INSTANCE.to_string());
        all.extend(st.external.keys().cloned());
        all.into_iter()
            .map(|i| {
                let role = if self.cfg.ka {
                    st.role
                } else {
                    st.external.get(&i).copied().unwrap_or(Role::NotDefined)
                };
                InstanceRole {
                    instance: i,
                    role,
                    term: st.term,
                }
            })
            .collect()
    }

    pub fn ready(&self) -> bool {
        self.st().ready
    }

    pub fn term(&self) -> u64 {
        self.st().term
    }

    pub fn transitions(&self) -> u64 {
        self.st().transitions
    }

    pub fn last_failover_s(&self) -> Option<f64> {
        self.st().last_failover_s
    }

    pub fn peer_views(&self) -> Vec<(SocketAddr, PeerView)> {
        self.st()
            .peers
            .iter()
            .map(|(a, v)| (*a, v.clone()))
            .collect()
    }

    /// `POST /config/cistate` without `--ka`. Becoming MASTER adopts every synced entry.
    pub fn set_external(&self, instance: &str, role: Role) {
        let promoted = {
            let mut st = self.st();
            let old = st.external.insert(instance.to_string(), role);
            if old != Some(role) {
                st.transitions += 1;
                st.since = Instant::now();
            }
            role == Role::Master && old != Some(Role::Master)
        };
        if promoted {
            let n = self.adopt(|_| true);
            info!(
                instance,
                adopted = n,
                "MASTER (set over REST): synced flows adopted"
            );
        }
        self.roles.changed();
    }

    /// A BFD session changed state.
    pub fn bfd_event(&self, peer: IpAddr, up: bool) {
        let mut st = self.st();
        let mut hit = false;
        for v in st.peers.values_mut() {
            if v.bfd_peer == Some(peer) {
                v.bfd_up = up;
                v.bfd_was_up |= up;
                hit = true;
            }
        }
        drop(st);
        if hit {
            self.wake.notify_one();
        }
    }

    /// Re-evaluates liveness and roles; called on every event and on a short timer. The
    /// decision is [`step`] (pure); this applies its effects: logs, the role bus, adoption.
    pub fn evaluate(&self) {
        let now = Instant::now();
        let joined = self
            .consync
            .get()
            .map(|c| c.peers().iter().all(|p| p.synced_once))
            .unwrap_or(true);
        let (out, term) = {
            let mut st = self.st();
            let out = step(&mut st, &self.cfg, now, joined);
            (out, st.term)
        };
        let Step {
            newly_dead,
            promote,
            demote,
            ready,
        } = out;
        match ready {
            Some((waited, true)) => info!(
                waited_ms = waited.as_millis() as u64,
                "HA: first sync from every peer complete; ready"
            ),
            Some((waited, false)) => warn!(
                waited_ms = waited.as_millis() as u64,
                "HA: no complete sync from every peer within the join timeout; proceeding without their state"
            ),
            None => {}
        }
        if let Some(reason) = &demote {
            warn!(reason, "HA: two MASTERs; stepping down to BACKUP");
        }
        if let Some((reason, _)) = &promote {
            info!(term, reason, "HA: MASTER");
        }
        if promote.is_some() || demote.is_some() {
            self.roles.changed();
        }
        for (addr, id, _) in &newly_dead {
            warn!(peer = %addr, node = ?id, "HA: peer dead");
        }
        // Adopt the dead peers' flows (as MASTER) after the role is announced: BGP first.
        if let Some((_, last)) = promote {
            // Every dead peer's: the ones that just died and any that were dead already (a
            // node that came up alone), in one walk of the table.
            let dead = self.dead_peers();
            if !dead.is_empty() {
                let n = self.adopt(|o| dead.contains(&o));
                if n > 0 {
                    info!(adopted = n, "HA: flows of dead peers adopted");
                }
            }
            // From the last moment the old MASTER was known alive to the end of the takeover.
            if let Some(t) = last {
                self.st().last_failover_s = Some(t.elapsed().as_secs_f64());
            }
        } else {
            self.adopt_dead(&newly_dead);
        }
    }

    fn adopt_dead(&self, dead: &[(SocketAddr, Option<u32>, Option<Instant>)]) {
        if dead.is_empty() || !self.master_anywhere() {
            return;
        }
        let ids: BTreeSet<u16> = dead
            .iter()
            .filter_map(|d| d.1.and_then(|i| u16::try_from(i).ok()))
            .collect();
        let n = self.adopt(|o| ids.contains(&o));
        if n > 0 {
            info!(adopted = n, origins = ?ids, "HA: flows of dead peers adopted");
        }
    }

    /// Makes synced flows whose origin satisfies `which` this node's own: local, aging from
    /// now, and published to the peers. Returns the number of flows adopted.
    pub fn adopt(&self, which: impl Fn(u16) -> bool) -> u64 {
        let me = self.cfg.node_id;
        let now = monotonic_ns();
        let mut published = Vec::new();
        {
            let mut t = self.tbl();
            let mine: Vec<(CtKey, Ct)> = t
                .entries()
                .into_iter()
                .filter(|(_, v)| v.flags & CTF_SYNCED != 0 && which(v.origin))
                .map(|(k, v)| {
                    (
                        k,
                        Ct {
                            flags: CTF_LOCAL,
                            origin: me,
                            last_ns: now,
                            ..v
                        },
                    )
                })
                .collect();
            cpus::write(
                &mut t,
                &mine,
                false,
                self.cpu_cursor.fetch_add(1, Ordering::Relaxed),
            );
            published.extend(
                mine.iter()
                    .filter(|(_, v)| v.dir == 0)
                    .map(|(k, v)| Change::Upsert(flows::flow_of(k, v, now))),
            );
        }
        let n = published.len() as u64;
        self.counters.adopted.fetch_add(n, Ordering::Relaxed);
        if let Some(c) = self.consync.get() {
            self.counters.published.fetch_add(n, Ordering::Relaxed);
            c.publish(published);
        }
        n
    }

    /// The collector's pass over synced flows ([`ownership`]): claims the flows whose owning
    /// direction this node carried within `window`, publishing them as its own, and removes
    /// dead peers' flows that no traffic reached for their timeout. `entries`: a chunk of the
    /// pass's walk of the table (each candidate flow is read again, both entries, and decided
    /// as it is now). Returns (claimed, orphans removed).
    pub fn ownership_pass(&self, entries: &[(CtKey, Ct)], window: Duration) -> (u64, u64) {
        let me = self.cfg.node_id;
        if !entries
            .iter()
            .any(|(_, v)| v.flags & CTF_SYNCED != 0 && v.origin != me)
        {
            return (0, 0);
        }
        let dead = self.dead_peers();
        let now = monotonic_ns();
        let window_ns = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
        let mut published = Vec::new();
        let mut orphans = 0;
        {
            let mut t = self.tbl();
            let plan = ownership::plan(
                entries,
                |k| t.get(k).ok().flatten(),
                me,
                |o| dead.contains(&o),
                now,
                window_ns,
            );
            if plan.claims.is_empty() && plan.orphans.is_empty() {
                return (0, 0);
            }
            let mut writes = Vec::with_capacity(plan.claims.len() * 2);
            for [(k, o), (rk, r)] in &plan.claims {
                let own = |v: Ct| Ct {
                    flags: (v.flags & !CTF_SYNCED) | CTF_LOCAL,
                    origin: me,
                    ..v
                };
                let last = ownership::owning_last_ns(k, o, Some(r));
                writes.push((*rk, own(*r)));
                writes.push((*k, own(*o)));
                let stamped = Ct {
                    last_ns: last,
                    ..own(*o)
                };
                published.push(Change::Upsert(flows::flow_of(k, &stamped, now)));
            }
            cpus::write(
                &mut t,
                &writes,
                false,
                self.cpu_cursor.fetch_add(1, Ordering::Relaxed),
            );
            for (k, rk) in &plan.orphans {
                if let Some(rk) = rk {
                    let _ = t.delete(rk);
                }
                let _ = t.delete(k);
                orphans += 1;
            }
        }
        let n = published.len() as u64;
        self.counters.handoffs_taken.fetch_add(n, Ordering::Relaxed);
        self.counters
            .orphans_removed
            .fetch_add(orphans, Ordering::Relaxed);
        if n > 0 {
            info!(
                claimed = n,
                "HA: flows this node carries now taken over from their peers"
            );
            if let Some(c) = self.consync.get() {
                self.counters.published.fetch_add(n, Ordering::Relaxed);
                c.publish(published);
            }
        }
        (n, orphans)
    }

    /// The node source addresses BGP advertises from this node with their distance (0: its
    /// own; n: the n-th backup of a peer's), see [`ownership::snat_routes`].
    pub fn snat_routes(&self) -> Vec<(IpAddr, u8)> {
        let peers: Vec<(u32, Vec<IpAddr>)> = self
            .st()
            .peers
            .values()
            .filter_map(|v| {
                let s = v.status.as_ref()?;
                let addrs = s
                    .node_snat
                    .iter()
                    .filter_map(|a| flows::ip_of(Some(a)))
                    .collect::<Vec<_>>();
                Some((s.node_id, addrs))
            })
            .collect();
        ownership::snat_routes(u32::from(self.cfg.node_id), &self.cfg.node_snat, &peers)
    }

    /// Datapath events and collector removals → changes for the peers. `events` are
    /// (key, entry) pairs of either direction, in ring order; `removed` are entries the
    /// collector deleted. Each flow is published once per call, as its newest event tells it
    /// ([`latest_flows`]); only a flow whose newest event came from its reply direction is
    /// read from the table (one system call each, where a connection's events used to cost
    /// one each).
    pub fn publish_events(&self, events: &[(CtKey, Ct)], removed: &[(CtKey, Ct)]) {
        let Some(c) = self.consync.get() else { return };
        let me = self.cfg.node_id;
        let now = monotonic_ns();
        let mut out = Vec::with_capacity(events.len() + removed.len());
        let mut table = None;
        for (ok, pick) in latest_flows(events, me) {
            let cur = match pick {
                Latest::Entry(v) => v,
                Latest::ReadOriginal => {
                    let t = table.get_or_insert_with(|| self.tbl());
                    match t.get(&ok) {
                        Ok(Some(cur)) if publishable(&ok, &cur, me) && cur.dir == 0 => cur,
                        _ => continue,
                    }
                }
            };
            out.push(Change::Upsert(flows::flow_of(&ok, &cur, now)));
        }
        drop(table);
        for (k, v) in removed {
            if v.dir == 0 && publishable(k, v, me) {
                out.push(Change::Delete(flows::key_of(k)));
            }
        }
        let n = out.len() as u64;
        if n > 0 {
            self.counters.published.fetch_add(n, Ordering::Relaxed);
            c.publish(out);
        }
    }

    /// The datapath lost events: every peer must start over with a snapshot.
    pub fn events_lost(&self) {
        if let Some(c) = self.consync.get() {
            self.counters.event_resyncs.fetch_add(1, Ordering::Relaxed);
            warn!("conntrack events were lost: peers resync from a snapshot");
            c.resync();
        }
    }

    /// Planned switchover on this side: after the peer took the role (`term`), step down.
    pub fn stepped_down(&self, term: u64) {
        {
            let mut st = self.st();
            st.role = Role::Backup;
            st.max_term_seen = st.max_term_seen.max(term);
            st.term = st.term.max(term);
            st.since = Instant::now();
            st.transitions += 1;
        }
        info!(term, "HA: handed MASTER over; BACKUP");
        self.roles.changed();
    }

    /// The live, ready peer a planned switchover goes to (lowest node id).
    pub fn switchover_target(&self) -> Option<u32> {
        self.st()
            .peers
            .values()
            .filter(|v| v.alive && v.status.as_ref().is_some_and(|s| s.ready))
            .filter_map(|v| v.node_id)
            .min()
    }
}

/// A flow's entry this node publishes: its own (created here, not a peer's synced copy),
/// confirmed. Half-open flows are never published: peers learn a TCP flow when its handshake
/// completes, so a SYN flood here does not fill their tables.
fn publishable(k: &CtKey, v: &Ct, me: u16) -> bool {
    v.origin == me && v.flags & (CTF_LOCAL | CTF_SYNCED) == CTF_LOCAL && !half_open(k, v)
}

/// What to publish of one flow: the entry its newest event carried, or (that event came from
/// the reply direction) its original-direction entry, read from the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Latest {
    Entry(Ct),
    ReadOriginal,
}

/// The flows a batch of datapath events (in ring order) changed, each once, by its original
/// key, in the order of their newest events. A flow's state changes only with an event
/// (established, closed), so its newest event in the batch tells its state: no table read
/// for it, unless that event came from the reply direction, whose entry is not the one peers
/// are sent. Events of entries this node does not publish are skipped.
fn latest_flows(events: &[(CtKey, Ct)], me: u16) -> Vec<(CtKey, Latest)> {
    let mut seen = HashSet::with_capacity(events.len());
    let mut out = Vec::with_capacity(events.len());
    for (k, v) in events.iter().rev() {
        if !publishable(k, v, me) {
            continue;
        }
        let (ok, pick) = if v.dir == 0 {
            (*k, Latest::Entry(*v))
        } else {
            (k.peer(v), Latest::ReadOriginal)
        };
        if seen.insert(ok) {
            out.push((ok, pick));
        }
    }
    out.reverse();
    out
}

/// Removes the flows under `keys` (original-direction keys, as peers name flows) that are
/// still `origin`'s synced flows here (not adopted or replaced meanwhile): both entries of
/// each, each flow once, in one batched delete. Returns the flows removed and the keys that
/// name no flow at all (malformed).
fn remove_synced(t: &mut SyncTable, origin: u16, keys: &[FlowKey]) -> (u64, u64) {
    let (mut n, mut malformed) = (0, 0);
    let cap = keys.len().min(1 << 16);
    let mut gone = Vec::with_capacity(cap * 2);
    let mut asked = HashSet::with_capacity(cap);
    for k in keys {
        let Some(key) = flows::ct_key(k) else {
            malformed += 1;
            continue;
        };
        if asked.insert(key)
            && let Ok(Some(cur)) = t.get(&key)
            && cur.dir == 0
            && cur.flags & CTF_SYNCED != 0
            && cur.origin == origin
        {
            gone.push(key.peer(&cur));
            gone.push(key);
            n += 1;
        }
    }
    t.delete_many(&gone);
    (n, malformed)
}

/// A flow peers never hear of: not confirmed yet (in the half-open table; a TCP or SCTP flow
/// before its handshake completed, also where it is made in the conntrack table itself), or
/// one closed before that (its original entry still marked half-open). Such a flow was never
/// published, so neither is its removal.
fn half_open(k: &CtKey, v: &Ct) -> bool {
    v.flags & CTF_NEW != 0
        || v.fin & FIN_HALFOPEN != 0
        || ((k.proto == PROTO_TCP || k.proto == PROTO_SCTP)
            && matches!(v.state(), CtState::SynSent | CtState::SynRecv))
}

impl Node for Ha {
    fn own_flows(&self, emit: &mut dyn FnMut(Vec<Flow>) -> bool) {
        let me = self.cfg.node_id;
        let now = monotonic_ns();
        self.walk(|chunk| {
            emit(
                chunk
                    .iter()
                    .filter(|(k, v)| {
                        v.dir == 0
                            && v.origin == me
                            && v.flags & CTF_LOCAL != 0
                            && v.flags & CTF_SYNCED == 0
                            && !half_open(k, v)
                            && !v.expired(k.proto, now)
                    })
                    .map(|(k, v)| flows::flow_of(k, v, now))
                    .collect(),
            )
        });
    }

    fn apply(&self, origin: u32, upserts: &[Flow], deletes: &[FlowKey]) -> u64 {
        let Ok(origin) = u16::try_from(origin) else {
            return 0;
        };
        if origin == self.cfg.node_id {
            // A peer configured with our --self: never install our own id's flows.
            self.counters
                .malformed
                .fetch_add((upserts.len() + deletes.len()) as u64, Ordering::Relaxed);
            return 0;
        }
        let now = monotonic_ns();
        let mut n = 0;
        let mut reassert = Vec::new();
        let mut t = self.tbl();
        // Service and endpoint numbers per (VIP, port, protocol, endpoint) within this batch:
        // a batch is mostly flows of a few services.
        let mut resolved: std::collections::HashMap<(CtKey, IpAddr, u16), (u32, u16)> =
            std::collections::HashMap::new();
        let mut writes: Vec<(CtKey, Ct)> = Vec::with_capacity(upserts.len() * 2);
        for f in upserts {
            let Some(pair) = flows::entries_of(f, now, |k, ep, port| {
                let svc_key = CtKey {
                    saddr: [0; 4],
                    sport: 0,
                    ..*k
                };
                *resolved
                    .entry((svc_key, ep, port))
                    .or_insert_with(|| flows::resolve(&t, k, ep, port))
            }) else {
                self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if pair[0].1.origin != origin {
                self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // Held here under another origin (ours, or a third node's): the version whose
            // owning direction carried a packet last wins (ownership.rs).
            if let Ok(Some(cur)) = t.get(&pair[0].0)
                && cur.origin != origin
            {
                let key = pair[0].0;
                let reply = t.get(&key.peer(&cur)).ok().flatten();
                let held = ownership::owning_last_ns(&key, &cur, reply.as_ref());
                let incoming = ownership::owning_last_ns(&key, &pair[0].1, Some(&pair[1].1));
                let ours = cur.flags & CTF_LOCAL != 0
                    && cur.flags & CTF_SYNCED == 0
                    && cur.origin == self.cfg.node_id;
                if !ownership::incoming_wins(incoming, held) {
                    self.counters.skipped_local.fetch_add(1, Ordering::Relaxed);
                    if ours {
                        // The sender (and whoever took its version) learns ours again.
                        let v = Ct {
                            last_ns: held,
                            ..cur
                        };
                        reassert.push(Change::Upsert(flows::flow_of(&key, &v, now)));
                    }
                    continue;
                }
                if ours {
                    self.counters.handoffs_given.fetch_add(1, Ordering::Relaxed);
                    // It no longer counts toward its endpoint's connections here.
                    t.release_lc(&cur);
                }
            }
            // The reply entry first: the original is what starts forwarding.
            writes.push(pair[1]);
            writes.push(pair[0]);
        }
        // A live batch is small and stays on this CPU; a snapshot chunk is spread (cpus.rs).
        n += cpus::write(
            &mut t,
            &writes,
            true,
            self.cpu_cursor.fetch_add(1, Ordering::Relaxed),
        ) as u64;
        n /= 2;
        self.counters.installed.fetch_add(n, Ordering::Relaxed);
        let (d, malformed) = remove_synced(&mut t, origin, deletes);
        self.counters
            .malformed
            .fetch_add(malformed, Ordering::Relaxed);
        self.counters.deleted.fetch_add(d, Ordering::Relaxed);
        drop(t);
        if !reassert.is_empty()
            && let Some(c) = self.consync.get()
        {
            self.counters
                .published
                .fetch_add(reassert.len() as u64, Ordering::Relaxed);
            c.publish(reassert);
        }
        n + d
    }

    fn flows_of(&self, origin: u32) -> HashSet<FlowKey> {
        let mut out = HashSet::new();
        let Ok(origin) = u16::try_from(origin) else {
            return out;
        };
        self.walk(|chunk| {
            out.extend(
                chunk
                    .iter()
                    .filter(|(_, v)| v.dir == 0 && v.flags & CTF_SYNCED != 0 && v.origin == origin)
                    .map(|(k, _)| flows::key_of(k)),
            );
            true
        });
        out
    }

    fn remove_stale(&self, origin: u32, keys: &[FlowKey]) -> u64 {
        let Ok(origin) = u16::try_from(origin) else {
            return 0;
        };
        // Keys a snapshot's sweep found here itself, so none is malformed.
        let (n, _) = remove_synced(&mut self.tbl(), origin, keys);
        self.counters.stale_removed.fetch_add(n, Ordering::Relaxed);
        n
    }

    fn malformed(&self, _origin: u32, n: u64) {
        self.counters.malformed.fetch_add(n, Ordering::Relaxed);
    }

    fn status(&self) -> pb::NodeStatus {
        let st = self.st();
        let instances = if self.cfg.ka {
            vec![pb::InstanceStatus {
                instance: DEFAULT_INSTANCE.to_string(),
                role: st.role.pb() as i32,
                term: st.term,
            }]
        } else {
            st.external
                .iter()
                .map(|(i, r)| pb::InstanceStatus {
                    instance: i.clone(),
                    role: r.pb() as i32,
                    term: st.term,
                })
                .collect()
        };
        let st_ready = st.ready;
        drop(st);
        let (endpoints_down, endpoints_down_total, endpoints_probed) = self
            .health_view
            .get()
            .map(|v| (*crate::health::view::read(v)).clone())
            .unwrap_or_default();
        pb::NodeStatus {
            node_id: u32::from(self.cfg.node_id),
            ready: st_ready,
            instances,
            endpoints_down,
            endpoints_down_total,
            endpoints_probed,
            node_snat: self.cfg.node_snat.iter().map(|a| flows::addr(*a)).collect(),
        }
    }

    fn peer_status(&self, peer: SocketAddr, status: Option<&pb::NodeStatus>) {
        {
            let mut st = self.st();
            let Some(v) = st.peers.get_mut(&peer) else {
                return;
            };
            match status {
                Some(s) if s.node_id == u32::from(self.cfg.node_id) => {
                    // Our own id: --cluster lists this node itself, or the peer was started
                    // with the same --self. Either way it is not a peer to sync with or to
                    // elect against.
                    if !v.same_id_reported {
                        v.same_id_reported = true;
                        tracing::error!(
                            peer = %peer,
                            node = s.node_id,
                            "--cluster: this peer reports our own --self id (the address is this node, or both nodes use the same --self); ignored"
                        );
                    }
                    return;
                }
                Some(s) if s.instances.iter().any(|i| i.term > TERM_LIMIT) => {
                    // No election produces such a term (one promotion per millisecond would
                    // take 8,900 years): a broken or hostile peer. Its status is not believed,
                    // so it can neither outrank us nor push our terms toward wrapping.
                    if !v.term_refused {
                        v.term_refused = true;
                        tracing::error!(peer = %peer, node = s.node_id, limit = TERM_LIMIT, "HA: a peer reports a term above the limit; its status is ignored");
                    }
                    return;
                }
                Some(s) => {
                    let prev_id = v.node_id.replace(s.node_id);
                    let mut s = s.clone();
                    // What a peer may make us keep: its view is read at most this far.
                    s.endpoints_down.truncate(crate::health::view::MAX_LISTED);
                    s.node_snat.truncate(2);
                    let snat_changed = v.status.as_ref().map(|o| &o.node_snat)
                        != Some(&s.node_snat)
                        || prev_id != Some(s.node_id);
                    v.status = Some(s);
                    if snat_changed {
                        // Its backup routes are advertised from here.
                        self.roles.changed();
                    }
                    v.connected = true;
                    v.heard = Some(Instant::now());
                    if !v.fresh_status {
                        v.fresh_status = true;
                        v.may_outrank = false;
                        self.roles.changed();
                    }
                }
                None => {
                    v.connected = false;
                    v.sync_cuts += 1;
                    if v.bfd_up {
                        warn!(peer = %peer, "ALARM: conntrack sync channel to a live peer is cut (BFD up); resyncing when it heals");
                    }
                }
            }
        }
        self.wake.notify_one();
    }

    fn handover(&self, from: SocketAddr, req: &pb::HandoverRequest) -> Result<u64, String> {
        if !self.cfg.ka {
            return Err("roles are set over REST on this node (no --ka)".into());
        }
        let term = {
            let mut st = self.st();
            if !st.ready {
                return Err("this node is still joining".into());
            }
            let reported = st.peers.get(&from).and_then(PeerView::master_term);
            let term = handover_term(st.term, st.max_term_seen, reported, req.term)?;
            st.role = Role::Master;
            st.term = term;
            st.max_term_seen = st.term;
            st.since = Instant::now();
            st.transitions += 1;
            st.term
        };
        info!(from = req.node_id, term, "HA: MASTER by planned switchover");
        self.roles.changed();
        let from = u16::try_from(req.node_id).unwrap_or(u16::MAX);
        let n = self.adopt(|o| o == from);
        info!(adopted = n, "HA: the previous MASTER's flows adopted");
        Ok(term)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Peers hear of a flow once it is confirmed, wherever it was half-open (the half-open
    /// table, or the conntrack table itself), and never of one closed before that.
    #[test]
    fn half_open_flows_are_never_published_wherever_they_live() {
        let k = CtKey::v4(
            std::net::Ipv4Addr::new(198, 51, 100, 2),
            40000,
            std::net::Ipv4Addr::new(203, 0, 113, 10),
            80,
            PROTO_TCP,
        );
        let flow = |state: CtState, flags: u8, fin: u32| Ct {
            state: state.as_u8(),
            flags: CTF_LOCAL | flags,
            fin,
            ..Default::default()
        };
        assert!(half_open(&k, &flow(CtState::SynSent, CTF_NEW, 0)));
        assert!(half_open(&k, &flow(CtState::SynSent, 0, FIN_HALFOPEN)));
        assert!(
            half_open(&k, &flow(CtState::SynRecv, 0, 0)),
            "a reopened flow"
        );
        assert!(
            half_open(&k, &flow(CtState::Close, 0, FIN_HALFOPEN | 0x04)),
            "reset before it was established"
        );
        assert!(!half_open(&k, &flow(CtState::Established, 0, 0)));
        assert!(
            !half_open(&k, &flow(CtState::Close, 0, 0x04)),
            "closed after it was"
        );
        let udp = CtKey {
            proto: ferrolb_bpf::maps::PROTO_UDP,
            ..k
        };
        assert!(!half_open(&udp, &flow(CtState::Established, 0, 0)));
        assert!(half_open(&udp, &flow(CtState::Established, CTF_NEW, 0)));
    }

    /// A connection's events in one drain: each flow published once, as its newest event
    /// tells it; the table is read only for a flow whose newest event came from its reply
    /// direction; what this node does not publish (half-open, synced, a peer's) is skipped.
    #[test]
    fn a_batch_publishes_each_flow_once_from_its_newest_event() {
        use std::net::Ipv4Addr;
        let me = 3;
        let k = CtKey::v4(
            Ipv4Addr::new(198, 51, 100, 2),
            40000,
            Ipv4Addr::new(203, 0, 113, 10),
            80,
            PROTO_TCP,
        );
        // DNAT to 10.10.10.11:8080: the reply key is (endpoint -> client).
        let ep = ferrolb_bpf::maps::addr_words(IpAddr::V4(Ipv4Addr::new(10, 10, 10, 11))).0;
        let orig = |state: CtState, fin: u32| Ct {
            nat_saddr: k.saddr,
            nat_daddr: ep,
            nat_sport: k.sport,
            nat_dport: 8080u16.to_be(),
            origin: me,
            dir: 0,
            state: state.as_u8(),
            flags: CTF_LOCAL,
            fin,
            ..Default::default()
        };
        let rk = k.peer(&orig(CtState::Established, 0));
        let reply = |state: CtState, fin: u32| Ct {
            nat_saddr: k.daddr,
            nat_daddr: k.saddr,
            nat_sport: k.dport,
            nat_dport: k.sport,
            dir: 1,
            ..orig(state, fin)
        };
        assert_eq!(rk.peer(&reply(CtState::Established, 0)), k);

        // Established, then closed by the client's FIN: the closed entry, no table read.
        let closed = orig(CtState::TimeWait, 3);
        let out = latest_flows(&[(k, orig(CtState::Established, 0)), (k, closed)], me);
        assert_eq!(out, vec![(k, Latest::Entry(closed))]);

        // Closed by the endpoint's FIN (the reply direction): read the original entry.
        let out = latest_flows(
            &[
                (k, orig(CtState::Established, 0)),
                (rk, reply(CtState::TimeWait, 3)),
            ],
            me,
        );
        assert_eq!(out, vec![(k, Latest::ReadOriginal)]);

        // Not published: half-open, a peer's synced copy, another node's flow.
        let mut synced = orig(CtState::Established, 0);
        synced.flags = CTF_SYNCED;
        let mut theirs = orig(CtState::Established, 0);
        theirs.origin = me + 1;
        let half = orig(CtState::SynSent, 0);
        assert!(latest_flows(&[(k, synced), (k, theirs), (k, half)], me).is_empty());

        // Two flows: in the order of their newest events.
        let k2 = CtKey {
            sport: 40001u16.to_be(),
            ..k
        };
        let e2 = Ct {
            nat_sport: k2.sport,
            ..orig(CtState::Established, 0)
        };
        let out = latest_flows(
            &[(k, orig(CtState::Established, 0)), (k2, e2), (k, closed)],
            me,
        );
        assert_eq!(
            out,
            vec![(k2, Latest::Entry(e2)), (k, Latest::Entry(closed))]
        );
    }

    #[test]
    fn a_handover_is_taken_only_at_the_callers_own_master_term() {
        // The caller is MASTER at term 7 in its status: we take term 8.
        assert_eq!(handover_term(6, 7, Some(7), 7), Ok(8));
        // Our own terms are never lowered.
        assert_eq!(handover_term(9, 9, Some(7), 7), Ok(10));
        // A forged term (not what the caller reports), or a caller that is not MASTER.
        assert!(handover_term(6, 7, Some(7), 1001).is_err());
        assert!(handover_term(6, 7, None, 7).is_err());
        // A term with no successor, or beyond the limit, never wraps to 0.
        let e = handover_term(0, 0, Some(u64::MAX), u64::MAX).unwrap_err();
        assert!(e.contains("limit"), "{e}");
        assert!(handover_term(0, 0, Some(TERM_LIMIT), TERM_LIMIT).is_err());
        assert_eq!(
            handover_term(0, 0, Some(TERM_LIMIT - 1), TERM_LIMIT - 1),
            Ok(TERM_LIMIT)
        );
    }

    // --- the pure core, driven like two (or three) nodes exchanging statuses and BFD ---

    const A: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1)), 22222);
    const B: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2)), 22222);

    fn cfg(id: u16, peer: SocketAddr) -> HaConfig {
        HaConfig {
            node_id: id,
            ka: true,
            peers: vec![(peer, Some(peer.ip()))],
            join_timeout: Duration::from_secs(5),
            silent_dead: Duration::from_secs(1),
            l2: false,
            node_snat: Vec::new(),
        }
    }

    fn node(c: &HaConfig, t0: Instant) -> State {
        State::new(c, t0)
    }

    fn status(st: &State, id: u16) -> pb::NodeStatus {
        pb::NodeStatus {
            node_id: u32::from(id),
            ready: st.ready,
            instances: vec![pb::InstanceStatus {
                instance: DEFAULT_INSTANCE.into(),
                role: st.role.pb() as i32,
                term: st.term,
            }],
            ..Default::default()
        }
    }

    /// `st` hears `from`'s status over sync at `now` (as `peer_status` records it).
    fn hear(st: &mut State, from: SocketAddr, s: pb::NodeStatus, now: Instant) {
        let v = st.peers.get_mut(&from).unwrap();
        v.node_id = Some(s.node_id);
        v.status = Some(s);
        v.connected = true;
        v.heard = Some(now);
        if !v.fresh_status {
            v.fresh_status = true;
            v.may_outrank = false;
        }
    }

    fn bfd(st: &mut State, peer: SocketAddr, up: bool) {
        let v = st.peers.get_mut(&peer).unwrap();
        v.bfd_up = up;
        v.bfd_was_up |= up;
    }

    /// Two nodes that came up together and exchanged statuses: A (0) MASTER term 1, B BACKUP.
    fn pair(t0: Instant) -> (HaConfig, State, HaConfig, State) {
        let (ca, cb) = (cfg(0, B), cfg(1, A));
        let (mut a, mut b) = (node(&ca, t0), node(&cb, t0));
        for _ in 0..2 {
            bfd(&mut a, B, true);
            bfd(&mut b, A, true);
            let (sa, sb) = (status(&a, 0), status(&b, 1));
            hear(&mut a, B, sb, t0);
            hear(&mut b, A, sa, t0);
            step(&mut a, &ca, t0, true);
            step(&mut b, &cb, t0, true);
        }
        (ca, a, cb, b)
    }

    #[test]
    fn cold_start_of_both_elects_the_lowest_id_once() {
        let t0 = Instant::now();
        let (ca, cb) = (cfg(0, B), cfg(1, A));
        let (mut a, mut b) = (node(&ca, t0), node(&cb, t0));
        bfd(&mut a, B, true);
        bfd(&mut b, A, true);
        let (sa, sb) = (status(&a, 0), status(&b, 1));
        hear(&mut a, B, sb, t0);
        hear(&mut b, A, sa, t0);
        // Not joined yet: nobody takes a role.
        assert_eq!(step(&mut a, &ca, t0, false), Step::default());
        assert_eq!(step(&mut b, &cb, t0, false), Step::default());
        // Both joined: A (lower id) takes MASTER, B waits for A.
        let sa_step = step(&mut a, &ca, t0, true);
        assert!(sa_step.promote.is_some() && sa_step.ready == Some((Duration::ZERO, true)));
        let sb_step = step(&mut b, &cb, t0, true);
        assert!(
            sb_step.promote.is_none(),
            "B never takes MASTER while A lives"
        );
        hear(&mut b, A, status(&a, 0), t0);
        assert_eq!(step(&mut b, &cb, t0, true), Step::default());
        assert_eq!((a.role, a.term, b.role), (Role::Master, 1, Role::Backup));
    }

    #[test]
    fn master_death_promotes_the_backup_with_a_higher_term() {
        let t0 = Instant::now();
        let (_ca, a, cb, mut b) = pair(t0);
        assert_eq!((a.role, b.role), (Role::Master, Role::Backup));
        let t1 = t0 + Duration::from_millis(300);
        bfd(&mut b, A, false);
        let out = step(&mut b, &cb, t1, true);
        assert_eq!(out.newly_dead.len(), 1);
        let (why, last) = out.promote.expect("B takes over");
        assert!(why.contains("dead"), "{why}");
        assert_eq!(
            last,
            Some(t0),
            "the failover is measured from A's last batch"
        );
        assert_eq!((b.role, b.term), (Role::Master, 2));
    }

    #[test]
    fn backup_death_leaves_the_master_alone() {
        let t0 = Instant::now();
        let (ca, mut a, _cb, _b) = pair(t0);
        bfd(&mut a, B, false);
        let out = step(&mut a, &ca, t0 + Duration::from_millis(300), true);
        assert_eq!(out.newly_dead.len(), 1);
        assert!(out.promote.is_none() && out.demote.is_none());
        assert_eq!((a.role, a.term), (Role::Master, 1));
    }

    #[test]
    fn a_partition_makes_two_masters_and_the_heal_leaves_the_later_one() {
        let t0 = Instant::now();
        let (ca, mut a, cb, mut b) = pair(t0);
        // The keepalive network fails: each side sees the other dead.
        let t1 = t0 + Duration::from_millis(300);
        bfd(&mut a, B, false);
        bfd(&mut b, A, false);
        step(&mut a, &ca, t1, true);
        step(&mut b, &cb, t1, true);
        assert_eq!((a.role, a.term), (Role::Master, 1));
        assert_eq!(
            (b.role, b.term),
            (Role::Master, 2),
            "B promoted on its side"
        );
        // A stays MASTER meanwhile but a returning B may outrank it.
        assert!(a.peers[&B].may_outrank);
        // Heal: BFD up, statuses cross. The later promotion (term 2) keeps MASTER.
        let t2 = t1 + Duration::from_secs(5);
        bfd(&mut a, B, true);
        bfd(&mut b, A, true);
        let (sa, sb) = (status(&a, 0), status(&b, 1));
        hear(&mut a, B, sb, t2);
        hear(&mut b, A, sa, t2);
        let oa = step(&mut a, &ca, t2, true);
        let ob = step(&mut b, &cb, t2, true);
        assert!(oa.demote.is_some(), "A steps down: {oa:?}");
        assert!(ob.demote.is_none() && ob.promote.is_none(), "{ob:?}");
        assert_eq!(
            (a.role, a.term, b.role, b.term),
            (Role::Backup, 2, Role::Master, 2)
        );
        // And it stays so.
        hear(&mut b, A, status(&a, 0), t2);
        assert_eq!(step(&mut b, &cb, t2, true), Step::default());
    }

    #[test]
    fn a_peer_returning_during_a_switchover_does_not_take_the_role_back() {
        let t0 = Instant::now();
        let (ca, mut a, cb, mut b) = pair(t0);
        // A's status, sent just before the switchover, is still in flight.
        let stale = status(&a, 0);
        // B takes MASTER by handover at the term A reports (as the sync service checks).
        let reported = b.peers[&A].master_term();
        let term = handover_term(b.term, b.max_term_seen, reported, a.term).unwrap();
        b.role = Role::Master;
        b.term = term;
        b.max_term_seen = term;
        // A steps down (`stepped_down`).
        a.role = Role::Backup;
        a.term = a.term.max(term);
        a.max_term_seen = a.max_term_seen.max(term);
        // The stale MASTER status (term 1) reaches B: B keeps the role.
        let t1 = t0 + Duration::from_millis(10);
        hear(&mut b, A, stale, t1);
        assert_eq!(step(&mut b, &cb, t1, true), Step::default());
        hear(&mut a, B, status(&b, 1), t1);
        assert_eq!(step(&mut a, &ca, t1, true), Step::default());
        assert_eq!((a.role, b.role, b.term), (Role::Backup, Role::Master, 2));
    }

    #[test]
    fn a_lone_node_waits_for_the_join_timeout_then_takes_master() {
        let t0 = Instant::now();
        let ca = cfg(1, A);
        let mut b = node(&ca, t0);
        // The peer never answers: no BFD, no sync. Not joined.
        assert_eq!(
            step(&mut b, &ca, t0 + Duration::from_secs(4), false),
            Step::default()
        );
        assert_eq!(b.role, Role::Backup);
        let out = step(&mut b, &ca, t0 + Duration::from_secs(5), false);
        assert_eq!(out.ready, Some((Duration::from_secs(5), false)));
        assert!(out.promote.is_some(), "{out:?}");
        assert_eq!((b.role, b.term), (Role::Master, 1));
    }
}
