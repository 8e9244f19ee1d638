//! Endpoint health: which endpoints to probe, how, and what the answers mean. Pure (the
//! probes themselves are in `probe`, the tasks that run them in `controller`).
//!
//! A rule probes its endpoints when `Monitor` is on or it names a probe type (loxilb's
//! semantics). Endpoints of several rules that would be probed the same way (address, kind,
//! port, request, response, source) share one probe. An endpoint starts active; `fall`
//! consecutive failures make it inactive, `rise` consecutive successes active again. An
//! inactive endpoint keeps its slot and its flows (TCP drains, UDP/ICMP are flushed, as for
//! a removed endpoint) but gets no new flows.

pub mod controller;
pub mod probe;
pub mod view;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use crate::model::{
    DEFAULT_PROBE_FALL, DEFAULT_PROBE_INTERVAL_S, NatMode, PROBE_RISE, ProbeKind, Protocol,
};
use crate::rules::{Endpoint, Rule, RuleSet};

/// Longest wait for one probe's answer: under the 1 s default interval, so that two failed
/// probes of a dead endpoint take at most 1 + 1 + 0.75 s after its death.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(750);

/// What is probed, and from where. Two endpoints with the same target share a probe.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    pub ip: IpAddr,
    pub port: u16,
    pub kind: ProbeKind,
    pub request: String,
    pub response: String,
    /// One-arm: the address the rule's traffic leaves from (probes leave from it too).
    pub source: Option<IpAddr>,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            ProbeKind::Ping | ProbeKind::None => write!(f, "{} {}", self.kind.name(), self.ip),
            _ => write!(
                f,
                "{} {}",
                self.kind.name(),
                std::net::SocketAddr::new(self.ip, self.port)
            ),
        }
    }
}

/// How often and how strictly a target is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive failures before inactive.
    pub fall: u32,
    /// Consecutive successes before active again.
    pub rise: u32,
}

impl Timing {
    /// The stricter of two rules' timings for a shared target.
    pub fn tighter(self, o: Timing) -> Timing {
        Timing {
            interval: self.interval.min(o.interval),
            timeout: self.timeout.min(o.timeout),
            fall: self.fall.min(o.fall),
            rise: self.rise.min(o.rise),
        }
    }
}

/// The probe of endpoint `ep` of `rule`, if the rule probes.
pub fn target_of(rule: &Rule, ep: &Endpoint) -> Option<(Target, Timing)> {
    let s = &rule.service;
    let kind = s.probe_kind(rule.key.protocol)?;
    let port = if kind.has_port() {
        s.probe_port(rule.key.port, &ep.spec)
    } else {
        0
    };
    if kind.has_port() && port == 0 {
        return None;
    }
    let interval_s = if s.probe.interval_s == 0 {
        DEFAULT_PROBE_INTERVAL_S
    } else {
        s.probe.interval_s
    };
    let interval = Duration::from_secs(u64::from(interval_s));
    let timing = Timing {
        interval,
        timeout: PROBE_TIMEOUT.min(interval),
        fall: if s.probe.retries == 0 {
            DEFAULT_PROBE_FALL
        } else {
            s.probe.retries
        },
        rise: PROBE_RISE,
    };
    let target = Target {
        ip: ep.spec.ip,
        port,
        kind,
        request: s.probe.request.clone(),
        response: s.probe.response.clone(),
        // One-arm probes leave from the address the traffic leaves from, except a floating
        // source: only the MASTER answers for it (a BACKUP's probes would get their replies
        // sent to the MASTER, and its ARP from that address would pull the endpoints'
        // neighbour entry away from the MASTER); those probes leave from the node's own
        // address toward the endpoint.
        source: if s.nat == NatMode::OneArm {
            ep.snat.filter(|a| !floating_sources().contains(a))
        } else {
            None
        },
    };
    Some((target, timing))
}

static FLOATING: std::sync::RwLock<Vec<IpAddr>> = std::sync::RwLock::new(Vec::new());

