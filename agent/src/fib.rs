//! Keeps the datapath's cached FIB answers true to the kernel's FIB (decision 0010): a new
//! generation whenever the kernel reports a link, route or rule change, or a neighbour's
//! change that reaches an answer (its validity or MAC: [`crate::netlink::NeighMemory`]), and the
//! families whose answers cannot depend on the ports, so that the cache keys their questions
//! by addresses only and a new connection between two addresses already seen is answered
//! from it.
//!
//! When the ports cannot matter (decided by [`ports_free`], a pure function): no policy rule
//! of the family selects on ports or the L4 protocol (nor carries an attribute this agent does
//! not know), and the family's multipath hash covers addresses only
//! (`fib_multipath_hash_policy` 0; 1 and 3 can hash ports, 2 hashes inner headers). The rules
//! are read again after every batch of notifications with a change (rule changes are); the
//! sysctls, which send no notification, every [`RECHECK`]. The datapath holds the agent to
//! its word for [`LEASE`] only, renewed at every wake: a stopped agent hears of no new rule.

use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use ferrolb_bpf::maps::{FIB_PORTS_FREE_V4, FIB_PORTS_FREE_V6};
use netlink_packet_route::AddressFamily;
use netlink_packet_route::rule::{RuleAttribute, RuleMessage};
use tracing::{info, warn};

/// How often the multipath hash policies are read again (a sysctl change sends no
/// notification): until then, new flows of a family still keyed without ports take their
/// next hop by the addresses' hash, as policy 0 would.
pub const RECHECK: Duration = Duration::from_secs(1);

/// How long the datapath keys questions without ports on the watcher's word: renewed at every
/// wake (at least every [`RECHECK`]), so that an agent that stopped, and no longer hears of
/// new rules, cannot leave ports out of the key for longer than this.
pub const LEASE: Duration = Duration::from_secs(3);

/// Times the datapath's cached FIB answers were invalidated (a batch of route, rule, link or
/// neighbour notifications that may change an answer each), for `/metrics`.
pub static INVALIDATIONS: AtomicU64 = AtomicU64::new(0);

/// The `FIB_PORTS_FREE_*` bits the datapath keys its questions by now, for `/metrics`.
pub static PORTS_FREE: AtomicU32 = AtomicU32::new(0);

/// What decides, per family, whether the FIB's answers can depend on the ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FibShape {
    /// `net.ipv4.fib_multipath_hash_policy` (None: unreadable).
    pub hash_policy_v4: Option<u32>,
    /// `net.ipv6.fib_multipath_hash_policy` (None: unreadable).
    pub hash_policy_v6: Option<u32>,
    /// An IPv4 policy rule selects on ports or protocol (or is not understood).
    pub port_rules_v4: bool,
    /// The same for IPv6.
    pub port_rules_v6: bool,
}

/// The `FIB_PORTS_FREE_*` bits `shape` allows: a family whose multipath hash covers
/// addresses only (policy 0) and no rule of which selects on ports or protocol. Anything
/// unknown (an unreadable policy, another policy) keeps the ports in the key.
pub fn ports_free(shape: &FibShape) -> u32 {
    let mut flags = 0;
    if shape.hash_policy_v4 == Some(0) && !shape.port_rules_v4 {
        flags |= FIB_PORTS_FREE_V4;
    }
    if shape.hash_policy_v6 == Some(0) && !shape.port_rules_v6 {
        flags |= FIB_PORTS_FREE_V6;
    }
    flags
}

/// Does a policy rule select on what a question keyed without ports leaves out (ports, the
/// L4 protocol), or carry an attribute this agent does not know (a newer kernel's selector)?
pub fn rule_may_select_ports(rule: &RuleMessage) -> bool {
    rule.attributes.iter().any(|a| {
        matches!(
            a,
            RuleAttribute::IpProtocol(_)
                | RuleAttribute::SourcePortRange(_)
                | RuleAttribute::DestinationPortRange(_)
                | RuleAttribute::Other(_)
        )
    })
}

