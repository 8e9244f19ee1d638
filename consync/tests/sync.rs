//! Two (or three) consync instances over loopback in a private network namespace, each
//! backed by an in-memory flow table: snapshot then live changes, resume without a snapshot,
//! resync after the log overflowed (with stale flows removed), token refusal, handover; and
//! what one `--cluster` address can make a node hold (the "peer host" 127.0.0.2): bounded
//! connections (a new one takes the place of the oldest that never carried an accepted
//! request), subscriptions (a new one ends the oldest) and snapshot walks, and no walk held
//! open by a subscriber that stops reading.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferrolb_consync::{Change, Config, Consync, Flow, FlowKey, Node, pb};

#[derive(Default)]
struct FakeNode {
    id: u32,
    own: Mutex<BTreeMap<FlowKey, Flow>>,
    /// (origin, flow) installed from peers.
    synced: Mutex<BTreeMap<FlowKey, (u32, Flow)>>,
    stale_removed: Mutex<u64>,
    peers: Mutex<BTreeMap<SocketAddr, Option<pb::NodeStatus>>>,
    took: Mutex<Vec<String>>,
    /// Snapshot walks in progress, and started.
    walking: AtomicUsize,
    walks: AtomicUsize,
}

struct Walking<'a>(&'a AtomicUsize);
impl Drop for Walking<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Node for FakeNode {
    fn own_flows(&self, emit: &mut dyn FnMut(Vec<Flow>) -> bool) {
        self.walks.fetch_add(1, Ordering::SeqCst);
        self.walking.fetch_add(1, Ordering::SeqCst);
        let _w = Walking(&self.walking);
        // Small chunks, so that a snapshot takes several batches.
        let all: Vec<Flow> = self.own.lock().unwrap().values().copied().collect();
        for c in all.chunks(7) {
            if !emit(c.to_vec()) {
                return;
            }
        }
    }
    fn apply(&self, origin: u32, ups: &[Flow], dels: &[FlowKey]) -> u64 {
        let mut s = self.synced.lock().unwrap();
        for f in ups {
            s.insert(f.key, (origin, *f));
        }
        for k in dels {
            s.remove(k);
        }
        (ups.len() + dels.len()) as u64
    }
    fn flows_of(&self, origin: u32) -> HashSet<FlowKey> {
        let s = self.synced.lock().unwrap();
        s.iter()
            .filter(|(_, (o, _))| *o == origin)
            .map(|(k, _)| *k)
            .collect()
    }
    fn remove_stale(&self, origin: u32, keys: &[FlowKey]) -> u64 {
        let mut s = self.synced.lock().unwrap();
        let mut n = 0;
        for k in keys {
            if s.get(k).is_some_and(|(o, _)| *o == origin) {
                s.remove(k);
                n += 1;
            }
        }
        *self.stale_removed.lock().unwrap() += n;
        n
    }
    fn malformed(&self, _origin: u32, _n: u64) {}
    fn status(&self) -> pb::NodeStatus {
        pb::NodeStatus {
            node_id: self.id,
            ready: true,
            instances: vec![],
            ..Default::default()
        }
    }
    fn peer_status(&self, peer: SocketAddr, status: Option<&pb::NodeStatus>) {
        self.peers.lock().unwrap().insert(peer, status.cloned());
    }
    fn handover(&self, _from: SocketAddr, req: &pb::HandoverRequest) -> Result<u64, String> {
        self.took.lock().unwrap().push(req.instance.clone());
        Ok(req.term + 1)
    }
}

fn flow(origin: u32, port: u16) -> Flow {
    Flow {
        key: key(port),
        nat_source: IpAddr::from([203, 0, 113, 10]),
        nat_source_port: 20000 + port,
        endpoint: IpAddr::from([10, 10, 10, 11]),
        endpoint_port: 9000,
        mode: 2,
        state: pb::TcpState::Established as u8,
        fin: 0,
        timeout_s: 240,
        origin,
        age_ms: 1000,
        idle_ms: 5,
    }
}

