//! The sans-IO BGP session state machine (RFC 4271 §8), for an active peer: inputs are the
//! RFC's events (manual start/stop, TCP connection confirmed/fails, messages, timer expiries),
//! outputs are what the driver must do (connect, send, disconnect) and what happened
//! (established, down). Timers are deadlines the driver sleeps until; tests use a fake clock.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use netgauze_bgp_pkt::BgpMessage;
use netgauze_bgp_pkt::notification::{
    BgpNotificationMessage, CeaseError, FiniteStateMachineError, HoldTimerExpiredError,
    OpenMessageError,
};

use crate::wire::{self, PeerOpen};

/// RFC 4271 §8.2.2: a large hold time while waiting for the peer's OPEN.
pub const LARGE_HOLD_TIME_S: u64 = 240;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum State {
    Idle,
    Connect,
    Active,
    OpenSent,
    OpenConfirm,
    Established,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Idle => "Idle",
            State::Connect => "Connect",
            State::Active => "Active",
            State::OpenSent => "OpenSent",
            State::OpenConfirm => "OpenConfirm",
            State::Established => "Established",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    pub local_as: u32,
    pub remote_as: u32,
    pub router_id: Ipv4Addr,
    /// 0 (no keepalives, no hold timer) or >= 3.
    pub hold_time_s: u16,
    pub connect_retry_s: u16,
    /// Never connect: wait for the peer's connection (RFC 4271 §8.1.1 PassiveTcpEstablishment).
    pub passive: bool,
}

/// RFC 4271 §8.1 events this speaker uses.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    ManualStart,
    ManualStop,
    /// Administrative teardown that restarts (e.g. BFD Down).
    Reset(BgpNotificationMessage),
    TcpConnectionConfirmed,
    TcpConnectionFails,
    Message(BgpMessage),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Connect,
    Send(BgpMessage),
    Disconnect,
    Established(PeerOpen),
    /// Left Established (or gave up before it), with why.
    Down(String),
    StateChange(State, State),
}

#[derive(Debug, Clone)]
pub struct Fsm {
    p: Params,
    state: State,
    peer: Option<PeerOpen>,
    hold_s: u16,
    connect_retry: Option<Instant>,
    hold: Option<Instant>,
    keepalive: Option<Instant>,
    auto_start: bool,
    pub last_error: Option<String>,
}

fn notif_cease_admin() -> BgpNotificationMessage {
    BgpNotificationMessage::CeaseError(CeaseError::AdministrativeShutdown {
        value: Box::new([]),
    })
}

