//! The daemon: loads (or adopts) the datapath, restores the rules, attaches to interfaces,
//! and runs the controllers (engine, BFD, BGP, roles, HA) and their tasks under supervision
//! until SIGTERM or SIGINT. Exiting leaves the datapath pinned and forwarding.
//!
//! [`run`] is a short list of stages: datapath -> engine -> BFD -> BGP -> HA -> tasks ->
//! signals -> REST listeners.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use ferrolb_bpf::maps::EventKind;
use ferrolb_bpf::{
    Collector, Datapath, DatapathConfig, EventStream, default_pin_dir, monotonic_ns,
};
use tokio::io::unix::AsyncFd;
use tracing::{debug, error, info, warn};

use crate::api::{self, App, Shared};
use crate::bfd::Bfd;
use crate::bgp::Bgp;
use crate::config::Config;
use crate::ha::{Ha, HaConfig};
use crate::lb::{CensusPass, Engine, EngineHandle};
use crate::metrics::Metrics;
use crate::roles::{RoleBus, Roles};
use crate::store::Store;

/// How often the conntrack event ring buffer is drained when the datapath does not wake us.
pub const EVENT_POLL_MS: u64 = 20;
/// Collector passes run on source-NAT port pressure are at least this far apart.
const NAT_PRESSURE_MIN_GAP: Duration = Duration::from_secs(1);

/// The same in cluster mode: the poll bounds how old a flow can be before its peers have it.
pub const EVENT_POLL_MS_CLUSTER: u64 = 5;

/// Where pinned datapaths live by default.
pub const BPFFS_BASE: &str = "/sys/fs/bpf/ferrolb";

/// A supervised task that failed is started again after this.
const RESTART_AFTER: Duration = Duration::from_secs(1);

/// This namespace's interfaces: (name, index).
pub fn interfaces() -> Vec<(String, u32)> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns a heap array terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut p = list;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            out.push((
                std::ffi::CStr::from_ptr((*p).if_name)
                    .to_string_lossy()
                    .into_owned(),
                (*p).if_index,
            ));
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

fn pin_dir(cfg: &Config) -> Result<std::path::PathBuf> {
    match &cfg.flags.bpf_pin_dir {
        Some(d) => Ok(d.clone()),
        None => default_pin_dir(std::path::Path::new(BPFFS_BASE))
            .context("find this network namespace's pin directory"),
    }
}

/// `--remove-datapath`.
pub fn remove_datapath(cfg: &Config) -> Result<()> {
    let dir = pin_dir(cfg)?;
    let _ = ferrolb_bpf::ensure_bpffs(&dir);
    let mut dirs = vec![dir.clone()];
    if cfg.flags.bpf_pin_dir.is_none() {
        dirs.extend(ferrolb_bpf::other_layouts(&dir));
    }
    for d in dirs {
        let n = ferrolb_bpf::purge(&d).with_context(|| format!("remove {}", d.display()))?;
        println!("removed {n} pinned objects from {}", d.display());
    }
    Ok(())
}

/// Attaches to interfaces that appeared, or were re-created (new index), since the last call.
fn attach_new(dp: &mut Datapath, cfg: &Config, done: &mut BTreeMap<String, u32>) {
    for (iface, index) in interfaces() {
        if done.get(&iface) == Some(&index) || !cfg.wants(&iface) {
            continue;
        }
        match dp.attach(&iface) {
            Ok(()) => {
                info!(iface, index, "datapath attached (TC ingress)");
                crate::forwarding::ensure(&iface, !cfg.flags.no_forwarding_sysctl);
                done.insert(iface, index);
            }
            Err(e) => warn!(iface, error = %e, "cannot attach datapath"),
        }
    }
    mark_peer_redirects(dp, cfg, done);
}

/// Marks, for the datapath, the attached interfaces it may forward through with
/// `bpf_redirect_peer`: veths whose other end is in another namespace (none with
/// `--no-peer-redirect`). Each pass re-reads them, with their MACs: a veth whose other end
/// came back into this namespace is unmarked (the kernel would drop what the datapath sent
/// to its peer meanwhile), and the datapath ignores a mark whose MAC is not the interface's.
fn mark_peer_redirects(dp: &mut Datapath, cfg: &Config, done: &BTreeMap<String, u32>) {
    let remote = if cfg.flags.no_peer_redirect {
        Vec::new()
    } else {
        match crate::netlink::veths_with_remote_peer() {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "cannot list veth interfaces; forwarding with plain redirects");
                Vec::new()
            }
        }
    };
    let marked: Vec<(u32, [u8; 6])> = done
        .iter()
        .filter(|(_, index)| remote.contains(index))
        .filter_map(|(iface, index)| Some((*index, ferrolb_bpf::datapath::mac_of(iface)?)))
        .collect();
    if let Err(e) = dp.set_peer_redirects(&marked) {
        warn!(error = %e, "cannot mark the interfaces for peer redirects");
    }
}

