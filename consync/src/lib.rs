//! `ferrolb-consync` — connection-tracking state sync between LB nodes.
//!
//! A gRPC service (tonic, TCP 22222) between every pair of nodes in `--cluster`. Each node
//! serves the flows it created itself (origin = its node id) and subscribes to every peer:
//!
//! - a subscription resumes from (epoch, sequence) when the server's [`log::ChangeLog`] still
//!   holds what the subscriber misses; otherwise it starts with a bulk snapshot, followed by the
//!   live changes from the snapshot's sequence number on, so there is no gap; after a snapshot
//!   the subscriber removes the peer's flows the snapshot did not contain, so nothing stale is
//!   left behind;
//! - a sequence gap seen by a subscriber, an overflowing log, or [`Consync::resync`] (the
//!   agent calls it when the datapath lost ring-buffer events) makes the subscriber start
//!   over with a snapshot, and is counted;
//! - batches are bounded by count ([`Config::batch_max`]) and time ([`Config::batch_delay`]);
//!   an idle stream carries a heartbeat every [`Config::heartbeat`], and every batch carries
//!   the server's [`pb::NodeStatus`] (roles and terms), so the channel is also the role
//!   exchange;
//! - only the configured peers' addresses may connect (others are refused at accept and
//!   counted, token or not); peers also authenticate with a shared token
//!   (`authorization: Bearer …`) or mutual TLS;
//! - a [`pb::HandoverRequest`] is taken only from the peer address whose subscription reported
//!   the node id the request claims.
//! - what one peer address can make the server hold is bounded (`gate.rs`): connections
//!   ([`Config::max_connections_per_peer`]; a new one takes the place of the oldest that never
//!   carried an accepted request), subscriptions ([`Config::max_streams_per_peer`]; a new one
//!   ends the oldest), snapshot walks (one per address, [`Config::max_snapshot_walks`] in all:
//!   each holds a thread of the blocking pool), and a subscriber that takes nothing for
//!   [`Config::stall_timeout`] is ended.
//!
//! The crate knows nothing of datapaths or roles: the agent implements [`Node`].

pub mod flow;
mod gate;
pub mod log;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use ferrolb_proto::consync as pb;
use pb::con_sync_client::ConSyncClient;
use pb::con_sync_server::{ConSync, ConSyncServer};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

pub use crate::flow::{Change, Flow, FlowError, FlowKey, Numbered};
use crate::log::{ChangeLog, Resume};

/// The sync port.
pub const PORT: u16 = 22222;

/// Upper bounds (ms) of the sync-lag buckets; the last one takes everything.
pub const LAG_BUCKETS_MS: [u64; 9] = [5, 10, 25, 50, 100, 250, 500, 1000, u64::MAX];

/// HTTP/2 flow-control windows: a bulk snapshot streams megabytes, which the 64 KiB default
/// would hold to one window per round trip.
const WINDOW: u32 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{what}: {detail}")]
    Tls { what: String, detail: String },
    #[error("peer {0} is not connected")]
    NotConnected(SocketAddr),
    #[error("peer {peer}: {detail}")]
    Rpc { peer: SocketAddr, detail: String },
}

/// Files for mutual TLS: this node's certificate and key, and the CA that signs the peers'.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub node_id: u32,
    pub listen: SocketAddr,
    pub peers: Vec<SocketAddr>,
    /// The source address of our connections to peers (the address they know us by); the
    /// routing table's choice when `None`.
    pub source: Option<IpAddr>,
    /// Shared secret; a subscriber without it is refused (and counted).
    pub token: Option<String>,
    pub tls: Option<TlsFiles>,
    pub log_capacity: usize,
    pub batch_max: usize,
    pub batch_delay: Duration,
    pub heartbeat: Duration,
    /// A subscription that hears nothing for this long is dropped and reconnected.
    pub dead_after: Duration,
    /// Ask peers for packed flow records (true). False subscribes as a node of an older
    /// version does, with explicit messages (tests of mixed versions).
    pub packed: bool,
    /// Connections open at once from one peer address (a new one at the limit takes the
    /// place of the oldest that has not carried an accepted request, or is refused).
    pub max_connections_per_peer: usize,
    /// Subscriptions served at once to one peer address (a new one ends the oldest).
    pub max_streams_per_peer: usize,
    /// A subscriber that takes nothing for this long is ended (its snapshot walk stops).
    pub stall_timeout: Duration,
    /// Snapshot walks at once (each holds a thread of the blocking pool until it ends; keep
    /// this below the pool's size so that installs still find threads). One address walks
    /// one at a time.
    pub max_snapshot_walks: usize,
}

impl Config {
    pub fn new(node_id: u32, listen: SocketAddr, peers: Vec<SocketAddr>) -> Config {
        Config {
            node_id,
            listen,
            peers,
            source: None,
            token: None,
            tls: None,
            log_capacity: 1 << 20,
            batch_max: 1024,
            batch_delay: Duration::from_millis(2),
            heartbeat: Duration::from_millis(100),
            dead_after: Duration::from_millis(1000),
            packed: true,
            max_connections_per_peer: 8,
            max_streams_per_peer: 4,
            stall_timeout: Duration::from_secs(10),
            max_snapshot_walks: 2,
        }
    }
}

