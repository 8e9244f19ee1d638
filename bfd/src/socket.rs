//! The only file that touches sockets: single-hop BFD transport (RFC 5881). Sockets are made
//! and configured with socket2; what it lacks (IP_RECVTTL / IPV6_RECVHOPLIMIT and reading the
//! TTL from `recvmsg`'s control messages) is done with libc here.
//!
//! - Receive: one UDP socket per address family on port 3784 with `IP_RECVTTL` /
//!   `IPV6_RECVHOPLIMIT`, so every datagram comes with its TTL; GTSM (RFC 5082) drops anything
//!   that did not arrive with TTL 255, first in the kernel (a classic BPF socket filter: a
//!   datagram from off the link is never queued, so a flood from afar neither wakes the
//!   real-time BFD thread nor delays the peers' packets behind it; `IP_MINTTL` would say the
//!   same but Linux applies it to TCP only), then again in user space.
//! - Send: one socket per session, bound to the session's local address and a source port in
//!   49152-65535 (the same port for the session's life), TTL / hop limit 255.

use std::io;
use std::mem::{size_of, size_of_val, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// The BFD control port (RFC 5881 §4).
pub const CONTROL_PORT: u16 = 3784;
/// Source ports for control packets (RFC 5881 §4).
pub const SOURCE_PORTS: std::ops::RangeInclusive<u16> = 49152..=65535;
/// GTSM: TTL / hop limit sent and required.
pub const TTL: u32 = 255;

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// For the options socket2 does not have (IP_RECVTTL, IPV6_RECVHOPLIMIT).
fn setsockopt_int(fd: RawFd, level: i32, name: i32, v: i32) -> io::Result<()> {
    // SAFETY: v lives across the call; the size matches.
    check(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const i32).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn from_sockaddr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this is a sockaddr_in.
            let sin =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this is a sockaddr_in6.
            let sin6 =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                0,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// `SO_MEMINFO` (`asm-generic/socket.h`: x86_64, aarch64, riscv64; the libc crate does not
/// have it) and the length of its answer (`SK_MEMINFO_VARS`). Where the number differs
/// (sparc, parisc), the call fails and the drops read as none.
const SO_MEMINFO: libc::c_int = 55;
const SK_MEMINFO_VARS: usize = 9;

/// GTSM in the kernel: a socket filter that keeps a datagram only when its IPv4 TTL (byte 8
/// of the IP header) or IPv6 hop limit (byte 7) is 255.
fn gtsm_filter(v6: bool) -> [socket2::SockFilter; 4] {
    use socket2::SockFilter;
    // The network header, seen from a UDP socket's filter (which starts at the UDP header).
    let at = (libc::SKF_NET_OFF + if v6 { 7 } else { 8 }) as u32;
    [
        SockFilter::new(
            (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16,
            0,
            0,
            at,
        ),
        SockFilter::new(
            (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            0,
            1,
            TTL,
        ),
        SockFilter::new((libc::BPF_RET | libc::BPF_K) as u16, 0, 0, u32::MAX),
        SockFilter::new((libc::BPF_RET | libc::BPF_K) as u16, 0, 0, 0),
    ]
}

/// A non-blocking, close-on-exec UDP socket of the family (socket2).
fn udp_socket(v6: bool) -> io::Result<Socket> {
    let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    let s = Socket::new(domain, Type::DGRAM.cloexec(), Some(Protocol::UDP))?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// A receiving socket on port 3784 (or another port, for tests) for one family.
pub struct RxSocket {
    fd: Socket,
}

/// One received datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    pub from: SocketAddr,
    /// TTL (IPv4) or hop limit (IPv6) it arrived with; None when the kernel gave none.
    pub ttl: Option<u8>,
    pub len: usize,
}

impl RxSocket {
    pub fn bind(v6: bool, port: u16) -> io::Result<RxSocket> {
        let fd = udp_socket(v6)?;
        fd.set_reuse_address(true)?;
        let addr = if v6 {
            fd.set_only_v6(true)?;
            setsockopt_int(
                fd.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_RECVHOPLIMIT,
                1,
            )?;
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)
        } else {
            setsockopt_int(fd.as_raw_fd(), libc::IPPROTO_IP, libc::IP_RECVTTL, 1)?;
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)
        };
        fd.attach_filter(&gtsm_filter(v6))?;
        fd.bind(&SockAddr::from(addr))?;
        Ok(RxSocket { fd })
    }

    /// Datagrams the kernel dropped for this socket: the GTSM filter's, and any that found
    /// the receive queue full (`SO_MEMINFO`'s drop count; it wraps at 2^32).
    pub fn kernel_drops(&self) -> io::Result<u32> {
        let mut info = [0u32; SK_MEMINFO_VARS];
        let mut len = size_of_val(&info) as libc::socklen_t;
        // SAFETY: `info` is writable for `len` bytes, and the kernel writes at most `len`.
        check(unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_MEMINFO,
                info.as_mut_ptr().cast(),
                &mut len,
            )
        })?;
        Ok(info[libc::SK_MEMINFO_DROPS as usize])
    }

    /// Reads one datagram into `buf`; `WouldBlock` when none is queued.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Datagram> {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: zeroed storage is valid for every field.
        let mut from: libc::sockaddr_storage = unsafe { zeroed() };
        let mut cbuf = [0u64; 16];
        // SAFETY: zeroed msghdr, then every pointer set to buffers that outlive the call.
        let mut msg: libc::msghdr = unsafe { zeroed() };
        msg.msg_name = (&mut from as *mut libc::sockaddr_storage).cast();
        msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = size_of::<[u64; 16]>();
        // SAFETY: msg is fully initialised above.
        let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut ttl = None;
        // SAFETY: walking the control buffer the kernel filled, with the libc macros.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                let level = (*c).cmsg_level;
                let ty = (*c).cmsg_type;
                if (level == libc::IPPROTO_IP && ty == libc::IP_TTL)
                    || (level == libc::IPPROTO_IPV6 && ty == libc::IPV6_HOPLIMIT)
                {
                    let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<i32>());
                    ttl = u8::try_from(v).ok();
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        let from = from_sockaddr(&from)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unknown address family"))?;
        Ok(Datagram {
            from,
            ttl,
            len: n as usize,
        })
    }
}

