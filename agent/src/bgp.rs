//! The BGP controller: the speaker, its configuration (`<config-path>/bgp.json`, restored at
//! start), the originated routes and the BFD coupling of neighbours.
//!
//! Originated routes are computed purely ([`routes_for`]) from the rules, the roles and the
//! policy: a /32 (/128) for every VIP of a rule with `bgp: true`; the rule's HA instance decides
//! the attributes (MASTER and NOT_DEFINED advertise plainly, BACKUP prepends its AS
//! [`BACKUP_PREPEND`] times with MED [`BACKUP_MED`]). They follow the engine's rule changes and
//! the [`crate::roles::RoleBus`] ([`Bgp::follow`]), gathered for [`SYNC_COALESCE`].

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferrolb_bgp::{GlobalConfig, NeighborConfig, RouteAttrs, Routes, Speaker};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::bfd::Bfd;
use crate::ha::Role;
use crate::lb::EngineHandle;
use crate::metrics::{counter, gauge};
use crate::roles::Roles;
use crate::rules::RuleSet;
use crate::store::{StoreError, save_document};

pub const BGP_FILE: &str = "bgp.json";
/// The instance name of the BFD sessions BGP neighbours get.
pub const BGP_BFD_INSTANCE: &str = "bgp";
pub const BACKUP_PREPEND: u8 = 3;
pub const BACKUP_MED: u32 = 200;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeighSpec {
    pub address: IpAddr,
    pub remote_as: u32,
    pub remote_port: u16,
    pub hold_time_s: u16,
    /// BFD with this neighbour: `None` (the body said nothing: kube-loxilb's) is a Passive
    /// session, answering a neighbour that runs BFD; `Some(true)` an active one; `Some(false)`
    /// none. Files of earlier versions said `false` for "nothing" and keep meaning none.
    pub bfd: Option<bool>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub ttl_security: bool,
    #[serde(default)]
    pub passive: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BgpConfig {
    pub local_as: Option<u32>,
    pub router_id: Option<Ipv4Addr>,
    pub neighbors: BTreeMap<IpAddr, NeighSpec>,
    #[serde(default)]
    pub policy: RoutePolicy,
    /// BFD timers of neighbours' sessions (`bfdInterval` µs, `bfdRetryCount` of
    /// `POST /config/bgp/global`); unset: the flags' (`--bgp-bfd-interval-ms`,
    /// `--bgp-bfd-multiplier`).
    #[serde(default)]
    pub bfd_interval_us: Option<u32>,
    #[serde(default)]
    pub bfd_multiplier: Option<u8>,
}

/// How a neighbour's BFD session runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BfdMode {
    Off,
    Passive,
    Active,
}

impl NeighSpec {
    pub fn bfd_mode(&self) -> BfdMode {
        match self.bfd {
            None => BfdMode::Passive,
            Some(true) => BfdMode::Active,
            Some(false) => BfdMode::Off,
        }
    }
}

/// The BFD timers of neighbours' sessions when `bgp.json` sets none (from the flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BfdDefaults {
    pub interval_us: u32,
    pub multiplier: u8,
}

impl Default for BfdDefaults {
    fn default() -> Self {
        BfdDefaults {
            interval_us: 100_000,
            multiplier: 3,
        }
    }
}

/// The session a neighbour in `mode` gets (None: no session). Pure.
pub fn neighbor_bfd(
    mode: BfdMode,
    c: &BgpConfig,
    d: BfdDefaults,
) -> Option<ferrolb_bfd::SessionConfig> {
    let interval = c.bfd_interval_us.unwrap_or(d.interval_us);
    Some(ferrolb_bfd::SessionConfig {
        desired_min_tx_us: interval,
        required_min_rx_us: interval,
        detect_mult: c.bfd_multiplier.unwrap_or(d.multiplier),
        auth: None,
        passive: match mode {
            BfdMode::Off => return None,
            BfdMode::Passive => true,
            BfdMode::Active => false,
        },
    })
}