/// What the agent provides. The blocking methods run on tokio's blocking pool.
pub trait Node: Send + Sync + 'static {
    /// Every flow this node created and still holds (for a snapshot), handed to `emit` a
    /// chunk at a time as the table is walked, so that the first chunks travel while the
    /// walk goes on. Stops when `emit` returns false (the subscriber left). Blocking.
    fn own_flows(&self, emit: &mut dyn FnMut(Vec<Flow>) -> bool);
    /// Installs or removes a peer's flows; returns how many were applied. Blocking.
    fn apply(&self, origin: u32, upserts: &[Flow], deletes: &[FlowKey]) -> u64;
    /// The keys of every flow from `origin` this node holds. Read when a snapshot from
    /// `origin` starts (while it arrives): those the snapshot does not contain are stale.
    /// Blocking.
    fn flows_of(&self, origin: u32) -> HashSet<FlowKey>;
    /// After a snapshot from `origin`: removes these stale flows (still from `origin`);
    /// returns how many went. Blocking.
    fn remove_stale(&self, origin: u32, keys: &[FlowKey]) -> u64;
    /// `n` flows from `origin` were refused as malformed before reaching [`Node::apply`].
    fn malformed(&self, origin: u32, n: u64);
    /// This node's status, sent with every batch.
    fn status(&self) -> pb::NodeStatus;
    /// A peer's status arrived (`Some`) or its channel was lost (`None`).
    fn peer_status(&self, peer: SocketAddr, status: Option<&pb::NodeStatus>);
    /// A planned switchover: take `req.instance`'s MASTER role; the caller's state has been
    /// applied. `from` is the configured address of the peer that asked (checked: it is the
    /// address the request came from, and that peer reported `req.node_id`). Returns the new
    /// term, or why not.
    fn handover(&self, from: SocketAddr, req: &pb::HandoverRequest) -> Result<u64, String>;
}

/// What one subscription (this node reading a peer) knows.
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    pub addr: Option<SocketAddr>,
    pub node_id: Option<u32>,
    pub connected: bool,
    /// The peer's epoch and the next sequence number we expect from it.
    pub epoch: u64,
    pub next_seq: u64,
    /// How far behind the peer's log we are, in changes (at its last batch).
    pub behind: u64,
    pub snapshots: u64,
    pub synced_once: bool,
    pub received: u64,
    pub applied: u64,
    pub resyncs: u64,
    pub disconnects: u64,
    /// Send-to-apply delay of the last batch that carried changes, in seconds.
    pub lag_s: f64,
    /// Batches that carried changes, by send-to-apply delay: `lag_batches[i]` counts those
    /// within [`LAG_BUCKETS_MS`]`[i]` (cumulative, the last bucket is every batch).
    pub lag_batches: [u64; LAG_BUCKETS_MS.len()],
    pub last_heard: Option<Instant>,
    pub last_error: Option<String>,
}

/// Node-wide counters.
#[derive(Debug, Default)]
pub struct Stats {
    pub sent: AtomicU64,
    pub streams: AtomicU64,
    /// Connections and requests refused: an address outside the cluster, a bad or missing
    /// token, a failed TLS handshake, a Handover whose sender is not the node it claims.
    pub refused: AtomicU64,
    /// Of those, connections from an address that is not a configured peer's.
    pub refused_address: AtomicU64,
    /// Of those, connections from a peer address that had
    /// [`Config::max_connections_per_peer`] open, all in use, and Handover requests from a
    /// peer that had one in progress.
    pub refused_limit: AtomicU64,
    /// Connections open now (from peer addresses).
    pub connections: AtomicU64,
    /// Connections closed for a newer one from their address (they had carried no accepted
    /// request).
    pub evicted: AtomicU64,
    /// Subscriptions ended for a newer one from their address
    /// ([`Config::max_streams_per_peer`]).
    pub streams_ended_limit: AtomicU64,
    /// Subscriptions ended because the subscriber took nothing for [`Config::stall_timeout`].
    pub streams_stalled: AtomicU64,
    pub resyncs_served: AtomicU64,
}

/// A subscription being served.
struct Serving {
    /// The subscriber's address.
    from: Option<IpAddr>,
    /// The next sequence number it gets.
    pos: Arc<AtomicU64>,
    /// Ends it (for a newer subscription from its address).
    end: Arc<tokio::sync::Notify>,
}

/// Which subscription a new one from `new` ends (the oldest from its address, once its
/// address has more than `limit`), given the addresses of those served, oldest first, the
/// new one last.
fn to_end(from: &[Option<IpAddr>], new: Option<IpAddr>, limit: usize) -> Option<usize> {
    let mine = from.iter().filter(|f| **f == new).count();
    (mine > limit)
        .then(|| from.iter().position(|f| *f == new))
        .flatten()
}

struct PeerSlot {
    addr: SocketAddr,
    info: Mutex<PeerInfo>,
    wake: tokio::sync::Notify,
    /// A Handover from this peer is being served (one at a time: each waits up to 3 s for
    /// the sync to catch up, so without it one connection could keep hundreds waiting).
    handover: AtomicBool,
}

/// Holds a peer's Handover place; gives it back when the request ends, however it ends (the
/// caller gone drops the request's future, and this with it).
struct HandoverPlace<'a>(&'a AtomicBool);