/// What happens when a supervised task fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Log the cause, count it (`ferrolb_task_restarts_total`) and start it again.
    Restart,
    /// The agent cannot work without it: stop with an error (exit status 1) so that the
    /// service manager restarts the agent; the pinned datapath keeps forwarding meanwhile.
    Exit,
}

/// Runs the tasks of the agent: a task that panics or returns is reported with its cause and
/// restarted, or stops the agent (see [`OnFailure`]).
#[derive(Clone)]
pub struct Supervisor {
    metrics: Arc<Metrics>,
    fatal: tokio::sync::mpsc::UnboundedSender<String>,
}

impl Supervisor {
    pub fn new(
        metrics: Arc<Metrics>,
    ) -> (Supervisor, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let (fatal, rx) = tokio::sync::mpsc::unbounded_channel();
        (Supervisor { metrics, fatal }, rx)
    }

    /// Starts `make()`'s task and keeps it running.
    pub fn spawn<F, Fut>(&self, name: &'static str, on_failure: OnFailure, make: F)
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let cause = match tokio::spawn(make()).await {
                    Ok(()) => "it returned".to_string(),
                    Err(e) if e.is_panic() => {
                        let p = e.into_panic();
                        let msg = p
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| p.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "a panic".into());
                        format!("it panicked: {msg}")
                    }
                    Err(e) => e.to_string(),
                };
                match on_failure {
                    OnFailure::Restart => {
                        me.metrics.task_restarted(name);
                        error!(task = name, cause, "agent task failed; restarting it");
                        tokio::time::sleep(RESTART_AFTER).await;
                    }
                    OnFailure::Exit => {
                        error!(task = name, cause, "agent task failed; the agent stops");
                        let _ = me.fatal.send(format!("task {name} failed: {cause}"));
                        return;
                    }
                }
            }
        });
    }
}

/// The HA settings from the flags: one sync peer per `--cluster` address, watched by the
/// `--ka` BFD session to the same address (or by the only `--ka` session when there is one
/// peer and one session).
fn ha_config(cfg: &Config) -> HaConfig {
    let peers = cfg
        .cluster
        .iter()
        .map(|ip| {
            let bfd = cfg
                .keepalives
                .iter()
                .find(|k| k.remote == *ip)
                .or(if cfg.cluster.len() == 1 && cfg.keepalives.len() == 1 {
                    cfg.keepalives.first()
                } else {
                    None
                })
                .map(|k| k.remote);
            (std::net::SocketAddr::new(*ip, cfg.flags.sync_port), bfd)
        })
        .collect();
    HaConfig {
        node_id: cfg.flags.self_id.unwrap_or(0),
        ka: !cfg.keepalives.is_empty(),
        peers,
        join_timeout: Duration::from_millis(cfg.flags.ha_join_timeout_ms),
        silent_dead: Duration::from_secs(1),
        l2: !cfg.flags.bgp,
        node_snat: cfg.node_snat.clone(),
    }
}

/// The datapath, loaded or adopted, with the handles the tasks take before the engine owns it.
struct Loaded {
    engine: Engine,
    events: Option<EventStream>,
    ha: Option<Arc<Ha>>,
    collector: Collector,
    conntrack: ferrolb_bpf::CtReader,
}

