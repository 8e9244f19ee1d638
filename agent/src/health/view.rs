//! A node's endpoint-health view as its peers see it. Each node probes for itself; its
//! status on the sync channel (heartbeats every 100 ms) carries the probe targets it holds
//! down, and each node compares that with its own verdicts, so an operator sees where nodes
//! disagree (a metric, `ferroctl get ep`). Nodes that agree build identical selection tables
//! (Maglev is independent of slot order), so agreement is what keeps their choices equal.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use ferrolb_consync::pb;

use crate::ha::flows::{addr, ip_of};
use crate::model::ProbeKind;

/// Most down targets one status lists (the rest are counted): a status rides on every
/// heartbeat, and what a peer sends is bounded the same way on receipt.
pub const MAX_LISTED: usize = 256;

/// A probe target as nodes compare it (without its source address, which is per node).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub ip: IpAddr,
    pub port: u16,
    pub kind: ProbeKind,
}

/// A target's state, as `currState` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Its probes pass (`ok`).
    Up,
    /// Its probes fail (`nok`).
    Down,
    /// Forced down by the operator (`red`).
    Forced,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Up => "ok",
            State::Down => "nok",
            State::Forced => "red",
        }
    }

    fn out(self) -> bool {
        self != State::Up
    }
}

/// This node's view: every target it probes and its state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    pub states: BTreeMap<Key, State>,
}

/// What a status carries: (listed down targets, all down, all probed).
pub type StatusPart = (Vec<pb::ProbeVerdict>, u32, u32);

/// The view's status part, shared between the prober (which writes it when verdicts change)
/// and the sync status (which reads it on every heartbeat, on the sync runtime: encoded
/// once here, so a heartbeat only copies at most [`MAX_LISTED`] entries).
pub type SharedView = Arc<Mutex<Arc<StatusPart>>>;

pub fn read(v: &SharedView) -> Arc<StatusPart> {
    v.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

pub fn write(v: &SharedView, view: &View) {
    let part = Arc::new(view.to_status());
    *v.lock().unwrap_or_else(|p| p.into_inner()) = part;
}

impl View {
    /// What goes into this node's status: (listed down targets, all down, all probed).
    pub fn to_status(&self) -> StatusPart {
        let down: Vec<(&Key, &State)> = self.states.iter().filter(|(_, s)| s.out()).collect();
        let listed = down
            .iter()
            .take(MAX_LISTED)
            .map(|(k, s)| pb::ProbeVerdict {
                ip: Some(addr(k.ip)),
                port: u32::from(k.port),
                probe: k.kind.name().to_string(),
                forced: **s == State::Forced,
            })
            .collect();
        (
            listed,
            u32::try_from(down.len()).unwrap_or(u32::MAX),
            u32::try_from(self.states.len()).unwrap_or(u32::MAX),
        )
    }
}

/// A peer's view, from its status. Only entries that parse are kept (at most
/// [`MAX_LISTED`]); anything else a peer sends is dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerHealth {
    pub down: BTreeMap<Key, State>,
    pub down_total: u32,
    pub probed: u32,
}

impl PeerHealth {
    pub fn from_status(s: &pb::NodeStatus) -> PeerHealth {
        let mut down = BTreeMap::new();
        for v in s.endpoints_down.iter().take(MAX_LISTED) {
            let Some(ip) = ip_of(v.ip.as_ref()) else {
                continue;
            };
            let Ok(port) = u16::try_from(v.port) else {
                continue;
            };
            let Some(kind) = ProbeKind::from_name(&v.probe) else {
                continue;
            };
            let state = if v.forced { State::Forced } else { State::Down };
            down.insert(Key { ip, port, kind }, state);
        }
        PeerHealth {
            down,
            down_total: s.endpoints_down_total,
            probed: s.endpoints_probed,
        }
    }

    /// The peer's state of `k`, as far as its status tells: `None` when its list was cut
    /// short and `k` is not on it.
    pub fn state(&self, k: &Key) -> Option<State> {
        match self.down.get(k) {
            Some(s) => Some(*s),
            None if self.down.len() as u64 >= u64::from(self.down_total) => Some(State::Up),
            None => None,
        }
    }
}

