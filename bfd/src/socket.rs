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

/// The most session peers of one family the receive filter lists by address; with more, it
/// checks the TTL alone (the BFD thread still drops the rest, as `no_session`). 9 instructions
/// an IPv6 address: 256 of them stay well inside classic BPF's 4,096.
pub const MAX_FILTER_PEERS: usize = 256;

/// The socket filter of a receive socket, in the kernel: it keeps a datagram only when its
/// IPv4 TTL (byte 8 of the IP header) or IPv6 hop limit (byte 7) is 255 (GTSM, RFC 5881) and,
/// when `peers` is given, its source address is one of them (the BFD thread would drop any
/// other as `no_session`: this keeps a flood from neighbours on the link, which can send TTL
/// 255, from waking it). Every jump is forward and short (each match returns at once), so the
/// program stays valid whatever the number of peers.
fn rx_filter(v6: bool, peers: Option<&[IpAddr]>) -> Vec<socket2::SockFilter> {
    use socket2::SockFilter;
    const ACCEPT: u32 = u32::MAX;
    let ld = |size: u32, off: i32| {
        SockFilter::new(
            (libc::BPF_LD | size | libc::BPF_ABS) as u16,
            0,
            0,
            // The network header, seen from a UDP socket's filter (which starts at the UDP
            // header).
            (libc::SKF_NET_OFF + off) as u32,
        )
    };
    let jeq = |k: u32, jt: u8, jf: u8| {
        SockFilter::new(
            (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt,
            jf,
            k,
        )
    };
    let ret = |k: u32| SockFilter::new((libc::BPF_RET | libc::BPF_K) as u16, 0, 0, k);
    let mut f = vec![
        ld(libc::BPF_B, if v6 { 7 } else { 8 }),
        jeq(TTL, 1, 0),
        ret(0),
    ];
    let Some(peers) = peers else {
        f.push(ret(ACCEPT));
        return f;
    };
    if v6 {
        for a in peers.iter().filter_map(|a| match a {
            IpAddr::V6(a) => Some(a.octets()),
            IpAddr::V4(_) => None,
        }) {
            // Four words of the source address (bytes 8-23); a mismatch skips to the next
            // peer's block (9 instructions: 4 loads, 4 compares, the return).
            for w in 0..4 {
                let word = u32::from_be_bytes([a[4 * w], a[4 * w + 1], a[4 * w + 2], a[4 * w + 3]]);
                f.push(ld(libc::BPF_W, 8 + 4 * w as i32));
                // jf counts from the instruction after the compare: the rest of the block
                // is 2 * (3 - w) loads and compares and the return.
                f.push(jeq(word, 0, (2 * (3 - w) + 1) as u8));
            }
            f.push(ret(ACCEPT));
        }
    } else {
        f.push(ld(libc::BPF_W, 12));
        for a in peers.iter().filter_map(|a| match a {
            IpAddr::V4(a) => Some(u32::from(*a)),
            IpAddr::V6(_) => None,
        }) {
            f.push(jeq(a, 0, 1));
            f.push(ret(ACCEPT));
        }
    }
    f.push(ret(0));
    f
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
    v6: bool,
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
        // No session yet: nothing is kept until the runner names its peers.
        fd.attach_filter(&rx_filter(v6, Some(&[])))?;
        fd.bind(&SockAddr::from(addr))?;
        Ok(RxSocket { fd, v6 })
    }

    /// Keeps, from now on, only datagrams with TTL 255 from `peers` (those of the other
    /// family are ignored); past [`MAX_FILTER_PEERS`] of this family, any with TTL 255. The
    /// kernel swaps the filter whole. When it refuses, the TTL-only filter is tried, so that
    /// a peer's datagrams are never left to an older list. Ok(false): the peers were too many
    /// to list, and the filter checks the TTL alone.
    pub fn set_peers(&self, peers: &[IpAddr]) -> io::Result<bool> {
        let mine = peers.iter().filter(|a| a.is_ipv6() == self.v6).count();
        let listed = (mine <= MAX_FILTER_PEERS).then_some(peers);
        match self.fd.attach_filter(&rx_filter(self.v6, listed)) {
            Ok(()) => Ok(listed.is_some()),
            Err(e) => {
                self.fd.attach_filter(&rx_filter(self.v6, None))?;
                Err(e)
            }
        }
    }

    /// Datagrams the kernel dropped for this socket: the filter's (TTL, source), and any that
    /// found the receive queue full (`SO_MEMINFO`'s drop count; it wraps at 2^32).
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
        rx.set_peers(&[IpAddr::V4(Ipv4Addr::LOCALHOST)]).unwrap();
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

    /// The kernel's filter keeps a datagram only when it arrived with TTL (hop limit) 255
    /// from a session's peer; the rest are never read, and counted in the socket's drops.
    #[test]
    fn the_kernel_keeps_only_ttl_255_from_session_peers() {
        if !ferrolb_tests::private_netns("the_kernel_keeps_only_ttl_255_from_session_peers") {
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
            let mut buf = [0u8; 64];
            let mut read = || {
                let mut got = Vec::new();
                for _ in 0..20 {
                    match rx.recv(&mut buf) {
                        Ok(d) => got.push(buf[..d.len].to_vec()),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            if !got.is_empty() {
                                break;
                            }
                            std::thread::sleep(std::time::Duration::from_millis(5))
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
                got
            };
            // Other peers, of both families, many of them: 200 IPv6 peers are 1,800
            // instructions, and each block's jumps must land on the next block.
            let others: Vec<IpAddr> = (1..=200u16)
                .map(|i| {
                    if v6 {
                        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 1, i))
                    } else {
                        IpAddr::V4(Ipv4Addr::new(192, 0, 2, i as u8))
                    }
                })
                .chain([
                    IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)),
                    IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1)),
                    // Differs from the loopback address in its last word only.
                    if v6 {
                        IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 2))
                    } else {
                        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))
                    },
                ])
                .collect();
            // No session yet: nothing is kept.
            send(255, b"early");
            // Sessions with others: a datagram from this address is not theirs.
            rx.set_peers(&others).unwrap();
            send(255, b"stranger");
            assert!(read().is_empty(), "v6 {v6}");
            assert_eq!(rx.kernel_drops().unwrap(), 2, "v6 {v6}");
            // A session with this address, last in the list.
            let mut peers = others.clone();
            peers.push(lo);
            rx.set_peers(&peers).unwrap();
            for ttl in [1, 64, 254] {
                send(ttl, b"far");
            }
            send(255, b"near");
            assert_eq!(read(), vec![b"near".to_vec()], "v6 {v6}");
            assert_eq!(rx.kernel_drops().unwrap(), 5, "v6 {v6}");
            // More peers of the family than the filter lists: the TTL alone is checked.
            let many: Vec<IpAddr> = (0..MAX_FILTER_PEERS as u32 + 1)
                .map(|i| {
                    if v6 {
                        IpAddr::V6(Ipv6Addr::from(
                            0x2001_0db8_0000_0000_0000_0000_0002_0000 + u128::from(i),
                        ))
                    } else {
                        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
                    }
                })
                .collect();
            rx.set_peers(&many).unwrap();
            send(64, b"far");
            send(255, b"unlisted");
            assert_eq!(read(), vec![b"unlisted".to_vec()], "v6 {v6}");
            assert_eq!(rx.kernel_drops().unwrap(), 6, "v6 {v6}");
        }
    }
}