/// (IPv4, IPv6): whether any rule of the family may select on ports.
pub fn port_rules(rules: &[RuleMessage]) -> (bool, bool) {
    let of = |family: AddressFamily| {
        rules
            .iter()
            .any(|r| r.header.family == family && rule_may_select_ports(r))
    };
    (of(AddressFamily::Inet), of(AddressFamily::Inet6))
}

/// A `fib_multipath_hash_policy` as read from /proc/sys (None: missing or not a number).
fn parse_policy(text: &str) -> Option<u32> {
    text.trim().parse().ok()
}

/// The multipath hash policies of this thread's network namespace (IPv4, IPv6).
fn hash_policies() -> (Option<u32>, Option<u32>) {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|t| parse_policy(&t))
    };
    (
        read("/proc/sys/net/ipv4/fib_multipath_hash_policy"),
        read("/proc/sys/net/ipv6/fib_multipath_hash_policy"),
    )
}

/// Invalidates the datapath's cached FIB answers whenever the kernel reports a route, rule,
/// neighbour or link change in this network namespace, and keeps the families keyed without
/// ports up to date, on a thread of its own (`ferrolb-fib`, blocked in a receive between
/// changes, for at most [`RECHECK`]). Subscribed here, in the caller's namespace. Should it
/// stop, cached answers still expire after 50 ms (the datapath's bound) and the ports are
/// put back into the key.
pub fn spawn_watcher(mut inv: ferrolb_bpf::FibInvalidator) -> io::Result<()> {
    let mut changes = crate::netlink::FibChanges::subscribe(RECHECK)?;
    std::thread::Builder::new()
        .name("ferrolb-fib".into())
        .spawn(move || {
            let mut w = Watcher::default();
            // The rules as they are before the first change.
            w.apply(&mut inv, true, false);
            loop {
                let n = match changes.wait() {
                    Ok(n) => n,
                    Err(e) => {
                        warn!(error = %e, "route, rule, neighbour and link changes are no longer watched; cached FIB answers expire after 50 ms only, and are keyed by ports again");
                        if inv.set_ports_free(0, 0).is_ok() {
                            PORTS_FREE.store(0, Ordering::Relaxed);
                        }
                        return;
                    }
                };
                w.apply(&mut inv, n > 0, n > 0);
            }
        })?;
    Ok(())
}

/// The watcher thread's memory: the rules' verdict as last read, and whether a write to the
/// datapath is failing (logged once).
#[derive(Default)]
struct Watcher {
    port_rules: (bool, bool),
    rules_unread: bool,
    failing: bool,
}

