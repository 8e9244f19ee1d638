//! rtnetlink requests the agent makes, built and parsed with `netlink-packet-route` over a
//! synchronous `netlink-sys` socket: VIP addresses on `lo`, the address list, and the
//! source address the kernel picks toward a destination (what `ip route get` prints as
//! `src`). Synchronous on purpose: the callers are the engine's own thread and the blocking
//! pool, never the async workers; every receive is bounded by a 2 s timeout. And the
//! notifications of link, neighbour and route changes ([`FibChanges`]), read by a thread of
//! their own (`ferrolb-fib`), which invalidates the datapath's cached FIB answers.

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::address::{
    AddressAttribute, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use netlink_packet_route::rule::RuleMessage;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// How long a request waits for the kernel's answer.
const TIMEOUT: Duration = Duration::from_secs(2);

fn family(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv6() {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    }
}

pub fn host_len(ip: IpAddr) -> u8 {
    if ip.is_ipv6() { 128 } else { 32 }
}

fn socket() -> io::Result<Socket> {
    let mut s = Socket::new(NETLINK_ROUTE)?;
    s.bind_auto()?;
    s.connect(&SocketAddr::new(0, 0))?;
    let sock = socket2::SockRef::from(&s);
    sock.set_read_timeout(Some(TIMEOUT))?;
    Ok(s)
}

/// Sends one request and collects the messages of its answer: until the ACK (or an error)
/// for a plain request, until DONE for a dump.
fn request(msg: RouteNetlinkMessage, flags: u16) -> io::Result<Vec<RouteNetlinkMessage>> {
    let s = socket()?;
    let mut hdr = NetlinkHeader::default();
    hdr.flags = NLM_F_REQUEST | flags;
    hdr.sequence_number = 1;
    let mut packet = NetlinkMessage::new(hdr, NetlinkPayload::from(msg));
    packet.finalize();
    let mut buf = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut buf[..]);
    s.send(&buf, 0)?;
    let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
    let mut out = Vec::new();
    let mut rx = vec![0u8; 1 << 16];
    loop {
        let n = s.recv(&mut &mut rx[..], 0)?;
        let mut off = 0;
        while off < n {
            let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rx[off..n])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let len = m.header.length as usize;
            match m.payload {
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                // An ACK ends a plain request.
                NetlinkPayload::Error(_) if !dump => return Ok(out),
                NetlinkPayload::InnerMessage(i) => {
                    out.push(i);
                    if !dump && flags & NLM_F_ACK == 0 {
                        return Ok(out);
                    }
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            off += (len + 3) & !3;
        }
    }
}

fn address_message(index: u32, ip: IpAddr) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.family = family(ip);
    m.header.prefix_len = host_len(ip);
    m.header.index = index;
    // Universe scope, as `ip addr add` gives a non-127 address on lo.
    m.header.scope = AddressScope::Universe;
    if ip.is_ipv6() {
        // Usable at once (no duplicate address detection), as `ip addr add ... nodad`.
        m.header.flags = AddressHeaderFlags::Nodad;
    }
    m.attributes.push(AddressAttribute::Local(ip));
    m.attributes.push(AddressAttribute::Address(ip));
    m
}

/// Adds `ip`/32 (/128) to interface `index`. `Ok(false)`: it was there already.
pub fn add_address(index: u32, ip: IpAddr) -> io::Result<bool> {
    match request(
        RouteNetlinkMessage::NewAddress(address_message(index, ip)),
        NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
    ) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes `ip`/32 (/128) from interface `index`; already gone is fine.
pub fn del_address(index: u32, ip: IpAddr) -> io::Result<()> {
    match request(
        RouteNetlinkMessage::DelAddress(address_message(index, ip)),
        NLM_F_ACK,
    ) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Every address of this network namespace: (interface index, address).
pub fn addresses() -> io::Result<Vec<(u32, IpAddr)>> {
    let replies = request(
        RouteNetlinkMessage::GetAddress(AddressMessage::default()),
        NLM_F_DUMP,
    )?;
    let mut out = Vec::new();
    for r in replies {
        let RouteNetlinkMessage::NewAddress(m) = r else {
            continue;
        };
        // IFA_LOCAL is the address itself (IFA_ADDRESS is the peer on point-to-point links).
        let local = m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        let addr = local.or_else(|| {
            m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        });
        if let Some(ip) = addr {
            out.push((m.header.index, ip));
        }
    }
    Ok(out)
}

/// The indexes of this namespace's veth interfaces whose other end is in another network
/// namespace (the kernel reports that end's namespace as `IFLA_LINK_NETNSID` only then): what
/// the datapath may hand straight to the other end's ingress (`bpf_redirect_peer`). One dump.
pub fn veths_with_remote_peer() -> io::Result<Vec<u32>> {
    let replies = request(
        RouteNetlinkMessage::GetLink(LinkMessage::default()),
        NLM_F_DUMP,
    )?;
    let mut out = Vec::new();
    for r in replies {
        let RouteNetlinkMessage::NewLink(m) = r else {
            continue;
        };
        let veth = m.attributes.iter().any(|a| {
            matches!(a, LinkAttribute::LinkInfo(info)
                if info.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))))
        });
        let remote = m
            .attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::LinkNetNsId(_)));
        if veth && remote {
            out.push(m.header.index);
        }
    }
    Ok(out)
}

