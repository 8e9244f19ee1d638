//! VIP ownership on `lo`, and route queries.
//!
//! A VIP in use is put on `lo` as a /32 (IPv6: /128) so the node owns it (IPv4: the stack
//! answers ARP and ping for it; IPv6 neighbour discovery does not answer for `lo` addresses, so
//! the datapath answers solicitations for IPv6 VIPs); an address
//! this agent added is removed when no rule uses it any more. Addresses someone else put on
//! `lo` are never removed. Adding and removing speak rtnetlink directly (one request and its
//! acknowledgement, about 20 µs); the start-up listing and one-arm's route query use iproute2
//! (`ip -j`), which runs once per start or per one-arm rule.

use std::collections::BTreeSet;
use std::io;
use std::net::IpAddr;
use std::process::Command;

use anyhow::{Context, Result, bail};
use tracing::info;

fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("run ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Addresses currently on `lo`.
pub fn lo_addresses() -> Result<BTreeSet<IpAddr>> {
    let out = ip(&["-j", "addr", "show", "dev", "lo"])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("parse ip -j addr output")?;
    let mut set = BTreeSet::new();
    for link in v.as_array().into_iter().flatten() {
        for a in link["addr_info"].as_array().into_iter().flatten() {
            if let Some(ip) = a["local"].as_str().and_then(|s| s.parse().ok()) {
                set.insert(ip);
            }
        }
    }
    Ok(set)
}

/// Makes `lo` carry exactly the wanted VIPs among those we manage (start-up reconciliation).
/// Returns the new managed set.
pub fn sync(wanted: &BTreeSet<IpAddr>, managed: &BTreeSet<IpAddr>) -> Result<BTreeSet<IpAddr>> {
    let present = lo_addresses()?;
    let mut now = managed.clone();
    for v in wanted {
        if !present.contains(v) {
            add(*v)?;
            now.insert(*v);
        }
    }
    for v in managed.difference(wanted) {
        if present.contains(v) {
            del(*v)?;
        }
        now.remove(v);
    }
    Ok(now)
}

/// The interface that carries `addr` in this network namespace, if any.
pub fn interface_with(addr: IpAddr) -> Result<Option<String>> {
    let list = nix::ifaddrs::getifaddrs().context("getifaddrs")?;
    for ifa in list {
        let Some(a) = ifa.address else { continue };
        let ip = if let Some(v4) = a.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = a.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        if ip == addr {
            return Ok(Some(ifa.interface_name));
        }
    }
    Ok(None)
}

fn host_len(ip: IpAddr) -> u8 {
    if ip.is_ipv6() { 128 } else { 32 }
}

/// Puts `vip`/32 (/128) on `lo`. Returns false when the address was already there (someone
/// else's: the caller must not remove it later).
pub fn add(vip: IpAddr) -> Result<bool> {
    let added =
        addr_request(true, vip).with_context(|| format!("add {vip}/{} to lo", host_len(vip)))?;
    if added {
        info!(%vip, "VIP added to lo");
    }
    Ok(added)
}

/// Removes `vip`/32 (/128) from `lo` (already gone is fine).
pub fn del(vip: IpAddr) -> Result<()> {
    addr_request(false, vip).with_context(|| format!("remove {vip}/{} from lo", host_len(vip)))?;
    info!(%vip, "VIP removed from lo");
    Ok(())
}

const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
/// No duplicate address detection: the address is usable at once (as `ip addr add nodad`).
const IFA_F_NODAD: u8 = 0x02;

/// Builds an RTM_NEWADDR/RTM_DELADDR request for `ip`/32 (/128) on interface `ifindex`.
fn addr_message(add: bool, ifindex: u32, ip: IpAddr, seq: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(40);
    let (ty, flags) = if add {
        (
            RTM_NEWADDR,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
    } else {
        (RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK)
    };
    // struct nlmsghdr
    m.extend_from_slice(&0u32.to_ne_bytes()); // length, patched below
    m.extend_from_slice(&ty.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // struct ifaddrmsg { family, prefixlen, flags, scope, index }
    let (family, octets, flags) = match ip {
        IpAddr::V4(a) => (libc::AF_INET, a.octets().to_vec(), 0),
        IpAddr::V6(a) => (libc::AF_INET6, a.octets().to_vec(), IFA_F_NODAD),
    };
    m.push(family as u8);
    m.push(host_len(ip));
    m.push(flags);
    m.push(0); // RT_SCOPE_UNIVERSE, as `ip addr add` gives a non-127 address on lo
    m.extend_from_slice(&ifindex.to_ne_bytes());
    for attr in [IFA_LOCAL, IFA_ADDRESS] {
        m.extend_from_slice(&(4 + octets.len() as u16).to_ne_bytes());
        m.extend_from_slice(&attr.to_ne_bytes());
        m.extend_from_slice(&octets);
    }
    let len = m.len() as u32;
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    m
}

/// The errno of the acknowledgement to request `seq` (0 = success).
fn ack_errno(reply: &[u8], seq: u32) -> Option<i32> {
    let mut off = 0;
    while off + 16 <= reply.len() {
        let len = u32::from_ne_bytes(reply[off..off + 4].try_into().ok()?) as usize;
        let ty = u16::from_ne_bytes(reply[off + 4..off + 6].try_into().ok()?);
        let s = u32::from_ne_bytes(reply[off + 8..off + 12].try_into().ok()?);
        if len < 16 || off + len > reply.len() {
            return None;
        }
        if ty == NLMSG_ERROR && s == seq && len >= 20 {
            let e = i32::from_ne_bytes(reply[off + 16..off + 20].try_into().ok()?);
            return Some(-e);
        }
        off += (len + 3) & !3;
    }
    None
}

/// Adds or removes an address; Ok(false) when there was nothing to do (present / absent).
fn addr_request(add: bool, ip: IpAddr) -> io::Result<bool> {
    // SAFETY: plain libc calls on a socket we own and close.
    unsafe {
        let ifindex = libc::if_nametoindex(c"lo".as_ptr());
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let tv = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
        let seq = 1;
        let msg = addr_message(add, ifindex, ip, seq);
        let mut sa: libc::sockaddr_nl = std::mem::zeroed();
        sa.nl_family = libc::AF_NETLINK as u16;
        let sent = libc::sendto(
            fd,
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&sa as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        );
        if sent < 0 {
            let e = io::Error::last_os_error();
            libc::close(fd);
            return Err(e);
        }
        let mut buf = [0u8; 4096];
        let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
        let recv_err = io::Error::last_os_error();
        libc::close(fd);
        if n < 0 {
            return Err(recv_err);
        }
        match ack_errno(&buf[..n as usize], seq) {
            Some(0) => Ok(true),
            Some(e) if add && e == libc::EEXIST => Ok(false),
            Some(e) if !add && e == libc::EADDRNOTAVAIL => Ok(false),
            Some(e) => Err(io::Error::from_raw_os_error(e)),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "no netlink acknowledgement",
            )),
        }
    }
}

/// The source address the kernel would use to reach `dst`.
pub fn source_toward(dst: IpAddr) -> Result<IpAddr> {
    let out = ip(&["-j", "route", "get", &dst.to_string()])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("parse ip -j route output")?;
    v.get(0)
        .and_then(|r| r["prefsrc"].as_str())
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no source address toward {dst}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_message_layout() {
        let m = addr_message(true, 1, "203.0.113.10".parse().unwrap(), 7);
        assert_eq!(m.len(), 16 + 8 + 8 + 8);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 40);
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), RTM_NEWADDR);
        assert_eq!(m[16], libc::AF_INET as u8);
        assert_eq!(m[17], 32);
        assert_eq!(&m[28..32], &[203, 0, 113, 10]);
        assert_eq!(&m[36..40], &[203, 0, 113, 10]);

        let v6: std::net::Ipv6Addr = "2001:db8::10".parse().unwrap();
        let m = addr_message(false, 1, v6.into(), 8);
        assert_eq!(m.len(), 16 + 8 + 20 + 20);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 64);
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), RTM_DELADDR);
        assert_eq!(m[16], libc::AF_INET6 as u8);
        assert_eq!((m[17], m[18]), (128, IFA_F_NODAD));
        assert_eq!(u16::from_ne_bytes(m[24..26].try_into().unwrap()), 20);
        assert_eq!(&m[28..44], &v6.octets());
        assert_eq!(&m[48..64], &v6.octets());
    }

    #[test]
    fn acknowledgements_are_parsed() {
        let mut ack = Vec::new();
        ack.extend_from_slice(&36u32.to_ne_bytes());
        ack.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack.extend_from_slice(&0u16.to_ne_bytes());
        ack.extend_from_slice(&5u32.to_ne_bytes());
        ack.extend_from_slice(&0u32.to_ne_bytes());
        ack.extend_from_slice(&(-libc::EEXIST).to_ne_bytes());
        ack.extend_from_slice(&[0u8; 16]);
        assert_eq!(ack_errno(&ack, 5), Some(libc::EEXIST));
        assert_eq!(ack_errno(&ack, 6), None);
        assert_eq!(ack_errno(&ack[..10], 5), None);
    }
}