/// The targets this node probes on which a peer decides otherwise: one takes the endpoint
/// out, the other keeps it (down and forced agree: both keep it out). A target the peer does
/// not probe counts as up on its side (it sends traffic there).
pub fn disagreements(ours: &View, theirs: &PeerHealth) -> Vec<Key> {
    ours.states
        .iter()
        .filter(|(k, s)| theirs.state(k).is_some_and(|t| t.out() != s.out()))
        .map(|(k, _)| *k)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(last: u8, port: u16, kind: ProbeKind) -> Key {
        Key {
            ip: IpAddr::from([10, 0, 0, last]),
            port,
            kind,
        }
    }

    fn status_of(v: &View) -> pb::NodeStatus {
        let (endpoints_down, endpoints_down_total, endpoints_probed) = v.to_status();
        pb::NodeStatus {
            node_id: 1,
            ready: true,
            instances: vec![],
            endpoints_down,
            endpoints_down_total,
            endpoints_probed,
            node_snat: vec![],
        }
    }

    #[test]
    fn a_view_round_trips_through_a_status() {
        let mut v = View::default();
        v.states.insert(key(1, 80, ProbeKind::Tcp), State::Up);
        v.states.insert(key(2, 53, ProbeKind::Udp), State::Down);
        v.states.insert(key(3, 0, ProbeKind::Ping), State::Forced);
        let s = status_of(&v);
        assert_eq!(
            (
                s.endpoints_down.len(),
                s.endpoints_down_total,
                s.endpoints_probed
            ),
            (2, 2, 3)
        );
        let p = PeerHealth::from_status(&s);
        assert_eq!(p.state(&key(1, 80, ProbeKind::Tcp)), Some(State::Up));
        assert_eq!(p.state(&key(2, 53, ProbeKind::Udp)), Some(State::Down));
        assert_eq!(p.state(&key(3, 0, ProbeKind::Ping)), Some(State::Forced));
        assert!(
            disagreements(&v, &p).is_empty(),
            "a view agrees with itself"
        );
    }

    #[test]
    fn disagreements_are_in_or_out_not_down_or_forced() {
        let mut ours = View::default();
        ours.states.insert(key(1, 80, ProbeKind::Tcp), State::Up);
        ours.states.insert(key(2, 80, ProbeKind::Tcp), State::Down);
        ours.states
            .insert(key(3, 80, ProbeKind::Tcp), State::Forced);
        ours.states.insert(key(4, 80, ProbeKind::Tcp), State::Down);
        let mut theirs = View::default();
        theirs
            .states
            .insert(key(1, 80, ProbeKind::Tcp), State::Down);
        theirs
            .states
            .insert(key(2, 80, ProbeKind::Tcp), State::Forced);
        theirs.states.insert(key(3, 80, ProbeKind::Tcp), State::Up);
        // key 4: the peer does not probe it (up on its side); key 9: only the peer probes it.
        theirs
            .states
            .insert(key(9, 80, ProbeKind::Tcp), State::Down);
        let d = disagreements(&ours, &PeerHealth::from_status(&status_of(&theirs)));
        assert_eq!(
            d,
            vec![
                key(1, 80, ProbeKind::Tcp),
                key(3, 80, ProbeKind::Tcp),
                key(4, 80, ProbeKind::Tcp)
            ]
        );
    }

    #[test]
    fn long_lists_are_cut_and_unlisted_targets_are_unknown() {
        let mut theirs = View::default();
        for i in 0..300u16 {
            theirs
                .states
                .insert(key(1, i + 1, ProbeKind::Tcp), State::Down);
        }
        let s = status_of(&theirs);
        assert_eq!(
            (s.endpoints_down.len(), s.endpoints_down_total),
            (MAX_LISTED, 300)
        );
        let p = PeerHealth::from_status(&s);
        assert_eq!(p.state(&key(1, 1, ProbeKind::Tcp)), Some(State::Down));
        assert_eq!(p.state(&key(1, 300, ProbeKind::Tcp)), None);
        let mut ours = View::default();
        ours.states.insert(key(1, 300, ProbeKind::Tcp), State::Up);
        assert!(
            disagreements(&ours, &p).is_empty(),
            "unknown is not a disagreement"
        );
    }

    #[test]
    fn what_a_peer_sends_is_checked() {
        let mut s = pb::NodeStatus::default();
        let ok = pb::ProbeVerdict {
            ip: Some(addr(IpAddr::from([10, 0, 0, 1]))),
            port: 80,
            probe: "tcp".into(),
            forced: false,
        };
        s.endpoints_down = vec![
            pb::ProbeVerdict {
                ip: Some(pb::Addr { ip: vec![1, 2, 3] }),
                ..ok.clone()
            },
            pb::ProbeVerdict {
                ip: None,
                ..ok.clone()
            },
            pb::ProbeVerdict {
                port: 70_000,
                ..ok.clone()
            },
            pb::ProbeVerdict {
                probe: "sctp\u{0}".repeat(1000),
                ..ok.clone()
            },
            ok.clone(),
        ];
        // A peer that claims more than it lists, and a flood beyond the bound.
        s.endpoints_down_total = u32::MAX;
        s.endpoints_down.extend(std::iter::repeat_n(ok, 10_000));
        let p = PeerHealth::from_status(&s);
        assert_eq!(p.down.len(), 1);
        assert_eq!(p.state(&key(1, 80, ProbeKind::Tcp)), Some(State::Down));
        assert_eq!(p.state(&key(2, 80, ProbeKind::Tcp)), None);
    }
}