/// Whether a BFD Down of a neighbour's session resets its BGP session: when the session had
/// been Up (this follower saw it), or, for an active session, when nothing is known (a lagged
/// event stream: the Down may follow an Up that was dropped). A passive session toward a
/// neighbour that does not run BFD is Down from the start and never resets anything. Pure.
pub fn bfd_down_resets(mode: BfdMode, seen_up: bool) -> bool {
    match mode {
        BfdMode::Off => false,
        BfdMode::Passive => seen_up,
        BfdMode::Active => true,
    }
}

/// Attributes of originated routes (set with `POST /config/bgp/global`, ferrolb's fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutePolicy {
    /// MED of MASTER / NOT_DEFINED routes (none by default).
    pub med: Option<u32>,
    pub backup_med: u32,
    pub backup_prepend: u8,
    /// LOCAL_PREF toward iBGP neighbours (100 when unset).
    pub local_pref: Option<u32>,
    pub backup_local_pref: Option<u32>,
    /// Added to every route.
    pub communities: Vec<u32>,
    pub large_communities: Vec<(u32, u32, u32)>,
    /// Keep advertising a VIP whose every endpoint is inactive (loxilb's behaviour). Off by
    /// default: the route is withdrawn, so the ToR sends the VIP's traffic to a node that
    /// can serve it or nowhere, and returns when an endpoint does.
    #[serde(default)]
    pub advertise_dead_vips: bool,
}

impl Default for RoutePolicy {
    fn default() -> Self {
        RoutePolicy {
            med: None,
            backup_med: BACKUP_MED,
            backup_prepend: BACKUP_PREPEND,
            local_pref: None,
            backup_local_pref: None,
            communities: Vec::new(),
            large_communities: Vec::new(),
            advertise_dead_vips: false,
        }
    }
}

impl RoutePolicy {
    pub fn attrs(&self, backup: bool) -> RouteAttrs {
        RouteAttrs {
            med: if backup {
                Some(self.backup_med)
            } else {
                self.med
            },
            prepend: if backup { self.backup_prepend } else { 0 },
            communities: self.communities.clone(),
            large_communities: self.large_communities.clone(),
            local_pref: if backup {
                self.backup_local_pref
            } else {
                self.local_pref
            },
        }
    }
}

