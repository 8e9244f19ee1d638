//! One probe of one target: TCP connect, UDP datagram, HTTP(S) `HEAD`, ICMP echo.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Target;
use crate::model::ProbeKind;

/// Why a probe failed (a metric label: a fixed set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Failure {
    /// No answer within the timeout.
    Timeout,
    /// TCP reset, or ICMP port unreachable.
    Refused,
    /// The host or network is unreachable (ICMP, or no neighbour).
    Unreachable,
    /// An answer that is not the expected one (HTTP status, response bytes).
    BadResponse,
    /// TLS handshake failed.
    Tls,
    /// Anything else (socket errors).
    Error,
}

impl Failure {
    pub const ALL: [Failure; 6] = [
        Failure::Timeout,
        Failure::Refused,
        Failure::Unreachable,
        Failure::BadResponse,
        Failure::Tls,
        Failure::Error,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Refused => "refused",
            Failure::Unreachable => "unreachable",
            Failure::BadResponse => "bad_response",
            Failure::Tls => "tls",
            Failure::Error => "error",
        }
    }

    fn of(e: &io::Error) -> Failure {
        match e.kind() {
            io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset => Failure::Refused,
            io::ErrorKind::TimedOut => Failure::Timeout,
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                Failure::Unreachable
            }
            _ => Failure::Error,
        }
    }
}

/// Most bytes read from an answer.
const MAX_ANSWER: usize = 4096;
/// What a UDP probe sends when the rule gives no request.
const UDP_PAYLOAD: &[u8] = b"ferrolb-probe";

/// A probe that passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Passed {
    pub rtt: Duration,
    /// A UDP probe that got no answer from a live host: up by loxilb's rule, but weak
    /// evidence (backends rate-limit their ICMP port unreachables to one a second per
    /// peer, so a dead service answers only every other probe at a 1 s interval).
    pub quiet: bool,
}

/// Probes `t` once.
pub async fn run(t: &Target, timeout: Duration) -> Result<Passed, Failure> {
    let start = Instant::now();
    let r = tokio::time::timeout(timeout, once(t, timeout)).await;
    match r {
        Ok(Ok(quiet)) => Ok(Passed {
            rtt: start.elapsed(),
            quiet,
        }),
        Ok(Err(f)) => Err(f),
        Err(_) => Err(Failure::Timeout),
    }
}

/// `Ok(quiet)`: passed (quiet: a UDP probe with no answer).
async fn once(t: &Target, timeout: Duration) -> Result<bool, Failure> {
    let addr = SocketAddr::new(t.ip, t.port);
    match t.kind {
        ProbeKind::None => Ok(false),
        ProbeKind::Ping => ping(t.ip, t.source).await.map(|()| false),
        ProbeKind::Tcp => {
            let mut s = connect(addr, t.source).await?;
            if t.request.is_empty() && t.response.is_empty() {
                return Ok(false);
            }
            exchange(&mut s, t.request.as_bytes(), t.response.as_bytes())
                .await
                .map(|()| false)
        }
        ProbeKind::Udp => udp(addr, t, timeout).await,
        ProbeKind::Sctp => sctp_init(addr, t.source).await.map(|()| false),
        ProbeKind::Http => {
            let mut s = connect(addr, t.source).await?;
            http(&mut s, t).await.map(|()| false)
        }
        ProbeKind::Https => {
            let s = connect(addr, t.source).await?;
            let cfg = tls_config().map_err(|_| Failure::Tls)?;
            let name = rustls::pki_types::ServerName::IpAddress(t.ip.into());
            let mut s = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, s)
                .await
                .map_err(|_| Failure::Tls)?;
            http(&mut s, t).await.map(|()| false)
        }
    }
}

async fn connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
) -> Result<tokio::net::TcpStream, Failure> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(|e| Failure::of(&e))?;
    if let Some(src) = source {
        sock.bind(SocketAddr::new(src, 0))
            .map_err(|e| Failure::of(&e))?;
    }
    let s = sock.connect(addr).await.map_err(|e| Failure::of(&e))?;
    // A probe closes with RST (linger 0, which does not block a non-blocking socket's
    // close): no TIME_WAIT per probe on this node.
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    Ok(s)
}