impl Fsm {
    pub fn new(p: Params) -> Fsm {
        Fsm {
            p,
            state: State::Idle,
            peer: None,
            hold_s: 0,
            connect_retry: None,
            hold: None,
            keepalive: None,
            auto_start: false,
            last_error: None,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn params(&self) -> &Params {
        &self.p
    }

    pub fn peer(&self) -> Option<&PeerOpen> {
        self.peer.as_ref()
    }

    /// The negotiated hold time (seconds) once Established.
    pub fn hold_time_s(&self) -> u16 {
        self.hold_s
    }

    pub fn ebgp(&self) -> bool {
        self.p.local_as != self.p.remote_as
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        [self.connect_retry, self.hold, self.keepalive]
            .into_iter()
            .flatten()
            .min()
    }

    fn set(&mut self, to: State, out: &mut Vec<Output>) {
        if self.state != to {
            out.push(Output::StateChange(self.state, to));
            if self.state == State::Established {
                out.push(Output::Down(
                    self.last_error
                        .clone()
                        .unwrap_or_else(|| "session closed".into()),
                ));
            }
            self.state = to;
        }
    }

    fn retry_later(&mut self, now: Instant) {
        self.connect_retry =
            Some(now + Duration::from_secs(u64::from(self.p.connect_retry_s.max(1))));
    }

    /// Tear down with an optional NOTIFICATION; back to Idle, restarting later unless stopped.
    fn fail(
        &mut self,
        notif: Option<BgpNotificationMessage>,
        why: String,
        now: Instant,
        out: &mut Vec<Output>,
    ) {
        if let Some(n) = notif {
            out.push(Output::Send(BgpMessage::Notification(n)));
        }
        self.last_error = Some(why);
        out.push(Output::Disconnect);
        self.hold = None;
        self.keepalive = None;
        self.peer = None;
        self.set(State::Idle, out);
        if self.auto_start {
            self.retry_later(now);
        } else {
            self.connect_retry = None;
        }
    }

    fn start_connect(&mut self, now: Instant, out: &mut Vec<Output>) {
        if self.p.passive {
            self.set(State::Active, out);
            self.connect_retry = None;
            return;
        }
        self.set(State::Connect, out);
        self.retry_later(now);
        out.push(Output::Connect);
    }

    /// Takes over a connection the peer opened (§8.2.2 in Connect/Active, or the winner of a
    /// collision, §6.8): OPEN goes out on it and the session is in OpenSent.
    pub fn adopt_incoming(&mut self, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        self.auto_start = true;
        self.connect_retry = None;
        self.keepalive = None;
        self.peer = None;
        self.send_open(now, &mut out);
        out
    }

    /// §8.2.2: OPEN out on a fresh connection, a large hold time until the peer's OPEN.
    fn send_open(&mut self, now: Instant, out: &mut Vec<Output>) {
        out.push(Output::Send(wire::open(
            self.p.local_as,
            self.p.hold_time_s,
            self.p.router_id,
        )));
        self.hold = Some(now + Duration::from_secs(LARGE_HOLD_TIME_S));
        self.set(State::OpenSent, out);
    }

    /// Restarts the hold timer (none when the negotiated hold time is 0).
    fn reset_hold(&mut self, now: Instant) {
        self.hold = (self.hold_s > 0).then(|| now + Duration::from_secs(u64::from(self.hold_s)));
    }

    fn keepalive_interval(&self) -> Option<Duration> {
        (self.hold_s > 0).then(|| Duration::from_millis(u64::from(self.hold_s) * 1000 / 3))
    }

    /// Sending an UPDATE counts as a keepalive (RFC 4271 §4.4).
    pub fn sent_update(&mut self, now: Instant) {
        if let Some(k) = self.keepalive_interval() {
            self.keepalive = Some(now + k);
        }
    }

    pub fn handle(&mut self, ev: Event, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        match (self.state, ev) {
            (State::Idle, Event::ManualStart) => {
                self.auto_start = true;
                self.start_connect(now, &mut out);
            }
            (_, Event::ManualStart) => {}
            (State::Idle, Event::ManualStop) => {
                self.auto_start = false;
                self.connect_retry = None;
            }
            (_, Event::ManualStop) => {
                self.auto_start = false;
                let established = matches!(
                    self.state,
                    State::OpenSent | State::OpenConfirm | State::Established
                );
                self.fail(
                    established.then(notif_cease_admin),
                    "administratively stopped".into(),
                    now,
                    &mut out,
                );
            }
            (State::Idle, Event::Reset(_)) => {}
            (_, Event::Reset(n)) => {
                let why = format!("reset: {}", wire::notification_code(&n).1);
                self.fail(Some(n), why, now, &mut out);
            }
            (State::Connect | State::Active, Event::TcpConnectionConfirmed) => {
                self.connect_retry = None;
                self.send_open(now, &mut out);
            }
            (State::Connect | State::Active, Event::TcpConnectionFails) => {
                self.set(State::Active, &mut out);
                if !self.p.passive {
                    self.retry_later(now);
                }
            }
            (_, Event::TcpConnectionFails) => {
                self.fail(None, "connection lost".into(), now, &mut out);
            }
            (State::OpenSent, Event::Message(BgpMessage::Open(o))) => {
                let peer = wire::peer_open(&o);
                if peer.asn != self.p.remote_as {
                    let why = format!(
                        "peer AS {} is not the configured {}",
                        peer.asn, self.p.remote_as
                    );
                    self.fail(
                        Some(BgpNotificationMessage::OpenMessageError(
                            OpenMessageError::BadPeerAs {
                                value: Box::new([]),
                            },
                        )),
                        why,
                        now,
                        &mut out,
                    );
                    return out;
                }
                if peer.hold_time_s == 1 || peer.hold_time_s == 2 {
                    self.fail(
                        Some(BgpNotificationMessage::OpenMessageError(
                            OpenMessageError::UnacceptableHoldTime {
                                value: Box::new([]),
                            },
                        )),
                        format!("unacceptable hold time {}", peer.hold_time_s),
                        now,
                        &mut out,
                    );
                    return out;
                }
                self.hold_s = self.p.hold_time_s.min(peer.hold_time_s);
                self.peer = Some(peer);
                out.push(Output::Send(BgpMessage::KeepAlive));
                self.reset_hold(now);
                self.keepalive = self.keepalive_interval().map(|k| now + k);
                self.set(State::OpenConfirm, &mut out);
            }
            (State::OpenConfirm, Event::Message(BgpMessage::KeepAlive)) => {
                self.reset_hold(now);
                self.last_error = None;
                self.set(State::Established, &mut out);
                if let Some(p) = &self.peer {
                    out.push(Output::Established(p.clone()));
                }
            }
            (_, Event::Message(BgpMessage::Notification(n))) => {
                let (code, what) = wire::notification_code(&n);
                self.fail(
                    None,
                    format!("NOTIFICATION from peer: {code} ({what})"),
                    now,
                    &mut out,
                );
            }
            (
                State::Established,
                Event::Message(
                    BgpMessage::KeepAlive | BgpMessage::Update(_) | BgpMessage::RouteRefresh(_),
                ),
            ) => {
                self.reset_hold(now);
            }
            (state, Event::Message(m)) => {
                let why = format!("unexpected {} in {}", msg_name(&m), state.name());
                self.fail(
                    Some(BgpNotificationMessage::FiniteStateMachineError(
                        FiniteStateMachineError::Unspecific {
                            value: Box::new([]),
                        },
                    )),
                    why,
                    now,
                    &mut out,
                );
            }
            (_, Event::TcpConnectionConfirmed) => {
                // A connection we did not ask for: the driver closes it.
                out.push(Output::Disconnect);
            }
        }
        out
    }

    /// Timer expiries (§8.1.3): ConnectRetry, Hold, Keepalive.
    pub fn on_timer(&mut self, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        if self.hold.is_some_and(|t| now >= t) {
            self.hold = None;
            let why = "hold timer expired".to_string();
            let n =
                BgpNotificationMessage::HoldTimerExpiredError(HoldTimerExpiredError::Unspecific {
                    sub_code: 0,
                    value: Box::new([]),
                });
            self.fail(Some(n), why, now, &mut out);
        }
        if self.keepalive.is_some_and(|t| now >= t) {
            out.push(Output::Send(BgpMessage::KeepAlive));
            self.keepalive = self.keepalive_interval().map(|k| now + k);
        }
        if self.connect_retry.is_some_and(|t| now >= t) {
            self.connect_retry = None;
            match self.state {
                State::Idle if self.auto_start => self.start_connect(now, &mut out),
                State::Connect | State::Active if !self.p.passive => {
                    out.push(Output::Disconnect);
                    self.start_connect(now, &mut out);
                }
                _ => {}
            }
        }
        out
    }
}

fn msg_name(m: &BgpMessage) -> &'static str {
    match m {
        BgpMessage::Open(_) => "OPEN",
        BgpMessage::Update(_) => "UPDATE",
        BgpMessage::Notification(_) => "NOTIFICATION",
        BgpMessage::KeepAlive => "KEEPALIVE",
        BgpMessage::RouteRefresh(_) => "ROUTE-REFRESH",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Params {
        Params {
            local_as: 65100,
            remote_as: 65000,
            router_id: Ipv4Addr::new(192, 0, 2, 2),
            hold_time_s: 9,
            connect_retry_s: 1,
            passive: false,
        }
    }

    fn peer_open(asn: u32, hold: u16) -> BgpMessage {
        wire::open(asn, hold, Ipv4Addr::new(192, 0, 2, 1))
    }

    fn sends(out: &[Output]) -> Vec<&BgpMessage> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send(m) => Some(m),
                _ => None,
            })
            .collect()
    }

    /// RFC 4271 §8.2.2: Idle -> Connect -> OpenSent -> OpenConfirm -> Established.
    fn establish(f: &mut Fsm, now: Instant) {
        let out = f.handle(Event::ManualStart, now);
        assert!(out.contains(&Output::Connect));
        assert_eq!(f.state(), State::Connect);
        let out = f.handle(Event::TcpConnectionConfirmed, now);
        assert!(matches!(sends(&out)[0], BgpMessage::Open(_)));
        assert_eq!(f.state(), State::OpenSent);
        let out = f.handle(Event::Message(peer_open(65000, 3)), now);
        assert_eq!(sends(&out), vec![&BgpMessage::KeepAlive]);
        assert_eq!(f.state(), State::OpenConfirm);
        let out = f.handle(Event::Message(BgpMessage::KeepAlive), now);
        assert!(
            out.iter()
                .any(|o| matches!(o, Output::Established(p) if p.asn == 65000))
        );
        assert_eq!(f.state(), State::Established);
    }

    #[test]
    fn session_comes_up_and_negotiates_the_smaller_hold_time() {
        let now = Instant::now();
        let mut f = Fsm::new(params());
        establish(&mut f, now);
        assert_eq!(f.hold_time_s(), 3);
        // Keepalives every hold/3 = 1 s.
        let out = f.on_timer(now + Duration::from_millis(1000));
        assert_eq!(sends(&out), vec![&BgpMessage::KeepAlive]);
    }

    #[test]
    fn hold_timer_expiry_sends_a_notification_and_retries() {
        let now = Instant::now();
        let mut f = Fsm::new(params());
        establish(&mut f, now);
        // Keepalives from the peer keep it up...
        f.handle(
            Event::Message(BgpMessage::KeepAlive),
            now + Duration::from_secs(2),
        );
        let _ = f.on_timer(now + Duration::from_secs(4));
        assert_eq!(f.state(), State::Established);
        // ...silence for the hold time does not.
        let out = f.on_timer(now + Duration::from_secs(6));
        assert!(matches!(
            sends(&out)[..],
            [BgpMessage::Notification(
                BgpNotificationMessage::HoldTimerExpiredError(_)
            )]
        ));
        assert!(out.contains(&Output::Disconnect));
        assert!(
            out.iter()
                .any(|o| matches!(o, Output::Down(w) if w.contains("hold timer")))
        );
        assert_eq!(f.state(), State::Idle);
        // Automatic restart after the connect-retry time.
        let out = f.on_timer(now + Duration::from_secs(8));
        assert!(out.contains(&Output::Connect));
    }

    #[test]
    fn wrong_peer_as_and_bad_hold_time_are_refused() {
        let now = Instant::now();
        let mut f = Fsm::new(params());
        f.handle(Event::ManualStart, now);
        f.handle(Event::TcpConnectionConfirmed, now);
        let out = f.handle(Event::Message(peer_open(65999, 9)), now);
        assert!(matches!(
            sends(&out)[..],
            [BgpMessage::Notification(
                BgpNotificationMessage::OpenMessageError(OpenMessageError::BadPeerAs { .. })
            )]
        ));
        assert_eq!(f.state(), State::Idle);
        assert!(f.last_error.as_deref().unwrap().contains("65999"));
        let mut f = Fsm::new(params());
        f.handle(Event::ManualStart, now);
        f.handle(Event::TcpConnectionConfirmed, now);
        let out = f.handle(Event::Message(peer_open(65000, 2)), now);
        assert!(matches!(
            sends(&out)[..],
            [BgpMessage::Notification(
                BgpNotificationMessage::OpenMessageError(
                    OpenMessageError::UnacceptableHoldTime { .. }
                )
            )]
        ));
    }

    #[test]
    fn passive_waits_and_adopts_the_peers_connection() {
        let now = Instant::now();
        let mut p = params();
        p.passive = true;
        let mut f = Fsm::new(p);
        let out = f.handle(Event::ManualStart, now);
        assert!(!out.contains(&Output::Connect));
        assert_eq!(f.state(), State::Active);
        assert!(
            f.on_timer(now + Duration::from_secs(30)).is_empty(),
            "never connects"
        );
        let out = f.adopt_incoming(now);
        assert!(matches!(sends(&out)[0], BgpMessage::Open(_)));
        assert_eq!(f.state(), State::OpenSent);
        f.handle(Event::Message(peer_open(65000, 9)), now);
        f.handle(Event::Message(BgpMessage::KeepAlive), now);
        assert_eq!(f.state(), State::Established);
        // Losing it: back to Active (waiting), not Connect.
        f.handle(Event::TcpConnectionFails, now);
        let out = f.on_timer(now + Duration::from_secs(2));
        assert!(!out.contains(&Output::Connect));
        assert_eq!(f.state(), State::Active);
    }

    #[test]
    fn connection_failures_go_active_then_retry() {
        let now = Instant::now();
        let mut f = Fsm::new(params());
        f.handle(Event::ManualStart, now);
        f.handle(Event::TcpConnectionFails, now);
        assert_eq!(f.state(), State::Active);
        let out = f.on_timer(now + Duration::from_secs(1));
        assert!(out.contains(&Output::Connect));
        assert_eq!(f.state(), State::Connect);
    }

    #[test]
    fn stop_notification_and_unexpected_messages() {
        let now = Instant::now();
        let mut f = Fsm::new(params());
        establish(&mut f, now);
        let out = f.handle(Event::ManualStop, now);
        assert!(matches!(
            sends(&out)[..],
            [BgpMessage::Notification(
                BgpNotificationMessage::CeaseError(_)
            )]
        ));
        assert_eq!(f.state(), State::Idle);
        assert!(
            f.on_timer(now + Duration::from_secs(60)).is_empty(),
            "stopped stays stopped"
        );
        // An UPDATE before the session is up is an FSM error.
        let mut f = Fsm::new(params());
        f.handle(Event::ManualStart, now);
        f.handle(Event::TcpConnectionConfirmed, now);
        let out = f.handle(Event::Message(wire::withdraw(&[])), now);
        assert!(matches!(
            sends(&out)[..],
            [BgpMessage::Notification(
                BgpNotificationMessage::FiniteStateMachineError(_)
            )]
        ));
        // A NOTIFICATION from the peer brings an Established session down.
        let mut f = Fsm::new(params());
        establish(&mut f, now);
        let n = BgpNotificationMessage::CeaseError(CeaseError::AdministrativeReset {
            value: Box::new([]),
        });
        let out = f.handle(Event::Message(BgpMessage::Notification(n)), now);
        assert!(
            out.iter()
                .any(|o| matches!(o, Output::Down(w) if w.contains("cease")))
        );
    }
}