/// How long changes are gathered before the route set is recomputed (a burst of 10,000 rule
/// changes costs a few recomputations, not 10,000).
pub const SYNC_COALESCE: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum BgpError {
    #[error("{0}")]
    NotFound(String),
    #[error("saving BGP configuration: {0}")]
    Save(#[from] StoreError),
    #[error("at most {MAX_NEIGHBORS} BGP neighbours")]
    Full,
}

/// Neighbours the REST API may configure (each runs a session task and a TCP connection).
pub const MAX_NEIGHBORS: usize = 256;

pub fn neighbor_config(n: &NeighSpec) -> NeighborConfig {
    NeighborConfig {
        address: n.address,
        remote_as: n.remote_as,
        remote_port: n.remote_port,
        hold_time_s: n.hold_time_s,
        connect_retry_s: 1,
        password: n.password.clone(),
        ttl_security: n.ttl_security,
        passive: n.passive,
    }
}

/// The routes the rules ask for, with role-driven attributes. Pure.
pub fn routes_for(rules: &RuleSet, role_of: impl Fn(&str) -> Role, policy: &RoutePolicy) -> Routes {
    let mut out = Routes::new();
    // VIPs with endpoints, none of them active: nothing there can serve.
    let mut live: BTreeMap<IpAddr, (bool, bool)> = BTreeMap::new();
    for r in rules.rules.values() {
        let e = live.entry(r.key.external_ip).or_default();
        e.0 |= !r.endpoints.is_empty();
        e.1 |= r.endpoints.iter().any(|ep| !ep.down);
    }
    let dead = |vip: &IpAddr| live.get(vip).is_some_and(|(any, up)| *any && !*up);
    for r in rules.rules.values() {
        if !r.service.bgp {
            continue;
        }
        let vip = r.key.external_ip;
        if !policy.advertise_dead_vips && dead(&vip) {
            continue;
        }
        let backup = role_of(r.service.instance()) == Role::Backup;
        let attrs = policy.attrs(backup);
        let Ok(net) = IpNet::new(vip, crate::netlink::host_len(vip)) else {
            continue;
        };
        // Two rules on one VIP in different roles: the plainer advertisement wins.
        out.entry(net)
            .and_modify(|a: &mut RouteAttrs| {
                if !backup {
                    *a = policy.attrs(false);
                }
            })
            .or_insert(attrs);
    }
    out
}

/// Adds the node source addresses (`--node-snat`) as host routes: this node's own plainly
/// (distance 0), a peer's as its `d`-th backup (the backup attributes, `d - 1` more prepends),
/// so that the ToR sends a node's replies to it while it lives and then to the next node in
/// ring order. A VIP route for the same prefix is left as it is. Pure.
pub fn add_snat_routes(out: &mut Routes, snat: &[(IpAddr, u8)], policy: &RoutePolicy) {
    for (a, d) in snat {
        let Ok(net) = IpNet::new(*a, crate::netlink::host_len(*a)) else {
            continue;
        };
        let mut attrs = policy.attrs(*d > 0);
        if *d > 1 {
            attrs.prepend = attrs.prepend.saturating_add(*d - 1);
        }
        out.entry(net).or_insert(attrs);
    }
}

pub struct Bgp {
    pub speaker: Speaker,
    dir: PathBuf,
    config: Mutex<BgpConfig>,
    bfd: Option<Arc<Bfd>>,
    bfd_defaults: BfdDefaults,
    /// The configuration changed (policy): routes are recomputed.
    dirty: tokio::sync::Notify,
}

fn load(dir: &std::path::Path) -> anyhow::Result<BgpConfig> {
    let path = dir.join(BGP_FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
            anyhow::anyhow!(
                "{}: not a ferrolb BGP document ({e}); move it aside",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BgpConfig::default()),
        Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
    }
}

impl Bgp {
    /// Loads the saved configuration, applies it to a new speaker and listens on TCP 179.
    pub async fn start(
        dir: &std::path::Path,
        bfd: Option<Arc<Bfd>>,
        bfd_defaults: BfdDefaults,
    ) -> anyhow::Result<Arc<Bgp>> {
        let config = load(dir)?;
        let bgp = Arc::new(Bgp {
            speaker: Speaker::new(),
            dir: dir.to_path_buf(),
            config: Mutex::new(config.clone()),
            bfd,
            bfd_defaults,
            dirty: tokio::sync::Notify::new(),
        });
        if let (Some(a), Some(r)) = (config.local_as, config.router_id) {
            bgp.speaker.set_global(GlobalConfig {
                local_as: a,
                router_id: r,
            });
        }
        for n in config.neighbors.values() {
            bgp.speaker.upsert_neighbor(neighbor_config(n));
        }
        // Passive neighbours connect to us; active ones may too (collisions are resolved).
        if let Err(e) = bgp.speaker.listen(179).await {
            warn!(error = %e, "cannot listen on TCP 179: passive BGP neighbours will not come up");
        }
        for n in config.neighbors.values() {
            bgp.ensure_bfd(n, &config).await;
        }
        info!("BGP speaker enabled");
        Ok(bgp)
    }

    pub async fn config(&self) -> BgpConfig {
        self.config.lock().await.clone()
    }

    /// Saves off the async workers; `shrinking` (a delete) may use the state volume's reserve.
    async fn save(&self, c: &BgpConfig, shrinking: bool) -> Result<(), BgpError> {
        let bytes = serde_json::to_vec_pretty(c).unwrap_or_default();
        save_document(self.dir.clone(), BGP_FILE, bytes, shrinking).await?;
        Ok(())
    }

    /// `POST /config/bgp/global`: AS, router id and route policy; saved, then applied.
    pub async fn set_global(
        &self,
        local_as: u32,
        router_id: Ipv4Addr,
        policy: RoutePolicy,
        bfd_timers: (Option<u32>, Option<u8>),
    ) -> Result<(), BgpError> {
        let mut c = self.config.lock().await;
        let mut next = c.clone();
        next.local_as = Some(local_as);
        next.router_id = Some(router_id);
        next.policy = policy;
        if let Some(i) = bfd_timers.0 {
            next.bfd_interval_us = Some(i);
        }
        if let Some(m) = bfd_timers.1 {
            next.bfd_multiplier = Some(m);
        }
        let timers_changed =
            (next.bfd_interval_us, next.bfd_multiplier) != (c.bfd_interval_us, c.bfd_multiplier);
        self.save(&next, false).await?;
        *c = next.clone();
        self.speaker.set_global(GlobalConfig {
            local_as,
            router_id,
        });
        drop(c);
        if timers_changed {
            for n in next.neighbors.values() {
                self.ensure_bfd(n, &next).await;
            }
        }
        self.dirty.notify_one();
        Ok(())
    }

    /// `POST /config/bgp/neigh`: saved, then applied (with a BFD session if asked).
    pub async fn upsert_neighbor(&self, spec: NeighSpec) -> Result<(), BgpError> {
        let mut c = self.config.lock().await;
        if !c.neighbors.contains_key(&spec.address) && c.neighbors.len() >= MAX_NEIGHBORS {
            return Err(BgpError::Full);
        }
        let mut next = c.clone();
        next.neighbors.insert(spec.address, spec.clone());
        self.save(&next, false).await?;
        *c = next.clone();
        self.speaker.upsert_neighbor(neighbor_config(&spec));
        drop(c);
        self.ensure_bfd(&spec, &next).await;
        Ok(())
    }

    /// `DELETE /config/bgp/neigh/{ip}` (with `remoteAs` when given: it must match).
    pub async fn remove_neighbor(
        &self,
        address: IpAddr,
        remote_as: Option<u32>,
    ) -> Result<(), BgpError> {
        let mut c = self.config.lock().await;
        let Some(n) = c.neighbors.get(&address).cloned() else {
            return Err(BgpError::NotFound(format!("no BGP neighbour {address}")));
        };
        if let Some(ra) = remote_as
            && ra != n.remote_as
        {
            return Err(BgpError::NotFound(format!(
                "BGP neighbour {address} has remote AS {}, not {ra}",
                n.remote_as
            )));
        }
        let mut next = c.clone();
        next.neighbors.remove(&address);
        self.save(&next, true).await?;
        *c = next;
        self.speaker.remove_neighbor(address);
        drop(c);
        if let Some(b) = &self.bfd {
            b.remove_owned(address, BGP_BFD_INSTANCE).await;
        }
        Ok(())
    }

    /// Gives the neighbour the BFD session its mode asks for (or removes the one BGP made).
    /// A session configured over `/config/bfd` or by `--ka` for the same address is left
    /// as it is and serves the neighbour.
    async fn ensure_bfd(&self, n: &NeighSpec, c: &BgpConfig) {
        let mode = n.bfd_mode();
        match (&self.bfd, neighbor_bfd(mode, c, self.bfd_defaults)) {
            (Some(b), Some(session)) => {
                b.ensure_session(n.address, BGP_BFD_INSTANCE, session).await
            }
            (Some(b), None) => b.remove_owned(n.address, BGP_BFD_INSTANCE).await,
            (None, Some(_)) if mode == BfdMode::Active => {
                warn!(address = %n.address, "BGP neighbour wants BFD but BFD is not running")
            }
            (None, _) => {}
        }
    }

    /// Recomputes the originated routes now.
    pub async fn sync_routes(&self, engine: &EngineHandle, roles: &Arc<Roles>) {
        let policy = self.config.lock().await.policy.clone();
        let roles = roles.clone();
        match engine
            .call(move |e| {
                let mut r = routes_for(e.rules(), |i| roles.advertised(i), &policy);
                add_snat_routes(&mut r, &roles.snat_routes(), &policy);
                r
            })
            .await
        {
            Ok(r) => self.speaker.set_routes(r),
            Err(e) => warn!(error = %e, "BGP routes not recomputed"),
        }
    }

    /// Keeps the originated routes in step with the rules, the roles and the policy: waits
    /// for a change of any of them, gathers for [`SYNC_COALESCE`], recomputes. Returns when
    /// the engine or the role bus is gone.
    pub async fn follow(self: Arc<Self>, engine: EngineHandle, roles: Arc<Roles>) {
        let mut rules = engine.rules_changed();
        let mut role_rx = roles.bus().subscribe();
        self.sync_routes(&engine, &roles).await;
        loop {
            tokio::select! {
                r = rules.changed() => if r.is_err() { return },
                r = role_rx.changed() => if r.is_err() { return },
                _ = self.dirty.notified() => {}
            }
            tokio::time::sleep(SYNC_COALESCE).await;
            rules.mark_unchanged();
            role_rx.mark_unchanged();
            self.sync_routes(&engine, &roles).await;
        }
    }

    /// BFD Down on a neighbour's session tears its BGP session down at once
    /// ([`bfd_down_resets`]). A lagged event stream re-reads every session: a missed Down is
    /// not lost.
    pub async fn follow_bfd(self: Arc<Self>) {
        let Some(b) = self.bfd.clone() else { return };
        let events = b.handle.subscribe();
        let me = self.clone();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(IpAddr, bool)>();
        let b_resets = b.clone();
        let resets = async move {
            let mut seen_up: std::collections::HashSet<IpAddr> = b_resets
                .states()
                .await
                .into_iter()
                .filter_map(|(p, up)| up.then_some(p))
                .collect();
            while let Some((peer, up)) = rx.recv().await {
                if up {
                    seen_up.insert(peer);
                    continue;
                }
                let was_up = seen_up.remove(&peer);
                let mode = me
                    .config
                    .lock()
                    .await
                    .neighbors
                    .get(&peer)
                    .map_or(BfdMode::Off, NeighSpec::bfd_mode);
                if bfd_down_resets(mode, was_up) {
                    me.speaker.reset_neighbor(peer, "BFD session down");
                }
            }
        };
        let b2 = b.clone();
        let watch = crate::bfd::follow(
            events,
            move || {
                let b = b2.clone();
                async move { b.states().await }
            },
            move |peer, up| {
                let _ = tx.send((peer, up));
            },
        );
        tokio::join!(resets, watch);
    }

    /// Records the BGP series (one per neighbour and label set).
    pub fn record_metrics(&self) {
        for n in self.speaker.neighbors() {
            let nb = n.config.address.to_string();
            let l = |extra: &[(&'static str, &str)]| {
                let mut v = vec![("neighbor", nb.clone())];
                v.extend(extra.iter().map(|(k, x)| (*k, x.to_string())));
                v
            };
            gauge(
                "ferrolb_bgp_session_established",
                "1 when the BGP session is Established.",
                &l(&[]),
                f64::from(u8::from(n.state == ferrolb_bgp::State::Established)),
            );
            counter(
                "ferrolb_bgp_state_transitions_total",
                "BGP FSM state changes.",
                &l(&[]),
                n.transitions,
            );
            for (dir, v) in [("in", n.updates_in), ("out", n.updates_out)] {
                counter(
                    "ferrolb_bgp_updates_total",
                    "UPDATE messages per direction.",
                    &l(&[("direction", dir)]),
                    v,
                );
            }
            for (dir, v) in [
                ("advertised", n.prefixes_sent),
                ("received", n.prefixes_received),
            ] {
                gauge(
                    "ferrolb_bgp_prefixes",
                    "Prefixes advertised to and received from the neighbour.",
                    &l(&[("direction", dir)]),
                    v as f64,
                );
            }
            for (dir, m) in [("in", &n.notifications_in), ("out", &n.notifications_out)] {
                for (code, c) in m {
                    counter(
                        "ferrolb_bgp_notifications_total",
                        "NOTIFICATION messages by direction and error code.",
                        &l(&[("direction", dir), ("code", &code.to_string())]),
                        *c,
                    );
                }
            }
            counter(
                "ferrolb_bgp_treat_as_withdraw_total",
                "Received UPDATEs treated as withdraw (RFC 7606).",
                &l(&[]),
                n.treat_as_withdraw,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::models::parse_rule;

    fn neigh(bfd: Option<bool>) -> NeighSpec {
        NeighSpec {
            address: "192.0.2.1".parse().unwrap(),
            remote_as: 65000,
            remote_port: 179,
            hold_time_s: 9,
            bfd,
            password: None,
            ttl_security: false,
            passive: false,
        }
    }

    /// kube-loxilb's neighbour body has no BFD field: the neighbour gets a Passive session
    /// at the flags' timers (or `bgp.json`'s); `"bfd": true` an active one; `false` none.
    #[test]
    fn node_addresses_are_host_routes_plain_here_and_longer_as_backups() {
        let pol = RoutePolicy::default();
        let mut r = Routes::new();
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        add_snat_routes(
            &mut r,
            &[
                (a("203.0.113.201"), 0),
                (a("203.0.113.200"), 1),
                (a("2001:db8::202"), 2),
            ],
            &pol,
        );
        let get = |s: &str| r.get(&s.parse::<IpNet>().unwrap()).cloned().unwrap();
        assert_eq!(get("203.0.113.201/32").prepend, 0);
        assert_eq!(get("203.0.113.200/32").prepend, BACKUP_PREPEND);
        assert_eq!(get("2001:db8::202/128").prepend, BACKUP_PREPEND + 1);
        assert_eq!(get("203.0.113.200/32").med, Some(BACKUP_MED));
    }

    #[test]
    fn neighbours_get_passive_bfd_unless_told_otherwise() {
        let d = BfdDefaults {
            interval_us: 100_000,
            multiplier: 3,
        };
        let mut c = BgpConfig::default();
        let s = neighbor_bfd(neigh(None).bfd_mode(), &c, d).unwrap();
        assert!(s.passive);
        assert_eq!(
            (s.desired_min_tx_us, s.required_min_rx_us, s.detect_mult),
            (100_000, 100_000, 3)
        );
        let s = neighbor_bfd(neigh(Some(true)).bfd_mode(), &c, d).unwrap();
        assert!(!s.passive);
        assert!(neighbor_bfd(neigh(Some(false)).bfd_mode(), &c, d).is_none());
        c.bfd_interval_us = Some(50_000);
        c.bfd_multiplier = Some(5);
        let s = neighbor_bfd(BfdMode::Passive, &c, d).unwrap();
        assert_eq!((s.desired_min_tx_us, s.detect_mult), (50_000, 5));
    }

    #[test]
    fn saved_neighbours_of_earlier_versions_keep_their_bfd() {
        let old = r#"{"address":"192.0.2.1","remote_as":65000,"remote_port":179,"hold_time_s":9,"bfd":false}"#;
        let n: NeighSpec = serde_json::from_str(old).unwrap();
        assert_eq!(n.bfd_mode(), BfdMode::Off);
        let on = old.replace("false", "true");
        let n: NeighSpec = serde_json::from_str(&on).unwrap();
        assert_eq!(n.bfd_mode(), BfdMode::Active);
        let none = serde_json::to_string(&neigh(None)).unwrap();
        let n: NeighSpec = serde_json::from_str(&none).unwrap();
        assert_eq!(n.bfd_mode(), BfdMode::Passive);
    }

    /// A passive session toward a ToR that does not run BFD stays Down: a re-read after a
    /// lagged event stream must not reset that BGP session; one that was Up does.
    #[test]
    fn bfd_down_resets_only_sessions_that_were_up_or_are_active() {
        assert!(!bfd_down_resets(BfdMode::Passive, false));
        assert!(bfd_down_resets(BfdMode::Passive, true));
        assert!(bfd_down_resets(BfdMode::Active, false));
        assert!(!bfd_down_resets(BfdMode::Off, true));
    }

    #[test]
    fn routes_follow_bgp_flag_and_roles() {
        let mut rs = RuleSet::default();
        for (port, bgp, name) in [
            (80, true, "default_a:llb-inst0"),
            (81, false, "default_b:llb-inst0"),
            (82, true, "x:inst1"),
        ] {
            let ip = if port == 82 {
                "203.0.113.11"
            } else {
                "203.0.113.10"
            };
            let b = format!(
                r#"{{"serviceArguments":{{"externalIP":"{ip}","port":{port},"BGP":{bgp},"name":"{name}"}},"endpoints":[]}}"#
            );
            let c = rs.plan(parse_rule(b.as_bytes()).unwrap(), 16).unwrap();
            rs.apply(&c);
        }
        let pol = RoutePolicy::default();
        let plain = routes_for(&rs, |_| Role::NotDefined, &pol);
        assert_eq!(plain.len(), 2);
        assert!(plain.values().all(|a| *a == RouteAttrs::default()));
        let backup0 = |i: &str| {
            if i == "llb-inst0" {
                Role::Backup
            } else {
                Role::Master
            }
        };
        let r = routes_for(&rs, backup0, &pol);
        let a = &r[&"203.0.113.10/32".parse().unwrap()];
        assert_eq!((a.prepend, a.med), (BACKUP_PREPEND, Some(BACKUP_MED)));
        assert_eq!(
            r[&"203.0.113.11/32".parse().unwrap()],
            RouteAttrs::default(),
            "another instance"
        );
        let pol = RoutePolicy {
            backup_prepend: 5,
            backup_med: 300,
            med: Some(10),
            communities: vec![(65100 << 16) | 10],
            ..RoutePolicy::default()
        };
        let r = routes_for(&rs, backup0, &pol);
        let a = &r[&"203.0.113.10/32".parse().unwrap()];
        assert_eq!((a.prepend, a.med), (5, Some(300)));
        assert_eq!(a.communities, vec![(65100 << 16) | 10]);
        assert_eq!(r[&"203.0.113.11/32".parse().unwrap()].med, Some(10));
    }

    #[test]
    fn a_vip_whose_every_endpoint_is_inactive_is_withdrawn() {
        let mut rs = RuleSet::default();
        for port in [80, 443] {
            let b = format!(
                r#"{{"serviceArguments":{{"externalIP":"203.0.113.10","port":{port},"BGP":true,"Monitor":true}},
                   "endpoints":[{{"endpointIP":"10.0.0.1","targetPort":8080}},{{"endpointIP":"10.0.0.2","targetPort":8080}}]}}"#
            );
            let c = rs.plan(parse_rule(b.as_bytes()).unwrap(), 16).unwrap();
            rs.apply(&c);
        }
        let net: IpNet = "203.0.113.10/32".parse().unwrap();
        let pol = RoutePolicy::default();
        let set_down = |rs: &mut RuleSet, port: u16, down: &[bool]| {
            let r = rs.rules.values_mut().find(|r| r.key.port == port).unwrap();
            for (e, d) in r.endpoints.iter_mut().zip(down) {
                e.down = *d;
            }
        };
        assert!(routes_for(&rs, |_| Role::NotDefined, &pol).contains_key(&net));
        // One rule's endpoints all down, the other rule still serves: advertised.
        set_down(&mut rs, 80, &[true, true]);
        assert!(routes_for(&rs, |_| Role::NotDefined, &pol).contains_key(&net));
        // Nothing on the VIP can serve: withdrawn (unless the operator keeps it).
        set_down(&mut rs, 443, &[true, true]);
        assert!(!routes_for(&rs, |_| Role::NotDefined, &pol).contains_key(&net));
        let keep = RoutePolicy {
            advertise_dead_vips: true,
            ..RoutePolicy::default()
        };
        assert!(routes_for(&rs, |_| Role::NotDefined, &keep).contains_key(&net));
        // One endpoint back: advertised again.
        set_down(&mut rs, 443, &[false, true]);
        assert!(routes_for(&rs, |_| Role::NotDefined, &pol).contains_key(&net));
    }
}