/// Sends `req` (if any) and expects the answer to start with `resp` (if any).
async fn exchange<S>(s: &mut S, req: &[u8], resp: &[u8]) -> Result<(), Failure>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if !req.is_empty() {
        s.write_all(req).await.map_err(|e| Failure::of(&e))?;
    }
    if resp.is_empty() {
        return Ok(());
    }
    let mut buf = vec![0u8; resp.len().min(MAX_ANSWER)];
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]).await {
            Ok(0) => return Err(Failure::BadResponse),
            Ok(n) => got += n,
            Err(e) => return Err(Failure::of(&e)),
        }
    }
    if buf[..] == resp[..buf.len()] {
        Ok(())
    } else {
        Err(Failure::BadResponse)
    }
}

/// `HEAD /<request>` (`GET` when a response is expected: its body must start with it);
/// status 200 passes, as loxilb.
async fn http<S>(s: &mut S, t: &Target) -> Result<(), Failure>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let path = t.request.trim_start_matches('/');
    // The request is the operator's text: no line breaks into the request line.
    if path.bytes().any(|b| b == b'\r' || b == b'\n' || b == b' ') {
        return Err(Failure::BadResponse);
    }
    let method = if t.response.is_empty() { "HEAD" } else { "GET" };
    let host = SocketAddr::new(t.ip, t.port);
    let req = format!(
        "{method} /{path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: ferrolb-probe\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| Failure::of(&e))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        match s.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() >= MAX_ANSWER {
                    break;
                }
                if t.response.is_empty() && buf.windows(2).any(|w| w == b"\r\n") {
                    break;
                }
                if let Some(i) = find(&buf, b"\r\n\r\n")
                    && buf.len() >= i + 4 + t.response.len()
                {
                    break;
                }
            }
            Err(e) if buf.is_empty() => return Err(Failure::of(&e)),
            Err(_) => break,
        }
    }
    let status_ok = buf.starts_with(b"HTTP/1.1 200") || buf.starts_with(b"HTTP/1.0 200");
    if !status_ok {
        return Err(Failure::BadResponse);
    }
    if t.response.is_empty() {
        return Ok(());
    }
    let body = find(&buf, b"\r\n\r\n")
        .map(|i| &buf[i + 4..])
        .unwrap_or(&[]);
    if body.starts_with(t.response.as_bytes()) {
        Ok(())
    } else {
        Err(Failure::BadResponse)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// How long a UDP probe still listens for an ICMP error after the host answered its echo.
/// The error for the datagram left the endpoint before the echo reply did, so it is normally
/// here already; this covers reordering on the way.
const UDP_GRACE: Duration = Duration::from_millis(20);

/// A datagram to the endpoint: an ICMP port unreachable (`ECONNREFUSED` on the connected
/// socket) is down; an answer is up (or compared with the expected response). Silence is up
/// (as loxilb) only if the host itself answers an echo meanwhile: a host that vanished
/// answers nothing, and silence alone cannot tell it from a quiet service.
///
/// The socket is watched for errors as well as data: an ICMP error makes a UDP socket
/// report `EPOLLERR` only, never `EPOLLIN`, and a wait for readability alone (tokio's
/// `UdpSocket::recv`) misses it; refusals then looked like quiet passes now and then.
async fn udp(addr: SocketAddr, t: &Target, timeout: Duration) -> Result<bool, Failure> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    use tokio::io::Interest;
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let sock =
        Socket::new(domain, Type::DGRAM, Some(Protocol::UDP)).map_err(|e| Failure::of(&e))?;
    sock.set_nonblocking(true).map_err(|e| Failure::of(&e))?;
    if let Some(src) = t.source {
        sock.bind(&SockAddr::from(SocketAddr::new(src, 0)))
            .map_err(|e| Failure::of(&e))?;
    }
    sock.connect(&SockAddr::from(addr))
        .map_err(|e| Failure::of(&e))?;
    let payload = if t.request.is_empty() {
        UDP_PAYLOAD
    } else {
        t.request.as_bytes()
    };
    sock.send(payload).map_err(|e| Failure::of(&e))?;
    // SAFETY: the socket owns its descriptor for its whole life and always returns that one.
    let fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(sock, Interest::READABLE | Interest::ERROR)
    }
    .map_err(|e| Failure::of(&e.into()))?;
    let alive = ping(t.ip, t.source);
    tokio::pin!(alive);
    let mut host_answered = false;
    let mut echo_done = false;
    let mut buf = vec![std::mem::MaybeUninit::<u8>::uninit(); MAX_ANSWER];
    // Leave a little of the timeout for the verdict on silence.
    let deadline = tokio::time::sleep(timeout.mul_f32(0.9));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            r = fd.ready(Interest::READABLE | Interest::ERROR) => {
                let mut guard = r.map_err(|e| Failure::of(&e))?;
                // A pending error (the ICMP's) is what recv reports first.
                match guard.try_io(|s| s.get_ref().recv(&mut buf)) {
                    Ok(Ok(n)) => {
                        // SAFETY: recv initialised the first n bytes.
                        let got: Vec<u8> = buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect();
                        return if t.response.is_empty() || got.starts_with(t.response.as_bytes()) {
                            Ok(false)
                        } else {
                            Err(Failure::BadResponse)
                        };
                    }
                    Ok(Err(e)) => return Err(Failure::of(&e)),
                    // Nothing after all: the readiness is cleared; wait again.
                    Err(_would_block) => {}
                }
            }
            r = &mut alive, if !echo_done => {
                // An echo that failed outright (unreachable): keep listening for the
                // datagram's fate until the deadline.
                echo_done = true;
                host_answered = r.is_ok();
                if host_answered && t.response.is_empty() {
                    deadline.as_mut().reset(tokio::time::Instant::now() + UDP_GRACE);
                }
            }
            _ = &mut deadline => {
                return if !t.response.is_empty() {
                    Err(Failure::Timeout)
                } else if host_answered {
                    Ok(true)
                } else {
                    Err(Failure::Unreachable)
                };
            }
        }
    }
}

