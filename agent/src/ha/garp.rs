//! L2 HA announcements: the new MASTER announces every VIP on every interface the datapath is
//! attached to, so clients and backends on those segments send the VIP's traffic to it at once
//! instead of waiting for their neighbour entries to expire. IPv4 VIPs get a gratuitous ARP,
//! IPv6 VIPs an unsolicited neighbour advertisement to all nodes (RFC 4861 §7.2.6, override
//! flag set).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ferrolb_bpf::datapath::mac_of;
use tracing::warn;

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;

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

/// An unsolicited neighbour advertisement for `vip` at `mac`: from the VIP to all nodes
/// (ff02::1, Ethernet 33:33:00:00:00:01), hop limit 255, override flag, target link-layer
/// address option.
pub fn na_frame(mac: [u8; 6], vip: Ipv6Addr) -> [u8; 86] {
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let mut f = [0u8; 86];
    f[0..6].copy_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
    // IPv6 header: version 6, payload 32 bytes, next header ICMPv6, hop limit 255.
    f[14] = 0x60;
    f[18..20].copy_from_slice(&32u16.to_be_bytes());
    f[20] = 58;
    f[21] = 255;
    f[22..38].copy_from_slice(&vip.octets());
    f[38..54].copy_from_slice(&all_nodes.octets());
    // ICMPv6 type 136, code 0, checksum, flags (override), target, option 2 (our MAC).
    f[54] = 136;
    f[58] = 0x20;
    f[62..78].copy_from_slice(&vip.octets());
    f[78] = 2;
    f[79] = 1;
    f[80..86].copy_from_slice(&mac);
    let mut sum: u32 = 0;
    for w in f[22..54].chunks(2).chain(f[54..86].chunks(2)) {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    sum += 32 + 58;
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    f[56..58].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f
}

/// Sends one announcement per VIP on each interface (name, index). Returns how many went.
pub fn announce(ifaces: &[(String, u32)], vips: &[IpAddr]) -> usize {
    if vips.is_empty() {
        return 0;
    }
    // SAFETY: a plain socket call; the fd is closed below. Protocol 0: this socket only sends.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        warn!(error = %std::io::Error::last_os_error(), "L2 announcements: no packet socket");
        return 0;
    }
    let mut sent = 0;
    for (name, index) in ifaces {
        let Some(mac) = mac_of(name) else { continue };
        for vip in vips {
            let (f, proto, dst): (Vec<u8>, u16, [u8; 6]) = match vip {
                IpAddr::V4(v) => (frame(mac, *v).to_vec(), ETH_P_ARP, [0xff; 6]),
                IpAddr::V6(v) => (
                    na_frame(mac, *v).to_vec(),
                    ETH_P_IPV6,
                    [0x33, 0x33, 0, 0, 0, 1],
                ),
            };
            // SAFETY: sockaddr_ll is plain data.
            let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sa.sll_family = libc::AF_PACKET as u16;
            sa.sll_protocol = proto.to_be();
            sa.sll_ifindex = *index as i32;
            sa.sll_halen = 6;
            sa.sll_addr[..6].copy_from_slice(&dst);
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

    #[test]
    fn neighbour_advertisement_is_unsolicited_with_override_and_a_valid_checksum() {
        let mac = [2, 0, 0, 0, 0, 7];
        let vip: Ipv6Addr = "2001:db8:10::50".parse().unwrap();
        let f = na_frame(mac, vip);
        assert_eq!(&f[0..6], &[0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        assert_eq!((f[20], f[21]), (58, 255), "ICMPv6, hop limit 255");
        assert_eq!(&f[22..38], &vip.octets(), "from the VIP");
        assert_eq!(f[38], 0xff, "to all nodes");
        assert_eq!(f[54], 136);
        assert_eq!(f[58], 0x20, "override, not solicited, not router");
        assert_eq!(&f[62..78], &vip.octets(), "target");
        assert_eq!(
            &f[78..86],
            &[2, 1, 2, 0, 0, 0, 0, 7],
            "target link-layer address"
        );
        // The checksum verifies over the pseudo header and the message.
        let mut sum: u32 = 32 + 58;
        for w in f[22..86].chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff);
    }
}
