//! The prober: one task per target, started and stopped as the rules change, each firing at
//! its own phase of its interval (so ten thousand endpoints do not fire together), with a
//! bound on probes in flight. Verdict changes go to the engine, which takes inactive
//! endpoints out of selection.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::probe::{self, Failure};
use super::{Forced, Target, Timing, Tracker, Verdicts};
use crate::lb::EngineHandle;

/// Probes in flight at once, whatever the number of targets.
pub const MAX_IN_FLIGHT: usize = 512;

/// After a rules change, how long the planner waits for more before it plans again.
const REPLAN_PAUSE: Duration = Duration::from_millis(50);
/// Most targets probed (a rule has at most 32 endpoints; this bounds what rules can ask).
pub const MAX_TARGETS: usize = 65_536;

/// One target as the operator sees it.
#[derive(Debug, Clone)]
pub struct Status {
    pub timing: Timing,
    pub tracker: Tracker,
    pub last: Option<Result<probe::Passed, Failure>>,
    pub probes: u64,
    pub min: Option<Duration>,
    pub max: Option<Duration>,
    pub sum: Duration,
    pub ok: u64,
    pub since: Instant,
}

impl Status {
    fn new(timing: Timing) -> Status {
        Status {
            timing,
            tracker: Tracker::default(),
            last: None,
            probes: 0,
            min: None,
            max: None,
            sum: Duration::ZERO,
            ok: 0,
            since: Instant::now(),
        }
    }

    pub fn avg(&self) -> Option<Duration> {
        (self.ok > 0).then(|| self.sum / self.ok.min(u64::from(u32::MAX)) as u32)
    }
}

#[derive(Debug, Default)]
pub struct Counters {
    pub probes: AtomicU64,
    pub failures: [AtomicU64; Failure::ALL.len()],
    pub transitions: AtomicU64,
    pub late: AtomicU64,
    pub refused_targets: AtomicU64,
    /// Probes that started within [`START_DELAY_BUCKETS_MS`]`[i]` of their schedule
    /// (cumulative; the last bucket is every probe).
    pub start_delay: [AtomicU64; START_DELAY_BUCKETS_MS.len()],
}

/// Buckets of a probe's start delay (how long after its scheduled time it started).
pub const START_DELAY_BUCKETS_MS: [u64; 9] = [1, 5, 10, 25, 50, 100, 250, 1000, u64::MAX];