/// One ICMP echo (raw socket: the agent runs with CAP_NET_RAW); any reply from `ip` with
/// our identifier is up.
pub async fn ping(ip: IpAddr, source: Option<IpAddr>) -> Result<(), Failure> {
    use socket2::{Domain, Protocol, Socket, Type};
    let (domain, proto) = match ip {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6),
    };
    let sock = Socket::new(domain, Type::RAW, Some(proto)).map_err(|e| Failure::of(&e))?;
    sock.set_nonblocking(true).map_err(|e| Failure::of(&e))?;
    if let Some(src) = source {
        sock.bind(&SocketAddr::new(src, 0).into())
            .map_err(|e| Failure::of(&e))?;
    }
    let ident = next_ident();
    let mut pkt = [0u8; 16];
    pkt[0] = if ip.is_ipv4() { 8 } else { 128 };
    pkt[4..6].copy_from_slice(&ident.to_be_bytes());
    pkt[6..8].copy_from_slice(&1u16.to_be_bytes());
    pkt[8..16].copy_from_slice(b"ferrolb!");
    if ip.is_ipv4() {
        let c = checksum(&pkt);
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
    }
    // (ICMPv6: the kernel fills the checksum of raw ICMPv6 sockets.)
    // SAFETY: the socket owns its descriptor for its whole life and always returns that one.
    let fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(sock, tokio::io::Interest::READABLE)
    }
    .map_err(|e| Failure::of(&e.into()))?;
    let dst: socket2::SockAddr = SocketAddr::new(ip, 0).into();
    fd.get_ref()
        .send_to(&pkt, &dst)
        .map_err(|e| Failure::of(&e))?;
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1500];
    loop {
        let mut guard = fd.readable().await.map_err(|e| Failure::of(&e))?;
        match guard.try_io(|s| s.get_ref().recv_from(&mut buf)) {
            Ok(Ok((n, from))) => {
                // SAFETY: recv_from initialised the first n bytes.
                let data: Vec<u8> = buf[..n]
                    .iter()
                    .map(|b| unsafe { b.assume_init() })
                    .collect();
                if from.as_socket().map(|a| a.ip()) != Some(ip) {
                    continue;
                }
                // IPv4 raw sockets see the IP header; IPv6 ones do not.
                let icmp = if ip.is_ipv4() {
                    let ihl = usize::from(data.first().copied().unwrap_or(0) & 0x0f) * 4;
                    data.get(ihl..).unwrap_or(&[])
                } else {
                    &data[..]
                };
                let reply = if ip.is_ipv4() { 0 } else { 129 };
                if icmp.len() >= 8 && icmp[0] == reply && icmp[4..6] == ident.to_be_bytes() {
                    return Ok(());
                }
            }
            Ok(Err(e)) => return Err(Failure::of(&e)),
            Err(_would_block) => continue,
        }
    }
}

