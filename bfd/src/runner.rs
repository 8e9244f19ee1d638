//! The BFD service: one task owns every session, the receive sockets and the timers. Callers
//! hold a [`Handle`]: commands go in over an mpsc channel, state changes come out on a
//! broadcast channel, snapshots are answered over oneshot channels.
//!
//! Demultiplexing (RFC 5880 §6.3, RFC 5881): by `your discriminator` when it is non-zero,
//! otherwise by the packet's source address (single hop: one session per peer address).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::fsm::{Action, Session, SessionConfig, Status};
use crate::packet::{Diag, Packet, State};
use crate::socket::{CONTROL_PORT, MAX_FILTER_PEERS, RxSocket, TTL, TxSocket};

/// One peer's session as the caller describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub peer: IpAddr,
    pub local: IpAddr,
    /// Free text carried into events and listings (the HA instance).
    pub instance: String,
    pub session: SessionConfig,
}

/// A state change, for BGP and HA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub peer: IpAddr,
    pub instance: String,
    pub from: State,
    pub to: State,
    pub diag: Diag,
    pub at: SystemTime,
    /// For a detection timeout: how long after the last packet from the peer it fired.
    pub silence: Option<Duration>,
}

/// Per-session counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionCounters {
    pub tx: u64,
    pub rx: u64,
    pub drop_auth: u64,
    pub state_changes: u64,
    pub tx_errors: u64,
}

/// A session as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub peer: IpAddr,
    pub local: SocketAddr,
    pub instance: String,
    pub status: Status,
    pub counters: SessionCounters,
    /// Time in the current state.
    pub since: Option<Duration>,
    /// Silence before the last detection timeout.
    pub last_detection: Option<Duration>,
    /// Wall-clock time of the last state change.
    pub changed_at: Option<SystemTime>,
}

/// Drops before a session is found, and how punctual the BFD thread is.
#[derive(Debug, Default)]
pub struct GlobalCounters {
    /// Dropped by the kernel before the thread read them (the GTSM filter: TTL not 255; or a
    /// full receive queue), both families, as the sockets count them (read every second).
    pub drop_kernel: AtomicU64,
    pub drop_bad_ttl: AtomicU64,
    pub drop_malformed: AtomicU64,
    pub drop_no_session: AtomicU64,
    /// Timer wake-ups that came more than [`LATE_US`] after their deadline (the thread did
    /// not get a CPU in time: packets went out late, detection ran late).
    pub timers_late: AtomicU64,
    /// The latest a timer ran after its deadline, in microseconds.
    pub timer_late_max_us: AtomicU64,
    /// The real-time priority the BFD thread runs at (0: normal scheduling).
    pub rt_priority: AtomicU64,
}

/// A timer that runs this much after its deadline counts as late.
pub const LATE_US: u64 = 10_000;
/// Lateness that is logged as a warning (at most every 10 s): at 50 ms x 3 a peer gives up
/// after 150 ms of silence.
const LATE_WARN: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum BfdError {
    #[error("{0}")]
    Invalid(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("the BFD task has stopped")]
    Stopped,
}

enum Cmd {
    Upsert(PeerConfig, oneshot::Sender<Result<bool, BfdError>>),
    Remove(IpAddr, oneshot::Sender<bool>),
    List(oneshot::Sender<Vec<PeerStatus>>),
}

/// The caller's side of the BFD service. Cheap to clone.
#[derive(Clone)]
pub struct Handle {
    cmd: mpsc::Sender<Cmd>,
    events: broadcast::Sender<Event>,
    pub counters: Arc<GlobalCounters>,
}

/// Limits on what a session may be configured with.
pub const MIN_INTERVAL_US: u32 = 10_000;
pub const MAX_INTERVAL_US: u32 = 60_000_000;