impl AsRawFd for RxSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A session's sending socket.
pub struct TxSocket {
    fd: Socket,
    pub local: SocketAddr,
}

impl TxSocket {
    /// Binds to `local` and a free source port in 49152-65535 (`first_port` is tried first,
    /// then the ports after it), TTL 255.
    pub fn bind(local: IpAddr, first_port: u16) -> io::Result<TxSocket> {
        let fd = udp_socket(local.is_ipv6())?;
        if local.is_ipv6() {
            fd.set_unicast_hops_v6(TTL)?;
        } else {
            fd.set_ttl_v4(TTL)?;
        }
        let span = u32::from(SOURCE_PORTS.end() - SOURCE_PORTS.start()) + 1;
        let start = u32::from(first_port.clamp(*SOURCE_PORTS.start(), *SOURCE_PORTS.end()))
            - u32::from(*SOURCE_PORTS.start());
        let mut last = io::Error::from(io::ErrorKind::AddrInUse);
        for i in 0..256u32 {
            let port = *SOURCE_PORTS.start() + ((start + i * 97) % span) as u16;
            let addr = SocketAddr::new(local, port);
            match fd.bind(&SockAddr::from(addr)) {
                Ok(()) => return Ok(TxSocket { fd, local: addr }),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    pub fn send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.fd.send_to(buf, &SockAddr::from(to))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_datagram_carries_its_ttl() {
        if !ferrolb_tests::private_netns("loopback_datagram_carries_its_ttl") {
            return;
        }
        let rx = RxSocket::bind(false, CONTROL_PORT).unwrap();
        let tx = TxSocket::bind(IpAddr::V4(Ipv4Addr::LOCALHOST), 50000).unwrap();
        assert!(SOURCE_PORTS.contains(&tx.local.port()));
        tx.send_to(
            b"hello",
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), CONTROL_PORT),
        )
        .unwrap();
        let mut buf = [0u8; 64];
        let mut got = None;
        for _ in 0..100 {
            match rx.recv(&mut buf) {
                Ok(d) => {
                    got = Some(d);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => panic!("{e}"),
            }
        }
        let d = got.expect("datagram");
        assert_eq!(d.len, 5);
        assert_eq!(d.ttl, Some(255));
        assert_eq!(d.from, tx.local);
        assert_eq!(&buf[..5], b"hello");
    }

    /// A datagram that did not arrive with TTL (hop limit) 255 is dropped by the kernel's
    /// filter: never read, counted in the socket's drops.
    #[test]
    fn the_kernel_drops_datagrams_without_ttl_255() {
        if !ferrolb_tests::private_netns("the_kernel_drops_datagrams_without_ttl_255") {
            return;
        }
        for (v6, lo) in [
            (false, IpAddr::V4(Ipv4Addr::LOCALHOST)),
            (true, IpAddr::V6(Ipv6Addr::LOCALHOST)),
        ] {
            let rx = RxSocket::bind(v6, CONTROL_PORT).unwrap();
            let to = SockAddr::from(SocketAddr::new(lo, CONTROL_PORT));
            let send = |ttl: u32, what: &[u8]| {
                let s = udp_socket(v6).unwrap();
                if v6 {
                    s.set_unicast_hops_v6(ttl).unwrap();
                } else {
                    s.set_ttl_v4(ttl).unwrap();
                }
                s.send_to(what, &to).unwrap();
            };
            for ttl in [1, 64, 254] {
                send(ttl, b"far");
            }
            send(255, b"near");
            let mut buf = [0u8; 64];
            let mut got = Vec::new();
            for _ in 0..40 {
                match rx.recv(&mut buf) {
                    Ok(d) => got.push((buf[..d.len].to_vec(), d.ttl)),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if !got.is_empty() {
                            break;
                        }
                        std::thread::sleep(std::time::Duration::from_millis(5))
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            assert_eq!(got, vec![(b"near".to_vec(), Some(255))], "v6 {v6}");
            assert_eq!(rx.kernel_drops().unwrap(), 3, "v6 {v6}");
        }
    }
}