/// The source address the kernel would use toward `dst` (`ip route get <dst>`'s `src`).
pub fn source_toward(dst: IpAddr) -> io::Result<IpAddr> {
    let mut m = RouteMessage::default();
    m.header.address_family = family(dst);
    m.header.destination_prefix_length = host_len(dst);
    m.attributes
        .push(RouteAttribute::Destination(RouteAddress::from(dst)));
    let replies = request(RouteNetlinkMessage::GetRoute(m), 0)?;
    replies
        .into_iter()
        .find_map(|r| match r {
            RouteNetlinkMessage::NewRoute(m) => m.attributes.into_iter().find_map(|a| match a {
                RouteAttribute::PrefSource(RouteAddress::Inet(a)) => Some(IpAddr::V4(a)),
                RouteAttribute::PrefSource(RouteAddress::Inet6(a)) => Some(IpAddr::V6(a)),
                _ => None,
            }),
            _ => None,
        })
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no source address toward {dst}"),
            )
        })
}

/// Every policy rule of this network namespace, of every family (`ip rule` and `ip -6 rule`).
pub fn rules() -> io::Result<Vec<RuleMessage>> {
    let replies = request(
        RouteNetlinkMessage::GetRule(RuleMessage::default()),
        NLM_F_DUMP,
    )?;
    Ok(replies
        .into_iter()
        .filter_map(|r| match r {
            RouteNetlinkMessage::NewRule(m) => Some(m),
            _ => None,
        })
        .collect())
}

/// The index of interface `name`.
pub fn if_index(name: &str) -> io::Result<u32> {
    nix::net::if_::if_nametoindex(name).map_err(io::Error::from)
}

/// The name of the interface with index `index`.
pub fn if_name(index: u32) -> Option<String> {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: if_indextoname writes at most IF_NAMESIZE bytes (NUL-terminated) into buf.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr().cast()) };
    if p.is_null() {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// rtnetlink multicast groups (as the legacy bind mask, bit `group - 1`) whose notifications can
/// change an answer of the FIB: links, neighbours, IPv4 and IPv6 routes and policy rules.
const FIB_GROUPS: u32 = (1 << (libc::RTNLGRP_LINK - 1))
    | (1 << (libc::RTNLGRP_NEIGH - 1))
    | (1 << (libc::RTNLGRP_IPV4_ROUTE - 1))
    | (1 << (libc::RTNLGRP_IPV6_ROUTE - 1))
    | (1 << (libc::RTNLGRP_IPV4_RULE - 1))
    | (1 << (libc::RTNLGRP_IPV6_RULE - 1));

/// Notifications [`FibChanges::wait`] reads at most before it returns, so that a storm of them
/// (a full routing table arriving) still ends in an invalidation now and then.
const FIB_BATCH: usize = 1024;

/// Neighbours [`NeighMemory`] remembers at most; one it has no room for counts as a change at
/// every notification (what an unparsed notification did).
const NEIGH_MEMORY: usize = 16_384;

/// `NUD_VALID`: the neighbour states in which `bpf_fib_lookup` answers with the entry's MAC.
const NUD_VALID: u16 = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80;

/// What of a neighbour can reach an answer of the FIB: whether `bpf_fib_lookup` would use it
/// (a `NUD_VALID` state) and, if so, its link-layer address. A neighbour going from
/// REACHABLE to STALE, DELAY or PROBE and back (every neighbour, every few tens of seconds)
/// changes neither.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighView {
    pub valid: bool,
    /// Empty unless `valid`.
    pub lladdr: Vec<u8>,
}