/// Stage 1: the datapath (purging other layouts), the HA table, the saved rules.
fn load_datapath(cfg: &Config, bus: &RoleBus) -> Result<Loaded> {
    let dir = pin_dir(cfg)?;
    match ferrolb_bpf::ensure_bpffs(&dir) {
        Ok(mounted_here) => crate::pins::check(mounted_here, &dir),
        Err(e) => warn!(error = %e, "cannot mount bpffs"),
    }
    // A datapath of another layout (an upgrade) cannot be adopted, and its program would stay
    // attached beside ours: remove it.
    if cfg.flags.bpf_pin_dir.is_none() {
        for old in ferrolb_bpf::other_layouts(&dir) {
            match ferrolb_bpf::purge(&old) {
                Ok(n) => warn!(
                    dir = %old.display(),
                    pins = n,
                    "removed a datapath of another layout version; its flows are not adopted"
                ),
                Err(e) => {
                    warn!(dir = %old.display(), error = %e, "cannot remove a datapath of another layout version")
                }
            }
        }
    }
    let adopted = dir.join("conntrack").exists();
    let mut dp = Datapath::load(&DatapathConfig {
        pin_dir: Some(dir.clone()),
        max_services: cfg.flags.max_services,
        max_conntrack: cfg.flags.max_conntrack,
        max_halfopen: cfg.flags.max_halfopen,
        halfopen_inplace: cfg.flags.halfopen_inplace,
        node_id: cfg.flags.self_id.unwrap_or(0),
        fullnat_sources: cfg.node_snat.clone(),
        // Sync is the only reader of flow events; a standalone node does not make them.
        flow_events: !cfg.cluster.is_empty(),
        ..Default::default()
    })
    .with_context(|| format!("load the datapath (pinned at {})", dir.display()))?;
    info!(
        pin_dir = %dir.display(),
        adopted,
        services = dp.capacity().services,
        conntrack = dp.capacity().conntrack,
        halfopen = dp.capacity().halfopen,
        halfopen_inplace = dp.halfopen_inplace().0,
        "datapath loaded"
    );
    let events = dp.take_events();
    let ha = if cfg.cluster.is_empty() {
        None
    } else {
        let table = dp
            .sync_table()
            .context("open the conntrack sync's map handles")?;
        Some(Arc::new(Ha::new(ha_config(cfg), table, bus.clone())))
    };
    let collector = dp
        .collector()
        .context("open the conntrack collector's map handles")?;
    let conntrack = dp
        .ct_reader()
        .context("open the conntrack listing's map handles")?;
    let flusher = crate::lb::spawn_flusher(
        dp.collector()
            .context("open the conntrack flusher's map handles")?,
    )
    .context("start the conntrack flusher's thread")?;
    match dp.fib_invalidator() {
        Ok(inv) => {
            if let Err(e) = crate::fib::spawn_watcher(inv) {
                warn!(error = %e, "cannot watch route, rule, neighbour and link changes; cached FIB answers expire after 50 ms only");
            }
        }
        Err(e) => {
            warn!(error = %e, "cannot open the FIB generation; cached FIB answers expire after 50 ms only")
        }
    }
    let store = Store::new(&cfg.flags.config_path);
    let mut engine = Engine::start(dp, store, adopted).context("restore saved rules")?;
    engine.set_flusher(flusher);
    Ok(Loaded {
        engine,
        events,
        ha,
        collector,
        conntrack,
    })
}

/// Nice value of the sync runtime's threads: ahead of the REST workers and of bulk work
/// (nice 10), behind BFD (real-time).
const SYNC_NICE: i32 = -10;

/// The SCHED_FIFO priority the sync worker got (0: normal scheduling), for `/metrics`.
pub static SYNC_RT_PRIORITY: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// The runtime conntrack sync runs on: one worker and its blocking pool, at [`SYNC_NICE`].
/// Built once and kept for the life of the process (a runtime may not be dropped from inside
/// another).
/// Threads of the sync runtime's blocking pool (installs, removals, snapshot walks).
const SYNC_BLOCKING_THREADS: usize = 4;

fn sync_runtime() -> Result<&'static tokio::runtime::Runtime> {
    static RT: std::sync::OnceLock<Result<tokio::runtime::Runtime, String>> =
        std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(SYNC_BLOCKING_THREADS)
            .thread_name("ferrolb-sync")
            .on_thread_start(|| {
                if let Err(e) = crate::lb::set_thread_nice(SYNC_NICE) {
                    tracing::warn!(nice = SYNC_NICE, error = %e, "sync thread left at normal priority");
                }
            })
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| anyhow::anyhow!("build conntrack sync's runtime: {e}"))
}

