//! RFC 4271 §6: a peer that sends a bad message gets the NOTIFICATION the RFC gives that error
//! before the session closes. Each case is a raw TCP "peer" on its own loopback address (in a
//! private network namespace) that the speaker connects to; it reads our OPEN, sends one bad
//! message and reads what comes back.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use ferrolb_bgp::{GlobalConfig, NeighborConfig, Speaker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PORT: u16 = 17_900;
const PEER_AS: u32 = 65_001;

fn message(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![0xff; 16];
    m.extend_from_slice(&(19 + body.len() as u16).to_be_bytes());
    m.push(kind);
    m.extend_from_slice(body);
    m
}

fn open(version: u8, asn: u16, hold: u16, id: [u8; 4]) -> Vec<u8> {
    let mut b = vec![version];
    b.extend_from_slice(&asn.to_be_bytes());
    b.extend_from_slice(&hold.to_be_bytes());
    b.extend_from_slice(&id);
    b.push(0);
    message(1, &b)
}

/// Reads one whole message; `None` when the connection closed first.
async fn read_message(s: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut head = [0u8; 19];
    s.read_exact(&mut head).await.ok()?;
    let len = usize::from(u16::from_be_bytes([head[16], head[17]]));
    let mut body = vec![0u8; len.saturating_sub(19)];
    s.read_exact(&mut body).await.ok()?;
    let mut m = head.to_vec();
    m.extend(body);
    Some(m)
}

/// Plays one bad peer at `addr`: our OPEN in, `bad` out, then the (code, subcode, data) of the
/// NOTIFICATION that came back (KEEPALIVEs skipped), or `None` if the session closed without.
/// (code, subcode, data) of a NOTIFICATION.
type Notification = (u8, u8, Vec<u8>);

async fn bad_peer(addr: SocketAddr, bad: Vec<u8>) -> Option<Notification> {
    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    let (mut s, _) = tokio::time::timeout(Duration::from_secs(10), l.accept())
        .await
        .expect("the speaker connects")
        .unwrap();
    let ours = read_message(&mut s).await.expect("our OPEN");
    assert_eq!(ours[18], 1, "the speaker opens with an OPEN");
    s.write_all(&bad).await.unwrap();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), read_message(&mut s))
            .await
            .expect("an answer within 5 s")?;
        match m[18] {
            3 => return Some((m[19], m[20], m[21..].to_vec())),
            4 => continue,
            t => panic!("unexpected message type {t} after a bad message"),
        }
    }
}

#[test]
fn each_message_error_gets_its_own_notification() {
    if !ferrolb_tests::private_netns("each_message_error_gets_its_own_notification") {
        return;
    }
    let id = [10, 0, 0, 9];
    let mut bad_marker = open(4, PEER_AS as u16, 9, id);
    bad_marker[3] = 0;
    let mut too_long = message(4, &[]);
    too_long[16..18].copy_from_slice(&5000u16.to_be_bytes());
    let cases: Vec<(&str, Vec<u8>, Option<Notification>)> = vec![
        ("bad marker", bad_marker, Some((1, 1, vec![]))),
        (
            "length above 4096",
            too_long,
            Some((1, 2, 5000u16.to_be_bytes().to_vec())),
        ),
        (
            "KEEPALIVE with a body",
            message(4, &[0]),
            Some((1, 2, 20u16.to_be_bytes().to_vec())),
        ),
        (
            "OPEN shorter than 29",
            message(1, &[4, 0]),
            Some((1, 2, 21u16.to_be_bytes().to_vec())),
        ),
        ("unknown type 9", message(9, &[]), Some((1, 3, vec![9]))),
        (
            "garbage",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            Some((1, 1, vec![])),
        ),
        (
            "version 3",
            open(3, PEER_AS as u16, 9, id),
            Some((2, 1, vec![0, 4])),
        ),
        (
            "wrong peer AS",
            open(4, 65_099, 9, id),
            Some((2, 2, vec![])),
        ),
        (
            "BGP identifier 0.0.0.0",
            open(4, PEER_AS as u16, 9, [0; 4]),
            Some((2, 3, vec![])),
        ),
        (
            "hold time 1",
            open(4, PEER_AS as u16, 1, id),
            Some((2, 6, vec![])),
        ),
    ];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let sp = Speaker::new();
        sp.set_global(GlobalConfig {
            local_as: 65_000,
            router_id: Ipv4Addr::new(10, 0, 0, 1),
        });
        let mut runs = Vec::new();
        for (i, (what, bad, want)) in cases.into_iter().enumerate() {
            let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i as u8));
            let addr = SocketAddr::new(ip, PORT);
            // The listener is up before the neighbour is configured.
            let run = tokio::spawn(bad_peer(addr, bad));
            tokio::time::sleep(Duration::from_millis(20)).await;
            let mut n = NeighborConfig::new(ip, PEER_AS);
            n.remote_port = PORT;
            sp.upsert_neighbor(n);
            runs.push((what, want, run));
        }
        for (what, want, run) in runs {
            let got = run.await.unwrap();
            assert_eq!(got, want, "{what}");
        }
        // Every answer was counted by code. A peer may read its NOTIFICATION before the
        // speaker's task counts it: the count gets a moment (bounded) to catch up.
        let counted = || -> u64 {
            sp.neighbors()
                .iter()
                .flat_map(|n| n.notifications_out.values().copied())
                .sum()
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while counted() < 10 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let out = counted();
        assert!(out >= 10, "NOTIFICATIONs counted: {out}");
    });
}
