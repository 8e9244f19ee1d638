//! The daemon: loads (or adopts) the datapath, restores the rules, attaches to interfaces,
//! and runs the REST API, the conntrack collector, the interface watcher and the event reader
//! until SIGTERM or SIGINT. Exiting leaves the datapath pinned and forwarding.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use ferrolb_bpf::maps::EventKind;
use ferrolb_bpf::{Datapath, DatapathConfig, default_pin_dir, monotonic_ns};
use tokio::io::unix::AsyncFd;
use tracing::{debug, info, warn};

use crate::api::bfd::BfdService;
use crate::api::bgp::BgpService;
use crate::api::{self, App, Shared};
use crate::config::Config;
use crate::ha::{Ha, HaConfig};
use crate::lb::{Engine, census};
use crate::metrics::Metrics;
use crate::store::Store;

/// How often the conntrack event ring buffer is drained when the datapath does not wake us.
pub const EVENT_POLL_MS: u64 = 20;
/// Collector passes run on source-NAT port pressure are at least this far apart.
const NAT_PRESSURE_MIN_GAP: Duration = Duration::from_secs(1);

/// The same in cluster mode: the poll bounds how old a flow can be before its peers have it.
pub const EVENT_POLL_MS_CLUSTER: u64 = 5;

/// Where pinned datapaths live by default.
pub const BPFFS_BASE: &str = "/sys/fs/bpf/ferrolb";

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
                done.insert(iface, index);
            }
            Err(e) => warn!(iface, error = %e, "cannot attach datapath"),
        }
    }
}

/// Starts BFD: sessions saved over REST, then those of `--ka` (which win for the same peer).
/// Without `--ka`, a BFD that cannot bind UDP 3784 is a warning, not a failure.
async fn start_bfd(cfg: &Config) -> Result<Option<BfdService>> {
    let handle =
        match ferrolb_bfd::spawn(ferrolb_bfd::socket::CONTROL_PORT, cfg.flags.bfd_rt_priority) {
            Ok(h) => h,
            Err(e) if cfg.keepalives.is_empty() => {
                warn!(error = %e, "BFD not started; /config/bfd answers 503");
                return Ok(None);
            }
            Err(e) => return Err(e).context("start BFD for --ka"),
        };
    let specs = BfdService::load(&cfg.flags.config_path)?;
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
        let pc = ferrolb_bfd::PeerConfig {
            peer: ka.remote,
            local: ka.source,
            instance: "default".into(),
            session: ferrolb_bfd::SessionConfig {
                desired_min_tx_us: ka.interval_us,
                required_min_rx_us: ka.interval_us,
                detect_mult: 3,
                auth: None,
            },
        };
        handle
            .upsert(pc)
            .await
            .with_context(|| format!("--ka: BFD session to {}", ka.remote))?;
        info!(peer = %ka.remote, source = %ka.source, interval_us = ka.interval_us, "BFD keepalive (--ka)");
    }
    Ok(Some(BfdService {
        handle,
        dir: cfg.flags.config_path.clone(),
        specs: tokio::sync::Mutex::new(specs),
        keepalive_peers: cfg.keepalives.iter().map(|k| k.remote).collect(),
    }))
}

/// Feeds BFD transitions to `apply(peer, up)` until the stream ends. When the receiver lagged
/// (the broadcast dropped its oldest events), the dropped ones may include some peer's Down:
/// HA latches on BFD, so instead of skipping ahead it re-reads every session's current state.
async fn follow_bfd<L, Fut>(
    mut events: tokio::sync::broadcast::Receiver<ferrolb_bfd::Event>,
    list: L,
    apply: impl Fn(std::net::IpAddr, bool),
) where
    L: Fn() -> Fut,
    Fut: std::future::Future<Output = Vec<(std::net::IpAddr, bool)>>,
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
    }
}