impl Watcher {
    /// After a batch of notifications (`changed`) or a timeout: reads what decides the key
    /// (the rules only when `read_rules`), and writes a new generation when anything changed.
    fn apply(&mut self, inv: &mut ferrolb_bpf::FibInvalidator, read_rules: bool, changed: bool) {
        if read_rules || self.rules_unread {
            match crate::netlink::rules() {
                Ok(r) => {
                    self.port_rules = port_rules(&r);
                    self.rules_unread = false;
                }
                Err(e) => {
                    if !self.rules_unread {
                        warn!(error = %e, "cannot list the policy rules; the FIB cache keys questions by ports");
                    }
                    self.rules_unread = true;
                }
            }
        }
        let (hash_policy_v4, hash_policy_v6) = hash_policies();
        let flags = if self.rules_unread {
            0
        } else {
            ports_free(&FibShape {
                hash_policy_v4,
                hash_policy_v6,
                port_rules_v4: self.port_rules.0,
                port_rules_v6: self.port_rules.1,
            })
        };
        let until = ferrolb_bpf::monotonic_ns().saturating_add(LEASE.as_nanos() as u64);
        if flags != inv.ports_free() {
            info!(
                ipv4 = flags & FIB_PORTS_FREE_V4 != 0,
                ipv6 = flags & FIB_PORTS_FREE_V6 != 0,
                "FIB cache keys questions by addresses where no rule or multipath hash uses ports"
            );
        }
        // One write: a new generation when anything changed, else the lease alone.
        let r = if changed || flags != inv.ports_free() {
            inv.set_ports_free(flags, until)
        } else {
            inv.renew(until)
        };
        match r {
            Ok(()) => {
                self.failing = false;
                PORTS_FREE.store(flags, Ordering::Relaxed);
                if changed {
                    INVALIDATIONS.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) if !self.failing => {
                self.failing = true;
                warn!(error = %e, "cannot invalidate the cached FIB answers");
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::rule::RulePortRange;

    fn rule(family: AddressFamily, attrs: Vec<RuleAttribute>) -> RuleMessage {
        let mut r = RuleMessage::default();
        r.header.family = family;
        r.attributes = attrs;
        r
    }

    #[test]
    fn ports_leave_the_key_only_where_nothing_can_select_or_hash_them() {
        let plain = FibShape {
            hash_policy_v4: Some(0),
            hash_policy_v6: Some(0),
            ..Default::default()
        };
        assert_eq!(ports_free(&plain), FIB_PORTS_FREE_V4 | FIB_PORTS_FREE_V6);
        // Layer-4 hashing (1), inner headers (2), custom fields (3), unreadable: ports stay.
        for p in [Some(1), Some(2), Some(3), None] {
            let s = FibShape {
                hash_policy_v4: p,
                ..plain
            };
            assert_eq!(ports_free(&s), FIB_PORTS_FREE_V6, "IPv4 policy {p:?}");
            let s = FibShape {
                hash_policy_v6: p,
                ..plain
            };
            assert_eq!(ports_free(&s), FIB_PORTS_FREE_V4, "IPv6 policy {p:?}");
        }
        let s = FibShape {
            port_rules_v4: true,
            ..plain
        };
        assert_eq!(ports_free(&s), FIB_PORTS_FREE_V6);
        let s = FibShape {
            port_rules_v6: true,
            ..plain
        };
        assert_eq!(ports_free(&s), FIB_PORTS_FREE_V4);
    }

    #[test]
    fn rules_on_ports_protocol_or_unknown_selectors_keep_the_ports_per_family() {
        use netlink_packet_route::IpProtocol;
        use netlink_packet_route::rule::RuleAttribute as A;
        let defaults = vec![
            rule(AddressFamily::Inet, vec![A::Table(255), A::Priority(0)]),
            rule(AddressFamily::Inet, vec![A::Table(254), A::Priority(32766)]),
            rule(
                AddressFamily::Inet6,
                vec![A::Table(254), A::Priority(32766)],
            ),
            // Addresses, marks and interfaces are in every question (or the same for all).
            rule(
                AddressFamily::Inet,
                vec![
                    A::Source("192.0.2.0".parse().unwrap()),
                    A::FwMark(7),
                    A::Iifname("eth0".into()),
                    A::Table(100),
                ],
            ),
        ];
        assert_eq!(port_rules(&defaults), (false, false));
        let range = RulePortRange { start: 80, end: 80 };
        for (attr, name) in [
            (A::DestinationPortRange(range), "dport"),
            (A::SourcePortRange(range), "sport"),
            (A::IpProtocol(IpProtocol::Tcp), "ipproto"),
            // FRA_DSCP (23), a selector newer than this agent's netlink crate.
            (
                A::Other(netlink_packet_core::DefaultNla::new(23, vec![0])),
                "unknown",
            ),
        ] {
            let mut v4 = defaults.clone();
            v4.push(rule(AddressFamily::Inet, vec![attr.clone(), A::Table(100)]));
            assert_eq!(port_rules(&v4), (true, false), "{name} on IPv4");
            let mut v6 = defaults.clone();
            v6.push(rule(AddressFamily::Inet6, vec![attr, A::Table(100)]));
            assert_eq!(port_rules(&v6), (false, true), "{name} on IPv6");
        }
    }

    #[test]
    fn hash_policies_parse_or_are_unknown() {
        assert_eq!(parse_policy("0\n"), Some(0));
        assert_eq!(parse_policy("1"), Some(1));
        assert_eq!(parse_policy(""), None);
        assert_eq!(parse_policy("x"), None);
    }
}