fn key(port: u16) -> FlowKey {
    FlowKey {
        protocol: pb::Protocol::Tcp as u8,
        client: IpAddr::from([198, 51, 100, 2]),
        client_port: port,
        vip: IpAddr::from([203, 0, 113, 10]),
        vip_port: 80,
    }
}

fn wait(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn node(id: u32) -> Arc<FakeNode> {
    Arc::new(FakeNode {
        id,
        ..Default::default()
    })
}

/// A node holding `n` flows of its own (client ports 1..=n).
fn node_with_flows(id: u32, n: u16) -> Arc<FakeNode> {
    let a = node(id);
    for p in 1..=n {
        a.own.lock().unwrap().insert(key(p), flow(id, p));
    }
    a
}

/// [`wait`] from async code (the condition polls on the blocking pool).
async fn wait_async(what: &'static str, limit: Duration, f: impl FnMut() -> bool + Send + 'static) {
    tokio::task::spawn_blocking(move || wait(what, limit, f))
        .await
        .unwrap();
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn synced_ports(n: &FakeNode) -> Vec<u16> {
    n.synced
        .lock()
        .unwrap()
        .values()
        .map(|(_, f)| f.key.client_port)
        .collect()
}

/// Two nodes of this version: packed records.
#[test]
fn snapshot_live_resume_and_resync() {
    if !ferrolb_tests::private_netns("snapshot_live_resume_and_resync") {
        return;
    }
    snapshot_live_resume_and_resync_with(true, 22001);
}

/// A subscriber that does not ask for packed records (an older version): the same sequence
/// in explicit messages.
#[test]
fn snapshot_live_resume_and_resync_explicit() {
    if !ferrolb_tests::private_netns("snapshot_live_resume_and_resync_explicit") {
        return;
    }
    snapshot_live_resume_and_resync_with(false, 22041);
}

fn snapshot_live_resume_and_resync_with(packed: bool, port: u16) {
    let rt = runtime();
    rt.block_on(async {
        let a = node(0);
        let b = node(1);
        // A's flows before anyone subscribes: they arrive in the snapshot.
        for p in 1..=100 {
            a.own.lock().unwrap().insert(key(p), flow(0, p));
        }
        let mut ca = Config::new(0, addr(port), vec![addr(port + 1)]);
        ca.log_capacity = 64;
        let mut cb = Config::new(1, addr(port + 1), vec![addr(port)]);
        cb.packed = packed;
        let sa = Consync::start(ca, a.clone()).await.unwrap();
        let sb = Consync::start(cb, b.clone()).await.unwrap();
        let bb = b.clone();
        let sbb = sb.clone();
        wait_async("B's snapshot of A", Duration::from_secs(5), move || {
            synced_ports(&bb).len() == 100 && sbb.peers()[0].synced_once
        })
        .await;
        let pb = &sb.peers()[0];
        assert!(pb.synced_once && pb.connected);
        assert_eq!(pb.node_id, Some(0));
        assert_eq!(pb.snapshots, 1);
        // Live: 10 new flows and 5 deletes, applied in order.
        let t0 = Instant::now();
        sa.publish(
            (101..=110)
                .map(|p| Change::Upsert(flow(0, p)))
                .chain((1..=5).map(|p| Change::Delete(key(p))))
                .collect(),
        );
        let bb = b.clone();
        wait_async("live changes", Duration::from_secs(2), move || {
            let s = synced_ports(&bb);
            s.len() == 105 && !s.contains(&1) && s.contains(&110)
        })
        .await;
        let live = t0.elapsed();
        assert!(
            live < Duration::from_millis(100),
            "live change took {live:?}"
        );
        // Resume: B reconnects and continues from its sequence number without a snapshot.
        sb.reconnect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        sa.publish(vec![Change::Upsert(flow(0, 111))]);
        let bb = b.clone();
        wait_async("change after resume", Duration::from_secs(2), move || {
            synced_ports(&bb).contains(&111)
        })
        .await;
        let pb = &sb.peers()[0];
        assert_eq!(pb.snapshots, 1, "resumed without a snapshot");
        assert!(pb.disconnects >= 1);
        // Overflow: B is away while A publishes more than its log keeps. A flow A dropped
        // meanwhile (port 6) must not survive on B.
        a.own.lock().unwrap().remove(&key(6));
        for p in 101..=111 {
            a.own.lock().unwrap().insert(key(p), flow(0, p));
        }
        for p in 7..=9 {
            a.own.lock().unwrap().remove(&key(p));
        }
        sb.reconnect();
        // While B reconnects, 200 changes go by (the log keeps 64).
        for p in 200..400 {
            a.own.lock().unwrap().insert(key(p), flow(0, p));
            sa.publish(vec![Change::Upsert(flow(0, p))]);
        }
        let bb = b.clone();
        let aa = a.clone();
        wait_async("resync after overflow", Duration::from_secs(5), move || {
            let mut want: Vec<u16> = aa
                .own
                .lock()
                .unwrap()
                .values()
                .map(|f| f.key.client_port)
                .collect();
            want.sort();
            let mut got = synced_ports(&bb);
            got.sort();
            got == want
        })
        .await;
        assert!(!synced_ports(&b).contains(&6), "stale flow removed");
        assert_eq!(
            *b.stale_removed.lock().unwrap(),
            4,
            "ports 6 to 9 were stale"
        );
        // Every field arrives as sent.
        let got = b.synced.lock().unwrap().get(&key(300)).map(|e| e.1);
        assert_eq!(got, Some(flow(0, 300)));
        // A sees B's status too (full mesh), and B can hand a role to A.
        let aa = a.clone();
        wait_async("A hears B", Duration::from_secs(3), move || {
            aa.peers
                .lock()
                .unwrap()
                .values()
                .any(|s| s.as_ref().is_some_and(|s| s.node_id == 1))
        })
        .await;
        let r = sb
            .handover(0, "llb-inst0", 4, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(r.accepted, "{}", r.reason);
        assert_eq!(r.term, 5);
        assert_eq!(a.took.lock().unwrap().as_slice(), ["llb-inst0"]);
        // An explicit resync (lost ring-buffer events) sends a new snapshot.
        let before = sb.peers()[0].snapshots;
        sa.resync();
        let sbb = sb.clone();
        wait_async("snapshot after resync", Duration::from_secs(3), move || {
            sbb.peers()[0].snapshots > before
        })
        .await;
    });
}

#[test]
fn wrong_token_is_refused_and_counted() {
    if !ferrolb_tests::private_netns("wrong_token_is_refused_and_counted") {
        return;
    }
    let rt = runtime();
    rt.block_on(async {
        let a = node(0);
        a.own.lock().unwrap().insert(key(1), flow(0, 1));
        let b = node(1);
        let mut ca = Config::new(0, addr(22011), vec![addr(22012)]);
        ca.token = Some("s3cret".into());
        let mut cb = Config::new(1, addr(22012), vec![addr(22011)]);
        cb.token = Some("wrong".into());
        let sa = Consync::start(ca, a.clone()).await.unwrap();
        let sb = Consync::start(cb, b.clone()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(
            sa.stats()
                .refused
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 1
        );
        assert!(
            synced_ports(&b).is_empty(),
            "nothing synced without the token"
        );
        let p = &sb.peers()[0];
        assert!(!p.connected);
        assert!(
            p.last_error.as_deref().unwrap_or("").contains("token"),
            "{:?}",
            p.last_error
        );
    });
}

/// Mutual TLS: peers with certificates from the cluster's CA sync; a peer whose certificate
/// another CA signed is refused and counted, and so is one that speaks plain TCP.
#[test]
fn mutual_tls_admits_only_the_clusters_certificates() {
    if !ferrolb_tests::require(
        "mutual_tls_admits_only_the_clusters_certificates",
        &["openssl"],
    ) || !ferrolb_tests::private_netns("mutual_tls_admits_only_the_clusters_certificates")
    {
        return;
    }
    let dir = std::env::temp_dir().join(ferrolb_tests::unique_name("consync-tls"));
    std::fs::create_dir_all(&dir).unwrap();
    struct Gone(std::path::PathBuf);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _gone = Gone(dir.clone());
    ferrolb_tests::certs(&dir, "ca", &["a", "b"]);
    ferrolb_tests::certs(&dir, "rogue", &["c"]);
    let tls = |n: &str, ca: &str| ferrolb_consync::TlsFiles {
        cert: dir.join(format!("{n}.pem")),
        key: dir.join(format!("{n}.key")),
        ca: dir.join(format!("{ca}.pem")),
    };
    let rt = runtime();
    rt.block_on(async {
        let a = node(0);
        a.own.lock().unwrap().insert(key(1), flow(0, 1));
        let (b, c, d) = (node(1), node(2), node(3));
        // C and D connect from a cluster address (all share 127.0.0.1): TLS refuses them.
        let mut ca = Config::new(0, addr(22021), vec![addr(22022)]);
        ca.tls = Some(tls("a", "ca"));
        let mut cb = Config::new(1, addr(22022), vec![addr(22021)]);
        cb.tls = Some(tls("b", "ca"));
        let mut cc = Config::new(2, addr(22023), vec![addr(22021)]);
        cc.tls = Some(tls("c", "rogue"));
        let cd = Config::new(3, addr(22024), vec![addr(22021)]);
        let sa = Consync::start(ca, a.clone()).await.unwrap();
        let _sb = Consync::start(cb, b.clone()).await.unwrap();
        let sc = Consync::start(cc, c.clone()).await.unwrap();
        let sd = Consync::start(cd, d.clone()).await.unwrap();
        let bb = b.clone();
        wait_async(
            "B syncs over mutual TLS",
            Duration::from_secs(5),
            move || synced_ports(&bb) == vec![1],
        )
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(synced_ports(&c).is_empty() && synced_ports(&d).is_empty());
        assert!(!sc.peers()[0].connected && !sd.peers()[0].connected);
        let refused = sa
            .stats()
            .refused
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!(refused >= 2, "refused {refused}");
    });
}

fn at(ip: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

/// A Handover from node 1 at a position a million changes past `seq` (never published, so
/// the server waits its full 3 s for it), with the caller's deadline `timeout`.
fn unreachable_handover(
    epoch: u64,
    seq: u64,
    timeout: Duration,
) -> tonic::Request<pb::HandoverRequest> {
    let mut req = tonic::Request::new(pb::HandoverRequest {
        node_id: 1,
        instance: "llb-inst0".into(),
        term: 3,
        epoch,
        seq: seq + 1_000_000,
    });
    req.set_timeout(timeout);
    req
}

/// A host outside `--cluster` is refused at accept (no token configured); a Handover is
/// taken only from the address of the node it claims to come from.
#[test]
fn only_cluster_addresses_connect_and_handovers_come_from_the_claimed_node() {
    if !ferrolb_tests::private_netns("only_cluster_addresses_connect") {
        return;
    }
    let rt = runtime();
    rt.block_on(async {
        let (a, b, c) = (node(0), node(1), node(2));
        a.own.lock().unwrap().insert(key(1), flow(0, 1));
        let (pa, pb_, pc) = (
            at([127, 0, 0, 1], 22031),
            at([127, 0, 0, 2], 22032),
            at([127, 0, 0, 3], 22033),
        );
        let ca = Config::new(0, pa, vec![pb_]);
        let mut cb = Config::new(1, pb_, vec![pa]);
        cb.source = Some(pb_.ip());
        let mut cc = Config::new(2, pc, vec![pa]);
        cc.source = Some(pc.ip());
        let sa = Consync::start(ca, a.clone()).await.unwrap();
        let sb = Consync::start(cb, b.clone()).await.unwrap();
        let sc = Consync::start(cc, c.clone()).await.unwrap();
        let bb = b.clone();
        wait_async(
            "B (in A's --cluster) syncs",
            Duration::from_secs(5),
            move || synced_ports(&bb) == vec![1],
        )
        .await;
        let saa = sa.clone();
        wait_async("A hears B's node id", Duration::from_secs(5), move || {
            saa.peers()[0].node_id == Some(1)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(synced_ports(&c).is_empty(), "C is outside A's --cluster");
        assert!(!sc.peers()[0].connected);
        let by_address = sa
            .stats()
            .refused_address
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!(by_address >= 1, "refused by address: {by_address}");

        // Raw Handover requests, as a forger would send them.
        async fn forge(
            from: std::net::IpAddr,
            to: SocketAddr,
            node_id: u32,
            (epoch, seq): (u64, u64),
        ) -> Result<pb::HandoverReply, String> {
            let ch = tonic::transport::Endpoint::from_shared(format!("http://{to}"))
                .unwrap()
                .local_address(Some(from))
                .connect_timeout(Duration::from_millis(500))
                .connect()
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let mut client = pb::con_sync_client::ConSyncClient::new(ch);
            let mut req = tonic::Request::new(pb::HandoverRequest {
                node_id,
                instance: "llb-inst0".into(),
                term: 3,
                epoch,
                seq,
            });
            req.set_timeout(Duration::from_secs(5));
            client
                .handover(req)
                .await
                .map(|r| r.into_inner())
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
        }
        // From outside the cluster: the connection is closed before any request.
        let r = forge(pc.ip(), pa, 1, sb.position()).await;
        assert!(r.is_err(), "{r:?}");
        // From B's address, claiming to be another node.
        let e = forge(pb_.ip(), pa, 7, sb.position()).await.unwrap_err();
        assert!(e.contains("PermissionDenied"), "{e}");
        assert!(
            a.took.lock().unwrap().is_empty(),
            "no forged handover taken"
        );
        // Many at once from B's address as B, on one connection, none of which can catch up
        // (a position B never published): one waits its 3 s, the rest are refused at once.
        let (epoch, seq) = sb.position();
        let ch = channel(pb_.ip(), pa).await;
        let busy_before = sa.stats().refused_limit.load(Ordering::Relaxed);
        let started = Instant::now();
        let many: Vec<_> = (0..20)
            .map(|_| {
                let mut client = pb::con_sync_client::ConSyncClient::new(ch.clone());
                tokio::spawn(async move {
                    let req = unreachable_handover(epoch, seq, Duration::from_secs(5));
                    let r = client.handover(req).await;
                    (r.map(|r| r.into_inner()), started.elapsed())
                })
            })
            .collect();
        let mut answers = Vec::new();
        for h in many {
            answers.push(h.await.unwrap());
        }
        let waited: Vec<_> = answers.iter().filter(|(r, _)| r.is_ok()).collect();
        assert_eq!(waited.len(), 1, "one Handover waits: {answers:?}");
        let (r, took) = waited[0];
        let r = r.as_ref().unwrap();
        assert!(!r.accepted && r.reason.contains("not caught up"), "{r:?}");
        assert!(*took >= Duration::from_millis(2900), "it waited {took:?}");
        for (r, took) in answers.iter().filter(|(r, _)| r.is_err()) {
            let e = r.as_ref().unwrap_err();
            assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
            assert!(*took < Duration::from_secs(1), "refused after {took:?}");
        }
        assert_eq!(
            sa.stats().refused_limit.load(Ordering::Relaxed) - busy_before,
            19
        );
        // A caller that gives up (its deadline, which the server applies too) gives the place
        // back when the server drops its request: a request from B as B (below) is served
        // within a second of it, where the request's own wait would have held the place for
        // 3 s. (The server's deadline fires a moment after the caller's, so the very next
        // request may still meet the place taken: CI once saw that.)
        let mut client = pb::con_sync_client::ConSyncClient::new(ch.clone());
        let t0 = Instant::now();
        let req = unreachable_handover(epoch, seq, Duration::from_millis(300));
        let e = client.handover(req).await.unwrap_err();
        assert_ne!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
        assert!(a.took.lock().unwrap().is_empty(), "nothing taken yet");
        // From B's address as B: the request reaches the node (which decides on terms).
        let r = loop {
            match forge(pb_.ip(), pa, 1, sb.position()).await {
                Err(e)
                    if e.starts_with("ResourceExhausted")
                        && t0.elapsed() < Duration::from_millis(1300) =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                r => break r.unwrap(),
            }
        };
        assert!(
            t0.elapsed() < Duration::from_millis(1300),
            "{:?}",
            t0.elapsed()
        );
        assert!(r.accepted, "{}", r.reason);
        assert_eq!(a.took.lock().unwrap().as_slice(), ["llb-inst0"]);
    });
}

/// Polls `f` every 10 ms until it holds or `limit` passes; returns whether it held.
async fn within(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Established TCP connections to `port` on the server's side, as `ss` counts them.
fn server_side_connections(port: u16) -> usize {
    let out = std::process::Command::new("ss")
        .args([
            "-Htn",
            "state",
            "established",
            "sport",
            "=",
            &format!(":{port}"),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

async fn raw_connection(from: IpAddr, to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(from, 0))?;
    s.connect(to).await
}

/// Whether the server closed `c` (a read returns end of stream or an error within `limit`).
async fn closed_by_server(c: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 256];
    let end = Instant::now() + limit;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, c.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // The server's HTTP/2 preface and pings: read on.
            Ok(Ok(_)) => {}
        }
    }
}

/// A gRPC channel from `from` with the default (64 KiB) flow-control windows.
async fn channel(from: IpAddr, to: SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{to}"))
        .unwrap()
        .local_address(Some(from))
        .connect_timeout(Duration::from_millis(500))
        .connect()
        .await
        .unwrap()
}

/// Subscribes from scratch (so the server walks its table) and never reads the stream.
async fn subscribe_and_stall(
    ch: tonic::transport::Channel,
    node_id: u32,
    token: Option<&str>,
) -> Result<tonic::Streaming<pb::SyncBatch>, tonic::Status> {
    let mut client = pb::con_sync_client::ConSyncClient::new(ch);
    let mut req = tonic::Request::new(pb::SubscribeRequest {
        node_id,
        epoch: 0,
        next_seq: 0,
        packed: true,
    });
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    client.subscribe(req).await.map(|r| r.into_inner())
}

const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

#[test]
fn one_peer_address_holds_bounded_connections_streams_and_walks() {
    if !ferrolb_tests::private_netns("one_peer_address_holds_bounded_connections") {
        return;
    }
    let rt = runtime();
    rt.block_on(async {
        let a = node_with_flows(0, 20_000);
        let me = SocketAddr::from(([127, 0, 0, 1], 22061));
        let other = SocketAddr::from(([127, 0, 0, 3], 22063));
        let (third, fourth) = (
            SocketAddr::from(([127, 0, 0, 4], 22064)),
            SocketAddr::from(([127, 0, 0, 5], 22065)),
        );
        let mut cfg = Config::new(
            0,
            me,
            vec![SocketAddr::new(PEER, 22062), other, third, fourth],
        );
        cfg.max_snapshot_walks = 2;
        cfg.max_connections_per_peer = 8;
        cfg.max_streams_per_peer = 4;
        cfg.stall_timeout = Duration::from_secs(2);
        let sa = Consync::start(cfg, a.clone()).await.unwrap();
        let stat = |f: fn(&ferrolb_consync::Stats) -> &std::sync::atomic::AtomicU64| {
            f(sa.stats()).load(Ordering::Relaxed)
        };

        // 40 idle connections from the peer's address: 8 held, each new one past 8 taking
        // the place of the oldest (none carried a request).
        let mut held = Vec::new();
        for _ in 0..40 {
            held.push(raw_connection(PEER, me).await.unwrap());
        }
        let settled = within(Duration::from_secs(3), || {
            server_side_connections(me.port()) == 8
        })
        .await;
        let n = server_side_connections(me.port());
        println!("40 idle connections from one address: the server holds {n}");
        assert!(
            settled,
            "the server holds {n} connections from one address, not 8"
        );
        assert_eq!(stat(|s| &s.evicted), 32);
        assert_eq!(stat(|s| &s.connections), 8);
        assert!(
            closed_by_server(&mut held[31], Duration::from_secs(2)).await,
            "a displaced connection is still open"
        );

        // A subscriber from that address still gets in: its connection takes the place of the
        // oldest idle one (which never carried a request), and its stream is served.
        let ch = channel(PEER, me).await;
        let mut first = subscribe_and_stall(ch.clone(), 1, None).await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_secs(2), first.message())
                .await
                .is_ok_and(|m| m.is_ok_and(|b| b.is_some())),
            "a subscriber at the connection limit was not served"
        );
        assert!(
            closed_by_server(&mut held[32], Duration::from_secs(2)).await,
            "the oldest idle connection was not closed for the subscriber's"
        );
        assert_eq!(stat(|s| &s.evicted), 33);
        assert_eq!(stat(|s| &s.connections), 8);

        // Ten subscriptions over that connection, none reading: at most 4 served at once
        // (the oldest ended for each new one), one walking the table at a time.
        let mut stalled = vec![first];
        for i in 0..9 {
            match subscribe_and_stall(ch.clone(), 100 + i, None).await {
                Ok(s) => stalled.push(s),
                Err(e) => panic!("subscription {i}: {e}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let walking = a.walking.load(Ordering::SeqCst);
        println!(
            "10 stalled subscriptions from one address: {walking} walks in progress, {} started",
            a.walks.load(Ordering::SeqCst)
        );
        assert!(walking <= 1, "{walking} snapshot walks held by one address");
        assert_eq!(stat(|s| &s.streams_ended_limit), 6);

        // Meanwhile a peer at another address gets its whole snapshot.
        let b = node(1);
        let mut cb = Config::new(1, other, vec![me]);
        cb.source = Some(other.ip());
        let _sb = Consync::start(cb, b.clone()).await.unwrap();
        let synced = within(Duration::from_secs(5), || synced_ports(&b).len() == 20_000).await;
        assert!(
            synced,
            "another address's peer synced {} of 20000 flows while one address stalled",
            synced_ports(&b).len()
        );
        assert!(
            a.walking.load(Ordering::SeqCst) >= 1,
            "the stalled address's walk ended before the check meant anything"
        );

        // Two more addresses stall a subscription each: two walks at most in all.
        let mut elsewhere = Vec::new();
        for at in [third, fourth] {
            let ch = channel(at.ip(), me).await;
            elsewhere.push(subscribe_and_stall(ch, 300, None).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let walking = a.walking.load(Ordering::SeqCst);
        println!("three addresses stalled: {walking} walks in progress");
        assert!(walking <= 2, "{walking} snapshot walks at once, 2 allowed");

        // A subscriber that takes nothing for the stall timeout is ended: its walk stops, and
        // the next one's too (4 served, each walking in turn for at most the timeout).
        let freed = within(Duration::from_secs(5 * 2 + 4), || {
            a.walking.load(Ordering::SeqCst) == 0
        })
        .await;
        println!(
            "after the stall timeout: {} walks in progress, {} streams ended as stalled",
            a.walking.load(Ordering::SeqCst),
            stat(|s| &s.streams_stalled)
        );
        assert!(freed, "stalled subscribers kept their snapshot walks");
        assert!(stat(|s| &s.streams_stalled) >= 1);

        // Seven more connections carrying requests take the idle ones' places; with all 8 in
        // use, the next connection is closed at once.
        let mut busy = Vec::new();
        for i in 0..7 {
            let ch = channel(PEER, me).await;
            busy.push(
                subscribe_and_stall(ch.clone(), 200 + i, None)
                    .await
                    .unwrap(),
            );
        }
        assert_eq!(stat(|s| &s.evicted), 40);
        let mut late = raw_connection(PEER, me).await.unwrap();
        assert!(
            closed_by_server(&mut late, Duration::from_secs(2)).await,
            "a connection past 8 in use was kept"
        );
        assert_eq!(stat(|s| &s.refused_limit), 1);
        // The 8, the other address's peer's subscription, the two stalled elsewhere.
        assert_eq!(stat(|s| &s.connections), 8 + 1 + 2);

        // Connections given back: all the address's closed, the server holds the other's.
        drop((busy, late));
        drop((stalled, elsewhere));
        drop(ch);
        drop(held);
        assert!(
            within(Duration::from_secs(5), || stat(|s| &s.connections) == 1).await,
            "{} connections counted after the address's closed (1 expected: the other peer's)",
            stat(|s| &s.connections)
        );
    });
}

/// With a token, connections that never carried an accepted request cannot keep a peer out:
/// an attacker on the peer's host holding every place loses them to the peer's connection.
#[test]
fn idle_unauthenticated_connections_cannot_keep_a_peer_out() {
    if !ferrolb_tests::private_netns("idle_unauthenticated_connections_cannot_keep_a_peer_out") {
        return;
    }
    let rt = runtime();
    rt.block_on(async {
        let a = node_with_flows(0, 100);
        let b = node(1);
        let (pa, pb_) = (
            SocketAddr::from(([127, 0, 0, 1], 22071)),
            SocketAddr::new(PEER, 22072),
        );
        let mut ca = Config::new(0, pa, vec![pb_]);
        ca.token = Some("s3cret".into());
        ca.max_connections_per_peer = 4;
        let sa = Consync::start(ca, a.clone()).await.unwrap();
        // The attacker: every place, each connection asking without the token.
        let mut held = Vec::new();
        for i in 0..4 {
            let ch = channel(PEER, pa).await;
            let refused = subscribe_and_stall(ch.clone(), 7 + i, None).await;
            assert!(
                refused.is_err_and(|s| s.code() == tonic::Code::Unauthenticated),
                "a subscription without the token was served"
            );
            held.push(ch);
        }
        assert_eq!(sa.stats().connections.load(Ordering::Relaxed), 4);
        // The peer, with the token, from the same address.
        let mut cb = Config::new(1, pb_, vec![pa]);
        cb.token = Some("s3cret".into());
        cb.source = Some(PEER);
        let _sb = Consync::start(cb, b.clone()).await.unwrap();
        let synced = within(Duration::from_secs(5), || synced_ports(&b).len() == 100).await;
        assert!(
            synced,
            "the peer synced {} of 100 flows while idle connections held its address's places",
            synced_ports(&b).len()
        );
        assert!(sa.stats().evicted.load(Ordering::Relaxed) >= 1);
        drop(held);
    });
}

/// The agent runs sync on a runtime of its own whose blocking pool has 4 threads, which also
/// install what peers send, and lets 2 of them walk snapshots. Subscribers on a peer's host
/// that read nothing must leave threads to install that peer's flows.
#[test]
fn stalled_subscribers_leave_threads_to_install_the_peers_flows() {
    if !ferrolb_tests::private_netns("stalled_subscribers_leave_threads") {
        return;
    }
    // A, on a runtime shaped as the agent's sync runtime.
    let rt_a = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let a = node_with_flows(0, 20_000);
    let (pa, pb_) = (addr(22081), SocketAddr::new(PEER, 22082));
    let mut ca = Config::new(0, pa, vec![pb_]);
    ca.max_snapshot_walks = 2;
    let _sa = rt_a.block_on(Consync::start(ca, a.clone())).unwrap();
    let rt = runtime();
    rt.block_on(async {
        // A process on B's host: ten subscriptions to A that read nothing.
        let ch = channel(PEER, pa).await;
        let mut stalled = Vec::new();
        for i in 0..10 {
            stalled.push(
                subscribe_and_stall(ch.clone(), 100 + i, None)
                    .await
                    .unwrap(),
            );
        }
        let aa = a.clone();
        wait_async("A walks its table", Duration::from_secs(5), move || {
            aa.walking.load(Ordering::SeqCst) >= 1
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        // B starts, with flows of its own, from that host's address.
        let b = node_with_flows(1, 1000);
        let mut cb = Config::new(1, pb_, vec![pa]);
        cb.source = Some(PEER);
        let _sb = Consync::start(cb, b).await.unwrap();
        let t0 = Instant::now();
        let installed = within(Duration::from_secs(5), || synced_ports(&a).len() == 1000).await;
        println!(
            "A installed {} of B's 1000 flows in {:?} with {} snapshot walks held",
            synced_ports(&a).len(),
            t0.elapsed(),
            a.walking.load(Ordering::SeqCst)
        );
        assert!(
            installed,
            "A installed {} of B's 1000 flows while subscribers on B's host stalled",
            synced_ports(&a).len()
        );
        drop((stalled, ch));
    });
    rt_a.shutdown_timeout(Duration::from_secs(2));
}