/// An SCTP packet: common header (CRC32c filled in) and chunks.
pub fn sctp_packet(sport: u16, dport: u16, vtag: u32, chunks: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(12 + chunks.len());
    p.extend(sport.to_be_bytes());
    p.extend(dport.to_be_bytes());
    p.extend(vtag.to_be_bytes());
    p.extend([0u8; 4]);
    p.extend_from_slice(chunks);
    // RFC 9260 appendix A: CRC32c over the packet with a zero checksum field, stored in the
    // byte order the algorithm produces it (little-endian as a number).
    let c = crc32c::crc32c(&p);
    p[8..12].copy_from_slice(&c.to_le_bytes());
    p
}

/// What an SCTP probe makes of a packet from the endpoint: `Some(Ok(peer_tag))` an INIT ACK
/// for our INIT (its initiate tag), `Some(Err)` an ABORT, `None` anything else (another
/// association's packet, a bad checksum).
pub fn sctp_answer(
    p: &[u8],
    our_port: u16,
    their_port: u16,
    tag: u32,
) -> Option<Result<u32, Failure>> {
    if p.len() < 16 || p[0..2] != their_port.to_be_bytes() || p[2..4] != our_port.to_be_bytes() {
        return None;
    }
    if p[4..8] != tag.to_be_bytes() {
        return None;
    }
    let mut z = p.to_vec();
    z[8..12].fill(0);
    if crc32c::crc32c(&z) != u32::from_le_bytes([p[8], p[9], p[10], p[11]]) {
        return None;
    }
    match p[12] {
        2 if p.len() >= 20 => Some(Ok(u32::from_be_bytes([p[16], p[17], p[18], p[19]]))),
        6 => Some(Err(Failure::Refused)),
        _ => None,
    }
}

