//! The REST API's connection limits on real sockets (root: a private network namespace whose
//! loopback gives each client a source address of its own): a client over its per-source
//! share, or anyone once the whole is open, is closed at accept and counted; idle connections
//! are closed after the idle timeout and give their places back; a connection in use is not.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use ferrolb_agent::listen::{ConnGate, ConnLimits, ConnStats, GatedTcp, Refusal};

/// A client connection from 127.0.0.`host`.
fn connect(host: u8, to: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, host], 0)).into())
        .unwrap();
    s.connect(&to.into()).unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Did the server close `s` (EOF or reset) within `within`?
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// One HTTP/1.1 request on `s` (kept alive); the status code.
fn get(s: &mut TcpStream) -> u16 {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /ping HTTP/1.1\r\nHost: lb\r\n\r\n")
        .unwrap();
    let mut buf = Vec::new();
    let mut b = [0u8; 512];
    while !buf.windows(4).any(|w| w == b"pong") {
        let n = s.read(&mut b).unwrap();
        assert!(n > 0, "closed before the answer");
        buf.extend_from_slice(&b[..n]);
    }
    String::from_utf8_lossy(&buf[9..12]).parse().unwrap()
}

#[test]
fn connections_over_the_limits_are_refused_and_idle_ones_closed() {
    if !ferrolb_tests::private_netns("connections_over_the_limits_are_refused_and_idle_ones_closed")
    {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stats = Arc::new(ConnStats::default());
    let idle = Duration::from_millis(1500);
    let gate = ConnGate::new(
        ConnLimits {
            max: 4,
            per_source: 2,
            idle,
        },
        stats.clone(),
    );
    let addr = rt.block_on(async {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let app = axum::Router::new().route("/ping", axum::routing::get(|| async { "pong" }));
        tokio::spawn(async move {
            axum::serve(GatedTcp::new(tcp, gate), app).await.unwrap();
        });
        addr
    });
    // The server runs on its own thread (the runtime is single-threaded); the clients block.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        rt.block_on(async {
            let _ = stopped.await;
        })
    });

    // Two from 127.0.0.2 are served; a third from it is closed at once.
    let mut a1 = connect(2, addr);
    let mut a2 = connect(2, addr);
    assert_eq!(get(&mut a1), 200);
    assert_eq!(get(&mut a2), 200);
    let mut a3 = connect(2, addr);
    assert!(
        closed_within(&mut a3, Duration::from_secs(1)),
        "over the per-source share"
    );
    assert_eq!(stats.refused(Refusal::PerSource), 1);
    // Two idle ones from 127.0.0.3 fill the whole; 127.0.0.4 is then closed at once.
    let mut b1 = connect(3, addr);
    let mut b2 = connect(3, addr);
    std::thread::sleep(Duration::from_millis(100));
    let mut c1 = connect(4, addr);
    assert!(
        closed_within(&mut c1, Duration::from_secs(1)),
        "over the whole"
    );
    assert_eq!(stats.refused(Refusal::Total), 1);
    assert_eq!(stats.open.load(Relaxed), 4);

    // a1 stays in use (a request every half timeout); the three others say nothing and are
    // closed once the idle timeout has passed.
    let t0 = Instant::now();
    while t0.elapsed() < idle * 2 {
        std::thread::sleep(idle / 2);
        assert_eq!(get(&mut a1), 200, "a connection in use stays");
    }
    for (what, s) in [("a2", &mut a2), ("b1", &mut b1), ("b2", &mut b2)] {
        assert!(
            closed_within(s, Duration::from_secs(1)),
            "{what} idle, still open"
        );
    }
    assert_eq!(stats.idle_closed.load(Relaxed), 3);
    assert_eq!(stats.open.load(Relaxed), 1, "their places given back");
    // Room again: a new client is served.
    let mut c2 = connect(4, addr);
    assert_eq!(get(&mut c2), 200);
    drop((a1, c2));
    stop.send(()).unwrap();
    server.join().unwrap();
}
