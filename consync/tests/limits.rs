//! What one address in `--cluster` can make the sync server hold: a bounded number of
//! connections (a new one takes the place of the oldest that never carried an accepted
//! request), a bounded number of subscriptions (a new one ends the oldest), and no snapshot
//! walk held open by a subscriber that stops reading. In a private network namespace over
//! loopback: the "peer host" is 127.0.0.2, the node 127.0.0.1.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferrolb_consync::{Config, Consync, Flow, FlowKey, Node, pb};

/// A node with many flows of its own, walked in small chunks, counting walks in progress.
struct Walked {
    own: Vec<Flow>,
    walking: AtomicUsize,
    walks: AtomicUsize,
    synced: Mutex<HashSet<FlowKey>>,
}

struct Walking<'a>(&'a AtomicUsize);
impl Drop for Walking<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Node for Walked {
    fn own_flows(&self, emit: &mut dyn FnMut(Vec<Flow>) -> bool) {
        self.walks.fetch_add(1, Ordering::SeqCst);
        self.walking.fetch_add(1, Ordering::SeqCst);
        let _w = Walking(&self.walking);
        for c in self.own.chunks(16) {
            if !emit(c.to_vec()) {
                return;
            }
        }
    }
    fn apply(&self, _origin: u32, ups: &[Flow], dels: &[FlowKey]) -> u64 {
        let mut s = self.synced.lock().unwrap();
        for f in ups {
            s.insert(f.key);
        }
        for k in dels {
            s.remove(k);
        }
        (ups.len() + dels.len()) as u64
    }
    fn flows_of(&self, _origin: u32) -> HashSet<FlowKey> {
        self.synced.lock().unwrap().clone()
    }
    fn remove_stale(&self, _origin: u32, keys: &[FlowKey]) -> u64 {
        let mut s = self.synced.lock().unwrap();
        keys.iter().filter(|k| s.remove(k)).count() as u64
    }
    fn malformed(&self, _origin: u32, _n: u64) {}
    fn status(&self) -> pb::NodeStatus {
        pb::NodeStatus {
            ready: true,
            ..Default::default()
        }
    }
    fn peer_status(&self, _peer: SocketAddr, _status: Option<&pb::NodeStatus>) {}
    fn handover(&self, _from: SocketAddr, _req: &pb::HandoverRequest) -> Result<u64, String> {
        Err("not in this test".into())
    }
}

fn flows(n: u16) -> Vec<Flow> {
    (1..=n)
        .map(|p| Flow {
            key: FlowKey {
                protocol: pb::Protocol::Tcp as u8,
                client: IpAddr::from([198, 51, 100, 2]),
                client_port: p,
                vip: IpAddr::from([203, 0, 113, 10]),
                vip_port: 80,
            },
            nat_source: IpAddr::from([203, 0, 113, 10]),
            nat_source_port: 0,
            endpoint: IpAddr::from([10, 10, 10, 11]),
            endpoint_port: 9000,
            mode: 0,
            state: pb::TcpState::Established as u8,
            fin: 0,
            timeout_s: 240,
            origin: 0,
            age_ms: 1000,
            idle_ms: 5,
        })
        .collect()
}

fn walked(n: u16) -> Arc<Walked> {
    Arc::new(Walked {
        own: flows(n),
        walking: AtomicUsize::new(0),
        walks: AtomicUsize::new(0),
        synced: Mutex::new(HashSet::new()),
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
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
        let a = walked(20_000);
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
        let b = walked(0);
        let mut cb = Config::new(1, other, vec![me]);
        cb.source = Some(other.ip());
        let _sb = Consync::start(cb, b.clone()).await.unwrap();
        let synced = within(Duration::from_secs(5), || {
            b.synced.lock().unwrap().len() == 20_000
        })
        .await;
        assert!(
            synced,
            "another address's peer synced {} of 20000 flows while one address stalled",
            b.synced.lock().unwrap().len()
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
        let a = walked(100);
        let b = walked(0);
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
        let synced = within(Duration::from_secs(5), || {
            b.synced.lock().unwrap().len() == 100
        })
        .await;
        assert!(
            synced,
            "the peer synced {} of 100 flows while idle connections held its address's places",
            b.synced.lock().unwrap().len()
        );
        assert!(sa.stats().evicted.load(Ordering::Relaxed) >= 1);
        drop(held);
    });
}