impl<'a> HandoverPlace<'a> {
    fn take(flag: &'a AtomicBool) -> Option<HandoverPlace<'a>> {
        // Not `then_some`: its argument is built either way, and dropping it would give back
        // a place this call never had.
        (!flag.swap(true, Ordering::AcqRel)).then(|| HandoverPlace(flag))
    }
}

impl Drop for HandoverPlace<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl PeerSlot {
    fn info(&self) -> std::sync::MutexGuard<'_, PeerInfo> {
        self.info.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The running sync service: the server and one subscription per peer.
pub struct Consync {
    cfg: Config,
    log: Arc<ChangeLog>,
    node: Arc<dyn Node>,
    peers: Vec<Arc<PeerSlot>>,
    stats: Arc<Stats>,
    /// The connections open from each peer address.
    gate: Arc<gate::PeerGate>,
    /// The subscriptions being served, oldest first.
    active_streams: Arc<Mutex<Vec<Serving>>>,
    /// Places for snapshot walks: in all, and one per subscriber address (only `--cluster`
    /// addresses connect, so the map holds a few).
    walks: Arc<tokio::sync::Semaphore>,
    walks_from: Mutex<HashMap<Option<IpAddr>, Arc<tokio::sync::Semaphore>>>,
}

impl Consync {
    /// Binds the listener and starts the server and the subscriptions.
    pub async fn start(cfg: Config, node: Arc<dyn Node>) -> Result<Arc<Consync>, Error> {
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| Error::Listen {
                addr: cfg.listen,
                source,
            })?;
        let tls = match &cfg.tls {
            Some(t) => Some(load_tls(t)?),
            None => None,
        };
        let server_tls = match &cfg.tls {
            Some(t) => Some(Arc::new(server_tls(t)?)),
            None => None,
        };
        let stats = Arc::new(Stats::default());
        let gate = gate::PeerGate::new(cfg.max_connections_per_peer, stats.clone());
        let me = Arc::new(Consync {
            log: Arc::new(ChangeLog::new(cfg.log_capacity)),
            node,
            peers: cfg
                .peers
                .iter()
                .map(|a| {
                    Arc::new(PeerSlot {
                        addr: *a,
                        info: Mutex::new(PeerInfo {
                            addr: Some(*a),
                            ..Default::default()
                        }),
                        wake: tokio::sync::Notify::new(),
                        handover: AtomicBool::new(false),
                    })
                })
                .collect(),
            stats,
            gate,
            active_streams: Arc::new(Mutex::new(Vec::new())),
            walks: Arc::new(tokio::sync::Semaphore::new(cfg.max_snapshot_walks.max(1))),
            walks_from: Mutex::new(HashMap::new()),
            cfg,
        });
        let svc = Service { cs: me.clone() };
        let router = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(WINDOW))
            .initial_connection_window_size(Some(WINDOW))
            .http2_keepalive_interval(Some(Duration::from_secs(1)))
            .http2_keepalive_timeout(Some(Duration::from_secs(2)))
            .add_service(ConSyncServer::new(svc));
        let allowed: Arc<HashSet<IpAddr>> =
            Arc::new(me.cfg.peers.iter().map(|p| p.ip().to_canonical()).collect());
        match server_tls {
            None => {
                let incoming = plain_incoming(listener, allowed, me.gate.clone(), me.stats.clone());
                tokio::spawn(async move {
                    if let Err(e) = router.serve_with_incoming(incoming).await {
                        warn!(error = %e, "conntrack sync server stopped");
                    }
                });
            }
            Some(config) => {
                // Our own acceptor, so that a peer failing the handshake (no certificate, or
                // one the CA did not sign) is counted as refused.
                let incoming =
                    tls_incoming(listener, config, allowed, me.gate.clone(), me.stats.clone());
                tokio::spawn(async move {
                    if let Err(e) = router.serve_with_incoming(incoming).await {
                        warn!(error = %e, "conntrack sync server stopped");
                    }
                });
            }
        }
        info!(listen = %me.cfg.listen, peers = ?me.cfg.peers, tls = tls.is_some(), "conntrack sync started");
        for slot in &me.peers {
            tokio::spawn(subscribe_loop(me.clone(), slot.clone(), tls.clone()));
        }
        Ok(me)
    }

    /// Appends this node's changes to the log served to peers.
    pub fn publish(&self, changes: Vec<Change>) -> u64 {
        self.log.publish(changes)
    }

    /// Every subscriber starts over with a snapshot (changes may have been lost upstream).
    pub fn resync(&self) {
        self.stats.resyncs_served.fetch_add(1, Ordering::Relaxed);
        self.log.resync();
    }

    /// (epoch, next sequence number) of this node's log.
    pub fn position(&self) -> (u64, u64) {
        self.log.position()
    }

