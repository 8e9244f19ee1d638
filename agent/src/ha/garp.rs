//! Gratuitous ARP for L2 HA: the new MASTER announces every VIP on every interface the
//! datapath is attached to, so clients and backends on those segments send the VIP's traffic
//! to it at once instead of waiting for their ARP entries to expire.

use std::net::Ipv4Addr;

use tracing::warn;

const ETH_P_ARP: u16 = 0x0806;

/// The interface's MAC address (from sysfs).
fn mac_of(iface: &str) -> Option<[u8; 6]> {
    let s = std::fs::read_to_string(format!("/sys/class/net/{iface}/address")).ok()?;
    let mut out = [0u8; 6];
    let mut parts = s.trim().split(':');
    for b in out.iter_mut() {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    if parts.next().is_some() || out == [0; 6] {
        return None;
    }
    Some(out)
}

/// An Ethernet broadcast ARP request announcing `vip` at `mac` (sender = target = VIP).
pub fn frame(mac: [u8; 6], vip: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    f[14..22].copy_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&vip.octets());
    f[38..42].copy_from_slice(&vip.octets());
    f
}

/// Sends one gratuitous ARP per VIP on each interface (name, index). Returns how many went.
pub fn announce(ifaces: &[(String, u32)], vips: &[Ipv4Addr]) -> usize {
    if vips.is_empty() {
        return 0;
    }
    // SAFETY: a plain socket call; the fd is closed below.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from(ETH_P_ARP.to_be()),
        )
    };
    if fd < 0 {
        warn!(error = %std::io::Error::last_os_error(), "gratuitous ARP: no packet socket");
        return 0;
    }
    let mut sent = 0;
    for (name, index) in ifaces {
        let Some(mac) = mac_of(name) else { continue };
        // SAFETY: sockaddr_ll is plain data.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = ETH_P_ARP.to_be();
        sa.sll_ifindex = *index as i32;
        sa.sll_halen = 6;
        sa.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        for vip in vips {
            let f = frame(mac, *vip);
            // SAFETY: f and sa outlive the call; lengths are theirs.
            let rc = unsafe {
                libc::sendto(
                    fd,
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&sa as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if rc == f.len() as isize {
                sent += 1;
            }
        }
    }
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    sent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_is_a_broadcast_arp_request_for_the_vip() {
        let mac = [2, 0, 0, 0, 0, 7];
        let f = frame(mac, Ipv4Addr::new(192, 168, 10, 50));
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1], "op: request");
        assert_eq!(&f[22..28], &mac, "sender MAC");
        assert_eq!(&f[28..32], &[192, 168, 10, 50], "sender IP");
        assert_eq!(&f[32..38], &[0; 6], "target MAC");
        assert_eq!(&f[38..42], &[192, 168, 10, 50], "target IP = sender IP");
    }
}
