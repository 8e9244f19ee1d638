//! The only file that touches BGP sockets: an outgoing TCP connection with optional TCP MD5
//! signatures (RFC 2385) and GTSM (RFC 5082: TTL 255 sent, 254 minimum accepted). Options
//! socket2 has (TTL / hop limit, IPV6_V6ONLY) are set with it; TCP_MD5SIG and IP_MINTTL /
//! IPV6_MINHOPCOUNT, which it lacks, with libc here.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};

/// `struct tcp_md5sig`: sockaddr_storage, flags, prefixlen, keylen, ifindex, key[80].
fn md5sig(peer: IpAddr, key: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 128 + 1 + 1 + 2 + 4 + 80];
    match peer {
        IpAddr::V4(a) => {
            b[0..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
            b[4..8].copy_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            b[0..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
            b[8..24].copy_from_slice(&a.octets());
        }
    }
    let n = key.len().min(80);
    b[130..132].copy_from_slice(&(n as u16).to_ne_bytes());
    b[136..136 + n].copy_from_slice(&key[..n]);
    b
}

fn setsockopt(fd: i32, level: i32, name: i32, val: &[u8]) -> io::Result<()> {
    // SAFETY: val is valid for its length during the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            val.as_ptr().cast(),
            val.len() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Sets (or, with an empty key, removes) the MD5 key for `peer` on a socket (a listener too).
pub fn set_md5(fd: i32, peer: IpAddr, key: &[u8]) -> io::Result<()> {
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_MD5SIG, &md5sig(peer, key))
}

/// A listener on [::]:`port` that takes IPv6 connections only (IPV6_V6ONLY), so IPv4 peers
/// reach the IPv4 listener and find their MD5 keys there.
pub fn listen_v6_only(port: u16) -> io::Result<tokio::net::TcpListener> {
    let sock = TcpSocket::new_v6()?;
    sock.set_reuseaddr(true)?;
    socket2::SockRef::from(&sock).set_only_v6(true)?;
    sock.bind(SocketAddr::new(
        IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        port,
    ))?;
    sock.listen(128)
}

/// Connects to `addr` (bounded by `timeout`), with the MD5 key and GTSM when asked.
pub async fn connect(
    addr: SocketAddr,
    md5_key: Option<&[u8]>,
    gtsm: bool,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    let fd = sock.as_raw_fd();
    if let Some(k) = md5_key {
        setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_MD5SIG,
            &md5sig(addr.ip(), k),
        )?;
    }
    if gtsm {
        let s2 = socket2::SockRef::from(&sock);
        let (level, min) = if addr.is_ipv4() {
            s2.set_ttl_v4(255)?;
            (libc::IPPROTO_IP, libc::IP_MINTTL)
        } else {
            s2.set_unicast_hops_v6(255)?;
            (libc::IPPROTO_IPV6, libc::IPV6_MINHOPCOUNT)
        };
        setsockopt(fd, level, min, &254i32.to_ne_bytes())?;
    }
    tokio::time::timeout(timeout, sock.connect(addr))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a private network namespace: a listener that requires MD5 for 127.0.0.1 accepts our
    /// signed connection and never sees an unsigned one.
    #[test]
    fn md5_signed_connections_only() {
        if !ferrolb_tests::private_netns("md5_signed_connections_only") {
            return;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = std::net::TcpListener::bind("127.0.0.1:1790").unwrap();
            setsockopt(
                l.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_MD5SIG,
                &md5sig("127.0.0.1".parse().unwrap(), b"key"),
            )
            .unwrap();
            // The listener answers with TTL 255 too, or our GTSM minimum drops its SYN-ACK.
            setsockopt(
                l.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_TTL,
                &255i32.to_ne_bytes(),
            )
            .unwrap();
            l.set_nonblocking(true).unwrap();
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            let addr: SocketAddr = "127.0.0.1:1790".parse().unwrap();
            let bad = connect(addr, None, false, Duration::from_millis(500)).await;
            assert!(bad.is_err(), "unsigned connection must not get through");
            let ok = connect(addr, Some(b"key"), false, Duration::from_secs(2)).await;
            assert!(ok.is_ok(), "{ok:?}");
            let acc = tokio::time::timeout(Duration::from_secs(2), l.accept()).await;
            assert!(acc.is_ok());
            // GTSM: our minimum TTL 254 refuses a peer answering at TTL 64...
            let plain = std::net::TcpListener::bind("127.0.0.1:1791").unwrap();
            setsockopt(
                plain.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_TTL,
                &64i32.to_ne_bytes(),
            )
            .unwrap();
            let a2: SocketAddr = "127.0.0.1:1791".parse().unwrap();
            assert!(
                connect(a2, None, true, Duration::from_millis(500))
                    .await
                    .is_err(),
                "TTL 64 must be refused"
            );
            // ...and takes one at TTL 255.
            setsockopt(
                plain.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_TTL,
                &255i32.to_ne_bytes(),
            )
            .unwrap();
            assert!(
                connect(a2, None, true, Duration::from_secs(2))
                    .await
                    .is_ok()
            );
        });
    }

    #[test]
    fn md5sig_layout() {
        let b = md5sig("192.0.2.1".parse().unwrap(), b"secret");
        assert_eq!(b.len(), 216);
        assert_eq!(u16::from_ne_bytes([b[0], b[1]]), libc::AF_INET as u16);
        assert_eq!(&b[4..8], &[192, 0, 2, 1]);
        assert_eq!(u16::from_ne_bytes([b[130], b[131]]), 6);
        assert_eq!(&b[136..142], b"secret");
    }
}