    pub fn peers(&self) -> Vec<PeerInfo> {
        self.peers.iter().map(|p| p.info().clone()).collect()
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Changes not yet sent to the slowest subscriber.
    pub fn queue_depth(&self) -> u64 {
        let next = self.log.position().1;
        let streams = self
            .active_streams
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        streams
            .iter()
            .map(|s| next.saturating_sub(s.pos.load(Ordering::Relaxed)))
            .max()
            .unwrap_or(0)
    }

    /// Drops and re-establishes every subscription (after the peers' addresses changed
    /// reachability, or for tests).
    pub fn reconnect(&self) {
        for p in &self.peers {
            p.wake.notify_one();
        }
    }

    /// Asks the peer with node id `node` to take `instance` once it holds all of our state.
    pub async fn handover(
        &self,
        node: u32,
        instance: &str,
        term: u64,
        timeout: Duration,
    ) -> Result<pb::HandoverReply, Error> {
        let slot = self
            .peers
            .iter()
            .find(|p| p.info().node_id == Some(node))
            .ok_or_else(|| Error::Rpc {
                peer: self.cfg.listen,
                detail: format!("no peer with node id {node}"),
            })?;
        let tls = match &self.cfg.tls {
            Some(t) => Some(load_tls(t)?),
            None => None,
        };
        let mut client = connect(slot.addr, self.cfg.source, tls.as_ref()).await?;
        let (epoch, seq) = self.log.position();
        let mut req = Request::new(pb::HandoverRequest {
            node_id: self.cfg.node_id,
            instance: instance.to_string(),
            term,
            epoch,
            seq,
        });
        req.set_timeout(timeout);
        self.authorize(&mut req);
        client
            .handover(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| Error::Rpc {
                peer: slot.addr,
                detail: s.message().to_string(),
            })
    }

    fn authorize<T>(&self, req: &mut Request<T>) {
        if let Some(t) = &self.cfg.token
            && let Ok(v) = format!("Bearer {t}").parse()
        {
            req.metadata_mut().insert("authorization", v);
        }
    }

    fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(t) = &self.cfg.token else {
            self.gate.in_use(req.remote_addr());
            return Ok(());
        };
        let ok = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|v| constant_time_eq(v.as_bytes(), t.as_bytes()));
        if ok {
            self.gate.in_use(req.remote_addr());
            Ok(())
        } else {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            warn!(peer = ?req.remote_addr(), "conntrack sync: peer refused (bad or missing token)");
            Err(Status::unauthenticated("bad or missing sync token"))
        }
    }

    fn batch(&self, epoch: u64) -> pb::SyncBatch {
        pb::SyncBatch {
            epoch,
            status: Some(self.node.status()),
            sent_unix_ns: unix_ns(),
            next_seq: self.log.position().1,
            ..Default::default()
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

type TlsParts = (tonic::transport::Identity, tonic::transport::Certificate);

/// The server side of mutual TLS: this node's certificate, peers must present one signed by
/// the CA.
fn server_tls(t: &TlsFiles) -> Result<rustls::ServerConfig, Error> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let err = |what: &str, detail: String| Error::Tls {
        what: what.to_string(),
        detail,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&t.cert)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| err("--sync-tls-cert", format!("{}: {e}", t.cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(&t.key)
        .map_err(|e| err("--sync-tls-key", format!("{}: {e}", t.key.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&t.ca)
        .map_err(|e| err("--sync-tls-ca", format!("{}: {e}", t.ca.display())))?
    {
        let c = c.map_err(|e| err("--sync-tls-ca", format!("{}: {e}", t.ca.display())))?;
        roots
            .add(c)
            .map_err(|e| err("--sync-tls-ca", format!("{}: {e}", t.ca.display())))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| err("--sync-tls-ca", e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err("sync TLS", e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| err("--sync-tls-cert/--sync-tls-key", e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

type PeerTcp = gate::Gated<tokio::net::TcpStream>;
type TlsConn = tokio_rustls::server::TlsStream<PeerTcp>;

/// The next connection from a configured peer's address, with a place under its address's
/// limit; others are closed at once and counted (a stranger on the segment gets neither a
/// stream nor a handshake).
async fn accept_peer(
    listener: &tokio::net::TcpListener,
    allowed: &HashSet<IpAddr>,
    gate: &Arc<gate::PeerGate>,
    stats: &Stats,
) -> (PeerTcp, SocketAddr) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "sync accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !allowed.contains(&peer.ip().to_canonical()) {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            let n = stats.refused_address.fetch_add(1, Ordering::Relaxed);
            // A scan must not flood the log: the first refusal and then every 1000th.
            if n.is_multiple_of(1000) {
                warn!(%peer, refused = n + 1, "conntrack sync: connection from an address outside --cluster refused");
            }
            drop(tcp);
            continue;
        }
        let _ = tcp.set_nodelay(true);
        if let Some(tcp) = gate.admit(tcp, peer) {
            return (tcp, peer);
        }
    }
}

/// Plain TCP: the peers' connections, handed to the gRPC server.
fn plain_incoming(
    listener: tokio::net::TcpListener,
    allowed: Arc<HashSet<IpAddr>>,
    gate: Arc<gate::PeerGate>,
    stats: Arc<Stats>,
) -> ReceiverStream<Result<PeerTcp, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let (tcp, _) = accept_peer(&listener, &allowed, &gate, &stats).await;
            if tx.send(Ok(tcp)).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Accepts the peers' TCP connections and completes each TLS handshake in its own task
/// (bounded in time); failures are counted in `Stats::refused`.
fn tls_incoming(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
    allowed: Arc<HashSet<IpAddr>>,
    gate: Arc<gate::PeerGate>,
    stats: Arc<Stats>,
) -> ReceiverStream<Result<TlsConn, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = accept_peer(&listener, &allowed, &gate, &stats).await;
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let stats = stats.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => {
                        // A peer with a certificate the CA signed: its connection keeps its place.
                        s.get_ref().0.mark_in_use();
                        let _ = tx.send(Ok(s)).await;
                    }
                    Ok(Err(e)) => {
                        stats.refused.fetch_add(1, Ordering::Relaxed);
                        warn!(%peer, error = %e, "conntrack sync: peer refused (TLS)");
                    }
                    Err(_) => {
                        stats.refused.fetch_add(1, Ordering::Relaxed);
                        warn!(%peer, "conntrack sync: peer refused (TLS handshake timed out)");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

fn load_tls(t: &TlsFiles) -> Result<TlsParts, Error> {
    let read = |p: &PathBuf, what: &str| {
        std::fs::read(p).map_err(|e| Error::Tls {
            what: format!("{what} {}", p.display()),
            detail: e.to_string(),
        })
    };
    let cert = read(&t.cert, "--sync-tls-cert")?;
    let key = read(&t.key, "--sync-tls-key")?;
    let ca = read(&t.ca, "--sync-tls-ca")?;
    Ok((
        tonic::transport::Identity::from_pem(cert, key),
        tonic::transport::Certificate::from_pem(ca),
    ))
}

async fn connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
    tls: Option<&TlsParts>,
) -> Result<ConSyncClient<tonic::transport::Channel>, Error> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let rpc = |detail: String| Error::Rpc { peer: addr, detail };
    let mut ep = tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| rpc(e.to_string()))?
        .connect_timeout(Duration::from_millis(500))
        .local_address(source)
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(WINDOW))
        .initial_connection_window_size(Some(WINDOW))
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(2));
    if let Some((id, ca)) = tls {
        ep = ep
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(ca.clone())
                    .identity(id.clone()),
            )
            .map_err(|e| rpc(e.to_string()))?;
    }
    let ch = ep.connect().await.map_err(|e| rpc(format!("{e:?}")))?;
    Ok(ConSyncClient::new(ch)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

struct Service {
    cs: Arc<Consync>,
}

type BatchStream = ReceiverStream<Result<pb::SyncBatch, Status>>;

#[tonic::async_trait]
impl ConSync for Service {
    type SubscribeStream = BatchStream;

    async fn subscribe(
        &self,
        req: Request<pb::SubscribeRequest>,
    ) -> Result<Response<BatchStream>, Status> {
        self.cs.check(&req)?;
        let remote = req.remote_addr();
        let r = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let cs = self.cs.clone();
        cs.stats.streams.fetch_add(1, Ordering::Relaxed);
        debug!(
            ?remote,
            node = r.node_id,
            epoch = r.epoch,
            next = r.next_seq,
            "sync subscriber"
        );
        let from = remote.map(|a| a.ip().to_canonical());
        let pos = Arc::new(AtomicU64::new(r.next_seq));
        let end = Arc::new(tokio::sync::Notify::new());
        let ended = {
            let mut s = cs.active_streams.lock().unwrap_or_else(|p| p.into_inner());
            s.push(Serving {
                from,
                pos: pos.clone(),
                end: end.clone(),
            });
            let addrs: Vec<Option<IpAddr>> = s.iter().map(|s| s.from).collect();
            to_end(&addrs, from, cs.cfg.max_streams_per_peer.max(1)).map(|i| s.remove(i))
        };
        if let Some(old) = ended {
            cs.stats.streams_ended_limit.fetch_add(1, Ordering::Relaxed);
            debug!(
                ?remote,
                "sync stream ended for a newer subscription from its address"
            );
            old.end.notify_one();
        }
        tokio::spawn(async move {
            let res = tokio::select! {
                r = serve(&cs, &tx, from, (r.epoch, r.next_seq), r.packed, &pos) => r,
                _ = end.notified() => Err("ended for a newer subscription from its address".into()),
            };
            cs.active_streams
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|s| !Arc::ptr_eq(&s.pos, &pos));
            if let Err(e) = res {
                debug!(?remote, error = %e, "sync stream ended");
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn handover(
        &self,
        req: Request<pb::HandoverRequest>,
    ) -> Result<Response<pb::HandoverReply>, Status> {
        self.cs.check(&req)?;
        let remote = req.remote_addr().map(|a| a.ip().to_canonical());
        let r = req.into_inner();
        // The sender must be the peer whose own stream reported the node id it claims.
        let Some(slot) = self.cs.peers.iter().find(|p| {
            let i = p.info();
            i.node_id == Some(r.node_id) && Some(p.addr.ip().to_canonical()) == remote
        }) else {
            self.cs.stats.refused.fetch_add(1, Ordering::Relaxed);
            warn!(
                ?remote,
                claimed = r.node_id,
                "conntrack sync: Handover refused (the sender is not that node)"
            );
            return Err(Status::permission_denied(format!(
                "Handover refused: {} is not the address of node {}",
                remote.map_or_else(|| "an unknown address".to_string(), |a| a.to_string()),
                r.node_id
            )));
        };
        let from = slot.addr;
        let Some(_place) = HandoverPlace::take(&slot.handover) else {
            self.cs.stats.refused.fetch_add(1, Ordering::Relaxed);
            let n = self.cs.stats.refused_limit.fetch_add(1, Ordering::Relaxed);
            if n.is_multiple_of(1000) {
                warn!(
                    ?remote,
                    node = r.node_id,
                    refused = n + 1,
                    "conntrack sync: Handover refused, one from that node is in progress"
                );
            }
            return Err(Status::resource_exhausted(format!(
                "Handover refused: one from node {} is in progress",
                r.node_id
            )));
        };
        // Wait until we have applied everything the caller had published when it asked.
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let caught_up = {
                let i = slot.info();
                i.node_id == Some(r.node_id)
                    && i.connected
                    && i.synced_once
                    && i.epoch == r.epoch
                    && i.next_seq >= r.seq
            };
            if caught_up {
                break;
            }
            if Instant::now() > deadline {
                return Ok(Response::new(pb::HandoverReply {
                    accepted: false,
                    term: 0,
                    reason: format!(
                        "not caught up with node {} (epoch {}, seq {}) within 3 s",
                        r.node_id, r.epoch, r.seq
                    ),
                }));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let node = self.cs.node.clone();
        let reply = match tokio::task::spawn_blocking(move || node.handover(from, &r)).await {
            Ok(Ok(term)) => pb::HandoverReply {
                accepted: true,
                term,
                reason: String::new(),
            },
            Ok(Err(reason)) => pb::HandoverReply {
                accepted: false,
                term: 0,
                reason,
            },
            Err(e) => return Err(Status::internal(e.to_string())),
        };
        Ok(Response::new(reply))
    }
}

type Tx = tokio::sync::mpsc::Sender<Result<pb::SyncBatch, Status>>;

/// One subscriber's stream: snapshot when needed, then changes and heartbeats.
async fn serve(
    cs: &Arc<Consync>,
    tx: &Tx,
    from: Option<IpAddr>,
    (epoch, next_seq): (u64, u64),
    packed: bool,
    pos: &AtomicU64,
) -> Result<(), String> {
    let mut wake = cs.log.subscribe();
    let (mut epoch, mut next) = match cs.log.resume(epoch, next_seq) {
        Resume::From(n) => (epoch, n),
        Resume::Snapshot => send_snapshot(cs, tx, from, packed).await?,
    };
    pos.store(next, Ordering::Relaxed);
    let mut last_sent = Instant::now();
    loop {
        match cs.log.read(epoch, next, cs.cfg.batch_max) {
            None => {
                // Our log moved on (new epoch, or the subscriber fell out of it).
                (epoch, next) = send_snapshot(cs, tx, from, packed).await?;
                pos.store(next, Ordering::Relaxed);
                continue;
            }
            Some(changes) if !changes.is_empty() => {
                let full = changes.len() >= cs.cfg.batch_max;
                if !full && last_sent.elapsed() < cs.cfg.batch_delay {
                    // Let a burst accumulate for a few milliseconds.
                    tokio::time::sleep(cs.cfg.batch_delay).await;
                    if let Some(more) = cs.log.read(epoch, next, cs.cfg.batch_max)
                        && more.len() > changes.len()
                    {
                        continue;
                    }
                }
                next = changes.last().map_or(next, |c| c.seq + 1);
                let n = changes.len() as u64;
                let mut b = cs.batch(epoch);
                if packed {
                    let mut buf = Vec::with_capacity(changes.len() * flow::RECORD);
                    for c in &changes {
                        flow::encode(c, &mut buf);
                    }
                    b.packed_changes = buf.into();
                } else {
                    b.changes = changes.iter().map(pb::Change::from).collect();
                }
                send(cs, tx, b).await?;
                cs.stats.sent.fetch_add(n, Ordering::Relaxed);
                pos.store(next, Ordering::Relaxed);
                last_sent = Instant::now();
                continue;
            }
            Some(_) => {}
        }
        let hb = cs.cfg.heartbeat.saturating_sub(last_sent.elapsed());
        tokio::select! {
            r = wake.changed() => { if r.is_err() { return Ok(()); } }
            _ = tokio::time::sleep(hb) => {
                if last_sent.elapsed() >= cs.cfg.heartbeat {
                    send(cs, tx, cs.batch(epoch)).await?;
                    last_sent = Instant::now();
                }
            }
            _ = tx.closed() => return Ok(()),
        }
    }
}

/// Hands a batch to the subscriber's stream. A subscriber that takes nothing for
/// [`Config::stall_timeout`] (its HTTP/2 window full, the stream's queue full) is ended, and
/// with it a snapshot walk waiting for room.
async fn send(cs: &Consync, tx: &Tx, b: pb::SyncBatch) -> Result<(), String> {
    match tokio::time::timeout(cs.cfg.stall_timeout, tx.send(Ok(b))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err("subscriber gone".into()),
        Err(_) => {
            cs.stats.streams_stalled.fetch_add(1, Ordering::Relaxed);
            Err(format!(
                "the subscriber took nothing for {:?}",
                cs.cfg.stall_timeout
            ))
        }
    }
}

/// Sends a snapshot; returns the (epoch, sequence) the live changes continue from. The
/// table is walked on the blocking pool and each chunk is sent as soon as it is read, so the
/// subscriber installs the first flows while the walk goes on.
async fn send_snapshot(
    cs: &Arc<Consync>,
    tx: &Tx,
    from: Option<IpAddr>,
    packed: bool,
) -> Result<(u64, u64), String> {
    let places = walk_places(cs, tx, from).await?;
    // Changes from `next` on are in the log (or force another snapshot): the snapshot is at
    // least as new as `next - 1`, and re-applying a change it already contains is harmless.
    let (epoch, next) = cs.log.position();
    let node = cs.node.clone();
    let (ctx, mut chunks) = tokio::sync::mpsc::channel::<Vec<Flow>>(4);
    // The walk holds its places until its thread is done: a subscriber that goes away (or
    // stalls) ends it at its next chunk, after this function has returned.
    let mut walk = tokio::task::spawn_blocking(move || {
        let _places = places;
        node.own_flows(&mut |chunk| chunk.is_empty() || ctx.blocking_send(chunk).is_ok());
    });
    // Walking a large table takes a while: heartbeats keep the subscriber from giving up
    // while no chunk comes.
    let mut hb = tokio::time::interval(cs.cfg.heartbeat);
    hb.tick().await;
    let mut total = 0usize;
    let mut walking = true;
    loop {
        tokio::select! {
            c = chunks.recv() => {
                let Some(part) = c else { break };
                let n = part.len();
                total += n;
                let mut b = cs.batch(epoch);
                snapshot_part(&mut b, &part, packed);
                send(cs, tx, b).await?;
                cs.stats.sent.fetch_add(n as u64, Ordering::Relaxed);
                hb.reset();
            }
            r = &mut walk, if walking => {
                r.map_err(|e| e.to_string())?;
                walking = false;
            }
            _ = hb.tick() => {
                send(cs, tx, cs.batch(epoch)).await?;
            }
        }
    }
    if walking {
        walk.await.map_err(|e| e.to_string())?;
    }
    let mut b = cs.batch(epoch);
    b.snapshot_done = true;
    b.snapshot_seq = next;
    send(cs, tx, b).await?;
    debug!(flows = total, epoch, next, packed, "sync snapshot sent");
    Ok((epoch, next))
}

/// Waits for a place to walk the table: one of [`Config::max_snapshot_walks`], and its
/// address's one. Heartbeats meanwhile keep the subscriber from giving up.
async fn walk_places(
    cs: &Arc<Consync>,
    tx: &Tx,
    from: Option<IpAddr>,
) -> Result<[tokio::sync::OwnedSemaphorePermit; 2], String> {
    let mine = cs
        .walks_from
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(from)
        .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(1)))
        .clone();
    let places = async {
        let a = mine.acquire_owned().await?;
        let b = cs.walks.clone().acquire_owned().await?;
        Ok::<_, tokio::sync::AcquireError>([a, b])
    };
    tokio::pin!(places);
    let mut hb = tokio::time::interval(cs.cfg.heartbeat);
    hb.tick().await;
    loop {
        tokio::select! {
            p = &mut places => return p.map_err(|e| e.to_string()),
            _ = hb.tick() => send(cs, tx, cs.batch(cs.log.position().0)).await?,
        }
    }
}

/// Puts a chunk of a snapshot into `b`, packed or explicit.
fn snapshot_part(b: &mut pb::SyncBatch, part: &[Flow], packed: bool) {
    if packed {
        let mut buf = Vec::with_capacity(part.len() * flow::RECORD);
        for f in part {
            flow::encode(
                &Numbered {
                    seq: 0,
                    change: Change::Upsert(*f),
                },
                &mut buf,
            );
        }
        b.packed_snapshot = buf.into();
    } else {
        b.snapshot = part.iter().map(pb::Flow::from).collect();
    }
}

/// Keeps a subscription to one peer alive: connect, subscribe, apply, reconnect.
async fn subscribe_loop(cs: Arc<Consync>, slot: Arc<PeerSlot>, tls: Option<TlsParts>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let r = subscribe_once(&cs, &slot, tls.as_ref()).await;
        let was_connected = {
            let mut i = slot.info();
            let was = i.connected;
            i.connected = false;
            if let Err(e) = &r {
                i.last_error = Some(e.clone());
            }
            if was {
                i.disconnects += 1;
            }
            was
        };
        if was_connected {
            cs.node.peer_status(slot.addr, None);
            warn!(peer = %slot.addr, error = ?r.err(), "conntrack sync channel lost");
            backoff = Duration::from_millis(100);
        } else {
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = slot.wake.notified() => {}
        }
    }
}

async fn subscribe_once(
    cs: &Arc<Consync>,
    slot: &Arc<PeerSlot>,
    tls: Option<&TlsParts>,
) -> Result<(), String> {
    let mut client = connect(slot.addr, cs.cfg.source, tls)
        .await
        .map_err(|e| e.to_string())?;
    let (epoch, next_seq) = {
        let i = slot.info();
        (i.epoch, i.next_seq)
    };
    let mut req = Request::new(pb::SubscribeRequest {
        node_id: cs.cfg.node_id,
        epoch,
        next_seq,
        packed: cs.cfg.packed,
    });
    cs.authorize(&mut req);
    let mut stream = client
        .subscribe(req)
        .await
        .map_err(|s| format!("subscribe: {}", s.message()))?
        .into_inner();
    // The snapshot being received: the keys of the flows from this peer we held when it
    // started (read while it arrives), and the keys it contained.
    let mut snap: Option<Snapshot> = None;
    loop {
        let msg = tokio::select! {
            m = tokio::time::timeout(cs.cfg.dead_after, stream.message()) => m,
            _ = slot.wake.notified() => return Err("reconnect requested".into()),
        };
        let batch = match msg {
            Err(_) => return Err(format!("silent for {:?}", cs.cfg.dead_after)),
            Ok(Err(s)) => return Err(format!("stream: {}", s.message())),
            Ok(Ok(None)) => return Err("stream closed by the peer".into()),
            Ok(Ok(Some(b))) => b,
        };
        let origin = batch.status.as_ref().map(|s| s.node_id);
        {
            let mut i = slot.info();
            if !i.connected {
                info!(peer = %slot.addr, node = ?origin, "conntrack sync channel up");
            }
            i.connected = true;
            i.node_id = origin.or(i.node_id);
            i.last_heard = Some(Instant::now());
        }
        cs.node.peer_status(slot.addr, batch.status.as_ref());
        let Some(origin) = origin else {
            return Err("batch without status".into());
        };
        if !batch.snapshot.is_empty() || !batch.packed_snapshot.is_empty() || batch.snapshot_done {
            let s = snap.get_or_insert_with(|| {
                let node = cs.node.clone();
                Snapshot {
                    held: Some(tokio::task::spawn_blocking(move || node.flows_of(origin))),
                    held_none: false,
                    seen: std::collections::HashMap::new(),
                    received: 0,
                }
            });
            let (flows, refused) = if batch.packed_snapshot.is_empty() {
                split_refused(batch.snapshot.iter().map(Flow::try_from))
            } else {
                let it = flow::decode(&batch.packed_snapshot).map_err(|e| e.to_string())?;
                split_refused(it.map(|r| {
                    r.and_then(|c| match c.change {
                        Change::Upsert(f) => Ok(f),
                        Change::Delete(_) => Err(FlowError::Field {
                            field: "kind",
                            reason: "a delete inside a snapshot",
                        }),
                    })
                }))
            };
            if refused > 0 {
                cs.node.malformed(origin, refused);
            }
            // Whether any of our flows could be stale: once the read of what we held has
            // finished and found none, the snapshot's keys need not be kept.
            if !s.held_none
                && let Some(h) = s.held.take_if(|h| h.is_finished())
            {
                let held = h.await.map_err(|e| e.to_string())?;
                s.held_none = held.is_empty();
                for k in held {
                    s.seen.entry(k).or_insert(false);
                }
            }
            if !s.held_none {
                for f in &flows {
                    s.seen.insert(f.key, true);
                }
            }
            let n = flows.len() as u64 + refused;
            s.received += n;
            let applied = apply(cs, origin, flows, Vec::new()).await?;
            {
                let mut i = slot.info();
                i.received += n;
                i.applied += applied;
                if batch.snapshot_done {
                    i.epoch = batch.epoch;
                    i.next_seq = batch.snapshot_seq;
                }
            }
            if batch.snapshot_done {
                let Some(mut s) = snap.take() else {
                    continue;
                };
                if let Some(h) = s.held.take() {
                    let held = h.await.map_err(|e| e.to_string())?;
                    for k in held {
                        s.seen.entry(k).or_insert(false);
                    }
                }
                // Held before, not in the snapshot: stale.
                let stale: Vec<FlowKey> = s
                    .seen
                    .into_iter()
                    .filter_map(|(k, in_snapshot)| (!in_snapshot).then_some(k))
                    .collect();
                let removed = if stale.is_empty() {
                    0
                } else {
                    let node = cs.node.clone();
                    tokio::task::spawn_blocking(move || node.remove_stale(origin, &stale))
                        .await
                        .map_err(|e| e.to_string())?
                };
                let mut i = slot.info();
                i.snapshots += 1;
                i.synced_once = true;
                i.behind = batch.next_seq.saturating_sub(i.next_seq);
                info!(peer = %slot.addr, node = origin, flows = s.received, stale_removed = removed, "sync snapshot applied");
            }
            continue;
        }
        let numbered: Vec<Result<Numbered, FlowError>> = if batch.packed_changes.is_empty() {
            batch.changes.iter().map(Numbered::try_from).collect()
        } else {
            flow::decode(&batch.packed_changes)
                .map_err(|e| e.to_string())?
                .collect()
        };
        if numbered.is_empty() {
            // A heartbeat (also sent while a snapshot is being built).
            let mut i = slot.info();
            if batch.epoch == i.epoch && snap.is_none() {
                i.behind = batch.next_seq.saturating_sub(i.next_seq);
            }
            continue;
        }
        if snap.is_some() {
            return Err("changes inside a snapshot".into());
        }
        // Sequence numbers of refused records still count: a gap is a gap.
        let seqs: Vec<u64> = batch
            .changes
            .iter()
            .map(|c| c.seq)
            .chain(
                batch
                    .packed_changes
                    .chunks_exact(flow::RECORD)
                    .map(|r| u64::from_be_bytes(r[32..40].try_into().unwrap_or([0; 8]))),
            )
            .collect();
        {
            let mut i = slot.info();
            let first = seqs[0];
            if batch.epoch != i.epoch || first != i.next_seq {
                i.resyncs += 1;
                i.epoch = 0;
                i.next_seq = 0;
                warn!(peer = %slot.addr, expected = i.next_seq, got = first, "sync sequence gap: resyncing");
                return Err("sequence gap".into());
            }
            for w in seqs.windows(2) {
                if w[1] != w[0].wrapping_add(1) {
                    i.resyncs += 1;
                    i.epoch = 0;
                    return Err("sequence gap inside a batch".into());
                }
            }
        }
        let last = seqs[seqs.len() - 1];
        let n = seqs.len() as u64;
        let mut ups = Vec::new();
        let mut dels = Vec::new();
        let mut refused = 0;
        for c in numbered {
            match c {
                Ok(Numbered {
                    change: Change::Upsert(f),
                    ..
                }) => ups.push(f),
                Ok(Numbered {
                    change: Change::Delete(k),
                    ..
                }) => dels.push(k),
                Err(_) => refused += 1,
            }
        }
        if refused > 0 {
            cs.node.malformed(origin, refused);
        }
        let applied = apply(cs, origin, ups, dels).await?;
        let mut i = slot.info();
        i.received += n;
        i.applied += applied;
        i.next_seq = last + 1;
        i.behind = batch.next_seq.saturating_sub(i.next_seq);
        let lag_ns = unix_ns().saturating_sub(batch.sent_unix_ns);
        i.lag_s = lag_ns as f64 / 1e9;
        let lag_ms = lag_ns / 1_000_000;
        for (b, n) in LAG_BUCKETS_MS.iter().zip(i.lag_batches.iter_mut()) {
            if lag_ms <= *b {
                *n += 1;
            }
        }
    }
}

/// A snapshot being received.
struct Snapshot {
    /// Reading the keys of the peer's flows this node held when the snapshot started.
    held: Option<tokio::task::JoinHandle<HashSet<FlowKey>>>,
    /// That read found none: nothing can be stale, `seen` is not kept.
    held_none: bool,
    /// Keys held before (false) or received in the snapshot (true).
    seen: std::collections::HashMap<FlowKey, bool>,
    /// Flows received in it.
    received: u64,
}

/// The flows that decoded (from either encoding), and how many were refused.
fn split_refused(it: impl Iterator<Item = Result<Flow, FlowError>>) -> (Vec<Flow>, u64) {
    let mut ok = Vec::with_capacity(it.size_hint().0);
    let mut refused = 0;
    for r in it {
        match r {
            Ok(f) => ok.push(f),
            Err(_) => refused += 1,
        }
    }
    (ok, refused)
}

async fn apply(
    cs: &Arc<Consync>,
    origin: u32,
    ups: Vec<Flow>,
    dels: Vec<FlowKey>,
) -> Result<u64, String> {
    if ups.is_empty() && dels.is_empty() {
        return Ok(0);
    }
    let node = cs.node.clone();
    tokio::task::spawn_blocking(move || node.apply(origin, &ups, &dels))
        .await
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subscription_past_its_address_limit_ends_that_address_oldest() {
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        let b = Some(IpAddr::from([10, 0, 0, 2]));
        // Within the limit: nothing ends.
        assert_eq!(to_end(&[a, b, a], a, 2), None);
        // Past it: the address's oldest, not another address's older one.
        assert_eq!(to_end(&[b, a, b, a, a], a, 2), Some(1));
        assert_eq!(to_end(&[b, a, b, a, a], b, 2), None);
        // An unknown address is an address of its own.
        assert_eq!(to_end(&[None, a, None], None, 1), Some(0));
    }
}