/// Starts conntrack sync and the HA tasks: role evaluation (on every event and every 50 ms),
/// BGP following role changes, BFD state feeding peer liveness.
async fn start_ha(app: &Shared, ha: &Arc<Ha>, cfg: &Config) -> Result<()> {
    let mut sc = ferrolb_consync::Config::new(
        u32::from(ha.cfg.node_id),
        std::net::SocketAddr::new(
            std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            cfg.flags.sync_port,
        ),
        ha.cfg.peers.iter().map(|p| p.0).collect(),
    );
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
    let cs = ferrolb_consync::Consync::start(sc, node)
        .await
        .context("start conntrack sync (--cluster)")?;
    let _ = ha.consync.set(cs);
    // Roles saved over REST (no --ka) are restored.
    if !ha.cfg.ka
        && let Some(b) = &app.bgp
    {
        for (i, r) in b.state.lock().await.roles.iter() {
            if let Some(role) = crate::ha::Role::parse(r) {
                ha.set_external(i, role);
            }
        }
    }
    info!(
        node = ha.cfg.node_id,
        ka = ha.cfg.ka,
        peers = ?ha.cfg.peers,
        "cluster mode"
    );
    if let Some(b) = &app.bfd {
        // Subscribe first, then read the current states: no transition falls in between.
        let events = b.handle.subscribe();
        let handle = b.handle.clone();
        let list = move || {
            let handle = handle.clone();
            async move {
                handle
                    .list()
                    .await
                    .map(|l| {
                        l.into_iter()
                            .map(|s| (s.peer, s.status.state == ferrolb_bfd::State::Up))
                            .collect()
                    })
                    .unwrap_or_default()
            }
        };
        for (peer, up) in list().await {
            ha.bfd_event(peer, up);
        }
        let h = ha.clone();
        tokio::spawn(follow_bfd(events, list, move |peer, up| {
            h.bfd_event(peer, up)
        }));
    }
    {
        let h = ha.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = h.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
                let h2 = h.clone();
                if tokio::task::spawn_blocking(move || h2.evaluate())
                    .await
                    .is_err()
                {
                    warn!("HA evaluation failed");
                }
            }
        });
    }
    // L2 mode: a node starts as a standby (no ARP answers for VIPs) until it is MASTER.
    if ha.cfg.l2 {
        l2_follow_role(app, ha, false);
    }
    {
        let h = ha.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let mut was_master = false;
            loop {
                h.changed.notified().await;
                api::bgp::sync_now(&app).await;
                if h.cfg.l2 {
                    was_master = l2_follow_role(&app, &h, was_master);
                }
            }
        });
    }
    Ok(())
}