/// Counts a probe's start delay into the cumulative buckets.
fn count_start_delay(c: &Counters, delay: Duration) {
    let ms = delay.as_millis().min(u128::from(u64::MAX)) as u64;
    for (b, n) in START_DELAY_BUCKETS_MS.iter().zip(&c.start_delay) {
        if ms <= *b {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Probes created over REST (`POST /config/endpoint`), outside any rule.
pub const MAX_MANUAL: usize = 4096;
/// The document holding REST-made probes and forced-down endpoints, under `--config-path`.
pub const HEALTH_FILE: &str = "health.json";

/// A probe made over REST: loxilb's endpoint object.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manual {
    pub name: String,
    pub target: ManualTarget,
    pub interval_s: u32,
    pub fall: u32,
}

/// A target as saved (its own on-disk shape).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ManualTarget {
    pub ip: std::net::IpAddr,
    pub port: u16,
    pub kind: String,
    pub request: String,
    pub response: String,
}

impl Manual {
    pub fn target(&self) -> Option<(Target, Timing)> {
        let kind = crate::model::ProbeKind::from_name(&self.target.kind)?;
        let interval = Duration::from_secs(u64::from(self.interval_s.max(1)));
        Some((
            Target {
                ip: self.target.ip,
                port: self.target.port,
                kind,
                request: self.target.request.clone(),
                response: self.target.response.clone(),
                source: None,
            },
            Timing {
                interval,
                timeout: super::PROBE_TIMEOUT.min(interval),
                fall: self.fall.max(1),
                rise: crate::model::PROBE_RISE,
            },
        ))
    }
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct Doc {
    #[serde(default)]
    endpoints: Vec<Manual>,
    #[serde(default)]
    forced: Vec<ForcedDoc>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct ForcedDoc {
    ip: std::net::IpAddr,
    port: u16,
    protocol: Option<String>,
}

/// Why a REST change to probes was refused.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    InUse(String),
    #[error("at most {MAX_MANUAL} endpoint probes")]
    Full,
    #[error("{0}")]
    Save(crate::store::StoreError),
}

pub struct Health {
    engine: EngineHandle,
    dir: std::path::PathBuf,
    statuses: Mutex<BTreeMap<Target, Status>>,
    forced: Mutex<BTreeSet<Forced>>,
    manual: Mutex<BTreeMap<String, Manual>>,
    /// REST changed the manual probes: the plan is made again.
    replan: tokio::sync::Notify,
    /// Serialises REST changes and their saving.
    saving: tokio::sync::Mutex<()>,
    wake: tokio::sync::Notify,
    sem: Arc<tokio::sync::Semaphore>,
    /// This node's verdicts as its peers get them (in its sync status).
    view: super::view::SharedView,
    pub counters: Counters,
}

impl Health {
    /// Loads the REST-made probes and forced endpoints saved under `dir`.
    pub fn load(engine: EngineHandle, dir: &std::path::Path) -> anyhow::Result<Arc<Health>> {
        let path = dir.join(HEALTH_FILE);
        let doc: Doc = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                anyhow::anyhow!(
                    "{}: not a ferrolb health document ({e}); move it aside",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Doc::default(),
            Err(e) => return Err(anyhow::anyhow!("{}: {e}", path.display())),
        };
        let forced = doc
            .forced
            .iter()
            .map(|f| Forced {
                ip: f.ip,
                port: f.port,
                protocol: f
                    .protocol
                    .as_deref()
                    .and_then(crate::model::Protocol::from_name),
            })
            .collect();
        let manual = doc
            .endpoints
            .into_iter()
            .filter(|m| m.target().is_some())
            .map(|m| (m.name.clone(), m))
            .collect();
        let h = Health::new(engine, dir);
        *h.forced.lock().unwrap_or_else(|p| p.into_inner()) = forced;
        *h.manual.lock().unwrap_or_else(|p| p.into_inner()) = manual;
        if !h.forced().is_empty() {
            h.wake.notify_one();
        }
        Ok(h)
    }

    pub fn new(engine: EngineHandle, dir: &std::path::Path) -> Arc<Health> {
        Arc::new(Health {
            engine,
            dir: dir.to_path_buf(),
            statuses: Mutex::new(BTreeMap::new()),
            forced: Mutex::new(BTreeSet::new()),
            manual: Mutex::new(BTreeMap::new()),
            replan: tokio::sync::Notify::new(),
            saving: tokio::sync::Mutex::new(()),
            wake: tokio::sync::Notify::new(),
            sem: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
            view: super::view::SharedView::default(),
            counters: Counters::default(),
        })
    }

    fn manual_map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Manual>> {
        self.manual.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn manual(&self) -> Vec<Manual> {
        self.manual_map().values().cloned().collect()
    }

    async fn save(&self) -> Result<(), HealthError> {
        let doc = Doc {
            endpoints: self.manual(),
            forced: self
                .forced()
                .into_iter()
                .map(|f| ForcedDoc {
                    ip: f.ip,
                    port: f.port,
                    protocol: f.protocol.map(|p| p.name().to_string()),
                })
                .collect(),
        };
        let bytes = serde_json::to_vec_pretty(&doc).unwrap_or_default();
        crate::store::save_document(self.dir.clone(), HEALTH_FILE, bytes, false)
            .await
            .map_err(HealthError::Save)
    }

    /// Creates or replaces a REST-made probe (by name).
    pub async fn upsert_manual(&self, m: Manual) -> Result<(), HealthError> {
        let _g = self.saving.lock().await;
        let prev = {
            let mut map = self.manual_map();
            if !map.contains_key(&m.name) && map.len() >= MAX_MANUAL {
                return Err(HealthError::Full);
            }
            map.insert(m.name.clone(), m.clone())
        };
        if let Err(e) = self.save().await {
            let mut map = self.manual_map();
            match prev {
                Some(p) => map.insert(m.name.clone(), p),
                None => map.remove(&m.name),
            };
            return Err(e);
        }
        self.replan.notify_one();
        Ok(())
    }

    /// Removes the REST-made probes of `ip` that match `name`, `kind` and `port` (each when
    /// given). A probe a rule makes cannot be removed here.
    pub async fn remove_manual(
        &self,
        ip: std::net::IpAddr,
        name: Option<&str>,
        kind: Option<&str>,
        port: Option<u16>,
    ) -> Result<usize, HealthError> {
        let _g = self.saving.lock().await;
        let matches = |m: &Manual| {
            m.target.ip == ip
                && name.is_none_or(|n| n == m.name)
                && kind.is_none_or(|k| k == m.target.kind)
                && port.is_none_or(|p| p == m.target.port)
        };
        let removed: Vec<Manual> = {
            let mut map = self.manual_map();
            let gone: Vec<String> = map
                .values()
                .filter(|m| matches(m))
                .map(|m| m.name.clone())
                .collect();
            gone.iter().filter_map(|n| map.remove(n)).collect()
        };
        if removed.is_empty() {
            let by_rule = self.st().keys().any(|t| t.ip == ip);
            return Err(if by_rule {
                HealthError::InUse(format!(
                    "the probes of {ip} come from load-balancer rules (Monitor); change the rules instead"
                ))
            } else {
                HealthError::NotFound(format!("no endpoint probe for {ip}"))
            });
        }
        if let Err(e) = self.save().await {
            let mut map = self.manual_map();
            for m in removed {
                map.insert(m.name.clone(), m);
            }
            return Err(e);
        }
        self.replan.notify_one();
        Ok(removed.len())
    }

    /// Forces an endpoint down (`down`) or lets the probes decide again; saved.
    pub async fn set_forced(&self, f: Forced, down: bool) -> Result<(), HealthError> {
        let _g = self.saving.lock().await;
        let changed = {
            let mut s = self.forced_set();
            if down {
                s.insert(f.clone())
            } else {
                s.remove(&f)
            }
        };
        if !changed {
            return Ok(());
        }
        if let Err(e) = self.save().await {
            let mut s = self.forced_set();
            if down {
                s.remove(&f);
            } else {
                s.insert(f);
            }
            return Err(e);
        }
        self.wake.notify_one();
        Ok(())
    }

    fn st(&self) -> std::sync::MutexGuard<'_, BTreeMap<Target, Status>> {
        self.statuses.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn forced_set(&self) -> std::sync::MutexGuard<'_, BTreeSet<Forced>> {
        self.forced.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every probed target and its state.
    pub fn statuses(&self) -> Vec<(Target, Status)> {
        self.st()
            .iter()
            .map(|(t, s)| (t.clone(), s.clone()))
            .collect()
    }

    pub fn forced(&self) -> Vec<Forced> {
        self.forced_set().iter().cloned().collect()
    }

    /// The view this node's sync status carries (kept current by the apply loop).
    pub fn shared_view(&self) -> super::view::SharedView {
        self.view.clone()
    }

    /// This node's view now: each target's state as `currState` shows it.
    pub fn view(&self) -> super::view::View {
        use super::view::{Key, State};
        let forced = self.forced();
        let st = self.st();
        let mut states: BTreeMap<Key, State> = BTreeMap::new();
        for (t, s) in st.iter() {
            let state = target_state(&forced, t, s);
            let k = Key {
                ip: t.ip,
                port: t.port,
                kind: t.kind,
            };
            // Targets that differ only by source (one-arm rules with different egress
            // addresses): the one held out wins.
            states
                .entry(k)
                .and_modify(|x| {
                    if *x == State::Up {
                        *x = state;
                    }
                })
                .or_insert(state);
        }
        super::view::View { states }
    }

    fn publish_view(&self) {
        super::view::write(&self.view, &self.view());
    }

    fn verdicts(&self) -> Verdicts {
        Verdicts {
            down: self
                .st()
                .iter()
                .filter(|(_, s)| !s.tracker.up)
                .map(|(t, _)| t.clone())
                .collect(),
            forced: self.forced_set().clone(),
        }
    }

    fn record(&self, t: &Target, r: Result<probe::Passed, Failure>) {
        self.counters.probes.fetch_add(1, Ordering::Relaxed);
        if let Err(f) = r
            && let Some(i) = Failure::ALL.iter().position(|x| *x == f)
        {
            self.counters.failures[i].fetch_add(1, Ordering::Relaxed);
        }
        tracing::debug!(probe = %t, result = ?r, "probe");
        let mut st = self.st();
        // Removed meanwhile: the answer is of no use.
        let Some(s) = st.get_mut(t) else { return };
        s.probes += 1;
        s.last = Some(r);
        if let Ok(p) = r {
            let d = p.rtt;
            s.ok += 1;
            s.sum += d;
            s.min = Some(s.min.map_or(d, |m| m.min(d)));
            s.max = Some(s.max.map_or(d, |m| m.max(d)));
        }
        let timing = s.timing;
        let answer = match r {
            Ok(p) if p.quiet => None,
            Ok(_) => Some(true),
            Err(_) => Some(false),
        };
        if let Some(up) = s.tracker.observe_answer(answer, &timing) {
            s.since = Instant::now();
            self.counters.transitions.fetch_add(1, Ordering::Relaxed);
            drop(st);
            if up {
                info!(target = %t, "endpoint active again: its probes pass");
            } else {
                warn!(target = %t, reason = r.err().map(Failure::name), "endpoint inactive: its probes fail");
            }
            self.wake.notify_one();
        }
    }

    /// Keeps one probe task per target the rules ask for. Runs until the agent stops; the
    /// probe tasks end with it (they are in its `JoinSet`).
    pub async fn plan_loop(self: Arc<Health>) {
        let mut rules = self.engine.rules_changed();
        let mut tasks: HashMap<Target, (Timing, tokio::task::AbortHandle)> = HashMap::new();
        let mut set = tokio::task::JoinSet::new();
        loop {
            let wanted = match self.engine.call(|e| super::plan(e.rules())).await {
                Ok(p) => p,
                Err(e) => {
                    warn!(error = %e, "health: the engine is gone");
                    return;
                }
            };
            let mut wanted: BTreeMap<Target, Timing> = wanted;
            for m in self.manual() {
                if let Some((t, timing)) = m.target() {
                    wanted
                        .entry(t)
                        .and_modify(|x| *x = x.tighter(timing))
                        .or_insert(timing);
                }
            }
            if wanted.len() > MAX_TARGETS {
                self.counters
                    .refused_targets
                    .store((wanted.len() - MAX_TARGETS) as u64, Ordering::Relaxed);
                warn!(
                    targets = wanted.len(),
                    limit = MAX_TARGETS,
                    "health: more targets than the prober takes; the rest are not probed"
                );
                let keep: Vec<Target> = wanted.keys().take(MAX_TARGETS).cloned().collect();
                wanted.retain(|t, _| keep.binary_search(t).is_ok());
            }
            let mut removed = false;
            tasks.retain(|t, (timing, h)| {
                let keep = wanted.get(t) == Some(timing);
                if !keep {
                    h.abort();
                }
                keep
            });
            {
                let mut st = self.st();
                st.retain(|t, s| {
                    let keep = wanted.get(t) == Some(&s.timing);
                    removed |= !keep && !s.tracker.up;
                    keep
                });
                for (t, timing) in &wanted {
                    st.entry(t.clone()).or_insert_with(|| Status::new(*timing));
                }
            }
            for (t, timing) in wanted {
                if tasks.contains_key(&t) {
                    continue;
                }
                let h = set.spawn(probe_loop(self.clone(), t.clone(), timing));
                tasks.insert(t, (timing, h));
            }
            if removed {
                self.wake.notify_one();
            } else {
                self.publish_view();
            }
            // Reap finished (aborted) tasks so the set does not grow.
            while set.try_join_next().is_some() {}
            tokio::select! {
                r = rules.changed() => {
                    if r.is_err() {
                        return;
                    }
                    // A burst of rule changes (10,000 created in a row) is planned once per
                    // pause, not once per change: each plan walks every rule on the engine's
                    // thread, where the REST calls wait their turn (it took a fifth of a
                    // 10,000-rule load).
                    tokio::time::sleep(REPLAN_PAUSE).await;
                }
                _ = self.replan.notified() => {}
            }
        }
    }

    /// Hands verdict changes to the engine (a burst in one call).
    pub async fn apply_loop(self: Arc<Health>) {
        loop {
            self.wake.notified().await;
            // Endpoints that fail together (a node died) go out together.
            tokio::time::sleep(Duration::from_millis(5)).await;
            let v = self.verdicts();
            self.publish_view();
            match self.engine.call(move |e| e.set_health(v)).await {
                Ok(0) => {}
                Ok(n) => info!(rules = n, "endpoint health applied to the datapath"),
                Err(e) => {
                    warn!(error = %e, "health: the engine is gone");
                    return;
                }
            }
        }
    }
}

/// Forced down (`POST /config/endpointhoststate` red): the host, on every port or this one.
pub fn is_forced(forced: &[Forced], t: &Target) -> bool {
    forced
        .iter()
        .any(|f| f.ip == t.ip && (f.port == 0 || f.port == t.port))
}

/// A target's state as `currState` and the cluster view name it: forced down, else its
/// probes' verdict.
pub fn target_state(forced: &[Forced], t: &Target, s: &Status) -> super::view::State {
    use super::view::State;
    if is_forced(forced, t) {
        State::Forced
    } else if s.tracker.up {
        State::Up
    } else {
        State::Down
    }
}

/// How this node's endpoint verdicts compare with each sync peer's (from its status).
pub fn record_peer_metrics(
    h: &Health,
    peers: &[(
        std::net::SocketAddr,
        Option<u32>,
        Option<super::view::PeerHealth>,
    )],
) {
    use crate::metrics::gauge;
    let ours = h.view();
    for (addr, _, p) in peers {
        let l = [("peer", addr.to_string())];
        // A peer out of reach: 0, not its last (stale) figures.
        gauge(
            "ferrolb_endpoint_view_disagreements",
            "Probe targets this node probes on which the peer decides otherwise (one keeps the endpoint in selection, the other takes it out); 0 while the peer's sync channel is down.",
            &l,
            p.as_ref()
                .map_or(0, |p| super::view::disagreements(&ours, p).len()) as f64,
        );
        gauge(
            "ferrolb_peer_endpoints_down",
            "Probe targets the peer holds down (failing or forced), as its sync status reports; 0 while its sync channel is down.",
            &l,
            p.as_ref().map_or(0.0, |p| f64::from(p.down_total)),
        );
    }
}

/// The prober's series.
pub fn record_metrics(h: &Health) {
    use crate::metrics::{counter, gauge};
    let c = &h.counters;
    counter(
        "ferrolb_probes_total",
        "Endpoint probes run.",
        &[],
        c.probes.load(Ordering::Relaxed),
    );
    for (f, n) in Failure::ALL.iter().zip(&c.failures) {
        counter(
            "ferrolb_probe_failures_total",
            "Endpoint probes that failed, by reason.",
            &[("reason", f.name().to_string())],
            n.load(Ordering::Relaxed),
        );
    }
    for (b, n) in START_DELAY_BUCKETS_MS.iter().zip(&c.start_delay) {
        let le = if *b == u64::MAX {
            "inf".to_string()
        } else {
            b.to_string()
        };
        counter(
            "ferrolb_probe_start_delay_total",
            "Probes that started within delay_le_ms milliseconds of their schedule (cumulative; the prober's jitter).",
            &[("delay_le_ms", le)],
            n.load(Ordering::Relaxed),
        );
    }
    counter(
        "ferrolb_probes_late_total",
        "Probes that started more than a tenth of their interval late (the prober is short of CPU or of its in-flight bound).",
        &[],
        c.late.load(Ordering::Relaxed),
    );
    gauge(
        "ferrolb_probe_targets_refused",
        "Targets the rules ask for beyond the prober's bound (not probed).",
        &[],
        c.refused_targets.load(Ordering::Relaxed) as f64,
    );
    gauge(
        "ferrolb_endpoints_forced_down",
        "Endpoints forced down over /config/endpointhoststate.",
        &[],
        h.forced().len() as f64,
    );
    for (t, s) in h.statuses() {
        let l = [
            ("target", t.to_string()),
            ("probe", t.kind.name().to_string()),
        ];
        gauge(
            "ferrolb_probe_up",
            "1 while the target passes its probes (after rise/fall), 0 while it fails them.",
            &l,
            f64::from(u8::from(s.tracker.up)),
        );
        counter(
            "ferrolb_probe_transitions_total",
            "Changes of a target between up and down.",
            &l,
            s.tracker.transitions,
        );
        if let Some(Ok(p)) = s.last {
            gauge(
                "ferrolb_probe_latency_seconds",
                "Round trip of the target's last successful probe.",
                &l,
                p.rtt.as_secs_f64(),
            );
        }
    }
}

/// Where in its interval a target fires: a hash of the target, so the phases spread evenly
/// and stay put across restarts of the task.
fn phase(t: &Target, interval: Duration) -> Duration {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    t.hash(&mut h);
    let ms = interval.as_millis().max(1) as u64;
    Duration::from_millis(h.finish() % ms)
}

async fn probe_loop(h: Arc<Health>, t: Target, timing: Timing) {
    let start = tokio::time::Instant::now() + phase(&t, timing.interval);
    let mut tick = tokio::time::interval_at(start, timing.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let due = tick.tick().await;
        let Ok(_permit) = h.sem.clone().acquire_owned().await else {
            return;
        };
        let delay = due.elapsed();
        count_start_delay(&h.counters, delay);
        if delay > timing.interval / 10 {
            h.counters.late.fetch_add(1, Ordering::Relaxed);
        }
        let r = probe::run(&t, timing.timeout).await;
        h.record(&t, r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ProbeKind;

    #[test]
    fn start_delays_are_counted_cumulatively() {
        let c = Counters::default();
        for ms in [0, 3, 30, 2000] {
            count_start_delay(&c, Duration::from_millis(ms));
        }
        let got: Vec<u64> = c
            .start_delay
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect();
        assert_eq!(got, vec![1, 2, 2, 2, 3, 3, 3, 3, 4]);
    }

    #[test]
    fn phases_spread_over_the_interval() {
        let interval = Duration::from_secs(1);
        let mut buckets = [0u32; 10];
        for i in 0..10_000u32 {
            let t = Target {
                ip: std::net::IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)),
                port: 80,
                kind: ProbeKind::Tcp,
                request: String::new(),
                response: String::new(),
                source: None,
            };
            let p = phase(&t, interval);
            assert!(p < interval);
            buckets[(p.as_millis() / 100) as usize] += 1;
        }
        // Every tenth of the interval gets 1,000 +- 15 %.
        assert!(
            buckets.iter().all(|b| (850..=1150).contains(b)),
            "{buckets:?}"
        );
    }
}
