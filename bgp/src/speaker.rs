//! The speaker: one task per neighbour owning its FSM, TCP connection and Adj-RIB-Out, fed by a
//! `watch` of the routes to originate. Changing a route's attributes sends an UPDATE at once;
//! a route that goes is withdrawn. Received UPDATEs are decoded, validated (RFC 7606:
//! attribute errors make the UPDATE's routes treat-as-withdraw) and counted, never installed.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netgauze_bgp_pkt::BgpMessage;
use netgauze_bgp_pkt::notification::{BgpNotificationMessage, CeaseError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::fsm::{Event, Fsm, Output, Params, State};
use crate::wire::{self, GRACEFUL_SHUTDOWN, RouteAttrs};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalConfig {
    pub local_as: u32,
    pub router_id: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighborConfig {
    /// The session's transport family is the family of the routes it carries: IPv4 VIPs go
    /// to IPv4 neighbours (NEXT_HOP), IPv6 VIPs to IPv6 neighbours (MP_REACH_NLRI).
    pub address: IpAddr,
    pub remote_as: u32,
    pub remote_port: u16,
    pub hold_time_s: u16,
    pub connect_retry_s: u16,
    /// TCP MD5 signature key (RFC 2385).
    pub password: Option<String>,
    /// GTSM (RFC 5082): TTL 255 sent, at least 254 required.
    pub ttl_security: bool,
    /// Wait for the peer to connect (needs [`Speaker::listen`]).
    pub passive: bool,
}

impl NeighborConfig {
    pub fn new(address: IpAddr, remote_as: u32) -> NeighborConfig {
        NeighborConfig {
            address,
            remote_as,
            remote_port: 179,
            hold_time_s: 9,
            connect_retry_s: 1,
            password: None,
            ttl_security: false,
            passive: false,
        }
    }
}

/// A neighbour as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighborStatus {
    pub config: NeighborConfig,
    pub state: State,
    pub since: Option<SystemTime>,
    pub local: Option<SocketAddr>,
    pub prefixes_sent: u64,
    pub prefixes_received: u64,
    pub updates_in: u64,
    pub updates_out: u64,
    pub treat_as_withdraw: u64,
    pub transitions: u64,
    pub notifications_in: BTreeMap<u8, u64>,
    pub notifications_out: BTreeMap<u8, u64>,
    pub last_error: Option<String>,
}

/// Routes to originate: prefix -> attributes.
pub type Routes = BTreeMap<IpNet, RouteAttrs>;

enum Cmd {
    Stop,
    Reset(String),
    Incoming(TcpStream),
}

struct Neighbor {
    tx: mpsc::Sender<Cmd>,
    status: Arc<Mutex<NeighborStatus>>,
}

/// The caller's handle. Cheap to clone.
#[derive(Clone)]
pub struct Speaker {
    /// The listening sockets, IPv4 and IPv6 (for MD5 keys of peers that connect to us).
    listener_fds: Arc<Mutex<Vec<(bool, i32)>>>,
    global: Arc<Mutex<Option<GlobalConfig>>>,
    neighbors: Arc<Mutex<HashMap<IpAddr, Neighbor>>>,
    routes: watch::Sender<Arc<Routes>>,
}

impl Default for Speaker {
    fn default() -> Self {
        Self::new()
    }
}

impl Speaker {
    pub fn new() -> Speaker {
        Speaker {
            listener_fds: Arc::new(Mutex::new(Vec::new())),
            global: Arc::new(Mutex::new(None)),
            neighbors: Arc::new(Mutex::new(HashMap::new())),
            routes: watch::channel(Arc::new(Routes::new())).0,
        }
    }

    pub fn global(&self) -> Option<GlobalConfig> {
        self.global.lock().ok().and_then(|g| g.clone())
    }

    /// Sets the local AS and router id; existing sessions restart with them.
    pub fn set_global(&self, g: GlobalConfig) {
        let changed = {
            let Ok(mut cur) = self.global.lock() else {
                return;
            };
            let changed = cur.as_ref() != Some(&g);
            *cur = Some(g);
            changed
        };
        if changed {
            let cfgs: Vec<NeighborConfig> = self
                .neighbors
                .lock()
                .map(|n| {
                    n.values()
                        .filter_map(|x| x.status.lock().ok().map(|s| s.config.clone()))
                        .collect()
                })
                .unwrap_or_default();
            for c in cfgs {
                self.upsert_neighbor(c);
            }
        }
    }

    /// Adds a neighbour, or replaces one whose configuration changed (the session restarts).
    /// Without a global configuration the neighbour waits (listed Idle).
    pub fn upsert_neighbor(&self, cfg: NeighborConfig) {
        let global = self.global();
        if global.is_none() {
            warn!(neighbor = %cfg.address, "BGP neighbour configured before the global settings");
        }
        self.listener_key(&cfg);
        let Ok(mut ns) = self.neighbors.lock() else {
            return;
        };
        if let Some(old) = ns.get(&cfg.address)
            && old.status.lock().map(|s| s.config == cfg).unwrap_or(false)
            && global.is_some()
        {
            return;
        }
        if let Some(old) = ns.remove(&cfg.address) {
            let _ = old.tx.try_send(Cmd::Stop);
        }
        let status = Arc::new(Mutex::new(NeighborStatus {
            config: cfg.clone(),
            state: State::Idle,
            since: None,
            local: None,
            prefixes_sent: 0,
            prefixes_received: 0,
            updates_in: 0,
            updates_out: 0,
            treat_as_withdraw: 0,
            transitions: 0,
            notifications_in: BTreeMap::new(),
            notifications_out: BTreeMap::new(),
            last_error: global
                .is_none()
                .then(|| "no global BGP configuration (localAs, routerId)".into()),
        }));
        let (tx, rx) = mpsc::channel(8);
        if let Some(g) = global {
            let task = Session {
                fsm: Fsm::new(Params {
                    local_as: g.local_as,
                    remote_as: cfg.remote_as,
                    router_id: g.router_id,
                    hold_time_s: cfg.hold_time_s,
                    connect_retry_s: cfg.connect_retry_s,
                    passive: cfg.passive,
                }),
                cfg: cfg.clone(),
                status: status.clone(),
                routes: self.routes.subscribe(),
                sent: Routes::new(),
                stream: None,
                buf: Vec::new(),
                asn4: true,
                refresh: false,
            };
            tokio::spawn(task.run(rx));
        }
        ns.insert(cfg.address, Neighbor { tx, status });
    }

    /// Accepts BGP connections on `port` (179) for configured neighbours: passive ones wait for
    /// them, active ones resolve collisions (§6.8). Other sources are closed at once.
    /// One listener per family: IPv4 on 0.0.0.0, IPv6 on [::] (IPv6 only, so each peer's MD5
    /// key lives on the socket of its family). A node without IPv6 keeps the IPv4 listener.
    pub async fn listen(&self, port: u16) -> std::io::Result<()> {
        let l4 =
            tokio::net::TcpListener::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port))
                .await?;
        let l6 = match crate::socket::listen_v6_only(port) {
            Ok(l) => Some(l),
            Err(e) => {
                warn!(port, error = %e, "no IPv6 BGP listener: IPv6 neighbours must be active");
                None
            }
        };
        {
            use std::os::fd::AsRawFd;
            if let Ok(mut fds) = self.listener_fds.lock() {
                fds.push((false, l4.as_raw_fd()));
                if let Some(l) = &l6 {
                    fds.push((true, l.as_raw_fd()));
                }
            }
        }
        // Keys of neighbours configured before the listener existed.
        for n in self.neighbors() {
            self.listener_key(&n.config);
        }
        for l in std::iter::once(l4).chain(l6) {
            self.accept_loop(l);
        }
        Ok(())
    }

    fn accept_loop(&self, l: tokio::net::TcpListener) {
        let neighbors = self.neighbors.clone();
        tokio::spawn(async move {
            loop {
                let Ok((s, peer)) = l.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let ip = peer.ip().to_canonical();
                let tx = neighbors
                    .lock()
                    .ok()
                    .and_then(|n| n.get(&ip).map(|x| x.tx.clone()));
                match tx {
                    Some(tx) => {
                        let _ = tx.try_send(Cmd::Incoming(s));
                    }
                    None => debug!(%peer, "BGP connection from a stranger closed"),
                }
            }
        });
    }

    /// Installs (or clears) a neighbour's MD5 key on the listening socket.
    fn listener_key(&self, cfg: &NeighborConfig) {
        let v6 = cfg.address.is_ipv6();
        let Some(fd) = self
            .listener_fds
            .lock()
            .ok()
            .and_then(|f| f.iter().find(|(is6, _)| *is6 == v6).map(|(_, fd)| *fd))
        else {
            return;
        };
        let key = cfg.password.as_deref().unwrap_or("").as_bytes();
        let res = crate::socket::set_md5(fd, cfg.address, key);
        if key.is_empty() {
            // Clearing a key that was never set fails harmlessly.
            return;
        }
        if let Err(e) = res {
            warn!(neighbor = %cfg.address, error = %e, "cannot set the MD5 key on the BGP listener");
        }
    }

    /// Removes a neighbour (Cease, administrative shutdown). False when unknown.
    pub fn remove_neighbor(&self, address: IpAddr) -> bool {
        let Ok(mut ns) = self.neighbors.lock() else {
            return false;
        };
        match ns.remove(&address) {
            Some(n) => {
                let _ = n.tx.try_send(Cmd::Stop);
                true
            }
            None => false,
        }
    }

    /// Tears a session down at once and lets it restart (e.g. BFD declared the peer Down).
    pub fn reset_neighbor(&self, address: IpAddr, why: &str) {
        if let Ok(ns) = self.neighbors.lock()
            && let Some(n) = ns.get(&address)
        {
            let _ = n.tx.try_send(Cmd::Reset(why.to_string()));
        }
    }

    pub fn neighbors(&self) -> Vec<NeighborStatus> {
        let mut v: Vec<NeighborStatus> = self
            .neighbors
            .lock()
            .map(|n| {
                n.values()
                    .filter_map(|x| x.status.lock().ok().map(|s| s.clone()))
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by_key(|s| s.config.address);
        v
    }

    /// The routes to originate (the whole set; each session sends the difference).
    pub fn set_routes(&self, routes: Routes) {
        if **self.routes.borrow() != routes {
            self.routes.send_replace(Arc::new(routes));
        }
    }

    pub fn routes(&self) -> Arc<Routes> {
        self.routes.borrow().clone()
    }

    /// Graceful shutdown (RFC 8326): re-advertise with GRACEFUL_SHUTDOWN and `prepend` extra
    /// AS-path copies, wait `grace`, withdraw everything, then close every session with a
    /// Cease.
    pub async fn drain(&self, grace: Duration, prepend: u8) {
        let gshut: Routes = self
            .routes()
            .iter()
            .map(|(p, a)| {
                let mut a = a.clone();
                if !a.communities.contains(&GRACEFUL_SHUTDOWN) {
                    a.communities.push(GRACEFUL_SHUTDOWN);
                }
                a.prepend = a.prepend.saturating_add(prepend);
                (*p, a)
            })
            .collect();
        info!(
            routes = gshut.len(),
            ?grace,
            "BGP drain: graceful shutdown community"
        );
        self.set_routes(gshut);
        tokio::time::sleep(grace).await;
        self.set_routes(Routes::new());
        tokio::time::sleep(Duration::from_millis(200)).await;
        let addrs: Vec<IpAddr> = self
            .neighbors
            .lock()
            .map(|n| n.keys().copied().collect())
            .unwrap_or_default();
        for a in addrs {
            self.remove_neighbor(a);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Session {
    fsm: Fsm,
    cfg: NeighborConfig,
    status: Arc<Mutex<NeighborStatus>>,
    routes: watch::Receiver<Arc<Routes>>,
    sent: Routes,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
    asn4: bool,
    /// A ROUTE-REFRESH asked for the whole Adj-RIB-Out.
    refresh: bool,
}

type Connecting =
    std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<TcpStream>> + Send>>;

impl Session {
    fn with_status(&self, f: impl FnOnce(&mut NeighborStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }

    async fn run(mut self, mut cmds: mpsc::Receiver<Cmd>) {
        let mut connecting: Option<Connecting> = None;
        let out = self.fsm.handle(Event::ManualStart, Instant::now());
        self.apply(out, &mut connecting).await;
        let mut rbuf = vec![0u8; 65536];
        loop {
            let deadline = self
                .fsm
                .next_deadline()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            let outs = tokio::select! {
                c = cmds.recv() => match c {
                    None | Some(Cmd::Stop) => {
                        let out = self.fsm.handle(Event::ManualStop, Instant::now());
                        self.apply(out, &mut connecting).await;
                        return;
                    }
                    Some(Cmd::Incoming(s)) => self.incoming(s, &mut connecting).await,
                    Some(Cmd::Reset(why)) => {
                        info!(neighbor = %self.cfg.address, %why, "BGP session reset");
                        let n = BgpNotificationMessage::CeaseError(CeaseError::BfdDown { value: Box::new([]) });
                        self.fsm.handle(Event::Reset(n), Instant::now())
                    }
                },
                r = async { match connecting.as_mut() { Some(c) => c.await, None => std::future::pending().await } } => {
                    connecting = None;
                    match r {
                        Ok(s) => {
                            let _ = s.set_nodelay(true);
                            let local = s.local_addr().ok();
                            self.with_status(|st| st.local = local);
                            self.stream = Some(s);
                            self.buf.clear();
                            self.fsm.handle(Event::TcpConnectionConfirmed, Instant::now())
                        }
                        Err(e) => {
                            debug!(neighbor = %self.cfg.address, error = %e, "BGP connect failed");
                            self.with_status(|st| st.last_error = Some(format!("connect: {e}")));
                            self.fsm.handle(Event::TcpConnectionFails, Instant::now())
                        }
                    }
                },
                r = async { match self.stream.as_mut() { Some(s) => s.read(&mut rbuf).await, None => std::future::pending().await } } => {
                    match r {
                        Ok(0) | Err(_) => {
                            self.stream = None;
                            self.fsm.handle(Event::TcpConnectionFails, Instant::now())
                        }
                        Ok(n) => {
                            self.buf.extend_from_slice(&rbuf[..n]);
                            self.receive()
                        }
                    }
                },
                _ = self.routes.changed() => {
                    if self.fsm.state() == State::Established {
                        self.sync_routes().await;
                    }
                    Vec::new()
                }
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => {
                    self.fsm.on_timer(Instant::now())
                }
            };
            self.apply(outs, &mut connecting).await;
            if std::mem::take(&mut self.refresh) {
                self.sync_routes().await;
            }
        }
    }

    /// A connection the peer opened: adopt it when we have none (or lose the collision,
    /// §6.8: the connection opened by the side with the higher BGP identifier survives),
    /// refuse it otherwise.
    async fn incoming(
        &mut self,
        mut s: TcpStream,
        connecting: &mut Option<Connecting>,
    ) -> Vec<Output> {
        let state = self.fsm.state();
        let local_id = self.fsm.params().router_id;
        // The peer's identifier once its OPEN is known; its address until then.
        let remote_id = self
            .fsm
            .peer()
            .map(|p| p.router_id)
            .unwrap_or(match self.cfg.address {
                IpAddr::V4(a) => a,
                IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
            });
        let adopt = match state {
            State::Idle | State::Connect | State::Active => true,
            State::OpenSent | State::OpenConfirm => local_id < remote_id,
            State::Established => false,
        };
        let collision = || {
            BgpMessage::Notification(BgpNotificationMessage::CeaseError(
                CeaseError::ConnectionCollisionResolution {
                    value: Box::new([]),
                },
            ))
        };
        if !adopt {
            debug!(neighbor = %self.cfg.address, state = state.name(), "refusing the peer's connection (collision)");
            if let Ok(b) = wire::encode(&collision()) {
                let _ = s.write_all(&b).await;
            }
            let _ = s.shutdown().await;
            return Vec::new();
        }
        if matches!(state, State::OpenSent | State::OpenConfirm) {
            let _ = self.send(&collision()).await;
        }
        if let Some(mut old) = self.stream.take() {
            let _ = old.shutdown().await;
        }
        *connecting = None;
        let _ = s.set_nodelay(true);
        let local = s.local_addr().ok();
        self.with_status(|st| st.local = local);
        self.stream = Some(s);
        self.buf.clear();
        self.sent.clear();
        info!(neighbor = %self.cfg.address, "BGP: took the peer's connection");
        self.fsm.adopt_incoming(Instant::now())
    }

    /// A message error: the NOTIFICATION RFC 4271 §6 gives it goes out before the session
    /// closes (none for an undecodable NOTIFICATION).
    fn protocol_error(&mut self, e: &wire::WireError) -> Vec<Output> {
        let now = Instant::now();
        match e.notification() {
            Some(n) if self.fsm.state() != State::Idle => self.fsm.handle(Event::Reset(n), now),
            _ => {
                self.stream = None;
                self.fsm.handle(Event::TcpConnectionFails, now)
            }
        }
    }

    /// Decodes every whole message in the buffer and feeds the FSM.
    fn receive(&mut self) -> Vec<Output> {
        let mut outs = Vec::new();
        loop {
            let len = match wire::frame_len(&self.buf) {
                Ok(Some(l)) if self.buf.len() >= l => l,
                Ok(_) => return outs,
                Err(e) => {
                    warn!(neighbor = %self.cfg.address, error = %e, "bad BGP message header; closing");
                    self.buf.clear();
                    outs.extend(self.protocol_error(&e));
                    return outs;
                }
            };
            let frame: Vec<u8> = self.buf.drain(..len).collect();
            let now = Instant::now();
            match wire::decode(&frame, self.asn4) {
                Ok(d) => {
                    if let BgpMessage::Update(u) = &d.message {
                        let tw = !d.attribute_errors.is_empty();
                        let (announced, withdrawn) = wire::update_counts(u);
                        self.with_status(|st| {
                            st.updates_in += 1;
                            if tw {
                                // RFC 7606 treat-as-withdraw: the announced routes count as
                                // withdrawals, the session stays up.
                                st.treat_as_withdraw += 1;
                                st.prefixes_received =
                                    st.prefixes_received.saturating_sub(withdrawn + announced);
                            } else {
                                st.prefixes_received =
                                    st.prefixes_received.saturating_sub(withdrawn) + announced;
                            }
                        });
                        if tw {
                            warn!(neighbor = %self.cfg.address, errors = ?d.attribute_errors, "UPDATE treated as withdraw (RFC 7606)");
                        }
                    }
                    if let BgpMessage::Notification(n) = &d.message {
                        let code = wire::notification_code(n).0;
                        self.with_status(|st| *st.notifications_in.entry(code).or_default() += 1);
                    }
                    if let BgpMessage::Open(o) = &d.message {
                        self.asn4 = wire::peer_open(o).asn4;
                    }
                    if matches!(d.message, BgpMessage::RouteRefresh(_))
                        && self.fsm.state() == State::Established
                    {
                        // RFC 2918: send the whole Adj-RIB-Out again.
                        self.sent.clear();
                        self.refresh = true;
                    }
                    outs.extend(self.fsm.handle(Event::Message(d.message), now));
                }
                Err(e) => {
                    warn!(neighbor = %self.cfg.address, error = %e, "bad BGP message; closing");
                    self.buf.clear();
                    outs.extend(self.protocol_error(&e));
                    return outs;
                }
            }
        }
    }

    async fn send(&mut self, m: &BgpMessage) -> bool {
        let Some(s) = self.stream.as_mut() else {
            return false;
        };
        let Ok(bytes) = wire::encode(m) else {
            return false;
        };
        match tokio::time::timeout(Duration::from_secs(5), s.write_all(&bytes)).await {
            Ok(Ok(())) => {
                if let BgpMessage::Notification(n) = m {
                    let code = wire::notification_code(n).0;
                    self.with_status(|st| *st.notifications_out.entry(code).or_default() += 1);
                }
                true
            }
            _ => {
                self.stream = None;
                false
            }
        }
    }

    fn apply<'a>(
        &'a mut self,
        outs: Vec<Output>,
        connecting: &'a mut Option<Connecting>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let mut more = Vec::new();
            for o in outs {
                match o {
                    Output::Connect => {
                        let addr = SocketAddr::new(self.cfg.address, self.cfg.remote_port);
                        let key = self.cfg.password.clone();
                        let gtsm = self.cfg.ttl_security;
                        debug!(neighbor = %self.cfg.address, md5 = key.is_some(), gtsm, "BGP connecting");
                        *connecting = Some(Box::pin(async move {
                            crate::socket::connect(
                                addr,
                                key.as_deref().map(str::as_bytes),
                                gtsm,
                                CONNECT_TIMEOUT,
                            )
                            .await
                        }));
                    }
                    Output::Send(m) => {
                        if !self.send(&m).await {
                            more.extend(self.fsm.handle(Event::TcpConnectionFails, Instant::now()));
                        }
                    }
                    Output::Disconnect => {
                        if let Some(mut s) = self.stream.take() {
                            let _ = s.shutdown().await;
                        }
                        *connecting = None;
                        self.sent.clear();
                        self.with_status(|st| st.prefixes_received = 0);
                    }
                    Output::Established(p) => {
                        info!(neighbor = %self.cfg.address, asn = p.asn, hold = self.fsm.hold_time_s(), "BGP session established");
                        // The session's family carries the VIPs of that family: say so when the
                        // peer did not take it (e.g. FRR without `neighbor X activate` under
                        // `address-family ipv6 unicast`).
                        let (family, negotiated) = if self.cfg.address.is_ipv6() {
                            ("IPv6", p.ipv6_unicast)
                        } else {
                            ("IPv4", p.ipv4_unicast)
                        };
                        let note = (!negotiated).then(|| {
                            format!("the peer did not negotiate {family} unicast: no {family} VIPs are sent on this session")
                        });
                        if let Some(n) = &note {
                            warn!(neighbor = %self.cfg.address, "{n}");
                        }
                        self.with_status(|st| st.last_error = note);
                        self.sent.clear();
                        self.sync_routes().await;
                    }
                    Output::Down(why) => {
                        warn!(neighbor = %self.cfg.address, %why, "BGP session down");
                        self.with_status(|st| st.last_error = Some(why));
                    }
                    Output::StateChange(from, to) => {
                        debug!(neighbor = %self.cfg.address, from = from.name(), to = to.name(), "BGP state");
                        self.with_status(|st| {
                            st.state = to;
                            st.since = Some(SystemTime::now());
                            st.transitions += 1;
                            if to != State::Established {
                                st.prefixes_sent = 0;
                            }
                        });
                    }
                }
            }
            if !more.is_empty() {
                self.apply(more, connecting).await;
            }
        })
    }

    /// Sends what changed since the last sync: withdrawals, then announcements grouped by
    /// identical attributes. A session carries the routes of its own transport family (the
    /// next hop is our end of it), when the peer negotiated that family.
    async fn sync_routes(&mut self) {
        let Some(local) = self
            .status
            .lock()
            .ok()
            .and_then(|s| s.local)
            .map(|a| a.ip().to_canonical())
        else {
            return;
        };
        let negotiated = self
            .fsm
            .peer()
            .map(|p| match local {
                IpAddr::V4(_) => p.ipv4_unicast,
                IpAddr::V6(_) => p.ipv6_unicast,
            })
            .unwrap_or(false);
        let all = self.routes.borrow_and_update().clone();
        let want: Routes = if negotiated {
            all.iter()
                .filter(|(p, _)| p.addr().is_ipv6() == local.is_ipv6())
                .map(|(p, a)| (*p, a.clone()))
                .collect()
        } else {
            Routes::new()
        };
        let gone: Vec<IpNet> = self
            .sent
            .keys()
            .filter(|p| !want.contains_key(p))
            .copied()
            .collect();
        let mut groups: BTreeMap<Vec<u8>, (RouteAttrs, Vec<IpNet>)> = BTreeMap::new();
        for (p, a) in want.iter() {
            if self.sent.get(p) != Some(a) {
                let key = format!("{a:?}").into_bytes();
                groups
                    .entry(key)
                    .or_insert_with(|| (a.clone(), Vec::new()))
                    .1
                    .push(*p);
            }
        }
        let mut updates = 0u64;
        let per_update = wire::prefixes_per_update(local.is_ipv6());
        for chunk in gone.chunks(per_update) {
            let (v4, v6) = split(chunk);
            for m in [
                (!v4.is_empty()).then(|| wire::withdraw(&v4)),
                (!v6.is_empty()).then(|| wire::withdraw6(&v6)),
            ]
            .into_iter()
            .flatten()
            {
                if !self.send(&m).await {
                    return;
                }
                updates += 1;
            }
        }
        let ebgp = self.fsm.ebgp();
        let local_as = self.fsm.params().local_as;
        for (attrs, prefixes) in groups.values() {
            for chunk in prefixes.chunks(per_update) {
                let m = match local {
                    IpAddr::V4(nh) => wire::announce(&split(chunk).0, attrs, local_as, ebgp, nh),
                    IpAddr::V6(nh) => wire::announce6(&split(chunk).1, attrs, local_as, ebgp, nh),
                };
                if !self.send(&m).await {
                    return;
                }
                updates += 1;
            }
        }
        for p in &gone {
            self.sent.remove(p);
        }
        for (p, a) in want.iter() {
            self.sent.insert(*p, a.clone());
        }
        if updates > 0 {
            self.fsm.sent_update(Instant::now());
        }
        let n = self.sent.len() as u64;
        self.with_status(|st| {
            st.updates_out += updates;
            st.prefixes_sent = n;
        });
    }
}

/// IPv4 and IPv6 prefixes of a list.
fn split(prefixes: &[IpNet]) -> (Vec<Ipv4Net>, Vec<Ipv6Net>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for p in prefixes {
        match p {
            IpNet::V4(n) => v4.push(*n),
            IpNet::V6(n) => v6.push(*n),
        }
    }
    (v4, v6)
}
