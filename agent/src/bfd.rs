//! The BFD controller: the sessions configured over REST (saved in `<config-path>/bfd.json`,
//! restored at start) and those of `--ka` (from the flags; HA watches them, so they cannot
//! be removed or changed over REST). The sessions themselves run on the BFD thread
//! (`ferrolb_bfd::spawn`); this holds the handle and what is saved.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context;
use ferrolb_bfd::{AuthConfig, AuthType, Handle, PeerConfig, SessionConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::config::Config;
use crate::model::FieldError;
use crate::store::{StoreError, save_document};

pub const BFD_FILE: &str = "bfd.json";

/// A session as configured over REST (what `bfd.json` holds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BfdSpec {
    pub instance: String,
    pub remote: IpAddr,
    pub source: IpAddr,
    pub interval_us: u32,
    pub retry_count: u8,
    #[serde(default)]
    pub auth: Option<(String, u8, String)>,
}

impl BfdSpec {
    pub fn peer_config(&self) -> Result<PeerConfig, FieldError> {
        let auth = match &self.auth {
            None => None,
            Some((t, id, key)) => {
                let auth_type = match t.as_str() {
                    "simple" => AuthType::SimplePassword,
                    "keyed-sha1" => AuthType::KeyedSha1,
                    "meticulous-keyed-sha1" => AuthType::MeticulousKeyedSha1,
                    other => {
                        return Err(FieldError::new(
                            "authType",
                            format!("'{other}' is not simple, keyed-sha1 or meticulous-keyed-sha1"),
                        ));
                    }
                };
                let a = AuthConfig {
                    auth_type,
                    key_id: *id,
                    secret: key.as_bytes().to_vec(),
                };
                a.validate()
                    .map_err(|e| FieldError::new("authKey", e.to_string()))?;
                Some(a)
            }
        };
        Ok(PeerConfig {
            peer: self.remote,
            local: self.source,
            instance: self.instance.clone(),
            session: SessionConfig {
                desired_min_tx_us: self.interval_us,
                required_min_rx_us: self.interval_us,
                detect_mult: self.retry_count,
                auth,
                passive: false,
            },
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BfdError {
    #[error("{0}")]
    Invalid(FieldError),
    /// A `--ka` session: HA's failure detector.
    #[error(
        "remoteIP: {0} is this node's --ka keepalive peer (HA failure detection); remove it from --ka and restart the agent to change or stop it"
    )]
    Keepalive(IpAddr),
    #[error("no BFD session to {0}")]
    NotFound(IpAddr),
    #[error("saving BFD sessions: {0}")]
    Save(#[from] StoreError),
    #[error("BFD: {0}")]
    Runner(String),
    #[error("at most {MAX_REST_SESSIONS} BFD sessions can be configured over REST")]
    Full,
}

/// Sessions the REST API may create (each holds a socket and timers on the BFD thread).
pub const MAX_REST_SESSIONS: usize = 1024;

/// A `--ka` session is HA's failure detector: removing or changing it over REST would make
/// the peer see our session go down (and take over) while this node, which still holds the
/// VIPs, would not know.
pub fn keepalive_refusal(ip: IpAddr, keepalive_peers: &BTreeSet<IpAddr>) -> Option<BfdError> {
    keepalive_peers
        .contains(&ip)
        .then_some(BfdError::Keepalive(ip))
}

/// The BFD controller.
pub struct Bfd {
    pub handle: Handle,
    dir: PathBuf,
    specs: Mutex<BTreeMap<IpAddr, BfdSpec>>,
    /// Peers of `--ka` sessions.
    keepalive_peers: BTreeSet<IpAddr>,
}

fn load(dir: &std::path::Path) -> anyhow::Result<BTreeMap<IpAddr, BfdSpec>> {
    let path = dir.join(BFD_FILE);
    match std::fs::read(&path) {
        Ok(b) => {
            let v: Vec<BfdSpec> = serde_json::from_slice(&b).map_err(|e| {
                anyhow::anyhow!(
                    "{}: not a ferrolb BFD document ({e}); move it aside",
                    path.display()
                )
            })?;
            Ok(v.into_iter().map(|s| (s.remote, s)).collect())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
    }
}

impl Bfd {
    /// Starts BFD: sessions saved over REST, then those of `--ka` (which win for the same
    /// peer). Without `--ka`, a BFD that cannot bind UDP 3784 is a warning, not a failure.
    pub async fn start(cfg: &Config) -> anyhow::Result<Option<Bfd>> {
        let handle = match ferrolb_bfd::spawn(
            ferrolb_bfd::socket::CONTROL_PORT,
            cfg.flags.bfd_rt_priority,
        ) {
            Ok(h) => h,
            Err(e) if cfg.keepalives.is_empty() => {
                warn!(error = %e, "BFD not started; /config/bfd answers 503");
                return Ok(None);
            }
            Err(e) => return Err(e).context("start BFD for --ka"),
        };
        let mut specs = load(&cfg.flags.config_path)?;
        let keepalive_peers: BTreeSet<IpAddr> = cfg.keepalives.iter().map(|k| k.remote).collect();
        // A saved session to a --ka peer (from before it was one) gives way to the flags.
        specs.retain(|ip, _| !keepalive_peers.contains(ip));
        for s in specs.values() {
            match s.peer_config() {
                Ok(pc) => {
                    if let Err(e) = handle.upsert(pc).await {
                        warn!(peer = %s.remote, error = %e, "saved BFD session not restored");
                    }
                }
                Err(e) => warn!(peer = %s.remote, error = %e, "saved BFD session not restored"),
            }
        }
        for ka in &cfg.keepalives {
            let pc = PeerConfig {
                peer: ka.remote,
                local: ka.source,
                instance: "default".into(),
                session: SessionConfig {
                    desired_min_tx_us: ka.interval_us,
                    required_min_rx_us: ka.interval_us,
                    detect_mult: 3,
                    auth: None,
                    passive: false,
                },
            };
            handle
                .upsert(pc)
                .await
                .with_context(|| format!("--ka: BFD session to {}", ka.remote))?;
            info!(peer = %ka.remote, source = %ka.source, interval_us = ka.interval_us, "BFD keepalive (--ka)");
        }
        Ok(Some(Bfd {
            handle,
            dir: cfg.flags.config_path.clone(),
            specs: Mutex::new(specs),
            keepalive_peers,
        }))
    }

    /// Why a session may not be created, changed or removed over REST, if it may not.
    pub fn refusal(&self, ip: IpAddr) -> Option<BfdError> {
        keepalive_refusal(ip, &self.keepalive_peers)
    }

    /// Saves the sessions off the async workers; `shrinking` (a delete) may use the state
    /// volume's reserve.
    async fn save(
        &self,
        specs: &BTreeMap<IpAddr, BfdSpec>,
        shrinking: bool,
    ) -> Result<(), BfdError> {
        let v: Vec<&BfdSpec> = specs.values().collect();
        let bytes = serde_json::to_vec_pretty(&v).unwrap_or_default();
        save_document(self.dir.clone(), BFD_FILE, bytes, shrinking).await?;
        Ok(())
    }

    /// `POST /config/bfd`: creates or changes a session and saves it.
    pub async fn upsert(&self, spec: BfdSpec) -> Result<(), BfdError> {
        if let Some(e) = self.refusal(spec.remote) {
            return Err(e);
        }
        let cfg = spec.peer_config().map_err(BfdError::Invalid)?;
        let mut specs = self.specs.lock().await;
        if !specs.contains_key(&spec.remote) && specs.len() >= MAX_REST_SESSIONS {
            return Err(BfdError::Full);
        }
        self.handle
            .upsert(cfg)
            .await
            .map_err(|e| BfdError::Invalid(FieldError::new("", e.to_string())))?;
        specs.insert(spec.remote, spec);
        self.save(&specs, false).await
    }

    /// `DELETE /config/bfd/remoteIP/{ip}`.
    pub async fn remove(&self, ip: IpAddr) -> Result<(), BfdError> {
        if let Some(e) = self.refusal(ip) {
            return Err(e);
        }
        let mut specs = self.specs.lock().await;
        let existed = self
            .handle
            .remove(ip)
            .await
            .map_err(|e| BfdError::Runner(e.to_string()))?;
        if !existed {
            return Err(BfdError::NotFound(ip));
        }
        if specs.remove(&ip).is_some() {
            self.save(&specs, true).await?;
        }
        Ok(())
    }

    /// A session of `instance` (BGP's) to `peer` with `session`'s timers and role: created,
    /// or changed when it is already `instance`'s. A session of another owner (`/config/bfd`,
    /// `--ka`) to that peer is left alone: it serves.
    pub async fn ensure_session(&self, peer: IpAddr, instance: &str, session: SessionConfig) {
        let existing = match self.handle.list().await {
            Ok(l) => l.into_iter().find(|p| p.peer == peer),
            Err(e) => {
                warn!(%peer, error = %e, "BFD for the BGP neighbour: BFD is not running");
                return;
            }
        };
        let local = match existing {
            Some(p) if p.instance != instance => return,
            Some(p) if p.status.config == session => return,
            Some(p) => p.local.ip(),
            None => match crate::vip::source_toward(peer).await {
                Ok(s) => s,
                Err(e) => {
                    warn!(%peer, error = %e, "no source address for BFD to the BGP neighbour");
                    return;
                }
            },
        };
        let passive = session.passive;
        let interval_us = session.desired_min_tx_us;
        let pc = PeerConfig {
            peer,
            local,
            instance: instance.into(),
            session,
        };
        match self.handle.upsert(pc).await {
            Ok(_) => info!(%peer, passive, interval_us, "BFD for the BGP neighbour"),
            Err(e) => warn!(%peer, error = %e, "BFD for the BGP neighbour failed"),
        }
    }

    /// Removes the session to `peer` if `instance` made it (not one of `/config/bfd` or
    /// `--ka`).
    pub async fn remove_owned(&self, peer: IpAddr, instance: &str) {
        let ours = self
            .handle
            .list()
            .await
            .is_ok_and(|l| l.iter().any(|p| p.peer == peer && p.instance == instance));
        if ours && !self.keepalive_peers.contains(&peer) {
            let _ = self.handle.remove(peer).await;
        }
    }

    /// Every session's peer and whether it is Up.
    pub async fn states(&self) -> Vec<(IpAddr, bool)> {
        self.handle
            .list()
            .await
            .map(|l| {
                l.into_iter()
                    .map(|s| (s.peer, s.status.state == ferrolb_bfd::State::Up))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Feeds BFD transitions to `apply(peer, up)` until the stream ends. When the receiver lagged
/// (the broadcast dropped its oldest events), the dropped ones may include some peer's Down:
/// instead of skipping ahead it re-reads every session's current state.
pub async fn follow<L, Fut>(
    mut events: tokio::sync::broadcast::Receiver<ferrolb_bfd::Event>,
    list: L,
    apply: impl Fn(IpAddr, bool),
) where
    L: Fn() -> Fut,
    Fut: std::future::Future<Output = Vec<(IpAddr, bool)>>,
{
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match events.recv().await {
            Ok(ev) => apply(ev.peer, ev.to == ferrolb_bfd::State::Up),
            Err(RecvError::Lagged(n)) => {
                warn!(
                    missed = n,
                    "BFD events dropped (slow reader): re-reading every session's state"
                );
                for (peer, up) in list().await {
                    apply(peer, up);
                }
            }
            Err(RecvError::Closed) => return,
        }
    }
}

fn secs(d: Option<std::time::Duration>) -> f64 {
    d.map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Records the BFD series: sessions (`l` from [`Handle::list`]), packets, drops, timers.
pub fn record_metrics(
    l: &[ferrolb_bfd::runner::PeerStatus],
    c: &ferrolb_bfd::runner::GlobalCounters,
) {
    use crate::metrics::{counter, gauge};
    use std::sync::atomic::Ordering::Relaxed;
    for p in l {
        let peer = p.peer.to_string();
        gauge(
            "ferrolb_bfd_session_up",
            "1 when the BFD session is Up.",
            &[("peer", peer.clone()), ("instance", p.instance.clone())],
            f64::from(u8::from(p.status.state == ferrolb_bfd::State::Up)),
        );
        counter(
            "ferrolb_bfd_state_transitions_total",
            "BFD state changes per session.",
            &[("peer", peer.clone())],
            p.counters.state_changes,
        );
        for (dir, v) in [("in", p.counters.rx), ("out", p.counters.tx)] {
            counter(
                "ferrolb_bfd_packets_total",
                "BFD control packets per session and direction.",
                &[("peer", peer.clone()), ("direction", dir.to_string())],
                v,
            );
        }
        gauge(
            "ferrolb_bfd_last_detection_seconds",
            "Silence before the session's last detection timeout (0: none yet).",
            &[("peer", peer)],
            secs(p.last_detection),
        );
    }
    let auth: u64 = l.iter().map(|p| p.counters.drop_auth).sum();
    for (reason, n) in [
        ("kernel", c.drop_kernel.load(Relaxed)),
        ("bad_ttl", c.drop_bad_ttl.load(Relaxed)),
        ("malformed", c.drop_malformed.load(Relaxed)),
        ("no_session", c.drop_no_session.load(Relaxed)),
        ("auth", auth),
    ] {
        counter(
            "ferrolb_bfd_drops_total",
            "BFD packets dropped, by reason.",
            &[("reason", reason.to_string())],
            n,
        );
    }
    counter(
        "ferrolb_bfd_timers_late_total",
        "BFD timer runs more than 10 ms after their deadline (the node is too busy for its BFD intervals).",
        &[],
        c.timers_late.load(Relaxed),
    );
    gauge(
        "ferrolb_bfd_timer_late_max_seconds",
        "The latest a BFD timer has run after its deadline.",
        &[],
        c.timer_late_max_us.load(Relaxed) as f64 / 1e6,
    );
    gauge(
        "ferrolb_bfd_thread_rt_priority",
        "SCHED_FIFO priority of the BFD thread (0: normal scheduling).",
        &[],
        c.rt_priority.load(Relaxed) as f64,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalive_sessions_cannot_be_changed_or_deleted_over_rest() {
        let ka: BTreeSet<IpAddr> = ["10.0.0.2".parse().unwrap()].into();
        let why = keepalive_refusal("10.0.0.2".parse().unwrap(), &ka)
            .unwrap()
            .to_string();
        assert!(why.contains("remoteIP") && why.contains("--ka"), "{why}");
        assert!(keepalive_refusal("10.0.0.3".parse().unwrap(), &ka).is_none());
    }
}