/// The neighbours the FIB watcher heard of, by interface and address, with what it last heard
/// ([`NeighView`]): a notification that changes nothing of it is not a change. Bounded
/// ([`NEIGH_MEMORY`]); forgotten on a lost notification (the queue overflowed).
#[derive(Debug, Default)]
pub struct NeighMemory {
    seen: std::collections::HashMap<(u32, IpAddr), NeighView>,
}

impl NeighMemory {
    /// A neighbour's notification: `Some(view)` for a new or changed entry, `None` for a deleted
    /// one. True when it may change an answer: the first word of a neighbour, a deletion, or a
    /// new validity or address.
    pub fn changed(&mut self, ifindex: u32, dst: IpAddr, view: Option<NeighView>) -> bool {
        let key = (ifindex, dst);
        let Some(view) = view else {
            self.seen.remove(&key);
            return true;
        };
        match self.seen.get_mut(&key) {
            Some(old) if *old == view => false,
            Some(old) => {
                *old = view;
                true
            }
            None => {
                if self.seen.len() < NEIGH_MEMORY {
                    self.seen.insert(key, view);
                }
                true
            }
        }
    }

    /// Forgets every neighbour (notifications were lost).
    pub fn clear(&mut self) {
        self.seen.clear();
    }

    /// Whether `m`, one notification, may change an answer of the FIB: any link, route or
    /// rule notification; a neighbour's unless [`NeighMemory::changed`] says otherwise.
    /// Neighbours of other families (a bridge's forwarding entries) never reach a FIB answer.
    /// Whatever cannot be read counts as a change.
    pub fn relevant(&mut self, m: &RouteNetlinkMessage) -> bool {
        let (n, deleted) = match m {
            RouteNetlinkMessage::NewNeighbour(n) => (n, false),
            RouteNetlinkMessage::DelNeighbour(n) => (n, true),
            _ => return true,
        };
        if !matches!(n.header.family, AddressFamily::Inet | AddressFamily::Inet6) {
            return false;
        }
        let mut dst = None;
        let mut lladdr = Vec::new();
        for a in &n.attributes {
            match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                    dst = Some(IpAddr::V4(*v4))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                    dst = Some(IpAddr::V6(*v6))
                }
                NeighbourAttribute::LinkLayerAddress(l) => lladdr.clone_from(l),
                _ => {}
            }
        }
        let Some(dst) = dst else {
            return true;
        };
        let view = (!deleted).then(|| {
            let valid = u16::from(n.header.state) & NUD_VALID != 0;
            NeighView {
                valid,
                lladdr: if valid { lladdr } else { Vec::new() },
            }
        });
        self.changed(n.header.ifindex, dst, view)
    }
}

/// The kernel's notifications of what can change the FIB's answers in a network namespace
/// (the subscriber's): [`FibChanges::wait`] blocks until it reports a link, neighbour, route
/// or rule change, or its timeout passes.
pub struct FibChanges {
    socket: Socket,
    rx: Vec<u8>,
    neigh: NeighMemory,
    /// Notifications read, changes or not (for tests).
    heard: u64,
}