pub fn validate(cfg: &PeerConfig) -> Result<(), BfdError> {
    let s = &cfg.session;
    for (name, v) in [
        ("desired min tx", s.desired_min_tx_us),
        ("required min rx", s.required_min_rx_us),
    ] {
        if !(MIN_INTERVAL_US..=MAX_INTERVAL_US).contains(&v) {
            return Err(BfdError::Invalid(format!(
                "{name} interval {v} us out of range {MIN_INTERVAL_US}..={MAX_INTERVAL_US}"
            )));
        }
    }
    if s.detect_mult == 0 {
        return Err(BfdError::Invalid(
            "detect multiplier must be 1..=255".into(),
        ));
    }
    if cfg.peer.is_ipv4() != cfg.local.is_ipv4() {
        return Err(BfdError::Invalid(format!(
            "peer {} and source {} are of different families",
            cfg.peer, cfg.local
        )));
    }
    if cfg.peer.is_unspecified() || cfg.peer.is_multicast() {
        return Err(BfdError::Invalid(format!(
            "{} is not a unicast peer",
            cfg.peer
        )));
    }
    if let Some(a) = &s.auth {
        a.validate()
            .map_err(|e| BfdError::Invalid(format!("authentication: {e}")))?;
    }
    Ok(())
}

impl Handle {
    /// Adds a session, or changes an existing one's timers/authentication in place (a Poll
    /// Sequence tells the peer; the session is not dropped). Returns true when it was new.
    pub async fn upsert(&self, cfg: PeerConfig) -> Result<bool, BfdError> {
        validate(&cfg)?;
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(Cmd::Upsert(cfg, tx))
            .await
            .map_err(|_| BfdError::Stopped)?;
        rx.await.map_err(|_| BfdError::Stopped)?
    }

    /// Removes a session (the peer is told AdminDown). False when there was none.
    pub async fn remove(&self, peer: IpAddr) -> Result<bool, BfdError> {
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(Cmd::Remove(peer, tx))
            .await
            .map_err(|_| BfdError::Stopped)?;
        rx.await.map_err(|_| BfdError::Stopped)
    }

    pub async fn list(&self) -> Result<Vec<PeerStatus>, BfdError> {
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(Cmd::List(tx))
            .await
            .map_err(|_| BfdError::Stopped)?;
        rx.await.map_err(|_| BfdError::Stopped)
    }

    /// State changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }
}

struct Entry {
    cfg: PeerConfig,
    fsm: Session,
    tx: TxSocket,
    counters: SessionCounters,
    last_rx: Option<Instant>,
    last_detection: Option<Duration>,
    changed_at: Option<SystemTime>,
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most 4 bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 4, 0) };
    if n == 4 {
        u32::from_ne_bytes(b)
    } else {
        // Fall back to the clock: still non-repeating enough for discriminators.
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        (t.as_nanos() as u32) ^ std::process::id().rotate_left(16)
    }
}

fn register(s: RxSocket) -> io::Result<AsyncFd<RxSocket>> {
    // SAFETY: RxSocket owns its descriptor for its whole life and always returns that one.
    unsafe { AsyncFd::register_with_interest(s, Interest::READABLE) }.map_err(|e| e.into())
}

/// Starts the BFD service on a thread of its own, listening on `port` (3784 unless a test
/// says otherwise) for IPv4 and, when the host has it, IPv6.
///
/// The thread runs nothing else, so no other work of the process can hold its timers up.
/// With `rt_priority` 1-99 it asks for `SCHED_FIFO` at that priority (as keepalived's
/// `bfd_rt_priority` does): forwarding load and busy processes on the node then cannot delay
/// its packets past a peer's detection time. When the kernel refuses (no CAP_SYS_NICE, a
/// cgroup without real-time budget), it warns and runs at normal priority. The thread ends
/// when the last [`Handle`] is dropped.
pub fn spawn(port: u16, rt_priority: u8) -> Result<Handle, BfdError> {
    let rx4 = RxSocket::bind(false, port).map_err(|e| BfdError::Io {
        context: format!("bind UDP 0.0.0.0:{port}"),
        source: e,
    })?;
    let rx6 = match RxSocket::bind(true, port) {
        Ok(s) => Some(s),
        Err(e) => {
            debug!(error = %e, "no IPv6 BFD socket");
            None
        }
    };
    let (cmd_tx, cmd_rx) = mpsc::channel(64);
    let (ev_tx, _) = broadcast::channel(1024);
    let counters = Arc::new(GlobalCounters::default());
    let runner = Runner {
        sessions: HashMap::new(),
        schedule: Default::default(),
        scheduled: HashMap::new(),
        by_discr: HashMap::new(),
        events: ev_tx.clone(),
        counters: counters.clone(),
        late_warned: None,
        filters_unlisted: false,
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<(), BfdError>>(1);
    let io_err = |context: &str| {
        let context = context.to_string();
        move |e: io::Error| BfdError::Io { context, source: e }
    };
    let spawned = std::thread::Builder::new()
        .name("ferrolb-bfd".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(io_err("start the BFD thread's runtime")(e)));
                    return;
                }
            };
            rt.block_on(async move {
                // Registration needs this thread's runtime.
                let rx4 = match register(rx4) {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ready_tx.send(Err(io_err("register the BFD socket")(e)));
                        return;
                    }
                };
                let rx6 = rx6.and_then(|s| register(s).ok());
                if rt_priority > 0 {
                    match set_realtime(rt_priority) {
                        Ok(()) => {
                            runner
                                .counters
                                .rt_priority
                                .store(u64::from(rt_priority), Ordering::Relaxed);
                            info!(priority = rt_priority, "BFD thread runs SCHED_FIFO");
                        }
                        Err(e) => warn!(
                            priority = rt_priority,
                            error = %e,
                            "BFD thread left at normal priority: real-time scheduling refused"
                        ),
                    }
                }
                let _ = ready_tx.send(Ok(()));
                runner.run(cmd_rx, rx4, rx6).await;
            });
        });
    if let Err(e) = spawned {
        return Err(io_err("start the BFD thread")(e));
    }
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(BfdError::Stopped),
    }
    Ok(Handle {
        cmd: cmd_tx,
        events: ev_tx,
        counters,
    })
}