/// An SCTP INIT to `addr` from a raw socket (this host needs no SCTP stack): an INIT ACK is
/// up, and the half-made association is aborted at once; an ABORT is down (no listener);
/// silence is a timeout (the caller's).
pub async fn sctp_init(addr: SocketAddr, source: Option<IpAddr>) -> Result<(), Failure> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let sock =
        Socket::new(domain, Type::RAW, Some(Protocol::from(132))).map_err(|e| Failure::of(&e))?;
    sock.set_nonblocking(true).map_err(|e| Failure::of(&e))?;
    if let Some(src) = source {
        sock.bind(&SocketAddr::new(src, 0).into())
            .map_err(|e| Failure::of(&e))?;
    }
    let ident = u32::from(next_ident());
    // An ephemeral port and a tag of our own (never 0).
    let our_port = 49152 + (ident as u16 % 16384);
    let tag = (ident << 16) | 0x5c7b;
    let mut init = vec![1u8, 0, 0, 20];
    init.extend(tag.to_be_bytes()); // initiate tag
    init.extend(65535u32.to_be_bytes()); // a_rwnd
    init.extend(1u16.to_be_bytes()); // outbound streams
    init.extend(1u16.to_be_bytes()); // inbound streams
    init.extend(tag.to_be_bytes()); // initial TSN
    let pkt = sctp_packet(our_port, addr.port(), 0, &init);
    // SAFETY: the socket owns its descriptor for its whole life and always returns that one.
    let fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(sock, tokio::io::Interest::READABLE)
    }
    .map_err(|e| Failure::of(&e.into()))?;
    let dst: socket2::SockAddr = SocketAddr::new(addr.ip(), 0).into();
    fd.get_ref()
        .send_to(&pkt, &dst)
        .map_err(|e| Failure::of(&e))?;
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
    loop {
        let mut guard = fd.readable().await.map_err(|e| Failure::of(&e))?;
        match guard.try_io(|s| s.get_ref().recv_from(&mut buf)) {
            Ok(Ok((n, from))) => {
                if from.as_socket().map(|a| a.ip()) != Some(addr.ip()) {
                    continue;
                }
                // SAFETY: recv_from initialised the first n bytes.
                let data: Vec<u8> = buf[..n]
                    .iter()
                    .map(|b| unsafe { b.assume_init() })
                    .collect();
                let sctp = if addr.is_ipv4() {
                    let ihl = usize::from(data.first().copied().unwrap_or(0) & 0x0f) * 4;
                    data.get(ihl..).unwrap_or(&[])
                } else {
                    &data[..]
                };
                match sctp_answer(sctp, our_port, addr.port(), tag) {
                    Some(Ok(peer_tag)) => {
                        // ABORT (no T bit: the peer's tag) so the endpoint frees its state.
                        let abort = sctp_packet(our_port, addr.port(), peer_tag, &[6, 0, 0, 4]);
                        let _ = fd.get_ref().send_to(&abort, &dst);
                        return Ok(());
                    }
                    Some(Err(f)) => return Err(f),
                    None => continue,
                }
            }
            Ok(Err(e)) => return Err(Failure::of(&e)),
            Err(_would_block) => continue,
        }
    }
}

fn next_ident() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Mixed with the process id: two agents on one host do not take each other's replies.
    NEXT.fetch_add(1, Ordering::Relaxed) ^ (std::process::id() as u16).rotate_left(7)
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in b.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from(c[0]) << 8
        };
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// TLS for HTTPS probes: endpoints are addressed by IP and carry whatever certificate their
/// service has; a probe asks "does it answer", not "is it who it says" (as loxilb, keepalived).
fn tls_config() -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    static CFG: std::sync::OnceLock<Result<Arc<rustls::ClientConfig>, rustls::Error>> =
        std::sync::OnceLock::new();
    CFG.get_or_init(|| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
            .with_no_client_auth();
        Ok(Arc::new(cfg))
    })
    .clone()
}