/// L2 mode: a BACKUP's datapath drops ARP requests for VIPs (the stack would answer them:
/// the VIPs are on `lo` on every node); a node that just became
/// MASTER announces them with gratuitous ARP on every attached interface, 5 times 100 ms
/// apart. Returns whether this node is MASTER now.
pub fn l2_follow_role(app: &Shared, ha: &Arc<Ha>, was_master: bool) -> bool {
    let role = ha.role(crate::ha::DEFAULT_INSTANCE);
    let master = role == crate::ha::Role::Master;
    // NOT_DEFINED (no roles set) answers like a single node.
    let flags = if role == crate::ha::Role::Backup {
        ferrolb_bpf::maps::HA_L2_STANDBY
    } else {
        0
    };
    let (ifaces, vips) = match app.engine.lock() {
        Ok(mut e) => {
            if let Err(e) = e.datapath_mut().set_ha_flags(flags) {
                warn!(error = %e, "cannot set the datapath's L2 standby flag");
            }
            let attached = e.datapath().attached().to_vec();
            let ifaces: Vec<(String, u32)> = interfaces()
                .into_iter()
                .filter(|(n, _)| attached.contains(n))
                .collect();
            let vips: Vec<std::net::IpAddr> = e.rules().vips().into_iter().collect();
            (ifaces, vips)
        }
        Err(_) => return master,
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
    let dir = pin_dir(&cfg)?;
    // A datapath of another layout (an upgrade) cannot be adopted, and its program would stay
    // attached beside ours: remove it.
    if cfg.flags.bpf_pin_dir.is_none() {
        let _ = ferrolb_bpf::ensure_bpffs(&dir);
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
    let dp = Datapath::load(&DatapathConfig {
        pin_dir: Some(dir.clone()),
        max_services: cfg.flags.max_services,
        max_conntrack: cfg.flags.max_conntrack,
        node_id: cfg.flags.self_id.unwrap_or(0),
        ..Default::default()
    })
    .with_context(|| format!("load the datapath (pinned at {})", dir.display()))?;
    info!(
        pin_dir = %dir.display(),
        adopted,
        services = dp.capacity().services,
        conntrack = dp.capacity().conntrack,
        "datapath loaded"
    );
    let mut dp = dp;
    let events = dp.take_events();
    let ha = if cfg.cluster.is_empty() {
        None
    } else {
        let table = dp
            .sync_table()
            .context("open the conntrack sync's map handles")?;
        Some(Arc::new(Ha::new(ha_config(&cfg), table)))
    };
    let store = Store::new(&cfg.flags.config_path);
    let mut engine = Engine::start(dp, store, adopted).context("restore saved rules")?;
    let mut attached = BTreeMap::new();
    attach_new(engine.datapath_mut(), &cfg, &mut attached);
    let bfd = start_bfd(&cfg).await?;
    let bgp = if cfg.flags.bgp {
        let state = BgpService::load(&cfg.flags.config_path)?;
        let svc = BgpService {
            speaker: ferrolb_bgp::Speaker::new(),
            dir: cfg.flags.config_path.clone(),
            state: tokio::sync::Mutex::new(state),
            dirty: tokio::sync::Notify::new(),
        };
        svc.apply(&*svc.state.lock().await);
        // Passive neighbours connect to us; active ones may too (collisions are resolved).
        if let Err(e) = svc.speaker.listen(179).await {
            warn!(error = %e, "cannot listen on TCP 179: passive BGP neighbours will not come up");
        }
        info!("BGP speaker enabled");
        Some(svc)
    } else {
        None
    };
    let app = Arc::new(App {
        engine: Mutex::new(engine),
        metrics: Metrics::default(),
        bfd,
        bgp,
        ha: ha.clone(),
    });
    if let Some(ha) = &ha {
        start_ha(&app, ha, &cfg).await?;
    }
    if let Some(b) = &app.bgp {
        api::bgp::sync_now(&app).await;
        tokio::spawn(api::bgp::sync_task(app.clone()));
        let bfd_neighbors: Vec<std::net::IpAddr> = b
            .state
            .lock()
            .await
            .neighbors
            .values()
            .filter(|n| n.bfd)
            .map(|n| n.address)
            .collect();
        for n in bfd_neighbors {
            api::bgp::bfd_for_neighbor(&app, n).await;
        }
    }
    // BFD Down on a BGP neighbour with `bfd: true` tears its session down at once.
    if let (Some(b), Some(_)) = (&app.bfd, &app.bgp) {
        let mut events = b.handle.subscribe();
        let app = app.clone();
        tokio::spawn(async move {
            loop {
                let ev = match events.recv().await {
                    Ok(e) => e,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                };
                if ev.to != ferrolb_bfd::State::Down || ev.from != ferrolb_bfd::State::Up {
                    continue;
                }
                let peer = ev.peer;
                let Some(svc) = &app.bgp else { return };
                let bfd_on = svc
                    .state
                    .lock()
                    .await
                    .neighbors
                    .get(&peer)
                    .is_some_and(|n| n.bfd);
                if bfd_on {
                    svc.speaker.reset_neighbor(peer, "BFD session down");
                }
            }
        });
    }
    let cfg = Arc::new(cfg);

    // Conntrack collector (own map handles: the API is not held up while it walks the
    // table) and interface watcher.
    let mut collector = app
        .engine
        .lock()
        .map_err(|_| anyhow::anyhow!("engine lock poisoned"))?
        .datapath()
        .collector()
        .context("open the conntrack collector's map handles")?;
    // The datapath reports source-NAT port pressure (a hard or failed allocation): expired
    // flows may hold the ports, so the collector runs at once (at most once a second).
    let nat_pressure = Arc::new(tokio::sync::Notify::new());
    {
        let app = app.clone();
        let cfg = cfg.clone();
        let nat_pressure = nat_pressure.clone();
        tokio::spawn(async move {
            let mut gc = tokio::time::interval(Duration::from_secs(cfg.flags.gc_interval));
            gc.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_pass = std::time::Instant::now();
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
                let app = app.clone();
                let cfg = cfg.clone();
                let mut attached_now = std::mem::take(&mut attached);
                let res = tokio::task::spawn_blocking(move || {
                    let now = monotonic_ns();
                    let entries = collector.entries();
                    let pass = census(&entries, now);
                    let removed_entries = collector.collect_from(&entries, now);
                    if let Some(ha) = &app.ha {
                        ha.publish_events(&[], &removed_entries);
                    }
                    let removed = removed_entries.len();
                    if removed > 0 {
                        debug!(removed, "conntrack collector pass");
                    }
                    if let Ok(mut e) = app.engine.lock() {
                        e.set_census(pass, (entries.len() - removed) as u64, removed as u64);
                        attach_new(e.datapath_mut(), &cfg, &mut attached_now);
                    }
                    (collector, attached_now)
                })
                .await;
                match res {
                    Ok((c, a)) => {
                        collector = c;
                        attached = a;
                    }
                    Err(e) => {
                        warn!(error = %e, "collector task failed; collection stops");
                        return;
                    }
                }
            }
        });
    }

    // Conntrack events from the ring buffer.
    if let Some(ev) = events {
        let app = app.clone();
        let nat_pressure = nat_pressure.clone();
        tokio::spawn(async move {
            // SAFETY: the ring buffer owns its map fd for its whole life, and the EventStream
            // (moved into the AsyncFd) always returns that same fd.
            let reg = unsafe { AsyncFd::register_with_interest(ev, tokio::io::Interest::READABLE) };
            let mut afd = match reg {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "cannot poll the conntrack event ring buffer");
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
                app.engine
                    .lock()
                    .ok()
                    .map(|e| e.datapath().counter(ferrolb_bpf::maps::Counter::EventsLost))
            };
            let mut lost = lost_now(&app).unwrap_or(0);
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
                            // In order: a removal followed by a new flow on the same key
                            // must reach the peers in that order.
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
                    // Events lost in the ring buffer: the peers cannot trust their copy
                    // (checked every 100 ms: one per-CPU counter, under the engine lock).
                    if lost_checked.elapsed() >= Duration::from_millis(100) {
                        lost_checked = std::time::Instant::now();
                        if let Some(l) = lost_now(&app)
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
        });
    }

    // SIGTERM or SIGINT stops every listener (and the agent; the datapath stays).
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let drain_app = app.clone();
    let drain_grace = cfg.flags.bgp_drain_seconds;
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        // A MASTER hands its role over (once the peer holds all its state) before draining.
        if let Some(ha) = &drain_app.ha
            && ha.cfg.ka
            && ha.role(crate::ha::DEFAULT_INSTANCE) == crate::ha::Role::Master
            && ha.switchover_target().is_some()
        {
            match api::ha::switchover_now(&drain_app).await {
                Ok((node, term)) => {
                    info!(node, term, "stopping: MASTER handed over");
                    if ha.cfg.l2 {
                        l2_follow_role(&drain_app, ha, true);
                    }
                }
                Err(e) => {
                    warn!(error = %e.message(), "stopping: switchover failed; the peer takes over when it detects us gone")
                }
            }
        }
        if let Some(b) = &drain_app.bgp {
            info!(grace_s = drain_grace, "draining BGP before stopping");
            b.speaker
                .drain(Duration::from_secs(drain_grace), api::bgp::BACKUP_PREPEND)
                .await;
        }
        info!("stopping; the datapath stays pinned and keeps forwarding");
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let mut servers = tokio::task::JoinSet::new();
    if cfg.flags.tls {
        let (Some(cert), Some(key)) = (&cfg.flags.tls_certificate, &cfg.flags.tls_key) else {
            anyhow::bail!("--tls needs --tls-certificate and --tls-key");
        };
        let tls = crate::tls::server_config(cert, key)?;
        let addr = std::net::SocketAddr::new(cfg.flags.tls_host, cfg.flags.tls_port);
        let listener = crate::tls::TlsListener::bind(addr, tls).await?;
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
        info!(%addr, "REST API listening (base /netlox/v1)");
        spawn_server(
            &mut servers,
            listener,
            &app,
            stopped(stop_rx.clone()),
            "HTTP",
        );
    }
    if servers.is_empty() {
        stopped(stop_rx).await;
        return Ok(());
    }
    while let Some(r) = servers.join_next().await {
        r.context("API server task")??;
    }
    Ok(())
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
        follow_bfd(
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
}