/// `SCHED_FIFO` at `priority` for the calling thread.
fn set_realtime(priority: u8) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: i32::from(priority),
    };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

struct Runner {
    sessions: HashMap<IpAddr, Entry>,
    /// Next deadline of every session, soonest first.
    schedule: std::collections::BTreeSet<(Instant, IpAddr)>,
    scheduled: HashMap<IpAddr, Instant>,
    by_discr: HashMap<u32, IpAddr>,
    events: broadcast::Sender<Event>,
    counters: Arc<GlobalCounters>,
    /// When lateness was last logged.
    late_warned: Option<Instant>,
    /// The receive filters check the TTL alone: a family has more session peers than they
    /// list (warned once each time it happens).
    filters_unlisted: bool,
}

impl Runner {
    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Cmd>,
        rx4: AsyncFd<RxSocket>,
        rx6: Option<AsyncFd<RxSocket>>,
    ) {
        let mut buf = vec![0u8; 2048];
        let mut drops_read = Instant::now();
        loop {
            let deadline = self
                .schedule
                .first()
                .map(|(t, _)| *t)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))
                // The kernel's drop count is read every second, sessions or not.
                .min(drops_read + Duration::from_secs(1));
            let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline));
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(c) => {
                        if self.command(c) {
                            self.refilter(&rx4, rx6.as_ref());
                        }
                    }
                    None => return,
                },
                r = rx4.readable() => {
                    if let Ok(mut g) = r {
                        self.drain(g.get_inner(), &mut buf);
                        g.clear_ready();
                    }
                }
                r = async {
                    match &rx6 {
                        Some(s) => s.readable().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let (Ok(mut g), Some(_)) = (r, &rx6) {
                        self.drain(g.get_inner(), &mut buf);
                        g.clear_ready();
                    }
                }
                _ = sleep => {}
            }
            let now = Instant::now();
            self.punctuality(now);
            self.tick(now);
            if now.duration_since(drops_read) >= Duration::from_secs(1) {
                drops_read = now;
                let n = std::iter::once(&rx4)
                    .chain(rx6.as_ref())
                    .filter_map(|s| s.get_ref().kernel_drops().ok())
                    .map(u64::from)
                    .sum();
                self.counters.drop_kernel.store(n, Ordering::Relaxed);
            }
        }
    }

    /// Accounts for how late the soonest due timer runs.
    fn punctuality(&mut self, now: Instant) {
        let Some(&(due, _)) = self.schedule.first() else {
            return;
        };
        let late = now.saturating_duration_since(due);
        let us = late.as_micros() as u64;
        if us <= LATE_US {
            return;
        }
        self.counters.timers_late.fetch_add(1, Ordering::Relaxed);
        self.counters
            .timer_late_max_us
            .fetch_max(us, Ordering::Relaxed);
        if late >= LATE_WARN
            && self
                .late_warned
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10))
        {
            self.late_warned = Some(now);
            warn!(
                late_ms = late.as_millis() as u64,
                "BFD timers ran late: this node is too busy for its BFD intervals"
            );
        }
    }

    /// Names the sessions' peers to the receive sockets' filters, so that the kernel drops
    /// datagrams from anyone else before they wake this thread.
    fn refilter(&mut self, rx4: &AsyncFd<RxSocket>, rx6: Option<&AsyncFd<RxSocket>>) {
        let peers: Vec<IpAddr> = self.sessions.keys().copied().collect();
        let mut unlisted = false;
        for s in std::iter::once(rx4).chain(rx6) {
            match s.get_ref().set_peers(&peers) {
                Ok(listed) => unlisted |= !listed,
                Err(e) => {
                    warn!(error = %e, "BFD: the kernel refused the receive filter listing the peers; it checks the TTL alone");
                }
            }
        }
        if unlisted && !self.filters_unlisted {
            warn!(
                sessions = peers.len(),
                listed_at_most = MAX_FILTER_PEERS,
                "BFD: more session peers of a family than the kernel filter lists; it checks the TTL alone, and datagrams from strangers on the link reach the BFD thread"
            );
        }
        self.filters_unlisted = unlisted;
    }

    /// Carries out a command; true when the set of session peers changed.
    fn command(&mut self, c: Cmd) -> bool {
        let now = Instant::now();
        match c {
            Cmd::Upsert(cfg, reply) => {
                if let Some(e) = self.sessions.get_mut(&cfg.peer) {
                    if e.cfg.local != cfg.local {
                        let _ = reply.send(Err(BfdError::Invalid(format!(
                            "session to {} exists with source {}; remove it first",
                            cfg.peer, e.cfg.local
                        ))));
                        return false;
                    }
                    e.fsm.set_config(cfg.session.clone(), now);
                    let peer = cfg.peer;
                    e.cfg = cfg;
                    self.reschedule(peer);
                    let _ = reply.send(Ok(false));
                    return false;
                }
                let mut discr = random_u32();
                while discr == 0 || self.by_discr.contains_key(&discr) {
                    discr = random_u32();
                }
                let tx = match TxSocket::bind(cfg.local, (random_u32() % 16384) as u16 + 49152) {
                    Ok(t) => t,
                    Err(e) => {
                        let _ = reply.send(Err(BfdError::Io {
                            context: format!("bind a BFD source socket on {}", cfg.local),
                            source: e,
                        }));
                        return false;
                    }
                };
                info!(peer = %cfg.peer, local = %tx.local, discr, "BFD session added");
                let fsm = Session::new(cfg.session.clone(), discr, random_u32(), now);
                let peer = cfg.peer;
                self.by_discr.insert(discr, cfg.peer);
                self.sessions.insert(
                    cfg.peer,
                    Entry {
                        cfg,
                        fsm,
                        tx,
                        counters: SessionCounters::default(),
                        last_rx: None,
                        last_detection: None,
                        changed_at: None,
                    },
                );
                self.reschedule(peer);
                let _ = reply.send(Ok(true));
                true
            }
            Cmd::Remove(peer, reply) => {
                let Some(mut e) = self.sessions.remove(&peer) else {
                    let _ = reply.send(false);
                    return false;
                };
                self.reschedule(peer);
                self.by_discr.remove(&e.fsm.local_discr());
                // Tell the peer (AdminDown) so it does not wait for a detection timeout.
                let acts = e.fsm.admin_down(now);
                let acts = acts
                    .into_iter()
                    .chain(e.fsm.on_timer(now))
                    .collect::<Vec<_>>();
                for a in acts {
                    if let Action::Send(b) = a {
                        let _ = e.tx.send_to(&b, SocketAddr::new(peer, CONTROL_PORT));
                    }
                }
                info!(%peer, "BFD session removed");
                let _ = reply.send(true);
                true
            }
            Cmd::List(reply) => {
                let mut v: Vec<PeerStatus> = self
                    .sessions
                    .values()
                    .map(|e| {
                        let status = e.fsm.status();
                        PeerStatus {
                            peer: e.cfg.peer,
                            local: e.tx.local,
                            instance: e.cfg.instance.clone(),
                            since: status.last_change.map(|t| now.saturating_duration_since(t)),
                            status,
                            counters: e.counters.clone(),
                            last_detection: e.last_detection,
                            changed_at: e.changed_at,
                        }
                    })
                    .collect();
                v.sort_by_key(|p| p.peer);
                let _ = reply.send(v);
                false
            }
        }
    }

    fn drain(&mut self, sock: &RxSocket, buf: &mut [u8]) {
        // Bounded: at most 256 datagrams per wake-up, then the timers get their turn.
        for _ in 0..256 {
            match sock.recv(buf) {
                Ok(d) => {
                    let raw = &buf[..d.len];
                    self.datagram(d.from, d.ttl, raw);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    warn!(error = %e, "BFD receive failed");
                    return;
                }
            }
        }
    }

    fn datagram(&mut self, from: SocketAddr, ttl: Option<u8>, raw: &[u8]) {
        if ttl != Some(TTL as u8) {
            self.counters.drop_bad_ttl.fetch_add(1, Ordering::Relaxed);
            debug!(%from, ?ttl, "BFD packet without TTL 255 dropped (GTSM)");
            return;
        }
        let p = match Packet::decode(raw) {
            Ok(p) => p,
            Err(e) => {
                self.counters.drop_malformed.fetch_add(1, Ordering::Relaxed);
                debug!(%from, error = %e, "malformed BFD packet dropped");
                return;
            }
        };
        let peer = if p.your_discr != 0 {
            match self.by_discr.get(&p.your_discr) {
                Some(ip) if *ip == from.ip() => *ip,
                _ => {
                    self.counters
                        .drop_no_session
                        .fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        } else {
            from.ip()
        };
        let now = Instant::now();
        let Some(e) = self.sessions.get_mut(&peer) else {
            self.counters
                .drop_no_session
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        match e.fsm.on_packet(&p, raw, now) {
            Ok(acts) => {
                e.counters.rx += 1;
                e.last_rx = Some(now);
                Self::act(e, acts, &self.events, now);
                self.reschedule(peer);
            }
            Err(err) => {
                e.counters.drop_auth += 1;
                debug!(%peer, error = %err, "BFD packet dropped");
            }
        }
    }

    /// Runs the sessions whose deadline has come (in deadline order; O(log N) each).
    fn tick(&mut self, now: Instant) {
        while let Some(&(t, peer)) = self.schedule.first() {
            if t > now {
                break;
            }
            self.schedule.pop_first();
            self.scheduled.remove(&peer);
            if let Some(e) = self.sessions.get_mut(&peer) {
                let acts = e.fsm.on_timer(now);
                Self::act(e, acts, &self.events, now);
            }
            self.reschedule(peer);
        }
    }

    /// Puts a session's next deadline in the schedule (replacing its old one).
    fn reschedule(&mut self, peer: IpAddr) {
        if let Some(old) = self.scheduled.remove(&peer) {
            self.schedule.remove(&(old, peer));
        }
        if let Some(t) = self.sessions.get(&peer).and_then(|e| e.fsm.next_deadline()) {
            self.schedule.insert((t, peer));
            self.scheduled.insert(peer, t);
        }
    }

    fn act(e: &mut Entry, acts: Vec<Action>, events: &broadcast::Sender<Event>, now: Instant) {
        for a in acts {
            match a {
                Action::Send(b) => {
                    match e.tx.send_to(&b, SocketAddr::new(e.cfg.peer, CONTROL_PORT)) {
                        Ok(_) => e.counters.tx += 1,
                        Err(err) => {
                            e.counters.tx_errors += 1;
                            debug!(peer = %e.cfg.peer, error = %err, "BFD send failed");
                        }
                    }
                }
                Action::StateChange { from, to, diag } => {
                    e.counters.state_changes += 1;
                    let at = SystemTime::now();
                    e.changed_at = Some(at);
                    let silence = (diag == Diag::ControlDetectionTimeExpired)
                        .then(|| e.last_rx.map(|t| now.saturating_duration_since(t)))
                        .flatten();
                    if silence.is_some() {
                        e.last_detection = silence;
                    }
                    info!(peer = %e.cfg.peer, %from, %to, diag = diag.name(), ?silence, "BFD state change");
                    let _ = events.send(Event {
                        peer: e.cfg.peer,
                        instance: e.cfg.instance.clone(),
                        from,
                        to,
                        diag,
                        at,
                        silence,
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(peer: &str, local: &str) -> PeerConfig {
        PeerConfig {
            peer: peer.parse().unwrap(),
            local: local.parse().unwrap(),
            instance: "default".into(),
            session: SessionConfig::default(),
        }
    }

    /// Two sessions of one runner talk to each other over loopback (127.0.0.1 <-> 127.0.0.2)
    /// in a private network namespace: they come Up, a timer change keeps them Up, and
    /// removing one side brings the other Down with "neighbor signaled session down".
    #[test]
    fn two_sessions_over_loopback() {
        if !ferrolb_tests::private_netns("two_sessions_over_loopback") {
            return;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let h = spawn(CONTROL_PORT, 0).unwrap();
            let mut ev = h.subscribe();
            assert!(h.upsert(cfg("127.0.0.2", "127.0.0.1")).await.unwrap());
            assert!(h.upsert(cfg("127.0.0.1", "127.0.0.2")).await.unwrap());
            let up = tokio::time::timeout(Duration::from_secs(5), async {
                let mut ups = 0;
                while ups < 2 {
                    if ev.recv().await.unwrap().to == State::Up {
                        ups += 1;
                    }
                }
            })
            .await;
            assert!(up.is_ok(), "both sessions Up");
            tokio::time::sleep(Duration::from_millis(500)).await;
            let l = h.list().await.unwrap();
            assert_eq!(l.len(), 2);
            for s in &l {
                assert_eq!(s.status.state, State::Up);
                assert_eq!(s.status.tx_interval_us, 100_000);
                assert!(crate::socket::SOURCE_PORTS.contains(&s.local.port()));
                assert!(s.counters.rx > 3 && s.counters.tx > 3);
            }
            // Faster timers in place: still Up, no state change.
            let mut fast = cfg("127.0.0.2", "127.0.0.1");
            fast.session.desired_min_tx_us = 50_000;
            fast.session.required_min_rx_us = 50_000;
            assert!(!h.upsert(fast).await.unwrap());
            let mut fast_b = cfg("127.0.0.1", "127.0.0.2");
            fast_b.session.desired_min_tx_us = 50_000;
            fast_b.session.required_min_rx_us = 50_000;
            assert!(!h.upsert(fast_b).await.unwrap());
            tokio::time::sleep(Duration::from_millis(500)).await;
            let l = h.list().await.unwrap();
            assert!(
                l.iter()
                    .all(|s| s.status.state == State::Up && s.status.tx_interval_us == 50_000)
            );
            assert!(
                ev.try_recv().is_err(),
                "no state change from a timer change"
            );
            // Removing one side: the other hears AdminDown.
            assert!(h.remove("127.0.0.1".parse().unwrap()).await.unwrap());
            let down = tokio::time::timeout(Duration::from_secs(2), ev.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                (down.to, down.diag),
                (State::Down, Diag::NeighborSignaledSessionDown)
            );
            assert!(!h.remove("127.0.0.1".parse().unwrap()).await.unwrap());
            // IPv6: the same over two addresses on lo (hop limit 255 required on receive).
            for a in ["fd00::1/128", "fd00::2/128"] {
                assert!(
                    std::process::Command::new("ip")
                        .args(["-6", "addr", "add", a, "dev", "lo", "nodad"])
                        .status()
                        .unwrap()
                        .success()
                );
            }
            assert!(h.upsert(cfg("fd00::2", "fd00::1")).await.unwrap());
            assert!(h.upsert(cfg("fd00::1", "fd00::2")).await.unwrap());
            let v6_up = tokio::time::timeout(Duration::from_secs(5), async {
                let mut ups = 0;
                while ups < 2 {
                    let e = ev.recv().await.unwrap();
                    if e.to == State::Up && e.peer.is_ipv6() {
                        ups += 1;
                    }
                }
            })
            .await;
            assert!(v6_up.is_ok(), "both IPv6 sessions Up");
            // Bad configurations are refused before they reach the task.
            let mut bad = cfg("127.0.0.9", "127.0.0.1");
            bad.session.desired_min_tx_us = 5_000;
            assert!(h.upsert(bad).await.is_err());
            assert!(h.upsert(cfg("127.0.0.9", "::1")).await.is_err());
        });
    }
}