/// Starts conntrack sync and the HA tasks: role evaluation (on every event and every 50 ms),
/// BFD state feeding peer liveness, and in L2 mode the ARP follower.
async fn start_ha(app: &Shared, ha: &Arc<Ha>, cfg: &Config, sup: &Supervisor) -> Result<()> {
    let mut sc = ferrolb_consync::Config::new(
        u32::from(ha.cfg.node_id),
        std::net::SocketAddr::new(
            std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            cfg.flags.sync_port,
        ),
        ha.cfg.peers.iter().map(|p| p.0).collect(),
    );
    // A snapshot walk holds a blocking thread until its subscriber has taken the last chunk:
    // half the pool at most, so that peers' flows are still installed meanwhile.
    sc.max_snapshot_walks = SYNC_BLOCKING_THREADS / 2;
    // Peers accept sync connections only from the addresses in their --cluster list: connect
    // from the address --ka says is ours toward them.
    sc.source = cfg
        .keepalives
        .iter()
        .find(|k| cfg.cluster.contains(&k.remote))
        .or(cfg.keepalives.first())
        .map(|k| k.source);
    if let Some(f) = &cfg.flags.sync_token_file {
        let t = std::fs::read_to_string(f)
            .with_context(|| format!("--sync-token-file: read {}", f.display()))?;
        let t = t.trim().to_string();
        if t.is_empty() {
            anyhow::bail!("--sync-token-file: {} is empty", f.display());
        }
        sc.token = Some(t);
    }
    if let (Some(cert), Some(key), Some(ca)) = (
        &cfg.flags.sync_tls_cert,
        &cfg.flags.sync_tls_key,
        &cfg.flags.sync_tls_ca,
    ) {
        sc.tls = Some(ferrolb_consync::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
        });
    }
    let node: Arc<dyn ferrolb_consync::Node> = ha.clone();
    // Sync runs on a runtime of its own, above normal priority: REST, scrapes and listings on
    // the main workers (and load generators beside the agent) then do not delay a batch.
    let rt = sync_runtime()?;
    let prio = cfg.flags.sync_rt_priority;
    if prio > 0 {
        // A task runs on the runtime's one worker thread (never on its blocking threads).
        let r = rt
            .spawn(async move { crate::lb::set_thread_realtime(prio) })
            .await
            .context("conntrack sync's runtime stopped")?;
        match r {
            Ok(()) => {
                SYNC_RT_PRIORITY.store(prio, std::sync::atomic::Ordering::Relaxed);
                info!(priority = prio, "conntrack sync worker runs SCHED_FIFO")
            }
            Err(e) => warn!(priority = prio, error = %e,
                "conntrack sync worker left at nice {SYNC_NICE}: real-time scheduling refused"),
        }
    }
    let cs = rt
        .spawn(ferrolb_consync::Consync::start(sc, node))
        .await
        .context("conntrack sync's runtime stopped")?
        .context("start conntrack sync (--cluster)")?;
    let _ = ha.consync.set(cs);
    info!(
        node = ha.cfg.node_id,
        ka = ha.cfg.ka,
        peers = ?ha.cfg.peers,
        "cluster mode"
    );
    if let Some(b) = &app.bfd {
        // Subscribe first, then read the current states: no transition falls in between.
        let b = b.clone();
        let events = b.handle.subscribe();
        for (peer, up) in b.states().await {
            ha.bfd_event(peer, up);
        }
        let h = ha.clone();
        let first = std::sync::Mutex::new(Some(events));
        sup.spawn("bfd-to-ha", OnFailure::Restart, move || {
            let b = b.clone();
            let h = h.clone();
            // A restart subscribes anew (and re-reads the states before following).
            let events = first
                .lock()
                .ok()
                .and_then(|mut f| f.take())
                .unwrap_or_else(|| b.handle.subscribe());
            async move {
                if h.cfg.peers.iter().any(|p| p.1.is_some()) {
                    for (peer, up) in b.states().await {
                        h.bfd_event(peer, up);
                    }
                }
                let list = || {
                    let b = b.clone();
                    async move { b.states().await }
                };
                crate::bfd::follow(events, list, |peer, up| h.bfd_event(peer, up)).await;
            }
        });
    }
    let h = ha.clone();
    sup.spawn("ha-evaluate", OnFailure::Restart, move || {
        let h = h.clone();
        async move {
            loop {
                tokio::select! {
                    _ = h.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
                let h2 = h.clone();
                if let Err(e) = tokio::task::spawn_blocking(move || h2.evaluate()).await {
                    // A panic in the role machine: the supervisor restarts the loop.
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        }
    });
    // L2 mode: a node starts as a standby (no ARP answers for VIPs) until it is MASTER, and
    // follows the role bus from there.
    // Floating one-arm sources (flag or REST, now or later) move the same way, with or
    // without BGP; with BGP the VIPs are routed, so their ARP handling changes nothing.
    {
        let app = app.clone();
        let h = ha.clone();
        sup.spawn("l2-follower", OnFailure::Restart, move || {
            let app = app.clone();
            let h = h.clone();
            async move {
                let mut rx = app.roles.bus().subscribe();
                let mut was_master = l2_follow_role(&app, &h, false).await;
                while rx.changed().await.is_ok() {
                    was_master = l2_follow_role(&app, &h, was_master).await;
                }
            }
        });
    }
    Ok(())
}

/// L2 mode: a BACKUP's datapath drops ARP requests for VIPs (the stack would answer them:
/// the VIPs are on `lo` on every node); a node that just became MASTER announces them with
/// gratuitous ARP on every attached interface, 5 times 100 ms apart. Returns whether this
/// node is MASTER now.
pub async fn l2_follow_role(app: &Shared, ha: &Arc<Ha>, was_master: bool) -> bool {
    let role = ha.role(crate::ha::DEFAULT_INSTANCE);
    let master = role == crate::ha::Role::Master;
    // NOT_DEFINED (no roles set) answers like a single node.
    let flags = if role == crate::ha::Role::Backup {
        ferrolb_bpf::maps::HA_L2_STANDBY
    } else {
        0
    };
    let Ok((ifaces, vips)) = app
        .engine
        .call(move |e| {
            if let Err(err) = e.datapath_mut().set_ha_flags(flags) {
                warn!(error = %err, "cannot set the datapath's L2 standby flag");
            }
            let attached = e.datapath().attached().to_vec();
            let ifaces: Vec<(String, u32)> = interfaces()
                .into_iter()
                .filter(|(n, _)| attached.contains(n))
                .collect();
            let mut vips: Vec<std::net::IpAddr> = e.rules().vips().into_iter().collect();
            vips.extend(e.onearm_sources());
            (ifaces, vips)
        })
        .await
    else {
        return master;
    };
    if master && !was_master {
        info!(
            vips = vips.len(),
            interfaces = ifaces.len(),
            "L2: MASTER; answering ARP / neighbour solicitations for the VIPs and announcing them"
        );
        tokio::spawn(async move {
            for _ in 0..5 {
                let (i, v) = (ifaces.clone(), vips.clone());
                let _ =
                    tokio::task::spawn_blocking(move || crate::ha::garp::announce(&i, &v)).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    } else if !master && was_master {
        info!("L2: not MASTER; ARP requests for the VIPs are left to the MASTER");
    }
    master
}

/// The conntrack collector (its own map handles: nothing waits while it walks the table),
/// also the interface watcher. Runs every `--gc-interval` and at once on source-NAT port
/// pressure (at most once a second).
async fn collector_loop(
    app: Shared,
    cfg: Arc<Config>,
    mut collector: Collector,
    nat_pressure: Arc<tokio::sync::Notify>,
    attached: Arc<std::sync::Mutex<BTreeMap<String, u32>>>,
) {
    let mut gc = tokio::time::interval(Duration::from_secs(cfg.flags.gc_interval));
    gc.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_pass = std::time::Instant::now();
    // The previous pass's clock: flows created (or reset) after it are new to this pass.
    let mut since_ns = monotonic_ns();
    loop {
        tokio::select! {
            _ = gc.tick() => {}
            _ = nat_pressure.notified() => {
                let since = last_pass.elapsed();
                if since < NAT_PRESSURE_MIN_GAP {
                    tokio::time::sleep(NAT_PRESSURE_MIN_GAP - since).await;
                }
                debug!("source-NAT port pressure: collecting now");
            }
        }
        last_pass = std::time::Instant::now();
        let app2 = app.clone();
        let cfg2 = cfg.clone();
        let attached2 = attached.clone();
        let res = tokio::task::spawn_blocking(move || {
            crate::lb::at_low_priority(|| {
                let now = monotonic_ns();
                let window = Duration::from_secs(2 * cfg2.flags.gc_interval);
                let new = |v: &ferrolb_bpf::maps::Ct| v.flags & ferrolb_bpf::maps::CTF_NEW != 0;
                let mut pass = CensusPass::default();
                // Entries listed in the half-open table, and removed from it.
                let (mut listed_new, mut removed_new) = (0usize, 0usize);
                // A chunk of the table at a time: memory bounded by the chunk, not the table.
                let stats = collector.pass(
                    now,
                    ferrolb_bpf::COLLECT_CHUNK,
                    |chunk| {
                        pass.add(chunk, now, since_ns);
                        listed_new += chunk.iter().filter(|(_, v)| new(v)).count();
                        if let Some(ha) = &app2.ha {
                            // Synced flows this node carries now become its own (a packet
                            // within two passes claims).
                            ha.ownership_pass(chunk, window);
                        }
                    },
                    |gone| {
                        removed_new += gone.iter().filter(|(_, v)| new(v)).count();
                        if let Some(ha) = &app2.ha {
                            ha.publish_events(&[], gone);
                        }
                    },
                );
                let removed = stats.removed;
                if removed > 0 {
                    debug!(
                        removed,
                        spilled = stats.spilled,
                        refunded = stats.refunded,
                        "conntrack collector pass"
                    );
                }
                pass.halfopen_inplace = stats.halfopen_inplace as u64;
                // Live entries of each table (the half-open ones carry CTF_NEW).
                // (Saturating: an entry's flag may change between the walk and its removal.)
                let halfopen = listed_new.saturating_sub(removed_new);
                let live = stats.listed.saturating_sub(removed + halfopen) as u64;
                let halfopen = halfopen as u64;
                let _ = app2.engine.call_blocking(move |e| {
                    e.set_census(pass, live, halfopen, removed as u64);
                    if let Ok(mut done) = attached2.lock() {
                        attach_new(e.datapath_mut(), &cfg2, &mut done);
                    }
                });
                (collector, now)
            })
        })
        .await;
        match res {
            Ok((c, now)) => {
                collector = c;
                since_ns = now;
            }
            // The supervisor reports it and starts a new collector.
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

/// Conntrack events from the ring buffer: published to the peers in ring order; port
/// pressure wakes the collector.
async fn event_loop(app: Shared, ev: EventStream, nat_pressure: Arc<tokio::sync::Notify>) {
    // SAFETY: the ring buffer owns its map fd for its whole life, and the EventStream
    // (moved into the AsyncFd) always returns that same fd.
    let reg = unsafe { AsyncFd::register_with_interest(ev, tokio::io::Interest::READABLE) };
    let mut afd = match reg {
        Ok(a) => a,
        Err(e) => {
            error!(error = %e, "cannot poll the conntrack event ring buffer");
            return;
        }
    };
    // The datapath wakes us only when the ring fills up; otherwise drain on a timer.
    let poll = if app.ha.is_some() {
        EVENT_POLL_MS_CLUSTER
    } else {
        EVENT_POLL_MS
    };
    let mut tick = tokio::time::interval(Duration::from_millis(poll));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let lost_now = |app: &Shared| {
        let engine = app.engine.clone();
        async move {
            engine
                .call(|e| e.datapath().counter(ferrolb_bpf::maps::Counter::EventsLost))
                .await
                .ok()
        }
    };
    let mut lost = lost_now(&app).await.unwrap_or(0);
    let mut lost_checked = std::time::Instant::now();
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            r = afd.readable_mut() => {
                let Ok(mut guard) = r else { return };
                guard.clear_ready();
            }
            _ = tick.tick() => {}
        }
        while let Some(e) = afd.get_mut().try_next() {
            let Some(k) = e.kind() else { continue };
            app.metrics.event(k);
            match k {
                EventKind::NatPressure => nat_pressure.notify_one(),
                EventKind::Removed => {
                    // In order: a removal followed by a new flow on the same key must reach
                    // the peers in that order.
                    if let Some(ha) = &app.ha {
                        ha.publish_events(&batch, &[]);
                        batch.clear();
                        ha.publish_events(&[], &[(e.key, e.val)]);
                    }
                }
                EventKind::Created | EventKind::Established | EventKind::Closed => {
                    if app.ha.is_some() {
                        batch.push((e.key, e.val));
                    }
                }
            }
        }
        if let Some(ha) = &app.ha {
            // Events lost in the ring buffer: the peers cannot trust their copy (checked
            // every 100 ms: one per-CPU counter, on the engine's thread).
            if lost_checked.elapsed() >= Duration::from_millis(100) {
                lost_checked = std::time::Instant::now();
                if let Some(l) = lost_now(&app).await
                    && l != lost
                {
                    lost = l;
                    ha.events_lost();
                }
            }
            if !batch.is_empty() {
                ha.publish_events(&batch, &[]);
                batch.clear();
            }
        }
    }
}

/// SIGTERM or SIGINT: a MASTER hands its role over (once the peer holds all its state), BGP
/// drains, then every listener stops (and the agent; the datapath stays).
async fn stop_on_signal(app: Shared, drain_grace: u64, stop: tokio::sync::watch::Sender<bool>) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
    if let Some(ha) = &app.ha
        && ha.cfg.ka
        && ha.role(crate::ha::DEFAULT_INSTANCE) == crate::ha::Role::Master
        && ha.switchover_target().is_some()
    {
        match crate::ha::control::switchover(ha).await {
            Ok((node, term)) => {
                info!(node, term, "stopping: MASTER handed over");
                if let (Some(b), Some(_)) = (&app.bgp, &app.ha) {
                    b.sync_routes(&app.engine, &app.roles).await;
                }
                if ha.cfg.l2 {
                    l2_follow_role(&app, ha, true).await;
                }
            }
            Err(e) => {
                warn!(error = %e, "stopping: switchover failed; the peer takes over when it detects us gone")
            }
        }
    }
    if let Some(b) = &app.bgp {
        info!(grace_s = drain_grace, "draining BGP before stopping");
        b.speaker
            .drain(Duration::from_secs(drain_grace), crate::bgp::BACKUP_PREPEND)
            .await;
    }
    info!("stopping; the datapath stays pinned and keeps forwarding");
    let _ = stop.send(true);
}

/// Serves the API on one listener until `stop` resolves.
fn spawn_server<L>(
    set: &mut tokio::task::JoinSet<Result<()>>,
    listener: L,
    app: &Arc<App>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
    what: &'static str,
) where
    L: axum::serve::Listener<Addr = std::net::SocketAddr>,
{
    let router = api::router(app.clone());
    set.spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(stop)
            .await
            .with_context(|| format!("serve the REST API over {what}"))
    });
}

pub async fn run(cfg: Config) -> Result<()> {
    let cfg = Arc::new(cfg);
    let metrics = Arc::new(Metrics::new(cfg.flags.loxilb_metrics));
    let bus = RoleBus::default();
    // Stages: datapath and saved rules; the engine on its thread; BFD; BGP; roles; HA.
    let Loaded {
        mut engine,
        events,
        ha,
        collector,
        conntrack,
    } = load_datapath(&cfg, &bus)?;
    let attached = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
    if let Ok(mut done) = attached.lock() {
        attach_new(engine.datapath_mut(), &cfg, &mut done);
    }
    let saved_sources = crate::api::onearm::load(&cfg.flags.config_path)?;
    engine.set_onearm_sources(
        cfg.onearm_sources.clone(),
        saved_sources,
        !cfg.cluster.is_empty(),
    );
    for a in &cfg.node_snat {
        engine.install_node_address(*a);
    }
    let engine = EngineHandle::spawn(engine).context("start the rule engine's thread")?;
    let bfd = Bfd::start(&cfg).await?.map(Arc::new);
    let bgp = if cfg.flags.bgp {
        let defaults = crate::bgp::BfdDefaults {
            interval_us: cfg.flags.bgp_bfd_interval_ms.saturating_mul(1000),
            multiplier: cfg.flags.bgp_bfd_multiplier,
        };
        Some(Bgp::start(&cfg.flags.config_path, bfd.clone(), defaults).await?)
    } else {
        None
    };
    let roles = Arc::new(Roles::load(&cfg.flags.config_path, ha.clone(), bus)?);
    let app = Arc::new(App {
        engine: engine.clone(),
        metrics: metrics.clone(),
        bfd,
        bgp: bgp.clone(),
        ha: ha.clone(),
        roles: roles.clone(),
        conntrack: Arc::new(conntrack),
        health: crate::health::controller::Health::load(engine.clone(), &cfg.flags.config_path)?,
        config_dir: cfg.flags.config_path.clone(),
    });
    if let Some(h) = &ha {
        h.set_health_view(app.health.shared_view());
    }
    let (sup, mut fatal) = Supervisor::new(metrics);
    {
        // Endpoint probes: a task per target, and verdicts to the engine.
        let h = app.health.clone();
        sup.spawn("health-probes", OnFailure::Restart, move || {
            h.clone().plan_loop()
        });
        let h = app.health.clone();
        sup.spawn("health-verdicts", OnFailure::Restart, move || {
            h.clone().apply_loop()
        });
    }
    if let Some(ha) = &ha {
        start_ha(&app, ha, &cfg, &sup).await?;
    }
    {
        // Roles saved over REST (no --ka); adopting flows as MASTER walks the table.
        let r = roles.clone();
        tokio::task::spawn_blocking(move || r.restore())
            .await
            .context("restore saved roles")?;
    }
    if let Some(b) = &bgp {
        let (b1, e1, r1) = (b.clone(), engine.clone(), roles.clone());
        sup.spawn("bgp-routes", OnFailure::Restart, move || {
            b1.clone().follow(e1.clone(), r1.clone())
        });
        let b2 = b.clone();
        sup.spawn("bgp-bfd", OnFailure::Restart, move || {
            b2.clone().follow_bfd()
        });
    }
    // The datapath reports source-NAT port pressure (a hard or failed allocation): expired
    // flows may hold the ports, so the collector runs at once (at most once a second).
    let nat_pressure = Arc::new(tokio::sync::Notify::new());
    {
        let (app, cfg, np, att) = (app.clone(), cfg.clone(), nat_pressure.clone(), attached);
        let first = std::sync::Mutex::new(Some(collector));
        sup.spawn("collector", OnFailure::Restart, move || {
            let (app, cfg, np, att) = (app.clone(), cfg.clone(), np.clone(), att.clone());
            let given = first.lock().ok().and_then(|mut f| f.take());
            async move {
                // After a failure: new handles from the datapath.
                let c = match given {
                    Some(c) => c,
                    None => match app.engine.call(|e| e.datapath().collector()).await {
                        Ok(Ok(c)) => c,
                        Ok(Err(e)) => panic!("no collector handles: {e}"),
                        Err(e) => panic!("{e}"),
                    },
                };
                collector_loop(app, cfg, c, np, att).await
            }
        });
    }
    if let Some(ev) = events {
        // The ring buffer can be taken once: without its reader the peers would silently
        // stop getting flows, so a failure stops the agent (a supervisor restarts it).
        let (app, np) = (app.clone(), nat_pressure.clone());
        let ev = std::sync::Mutex::new(Some(ev));
        sup.spawn("conntrack-events", OnFailure::Exit, move || {
            let (app, np) = (app.clone(), np.clone());
            let ev = ev.lock().ok().and_then(|mut e| e.take());
            async move {
                if let Some(ev) = ev {
                    event_loop(app, ev, np).await;
                }
            }
        });
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(stop_on_signal(
        app.clone(),
        cfg.flags.bgp_drain_seconds,
        stop_tx,
    ));
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut servers = tokio::task::JoinSet::new();
    // One set of connection limits for both listeners.
    let gate = crate::listen::ConnGate::new(
        crate::listen::ConnLimits {
            max: cfg.flags.api_max_connections,
            per_source: cfg.flags.api_max_connections_per_source,
            idle: std::time::Duration::from_secs(cfg.flags.api_idle_timeout),
        },
        app.metrics.api_conns.clone(),
    );
    if cfg.flags.tls {
        let (Some(cert), Some(key)) = (&cfg.flags.tls_certificate, &cfg.flags.tls_key) else {
            anyhow::bail!("--tls needs --tls-certificate and --tls-key");
        };
        let tls = crate::tls::server_config(cert, key)?;
        let addr = std::net::SocketAddr::new(cfg.flags.tls_host, cfg.flags.tls_port);
        let listener = crate::tls::TlsListener::bind(addr, tls, gate.clone()).await?;
        info!(%addr, "REST API listening over HTTPS");
        spawn_server(
            &mut servers,
            listener,
            &app,
            stopped(stop_rx.clone()),
            "HTTPS",
        );
    }
    if !cfg.flags.no_api {
        let addr = std::net::SocketAddr::new(cfg.flags.host, cfg.flags.port);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listen on {addr} (--host/--port)"))?;
        let listener = crate::listen::GatedTcp::new(listener, gate.clone());
        info!(%addr, "REST API listening (base /netlox/v1)");
        spawn_server(
            &mut servers,
            listener,
            &app,
            stopped(stop_rx.clone()),
            "HTTP",
        );
    }
    loop {
        tokio::select! {
            Some(why) = fatal.recv() => anyhow::bail!("{why}"),
            r = servers.join_next(), if !servers.is_empty() => match r {
                Some(r) => r.context("API server task")??,
                None => return Ok(()),
            },
            _ = stopped(stop_rx.clone()), if servers.is_empty() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::Mutex;
    use std::time::SystemTime;

    use ferrolb_bfd::{Diag, Event, State};

    use super::*;

    fn ev(peer: IpAddr, from: State, to: State) -> Event {
        Event {
            peer,
            instance: String::new(),
            from,
            to,
            diag: Diag::None,
            at: SystemTime::now(),
            silence: None,
        }
    }

    /// Peer A goes Down, then peer B flaps until the two-slot channel has dropped A's event:
    /// the follower must still end with A down (from the re-read), and B as it really is.
    #[tokio::test]
    async fn a_lagged_bfd_stream_resyncs_instead_of_losing_a_down() {
        let a = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let b = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
        let (tx, rx) = tokio::sync::broadcast::channel(2);
        tx.send(ev(a, State::Up, State::Down)).unwrap();
        tx.send(ev(b, State::Down, State::Up)).unwrap();
        tx.send(ev(b, State::Up, State::Down)).unwrap();
        tx.send(ev(b, State::Down, State::Up)).unwrap();
        drop(tx);
        let seen = Mutex::new(BTreeMap::new());
        let lists = Mutex::new(0);
        crate::bfd::follow(
            rx,
            || {
                *lists.lock().unwrap() += 1;
                async move { vec![(a, false), (b, true)] }
            },
            |peer, up| {
                seen.lock().unwrap().insert(peer, up);
            },
        )
        .await;
        assert_eq!(*lists.lock().unwrap(), 1, "one re-read for the lag");
        assert_eq!(
            seen.into_inner().unwrap(),
            BTreeMap::from([(a, false), (b, true)])
        );
    }

    /// A task that panics is reported, counted and started again; one marked Exit stops the
    /// agent with its cause.
    #[tokio::test]
    async fn failed_tasks_are_restarted_or_stop_the_agent() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let metrics = Arc::new(Metrics::default());
        let (sup, mut fatal) = Supervisor::new(metrics.clone());
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
        sup.spawn("flaky", OnFailure::Restart, move || {
            let r = r.clone();
            let done = done_tx.clone();
            async move {
                if r.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("collector map gone");
                }
                let _ = done.send(());
                std::future::pending::<()>().await;
            }
        });
        tokio::time::timeout(Duration::from_secs(5), done_rx.recv())
            .await
            .expect("restarted within 5 s");
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert_eq!(metrics.task_restarts(), vec![("flaky", 1)]);
        sup.spawn("events", OnFailure::Exit, || async {
            panic!("ring buffer gone")
        });
        let why = tokio::time::timeout(Duration::from_secs(5), fatal.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(
            why.contains("events") && why.contains("ring buffer gone"),
            "{why}"
        );
    }
}