/// Declares the floating one-arm sources (`--onearm-source`, `/config/onearmsource`).
pub fn set_floating_sources(v: Vec<IpAddr>) {
    if let Ok(mut f) = FLOATING.write() {
        *f = v;
    }
}

fn floating_sources() -> Vec<IpAddr> {
    FLOATING.read().map(|f| f.clone()).unwrap_or_default()
}

/// Every target the rules ask for, with the tightest timing any of them asks.
pub fn plan(rules: &RuleSet) -> BTreeMap<Target, Timing> {
    let mut out: BTreeMap<Target, Timing> = BTreeMap::new();
    for r in rules.rules.values() {
        for e in &r.endpoints {
            if let Some((t, timing)) = target_of(r, e) {
                out.entry(t)
                    .and_modify(|x| *x = x.tighter(timing))
                    .or_insert(timing);
            }
        }
    }
    out
}

/// An endpoint forced down by hand (`/config/endpointhoststate`): a host, optionally one
/// port and protocol of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Forced {
    pub ip: IpAddr,
    /// 0: every port.
    pub port: u16,
    /// None: every protocol.
    pub protocol: Option<Protocol>,
}

impl Forced {
    fn covers(&self, rule: &Rule, ep: &Endpoint) -> bool {
        self.ip == ep.spec.ip
            && (self.port == 0 || self.port == ep.spec.target_port)
            && self.protocol.is_none_or(|p| p == rule.key.protocol)
    }
}

/// What the engine knows of health: the targets that failed and the endpoints forced down.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdicts {
    pub down: BTreeSet<Target>,
    pub forced: BTreeSet<Forced>,
}

impl Verdicts {
    /// Whether endpoint `ep` of `rule` is inactive.
    pub fn is_down(&self, rule: &Rule, ep: &Endpoint) -> bool {
        if self.forced.iter().any(|f| f.covers(rule, ep)) {
            return true;
        }
        !self.down.is_empty() && target_of(rule, ep).is_some_and(|(t, _)| self.down.contains(&t))
    }

    /// Marks the endpoints of `rule`; returns the slots that went down (were up before).
    pub fn mark(&self, rule: &mut Rule) -> (bool, Vec<u8>) {
        let mut changed = false;
        let mut went_down = Vec::new();
        let snapshot = rule.clone();
        for e in &mut rule.endpoints {
            let down = self.is_down(&snapshot, e);
            if down != e.down {
                changed = true;
                if down {
                    went_down.push(e.slot);
                }
                e.down = down;
            }
        }
        (changed, went_down)
    }
}

/// One target's run of answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tracker {
    pub up: bool,
    /// Consecutive failures (while up) or successes (while down) toward a change.
    pub streak: u32,
    /// Quiet passes in a row while inactive.
    pub quiet: u32,
    pub transitions: u64,
}

impl Default for Tracker {
    /// New endpoints start active: a rule works at once, and a dead endpoint is out after
    /// `fall` probes.
    fn default() -> Tracker {
        Tracker {
            up: true,
            streak: 0,
            quiet: 0,
            transitions: 0,
        }
    }
}

impl Tracker {
    /// Takes one probe's result; returns the new state when it changed. Only consecutive
    /// results count: one success resets the failures (loxilb once counted them
    /// cumulatively, and healthy endpoints flapped).
    pub fn observe(&mut self, ok: bool, t: &Timing) -> Option<bool> {
        self.observe_answer(Some(ok), t)
    }