#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CRC32c of RFC 9260 appendix A (RFC 3720 B.4's test vector: 32 zero bytes), the
    /// packet the probe sends, and which answers it takes.
    #[test]
    fn sctp_probe_packets_and_answers() {
        assert_eq!(crc32c::crc32c(&[0u8; 32]), 0x8a91_36aa);
        let p = sctp_packet(50000, 38412, 0, &[1, 0, 0, 4]);
        assert_eq!(&p[..8], &[0xc3, 0x50, 0x96, 0x0c, 0, 0, 0, 0]);
        let init_ack = |tag: u32, crc_ok: bool| {
            let mut c = vec![2u8, 0, 0, 20];
            c.extend(0xabcd_0001u32.to_be_bytes());
            c.extend([0u8; 12]);
            let mut p = sctp_packet(38412, 50000, tag, &c);
            if !crc_ok {
                p[11] ^= 1;
            }
            p
        };
        assert_eq!(
            sctp_answer(&init_ack(7, true), 50000, 38412, 7),
            Some(Ok(0xabcd_0001))
        );
        assert_eq!(
            sctp_answer(&init_ack(8, true), 50000, 38412, 7),
            None,
            "another tag"
        );
        assert_eq!(
            sctp_answer(&init_ack(7, false), 50000, 38412, 7),
            None,
            "bad CRC"
        );
        assert_eq!(
            sctp_answer(&init_ack(7, true), 50001, 38412, 7),
            None,
            "another port"
        );
        let abort = sctp_packet(38412, 50000, 7, &[6, 0, 0, 4]);
        assert_eq!(
            sctp_answer(&abort, 50000, 38412, 7),
            Some(Err(Failure::Refused))
        );
        assert_eq!(
            sctp_answer(&abort[..10], 50000, 38412, 7),
            None,
            "truncated"
        );
    }

    #[test]
    fn icmp_checksum_of_an_echo_request() {
        // RFC 1071 example words.
        let mut p = [8u8, 0, 0, 0, 0x12, 0x34, 0, 1];
        let c = checksum(&p);
        p[2..4].copy_from_slice(&c.to_be_bytes());
        assert_eq!(checksum(&p), 0);
    }

    #[tokio::test]
    async fn tcp_and_http_probes_against_local_listeners() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 512];
                    let n = s.read(&mut b).await.unwrap_or(0);
                    let req = String::from_utf8_lossy(&b[..n]).to_string();
                    let reply =
                        if req.starts_with("HEAD /health ") || req.starts_with("GET /health ") {
                            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                        } else if req.starts_with("ping") {
                            "pong"
                        } else {
                            "HTTP/1.1 404 Not Found\r\n\r\n"
                        };
                    let _ = s.write_all(reply.as_bytes()).await;
                });
            }
        });
        let t = |kind, req: &str, resp: &str| Target {
            ip: "127.0.0.1".parse().unwrap(),
            port,
            kind,
            request: req.into(),
            response: resp.into(),
            source: None,
        };
        let to = Duration::from_secs(1);
        assert!(run(&t(ProbeKind::Tcp, "", ""), to).await.is_ok());
        assert!(run(&t(ProbeKind::Tcp, "ping", "pong"), to).await.is_ok());
        assert_eq!(
            run(&t(ProbeKind::Tcp, "ping", "nope"), to).await,
            Err(Failure::BadResponse)
        );
        assert!(run(&t(ProbeKind::Http, "health", ""), to).await.is_ok());
        assert!(run(&t(ProbeKind::Http, "/health", "ok"), to).await.is_ok());
        assert_eq!(
            run(&t(ProbeKind::Http, "other", ""), to).await,
            Err(Failure::BadResponse)
        );
        assert_eq!(
            run(&t(ProbeKind::Http, "a b\r\nX: y", ""), to).await,
            Err(Failure::BadResponse)
        );
        // A closed port: refused.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut c = t(ProbeKind::Tcp, "", "");
        c.port = closed;
        assert_eq!(run(&c, to).await, Err(Failure::Refused));
    }

    #[tokio::test]
    async fn udp_probe_tells_a_closed_port_from_a_quiet_one() {
        if !nix::unistd::Uid::effective().is_root() {
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                b"skipped: the UDP probe's echo needs a raw socket (root)\n",
            );
            assert!(std::env::var_os("CI").is_none(), "CI runs as root");
            return;
        }
        let quiet = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = quiet.local_addr().unwrap().port();
        let closed = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap().port()
        };
        let t = |port| Target {
            ip: "127.0.0.1".parse().unwrap(),
            port,
            kind: ProbeKind::Udp,
            request: String::new(),
            response: String::new(),
            source: None,
        };
        let to = Duration::from_millis(500);
        let p = run(&t(port), to).await.unwrap();
        assert!(p.quiet, "a quiet UDP port is up, quietly: {p:?}");
        // Every probe of a closed port is refused: the port unreachable reaches the probe
        // (loopback is not rate-limited per peer). Tokio's wait for readability alone
        // missed it now and then, and a dead service looked up.
        for i in 0..6 {
            let r = run(&t(closed), to).await;
            assert_eq!(r, Err(Failure::Refused), "probe {i} of a closed UDP port");
        }
        assert!(
            run(
                &Target {
                    kind: ProbeKind::Ping,
                    ..t(0)
                },
                to
            )
            .await
            .is_ok()
        );
        drop(quiet);
    }
}