impl FibChanges {
    /// Subscribes, in the calling thread's network namespace; [`FibChanges::wait`] returns
    /// after `timeout` without a change.
    pub fn subscribe(timeout: Duration) -> io::Result<FibChanges> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind(&SocketAddr::new(0, FIB_GROUPS))?;
        socket2::SockRef::from(&socket).set_read_timeout(Some(timeout))?;
        Ok(FibChanges {
            socket,
            rx: vec![0u8; 1 << 16],
            neigh: NeighMemory::default(),
            heard: 0,
        })
    }

    /// Waits for the next notification and reads every one already queued with it (at most
    /// [`FIB_BATCH`] datagrams); returns how many of them may change an answer
    /// ([`NeighMemory::relevant`]; 0: none did, or the timeout passed without one). A queue
    /// that overflowed (notifications lost: `ENOBUFS`) counts as a change, and the neighbours
    /// are learnt again.
    pub fn wait(&mut self) -> io::Result<usize> {
        let mut changes = 0;
        loop {
            match self.socket.recv_from(&mut &mut self.rx[..], 0) {
                Ok((len, from)) => {
                    changes += self.read(len, from.port_number());
                    break;
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    changes += self.lost();
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(0);
                }
                Err(e) => return Err(e),
            }
        }
        for _ in 1..FIB_BATCH {
            match self
                .socket
                .recv_from(&mut &mut self.rx[..], libc::MSG_DONTWAIT)
            {
                Ok((len, from)) => changes += self.read(len, from.port_number()),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => changes += self.lost(),
                Err(_) => break,
            }
        }
        Ok(changes)
    }

    /// The notifications in the datagram of `len` bytes in `rx`, sent by netlink port `from`:
    /// how many may change an answer. Only the kernel's (port 0) are read; another sender's
    /// datagram is one change, unread. One that cannot be parsed counts as one, and ends the
    /// datagram.
    fn read(&mut self, len: usize, from: u32) -> usize {
        if from != 0 {
            self.heard += 1;
            return 1;
        }
        let buf = &self.rx[..len.min(self.rx.len())];
        let mut changes = 0;
        let mut off = 0;
        while off < buf.len() {
            self.heard += 1;
            let Ok(m) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[off..]) else {
                return changes + 1;
            };
            let step = (m.header.length as usize + 3) & !3;
            match &m.payload {
                NetlinkPayload::InnerMessage(i) if !self.neigh.relevant(i) => {}
                _ => changes += 1,
            }
            if step == 0 {
                break;
            }
            off += step;
        }
        changes
    }

    /// Notifications were lost: a change, and the neighbours are learnt anew.
    fn lost(&mut self) -> usize {
        self.heard += 1;
        self.neigh.clear();
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `ip` with `args` in this thread's network namespace; it must succeed.
    fn ip(args: &[&str]) {
        let ok = std::process::Command::new("ip")
            .args(args)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip {}", args.join(" "));
    }

    /// In a private network namespace: add, list, add again (already there), route source,
    /// remove, remove again (already gone).
    #[test]
    fn addresses_and_route_sources_over_rtnetlink() {
        if !ferrolb_tests::private_netns("addresses_and_route_sources_over_rtnetlink") {
            return;
        }
        let lo = if_index("lo").unwrap();
        let v4: IpAddr = "203.0.113.77".parse().unwrap();
        let v6: IpAddr = "2001:db8::77".parse().unwrap();
        for ip in [v4, v6] {
            assert!(add_address(lo, ip).unwrap(), "{ip} added");
            assert!(!add_address(lo, ip).unwrap(), "{ip} already there");
            assert!(addresses().unwrap().contains(&(lo, ip)), "{ip} listed");
            assert_eq!(source_toward(ip).unwrap(), ip, "local route to {ip}");
            del_address(lo, ip).unwrap();
            del_address(lo, ip).unwrap();
            assert!(!addresses().unwrap().contains(&(lo, ip)));
        }
        assert_eq!(if_name(lo).as_deref(), Some("lo"));
        let e = source_toward("198.51.100.1".parse().unwrap()).unwrap_err();
        assert!(
            e.raw_os_error() == Some(libc::ENETUNREACH) || e.kind() == io::ErrorKind::NotFound,
            "{e}"
        );
    }

    /// In a private network namespace: nothing is reported until something changes (a wait
    /// returns 0 at its timeout); a new link, a neighbour, a route and a policy rule are each
    /// reported (the first with all the notifications it made, in one batch). The rule on a
    /// port is listed as one of its family's rules that may select on ports.
    #[test]
    fn link_neighbour_route_and_rule_changes_are_heard() {
        if !ferrolb_tests::private_netns("link_neighbour_route_and_rule_changes_are_heard") {
            return;
        }
        let mut changes = FibChanges::subscribe(Duration::from_millis(300)).unwrap();
        let timeout = |changes: &FibChanges, d: Duration| {
            socket2::SockRef::from(&changes.socket)
                .set_read_timeout(Some(d))
                .unwrap();
        };
        let quiet = |changes: &mut FibChanges| {
            // Until 300 ms pass without a notification; the changes among them.
            timeout(changes, Duration::from_millis(300));
            let mut extra = 0;
            for _ in 0..10_000 {
                let heard = changes.heard;
                let n = changes.wait().unwrap();
                if n == 0 && changes.heard == heard {
                    return extra;
                }
                extra += n;
            }
            panic!("notifications without end");
        };
        // The namespace's own rules (local, main, default) select on nothing of the kind.
        let before = rules().unwrap();
        assert!(before.len() >= 3, "{before:?}");
        assert_eq!(crate::fib::port_rules(&before), (false, false));
        assert_eq!(quiet(&mut changes), 0, "nothing changed yet");
        for (what, args) in [
            (
                "a link",
                &[
                    "link", "add", "flbfa", "type", "veth", "peer", "name", "flbfb",
                ][..],
            ),
            (
                "a neighbour",
                &[
                    "neigh",
                    "add",
                    "192.0.2.9",
                    "lladdr",
                    "02:00:00:00:00:09",
                    "dev",
                    "flbfa",
                    "nud",
                    "permanent",
                ][..],
            ),
            (
                "a route",
                &["route", "add", "198.51.100.0/24", "dev", "flbfa"][..],
            ),
            (
                "a rule",
                &["rule", "add", "dport", "8080", "table", "100"][..],
            ),
        ] {
            if what == "a route" {
                ip(&["link", "set", "flbfa", "up"]);
                quiet(&mut changes);
            }
            ip(args);
            timeout(&changes, Duration::from_secs(5));
            let n = changes.wait().unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(n >= 1, "{what}: not heard within 5 s");
            quiet(&mut changes);
        }
        assert_eq!(crate::fib::port_rules(&rules().unwrap()), (true, false));
        ip(&["-6", "rule", "add", "ipproto", "tcp", "table", "100"]);
        assert_eq!(crate::fib::port_rules(&rules().unwrap()), (true, true));
        quiet(&mut changes);

        // The neighbour's state changes, its MAC does not: heard, not a change. Then its MAC
        // changes, then it goes: each a change.
        let neigh = |nud: &str, mac: &str| {
            ip(&[
                "neigh",
                "replace",
                "192.0.2.9",
                "lladdr",
                mac,
                "dev",
                "flbfa",
                "nud",
                nud,
            ])
        };
        for nud in ["reachable", "stale", "reachable"] {
            let heard = changes.heard;
            neigh(nud, "02:00:00:00:00:09");
            assert_eq!(quiet(&mut changes), 0, "{nud}, same MAC: no change");
            assert!(changes.heard > heard, "{nud}: a notification was heard");
        }
        neigh("reachable", "02:00:00:00:00:0a");
        assert!(quiet(&mut changes) >= 1, "a new MAC");
        ip(&["neigh", "del", "192.0.2.9", "dev", "flbfa"]);
        assert!(quiet(&mut changes) >= 1, "a neighbour gone");
    }

    fn view(valid: bool, mac: u8) -> Option<NeighView> {
        Some(NeighView {
            valid,
            lladdr: if valid {
                vec![2, 0, 0, 0, 0, mac]
            } else {
                vec![]
            },
        })
    }

    /// Only what reaches a FIB answer is a change: the first word of a neighbour, its validity,
    /// its MAC, its removal; not a repeat. Each interface has its own neighbours. Full, the
    /// memory takes no more and every unknown neighbour's word is a change.
    #[test]
    fn a_neighbour_is_a_change_only_when_its_validity_or_mac_changes() {
        let mut m = NeighMemory::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(m.changed(2, a, view(true, 1)), "first word");
        assert!(!m.changed(2, a, view(true, 1)), "the same again");
        assert!(m.changed(3, a, view(true, 1)), "another interface's");
        assert!(m.changed(2, a, view(true, 2)), "a new MAC");
        assert!(!m.changed(2, a, view(true, 2)));
        assert!(m.changed(2, a, view(false, 0)), "no longer valid");
        assert!(!m.changed(2, a, view(false, 0)));
        assert!(m.changed(2, a, view(true, 2)), "valid again");
        assert!(m.changed(2, a, None), "gone");
        assert!(m.changed(2, a, view(true, 2)), "back: a first word again");
        m.clear();
        assert!(
            m.changed(2, a, view(true, 2)),
            "forgotten: a first word again"
        );

        let mut full = NeighMemory::default();
        for i in 0..NEIGH_MEMORY as u32 {
            full.changed(1, IpAddr::from(i.to_be_bytes()), view(true, 1));
        }
        let beyond: IpAddr = "203.0.113.1".parse().unwrap();
        assert!(full.changed(1, beyond, view(true, 1)));
        assert!(
            full.changed(1, beyond, view(true, 1)),
            "no room: every time"
        );
        assert_eq!(full.seen.len(), NEIGH_MEMORY);
    }

    /// Notifications as the kernel sends them: a neighbour's states that keep its MAC
    /// (REACHABLE, STALE, DELAY, PROBE) are one view; FAILED is another; a bridge's forwarding
    /// entry and a neighbour without an address are not remembered (the first never a change,
    /// the second always); links, routes and rules are always changes.
    #[test]
    fn neighbour_notifications_are_read_by_state_and_address() {
        use netlink_packet_route::neighbour::{NeighbourMessage, NeighbourState};
        let msg = |family, state, mac: Option<u8>, dst: bool| {
            let mut n = NeighbourMessage::default();
            n.header.family = family;
            n.header.ifindex = 7;
            n.header.state = state;
            if dst {
                n.attributes
                    .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                        "192.0.2.7".parse().unwrap(),
                    )));
            }
            if let Some(b) = mac {
                n.attributes
                    .push(NeighbourAttribute::LinkLayerAddress(vec![2, 0, 0, 0, 0, b]));
            }
            RouteNetlinkMessage::NewNeighbour(n)
        };
        let inet = AddressFamily::Inet;
        let mut m = NeighMemory::default();
        assert!(m.relevant(&msg(inet, NeighbourState::Reachable, Some(1), true)));
        for st in [
            NeighbourState::Stale,
            NeighbourState::Delay,
            NeighbourState::Probe,
            NeighbourState::Reachable,
        ] {
            assert!(!m.relevant(&msg(inet, st, Some(1), true)), "{st:?}");
        }
        assert!(m.relevant(&msg(inet, NeighbourState::Failed, None, true)));
        assert!(!m.relevant(&msg(inet, NeighbourState::Incomplete, None, true)));
        assert!(m.relevant(&msg(inet, NeighbourState::Reachable, Some(1), true)));
        assert!(m.relevant(&msg(inet, NeighbourState::Reachable, Some(2), true)));
        let RouteNetlinkMessage::NewNeighbour(n) =
            msg(inet, NeighbourState::Reachable, Some(2), true)
        else {
            unreachable!()
        };
        assert!(m.relevant(&RouteNetlinkMessage::DelNeighbour(n)));
        assert!(!m.relevant(&msg(
            AddressFamily::Bridge,
            NeighbourState::Reachable,
            Some(3),
            false
        )));
        assert!(m.relevant(&msg(inet, NeighbourState::Reachable, Some(1), false)));
        assert!(m.relevant(&msg(inet, NeighbourState::Reachable, Some(1), false)));
        assert!(m.relevant(&RouteNetlinkMessage::NewRoute(RouteMessage::default())));
        assert!(m.relevant(&RouteNetlinkMessage::NewLink(LinkMessage::default())));
        assert!(m.relevant(&RouteNetlinkMessage::NewRule(RuleMessage::default())));
    }

    /// In a private network namespace: a veth pair with both ends here is not reported; once
    /// one end moves to another namespace (a child process's own, gone with it), the end left
    /// here is, and nothing else is (`lo`).
    #[test]
    fn veths_whose_other_end_is_elsewhere_are_found() {
        if !ferrolb_tests::private_netns("veths_whose_other_end_is_elsewhere_are_found") {
            return;
        }
        ip(&[
            "link", "add", "flbva", "type", "veth", "peer", "name", "flbvb",
        ]);
        let a = if_index("flbva").unwrap();
        let b = if_index("flbvb").unwrap();
        assert_eq!(veths_with_remote_peer().unwrap(), Vec::<u32>::new());
        // The other namespace: a child's (killed on every way out, which deletes the pair).
        struct Child(std::process::Child);
        impl Drop for Child {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let child = Child(
            std::process::Command::new("unshare")
                .args(["--net", "sleep", "30"])
                .spawn()
                .expect("unshare --net sleep"),
        );
        let pid = child.0.id().to_string();
        // unshare(1) execs sleep once its namespace exists: wait for it to differ from ours.
        let ours = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::fs::read_link(format!("/proc/{pid}/ns/net"))
            .ok()
            .as_ref()
            == Some(&ours)
        {
            assert!(std::time::Instant::now() < deadline, "child namespace");
            std::thread::sleep(Duration::from_millis(10));
        }
        ip(&["link", "set", "flbvb", "netns", &pid]);
        assert_eq!(veths_with_remote_peer().unwrap(), vec![a]);
        assert!(if_name(b).is_none_or(|n| n != "flbvb"));
        drop(child);
    }
}