    /// As [`Tracker::observe`], where `None` is a quiet pass (a UDP probe with no answer
    /// from a live host): it keeps an active endpoint active but does not clear its run of
    /// failures (the ICMP error that would have said "down" may have been rate-limited
    /// away), and brings an inactive endpoint back only after twice `rise` of them in a row
    /// (a dead service behind a rate limiter still gets a refusal through in that time).
    pub fn observe_answer(&mut self, ok: Option<bool>, t: &Timing) -> Option<bool> {
        let ok = match ok {
            Some(ok) => ok,
            None if self.up => return None,
            None => {
                self.quiet += 1;
                if self.quiet >= 2 * t.rise.max(1) {
                    self.up = true;
                    self.streak = 0;
                    self.quiet = 0;
                    self.transitions += 1;
                    return Some(true);
                }
                return None;
            }
        };
        if !ok {
            self.quiet = 0;
        }
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.up { t.fall } else { t.rise };
        if self.streak >= needed.max(1) {
            self.up = ok;
            self.streak = 0;
            self.transitions += 1;
            return Some(ok);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EndpointSpec, Oper, RuleKey, RuleSpec, Selection, Service};

    fn timing(fall: u32, rise: u32) -> Timing {
        Timing {
            interval: Duration::from_secs(1),
            timeout: PROBE_TIMEOUT,
            fall,
            rise,
        }
    }

    #[test]
    fn consecutive_failures_take_an_endpoint_out_and_successes_bring_it_back() {
        let t = timing(2, 2);
        let mut k = Tracker::default();
        assert_eq!(k.observe(false, &t), None);
        // One success resets the count: no flapping on a single loss.
        assert_eq!(k.observe(true, &t), None);
        assert_eq!(k.observe(false, &t), None);
        assert_eq!(k.observe(false, &t), Some(false));
        assert!(!k.up);
        assert_eq!(k.observe(false, &t), None);
        assert_eq!(k.observe(true, &t), None);
        assert_eq!(k.observe(false, &t), None);
        assert_eq!(k.observe(true, &t), None);
        assert_eq!(k.observe(true, &t), Some(true));
        assert_eq!(k.transitions, 2);
        // fall 0 behaves as 1.
        let mut k = Tracker::default();
        assert_eq!(k.observe(false, &timing(0, 1)), Some(false));
    }

    #[test]
    fn quiet_udp_answers_neither_hide_a_dead_service_nor_keep_a_live_one_out() {
        let t = timing(2, 2);
        // A dead UDP service behind a backend that rate-limits its port unreachables: every
        // other probe is quiet. Still out after two refusals.
        let mut k = Tracker::default();
        assert_eq!(k.observe_answer(Some(false), &t), None);
        assert_eq!(k.observe_answer(None, &t), None);
        assert_eq!(k.observe_answer(Some(false), &t), Some(false));
        // Refused, quiet, refused...: stays out.
        for _ in 0..3 {
            assert_eq!(k.observe_answer(None, &t), None);
            assert_eq!(k.observe_answer(Some(false), &t), None);
        }
        // Two refusals suppressed in a row: still out.
        assert_eq!(k.observe_answer(None, &t), None);
        assert_eq!(k.observe_answer(None, &t), None);
        assert_eq!(k.observe_answer(Some(false), &t), None);
        // A live service that never answers the probe: four quiet passes, back.
        for _ in 0..3 {
            assert_eq!(k.observe_answer(None, &t), None);
        }
        assert_eq!(k.observe_answer(None, &t), Some(true));
        // Quiet keeps an active endpoint active.
        assert_eq!(k.observe_answer(None, &t), None);
        assert!(k.up);
    }

    fn rule(monitor: bool, kind: &str, nat: NatMode, eps: &[(&str, u16)]) -> Rule {
        let spec = RuleSpec {
            key: RuleKey {
                external_ip: "10.0.0.1".parse().unwrap(),
                port: 80,
                port_max: 0,
                protocol: Protocol::Tcp,
                block: 0,
                host: String::new(),
            },
            service: Service {
                selection: Selection::Hash,
                nat,
                inactive_timeout_s: 1800,
                ..crate::model::test_service(monitor, kind)
            },
            endpoints: eps
                .iter()
                .map(|(ip, port)| EndpointSpec {
                    ip: ip.parse().unwrap(),
                    target_port: *port,
                    weight: 1,
                })
                .collect(),
            oper: Oper::Replace,
        };
        let set = RuleSet::default();
        let change = set.plan(spec, 16).unwrap();
        change.rule().clone()
    }

    #[test]
    fn kube_loxilb_bodies_probe_each_endpoint_by_tcp_at_one_second() {
        let r = rule(
            true,
            "",
            NatMode::FullNat,
            &[("10.1.0.1", 30080), ("10.1.0.2", 0)],
        );
        let (t, timing) = target_of(&r, &r.endpoints[0]).unwrap();
        assert_eq!((t.kind, t.port, t.source), (ProbeKind::Tcp, 30080, None));
        assert_eq!(timing.interval, Duration::from_secs(1));
        assert_eq!((timing.fall, timing.rise), (2, 2));
        // Target port 0: traffic goes to the rule's port, so does the probe.
        assert_eq!(target_of(&r, &r.endpoints[1]).unwrap().0.port, 80);
        // Monitor off: nothing probed.
        let r = rule(false, "", NatMode::FullNat, &[("10.1.0.1", 30080)]);
        assert!(target_of(&r, &r.endpoints[0]).is_none());
    }

    #[test]
    fn one_arm_probes_leave_from_the_egress_address() {
        let mut r = rule(true, "", NatMode::OneArm, &[("10.1.0.1", 30080)]);
        r.endpoints[0].snat = Some("10.1.0.254".parse().unwrap());
        let (t, _) = target_of(&r, &r.endpoints[0]).unwrap();
        assert_eq!(t.source, Some("10.1.0.254".parse().unwrap()));
        // A floating source (--onearm-source) is the MASTER's only: probes leave from the
        // node's own address (the kernel's choice) instead.
        set_floating_sources(vec!["10.1.0.100".parse().unwrap()]);
        r.endpoints[0].snat = Some("10.1.0.100".parse().unwrap());
        let (t, _) = target_of(&r, &r.endpoints[0]).unwrap();
        assert_eq!(t.source, None);
    }

    #[test]
    fn verdicts_mark_only_matching_endpoints_and_report_new_downs() {
        let mut r = rule(
            true,
            "",
            NatMode::FullNat,
            &[("10.1.0.1", 30080), ("10.1.0.2", 30080)],
        );
        let mut v = Verdicts::default();
        v.down.insert(target_of(&r, &r.endpoints[1]).unwrap().0);
        let (changed, went) = v.mark(&mut r);
        assert!(changed);
        assert_eq!(went, vec![r.endpoints[1].slot]);
        assert!(!r.endpoints[0].down && r.endpoints[1].down);
        // Same verdicts again: nothing changes.
        assert_eq!(v.mark(&mut r), (false, vec![]));
        // Forced down by host, every port and protocol.
        v.forced.insert(Forced {
            ip: "10.1.0.1".parse().unwrap(),
            port: 0,
            protocol: None,
        });
        let (changed, went) = v.mark(&mut r);
        assert!(changed && went == vec![r.endpoints[0].slot]);
        // Back up: no new downs.
        let v = Verdicts::default();
        let (changed, went) = v.mark(&mut r);
        assert!(changed && went.is_empty());
        assert!(r.endpoints.iter().all(|e| !e.down));
    }

    #[test]
    fn shared_targets_get_the_tightest_timing() {
        let mut set = RuleSet::default();
        let a = rule(true, "", NatMode::FullNat, &[("10.1.0.1", 30080)]);
        let mut b = a.clone();
        b.key.port = 81;
        b.service.probe.interval_s = 5;
        b.service.probe.retries = 1;
        set.rules.insert(a.key.clone(), a);
        set.rules.insert(b.key.clone(), b);
        let p = plan(&set);
        assert_eq!(p.len(), 1);
        let t = p.values().next().unwrap();
        assert_eq!((t.interval, t.fall), (Duration::from_secs(1), 1));
    }
}
