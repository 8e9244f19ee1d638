//! The sans-IO BFD session (RFC 5880 asynchronous mode): state machine (§6.2, §6.8.6),
//! Poll/Final sequences (§6.5), negotiated intervals (§6.8.2-§6.8.4), transmission rules
//! (§6.8.7) and authentication (§6.7). Inputs are received packets and the clock; outputs are
//! packets to send and state changes. No sockets, no clock of its own: tests drive it with a
//! fake `Instant`.

use std::time::{Duration, Instant};

use crate::auth::{self, AuthConfig, AuthError, AuthState};
use crate::packet::{Diag, Packet, State};

/// While a session is not Up, it advertises a desired transmit interval of at least this
/// (§6.8.3: "not less than one second").
pub const SLOW_TX_US: u32 = 1_000_000;

/// Timers and authentication of one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    pub desired_min_tx_us: u32,
    pub required_min_rx_us: u32,
    pub detect_mult: u8,
    pub auth: Option<AuthConfig>,
    /// The Passive role (§6.1): send nothing until the peer has been heard from (and again
    /// nothing once it is forgotten after a detection timeout), then run as usual. For
    /// peers that may or may not run BFD (a BGP neighbour): silence toward one that does not.
    pub passive: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            desired_min_tx_us: 100_000,
            required_min_rx_us: 100_000,
            detect_mult: 3,
            auth: None,
            passive: false,
        }
    }
}

/// What the session asks its owner to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this encoded control packet to the peer.
    Send(Vec<u8>),
    /// The session changed state.
    StateChange { from: State, to: State, diag: Diag },
}

/// Why a received packet was dropped by the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RxError {
    #[error("authentication: {0}")]
    Auth(#[from] AuthError),
}

/// A point-in-time view of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub state: State,
    pub remote_state: State,
    pub local_discr: u32,
    pub remote_discr: u32,
    pub local_diag: Diag,
    pub remote_diag: Diag,
    /// The interval we transmit at (before jitter): max(our desired tx, their required rx).
    pub tx_interval_us: u32,
    /// The interval we expect packets at: max(our required rx, their desired tx).
    pub rx_interval_us: u32,
    pub remote_detect_mult: u8,
    /// Detection time (their multiplier x rx interval); zero before we heard from them.
    pub detect_time_us: u64,
    pub config: SessionConfig,
    pub poll_active: bool,
    pub last_change: Option<Instant>,
}

/// A small xorshift generator for jitter (determined by the seed, so tests are exact).
#[derive(Debug, Clone)]
struct Rng(u32);

impl Rng {
    fn next(&mut self) -> u32 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.0 = x;
        x
    }
}

#[derive(Debug, Clone)]
pub struct Session {
    cfg: SessionConfig,
    state: State,
    local_diag: Diag,
    local_discr: u32,
    remote_discr: u32,
    remote_state: State,
    remote_diag: Diag,
    remote_min_rx_us: u32,
    remote_desired_tx_us: u32,
    remote_mult: u8,
    /// The desired tx and required rx in force for timing; during a Poll Sequence an increase
    /// of tx (or a decrease of rx) waits here until the Final (§6.8.3).
    tx_in_use_us: u32,
    rx_in_use_us: u32,
    /// A Poll Sequence is running: periodic packets carry P until a Final arrives.
    poll_active: bool,
    send_final: bool,
    next_tx: Option<Instant>,
    detect_deadline: Option<Instant>,
    last_rx: Option<Instant>,
    last_change: Option<Instant>,
    auth: AuthState,
    rng: Rng,
}

impl Session {
    /// A session in Down, transmitting unless it takes the Passive role.
    pub fn new(cfg: SessionConfig, local_discr: u32, seed: u32, now: Instant) -> Session {
        let mut s = Session {
            tx_in_use_us: cfg.desired_min_tx_us.max(SLOW_TX_US),
            rx_in_use_us: cfg.required_min_rx_us,
            cfg,
            state: State::Down,
            local_diag: Diag::None,
            local_discr,
            remote_discr: 0,
            remote_state: State::Down,
            remote_diag: Diag::None,
            // §6.8.1: bfd.RemoteMinRxInterval starts at 1 (µs).
            remote_min_rx_us: 1,
            remote_desired_tx_us: 0,
            remote_mult: 0,
            poll_active: false,
            send_final: false,
            next_tx: Some(now),
            detect_deadline: None,
            last_rx: None,
            last_change: None,
            auth: AuthState::new(seed.rotate_left(7) ^ 0x5bd1_e995),
            rng: Rng(seed | 1),
        };
        s.rng.next();
        s
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn local_discr(&self) -> u32 {
        self.local_discr
    }

    pub fn remote_discr(&self) -> u32 {
        self.remote_discr
    }

    pub fn config(&self) -> &SessionConfig {
        &self.cfg
    }

    /// The desired tx interval we advertise now.
    fn advertised_tx_us(&self) -> u32 {
        if self.state == State::Up {
            self.cfg.desired_min_tx_us
        } else {
            self.cfg.desired_min_tx_us.max(SLOW_TX_US)
        }
    }

    fn tx_interval_us(&self) -> u32 {
        self.tx_in_use_us.max(self.remote_min_rx_us)
    }

    fn detect_time(&self) -> Duration {
        let us = u64::from(self.remote_mult)
            * u64::from(self.rx_in_use_us.max(self.remote_desired_tx_us));
        Duration::from_micros(us)
    }

    pub fn status(&self) -> Status {
        Status {
            state: self.state,
            remote_state: self.remote_state,
            local_discr: self.local_discr,
            remote_discr: self.remote_discr,
            local_diag: self.local_diag,
            remote_diag: self.remote_diag,
            tx_interval_us: self.tx_interval_us(),
            rx_interval_us: self.rx_in_use_us.max(self.remote_desired_tx_us),
            remote_detect_mult: self.remote_mult,
            detect_time_us: self.detect_time().as_micros() as u64,
            config: self.cfg.clone(),
            poll_active: self.poll_active,
            last_change: self.last_change,
        }
    }

    /// When `on_timer` next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        match (self.next_tx, self.detect_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn jittered(&mut self, interval_us: u32) -> Duration {
        // §6.8.7: reduced by a random 0-25 %, and to at most 90 % with a multiplier of 1. We
        // always take 75-90 %: the gap between two packets a peer receives is then at most
        // the silence in between plus 0.9 interval, so a silence of two intervals (a short
        // link flap, a switch's reconvergence) never reaches a detection time of three.
        let pct = 75 + self.rng.next() % 16;
        Duration::from_micros(u64::from(interval_us) * u64::from(pct) / 100)
    }

    fn build(&mut self, final_: bool) -> Vec<u8> {
        let mut p = Packet {
            diag: self.local_diag,
            state: self.state,
            poll: self.poll_active && !final_,
            final_,
            control_plane_independent: false,
            demand: false,
            multipoint: false,
            detect_mult: self.cfg.detect_mult,
            my_discr: self.local_discr,
            your_discr: self.remote_discr,
            desired_min_tx_us: self.advertised_tx_us(),
            required_min_rx_us: self.cfg.required_min_rx_us,
            required_min_echo_rx_us: 0,
            auth: None,
        };
        if let Some(a) = &self.cfg.auth {
            auth::sign(&mut p, a, &mut self.auth);
        }
        p.encode()
    }

    fn change_state(&mut self, to: State, diag: Diag, now: Instant, out: &mut Vec<Action>) {
        let from = self.state;
        if from == to {
            return;
        }
        self.state = to;
        self.local_diag = diag;
        self.last_change = Some(now);
        out.push(Action::StateChange { from, to, diag });
        // The advertised tx interval follows the state (slow while not Up); a change while Up
        // (reaching Up) is announced with a Poll Sequence.
        self.timers_changed(now);
        // Tell the peer at once rather than at the next periodic packet.
        self.next_tx = Some(now);
    }

    /// Our advertised timers changed: apply decreases of tx and increases of rx now, the
    /// rest when the Poll Sequence ends (§6.8.3), and start the sequence when Up.
    fn timers_changed(&mut self, _now: Instant) {
        let tx = self.advertised_tx_us();
        let rx = self.cfg.required_min_rx_us;
        if self.state == State::Up {
            if tx < self.tx_in_use_us {
                self.tx_in_use_us = tx;
            }
            if rx > self.rx_in_use_us {
                self.rx_in_use_us = rx;
            }
            self.poll_active = true;
        } else {
            self.tx_in_use_us = tx;
            self.rx_in_use_us = rx;
            self.poll_active = false;
        }
    }

    /// Changes timers (and keeps the session): a Poll Sequence tells the peer.
    pub fn set_config(&mut self, cfg: SessionConfig, now: Instant) {
        let timers = cfg.desired_min_tx_us != self.cfg.desired_min_tx_us
            || cfg.required_min_rx_us != self.cfg.required_min_rx_us
            || cfg.detect_mult != self.cfg.detect_mult;
        self.cfg = cfg;
        if timers {
            self.timers_changed(now);
            self.next_tx = Some(now);
        }
    }

    /// Administratively down (§6.8.16): tell the peer with diag 7 and stop detecting.
    pub fn admin_down(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        self.change_state(State::AdminDown, Diag::AdministrativelyDown, now, &mut out);
        self.detect_deadline = None;
        out
    }

    pub fn admin_up(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if self.state == State::AdminDown {
            self.change_state(State::Down, Diag::None, now, &mut out);
        }
        out
    }

    /// A decoded packet addressed to this session (the transport did the demultiplexing).
    pub fn on_packet(
        &mut self,
        p: &Packet,
        raw: &[u8],
        now: Instant,
    ) -> Result<Vec<Action>, RxError> {
        auth::verify(
            p,
            raw,
            self.cfg.auth.as_ref(),
            &mut self.auth,
            p.detect_mult,
        )?;
        let mut out = Vec::new();
        self.remote_discr = p.my_discr;
        self.remote_state = p.state;
        self.remote_diag = p.diag;
        self.remote_min_rx_us = p.required_min_rx_us;
        self.remote_desired_tx_us = p.desired_min_tx_us;
        self.remote_mult = p.detect_mult;
        self.last_rx = Some(now);
        // A faster rate allowed (the peer lowered its Required Min RX, e.g. on reaching Up)
        // applies now, not after a transmission scheduled at the old, slower rate.
        let iv = self.tx_interval_us().max(1);
        if let Some(t) = self.next_tx
            && t > now + Duration::from_micros(u64::from(iv))
        {
            self.next_tx = Some(now + self.jittered(iv));
        }
        if p.final_ && self.poll_active {
            // §6.5: the Poll Sequence is over; the new timers are in force.
            self.poll_active = false;
            self.tx_in_use_us = self.advertised_tx_us();
            self.rx_in_use_us = self.cfg.required_min_rx_us;
        }
        if self.state == State::AdminDown {
            return Ok(out);
        }
        if p.state == State::AdminDown {
            if self.state != State::Down {
                self.change_state(
                    State::Down,
                    Diag::NeighborSignaledSessionDown,
                    now,
                    &mut out,
                );
            }
        } else {
            match (self.state, p.state) {
                (State::Down, State::Down) => {
                    self.change_state(State::Init, Diag::None, now, &mut out)
                }
                (State::Down, State::Init) | (State::Init, State::Init | State::Up) => {
                    self.change_state(State::Up, Diag::None, now, &mut out)
                }
                (State::Up, State::Down) => self.change_state(
                    State::Down,
                    Diag::NeighborSignaledSessionDown,
                    now,
                    &mut out,
                ),
                _ => {}
            }
        }
        if self.state == State::Init || self.state == State::Up {
            self.detect_deadline = Some(now + self.detect_time());
        }
        if p.poll {
            // §6.5: answer a Poll at once with the Final bit (and no Poll bit).
            self.send_final = true;
        }
        // Anything to send right now (a Final, or news of a state change)?
        out.extend(self.on_timer(now));
        Ok(out)
    }

    /// Lets time pass: detection timeout, periodic transmission.
    pub fn on_timer(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(d) = self.detect_deadline
            && now >= d
        {
            self.detect_deadline = None;
            if matches!(self.state, State::Init | State::Up) {
                self.change_state(
                    State::Down,
                    Diag::ControlDetectionTimeExpired,
                    now,
                    &mut out,
                );
                // §6.8.1: forget the remote discriminator after a detection timeout.
                self.remote_discr = 0;
                self.remote_state = State::Down;
            }
        }
        // §6.8.1: AuthSeqKnown is reset after two detection times of silence.
        if let Some(last) = self.last_rx
            && now.duration_since(last) > self.detect_time() * 2
        {
            self.auth.seq_known = false;
        }
        if self.send_final {
            self.send_final = false;
            out.push(Action::Send(self.build(true)));
        }
        if let Some(t) = self.next_tx
            && now >= t
        {
            // §6.8.7: no periodic packets while the peer asks for none, none in the Passive
            // role before the peer is known, and (we keep sending in AdminDown: the peer
            // learns it from them).
            let silent = self.cfg.passive && self.remote_discr == 0;
            if self.remote_min_rx_us != 0 && !silent {
                out.push(Action::Send(self.build(false)));
            }
            let iv = self.tx_interval_us().max(1);
            let next = self.jittered(iv);
            self.next_tx = Some(now + next);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AuthConfig;
    use crate::packet::AuthType;

    /// Two sessions joined by a lossless wire with a fake clock stepping 1 ms.
    struct Pair {
        a: Session,
        b: Session,
        now: Instant,
        changes: Vec<(char, State, State, Diag, Duration)>,
        start: Instant,
        a_to_b: bool,
        b_to_a: bool,
        sent_a: Vec<(Duration, Packet)>,
    }

    impl Pair {
        fn new(ca: SessionConfig, cb: SessionConfig) -> Pair {
            let now = Instant::now();
            Pair {
                a: Session::new(ca, 0x0a0a_0001, 11, now),
                b: Session::new(cb, 0x0b0b_0002, 22, now),
                now,
                changes: Vec::new(),
                start: now,
                a_to_b: true,
                b_to_a: true,
                sent_a: Vec::new(),
            }
        }

        fn deliver(&mut self, from: char, acts: Vec<Action>) {
            for act in acts {
                match act {
                    Action::StateChange { from: f, to, diag } => {
                        self.changes
                            .push((from, f, to, diag, self.now - self.start))
                    }
                    Action::Send(raw) => {
                        let p = Packet::decode(&raw).unwrap();
                        if from == 'a' {
                            self.sent_a.push((self.now - self.start, p.clone()));
                            if self.a_to_b {
                                let r = self.b.on_packet(&p, &raw, self.now).unwrap();
                                self.deliver('b', r);
                            }
                        } else if self.b_to_a {
                            let r = self.a.on_packet(&p, &raw, self.now).unwrap();
                            self.deliver('a', r);
                        }
                    }
                }
            }
        }

        fn run(&mut self, d: Duration) {
            let end = self.now + d;
            while self.now < end {
                let ra = self.a.on_timer(self.now);
                self.deliver('a', ra);
                let rb = self.b.on_timer(self.now);
                self.deliver('b', rb);
                self.now += Duration::from_millis(1);
            }
        }
    }

    fn cfg(tx_ms: u32, rx_ms: u32, mult: u8) -> SessionConfig {
        SessionConfig {
            desired_min_tx_us: tx_ms * 1000,
            required_min_rx_us: rx_ms * 1000,
            detect_mult: mult,
            auth: None,
            passive: false,
        }
    }

    fn passive(mut c: SessionConfig) -> SessionConfig {
        c.passive = true;
        c
    }

    /// §6.1 / §6.8.7: a Passive session toward a peer that never speaks sends nothing at
    /// all (a BGP neighbour that does not run BFD sees no packets from us).
    #[test]
    fn a_passive_session_is_silent_until_the_peer_speaks() {
        let mut p = Pair::new(passive(cfg(100, 100, 3)), cfg(100, 100, 3));
        p.b_to_a = false;
        // b's packets never reach a: a stays Down and silent.
        p.run(Duration::from_millis(3000));
        assert!(p.sent_a.is_empty(), "{:?}", p.sent_a);
        assert_eq!(p.a.state(), State::Down);
        assert!(p.changes.is_empty());
    }

    /// A Passive session answers an active peer: the three-way handshake completes from the
    /// peer's first packet, both go Up at the fast timers, and after the peer falls silent
    /// (detection timeout, remote discriminator forgotten) the passive side is silent again
    /// until it hears from the peer, then comes back Up.
    #[test]
    fn a_passive_session_answers_an_active_peer_and_goes_quiet_after_it() {
        let mut p = Pair::new(passive(cfg(100, 100, 3)), cfg(100, 100, 3));
        p.run(Duration::from_millis(3000));
        assert_eq!((p.a.state(), p.b.state()), (State::Up, State::Up));
        let first = p.sent_a.first().unwrap();
        assert_eq!(
            first.1.state,
            State::Init,
            "a's first packet answers b's Down"
        );
        assert_ne!(first.1.your_discr, 0);
        // b dies silently.
        p.a_to_b = false;
        p.b_to_a = false;
        p.run(Duration::from_millis(600));
        assert_eq!(p.a.state(), State::Down);
        let cut = p.now;
        let sent_before = p.sent_a.len();
        p.a_to_b = true;
        // A Down packet may go out at the moment of the change (telling the peer); after
        // that, nothing while the peer is unknown.
        p.run(Duration::from_millis(2000));
        let after: Vec<_> = p.sent_a[sent_before..]
            .iter()
            .filter(|(t, _)| p.start + *t > cut)
            .collect();
        assert!(after.is_empty(), "{after:?}");
        // b comes back.
        p.b_to_a = true;
        p.run(Duration::from_millis(3000));
        assert_eq!((p.a.state(), p.b.state()), (State::Up, State::Up));
    }

    #[test]
    fn three_way_handshake_then_poll_to_fast_timers() {
        let mut p = Pair::new(cfg(100, 100, 3), cfg(100, 100, 3));
        p.run(Duration::from_millis(50));
        // Down -> Init -> Up on both sides (§6.2), within the first exchange.
        assert_eq!(p.a.state(), State::Up);
        assert_eq!(p.b.state(), State::Up);
        assert_eq!(p.a.remote_discr(), 0x0b0b_0002);
        let seq: Vec<_> = p.changes.iter().map(|c| (c.0, c.1, c.2)).collect();
        assert!(
            seq.contains(&('a', State::Down, State::Up))
                || seq.contains(&('a', State::Init, State::Up))
        );
        // While not Up, at least 1 s was advertised (§6.8.3).
        let first = &p.sent_a[0].1;
        assert_eq!(first.desired_min_tx_us, SLOW_TX_US);
        assert_eq!(first.state, State::Down);
        // Reaching Up changed the advertised interval: a Poll Sequence ran and ended.
        assert!(
            p.sent_a
                .iter()
                .any(|(_, pk)| pk.poll && pk.state == State::Up)
        );
        p.run(Duration::from_millis(500));
        let st = p.a.status();
        assert!(!st.poll_active);
        assert_eq!(st.tx_interval_us, 100_000);
        assert_eq!(st.rx_interval_us, 100_000);
        assert_eq!(st.detect_time_us, 300_000);
        // Periodic packets at 75-90 % of 100 ms once Up.
        let ups: Vec<Duration> = p
            .sent_a
            .iter()
            .filter(|(_, pk)| pk.state == State::Up && !pk.final_)
            .map(|(t, _)| *t)
            .collect();
        for w in ups.windows(2).skip(2) {
            let gap = w[1] - w[0];
            assert!(
                gap >= Duration::from_millis(75) && gap <= Duration::from_millis(91),
                "{gap:?}"
            );
        }
    }

    #[test]
    fn negotiation_takes_the_slower_side() {
        // A wants 50 ms both ways; B can only receive every 200 ms and sends every 300 ms.
        let mut p = Pair::new(cfg(50, 50, 3), cfg(300, 200, 5));
        p.run(Duration::from_millis(3000));
        let a = p.a.status();
        assert_eq!(a.state, State::Up);
        assert_eq!(a.tx_interval_us, 200_000, "max(our 50, their rx 200)");
        assert_eq!(a.rx_interval_us, 300_000, "max(our rx 50, their tx 300)");
        assert_eq!(a.detect_time_us, 5 * 300_000, "their multiplier");
        let b = p.b.status();
        assert_eq!(b.tx_interval_us, 300_000);
        assert_eq!(b.detect_time_us, 3 * 200_000);
    }

    #[test]
    fn silence_is_detected_in_detection_time() {
        let mut p = Pair::new(cfg(100, 100, 3), cfg(100, 100, 3));
        p.run(Duration::from_millis(1000));
        assert_eq!(p.a.state(), State::Up);
        p.b_to_a = false;
        let cut = p.now - p.start;
        p.run(Duration::from_millis(600));
        let down = p
            .changes
            .iter()
            .find(|c| c.0 == 'a' && c.2 == State::Down)
            .unwrap();
        assert_eq!(down.3, Diag::ControlDetectionTimeExpired);
        let took = down.4 - cut;
        // The last packet arrived up to one interval before the cut: detection lands within
        // (3 x 100 ms - 100 ms, 3 x 100 ms].
        assert!(
            took <= Duration::from_millis(301) && took >= Duration::from_millis(150),
            "{took:?}"
        );
        assert_eq!(p.a.remote_discr(), 0);
        // B hears A's Down and follows (neighbor signaled).
        let b_down = p
            .changes
            .iter()
            .find(|c| c.0 == 'b' && c.2 == State::Down)
            .unwrap();
        assert_eq!(b_down.3, Diag::NeighborSignaledSessionDown);
        // Heal: back Up.
        p.b_to_a = true;
        p.run(Duration::from_millis(3000));
        assert_eq!((p.a.state(), p.b.state()), (State::Up, State::Up));
    }

    #[test]
    fn admin_down_is_signalled() {
        let mut p = Pair::new(cfg(100, 100, 3), cfg(100, 100, 3));
        p.run(Duration::from_millis(500));
        let acts = p.b.admin_down(p.now);
        p.deliver('b', acts);
        p.run(Duration::from_millis(200));
        assert_eq!(p.b.state(), State::AdminDown);
        assert_eq!(p.a.state(), State::Down);
        let a_down = p.changes.iter().rfind(|c| c.0 == 'a').unwrap();
        assert_eq!(a_down.3, Diag::NeighborSignaledSessionDown);
        // AdminDown packets carry diag 7 and keep A from coming up.
        p.run(Duration::from_millis(3000));
        assert_eq!(p.a.state(), State::Down);
        let acts = p.b.admin_up(p.now);
        p.deliver('b', acts);
        p.run(Duration::from_millis(3000));
        assert_eq!((p.a.state(), p.b.state()), (State::Up, State::Up));
    }

    #[test]
    fn timer_change_while_up_polls_without_a_drop() {
        let mut p = Pair::new(cfg(100, 100, 3), cfg(100, 100, 3));
        p.run(Duration::from_millis(1000));
        let n_changes = p.changes.len();
        p.a.set_config(cfg(50, 50, 3), p.now);
        p.run(Duration::from_millis(30));
        // The poll went out and B answered with a Final at once.
        assert!(!p.a.status().poll_active);
        p.run(Duration::from_millis(1000));
        assert_eq!(p.changes.len(), n_changes, "no state change");
        assert_eq!(p.a.status().tx_interval_us, 100_000, "B still wants 100 ms");
        assert_eq!(p.b.status().tx_interval_us, 100_000);
        assert_eq!(p.b.status().detect_time_us, 3 * 100_000);
        p.b.set_config(cfg(50, 50, 3), p.now);
        p.run(Duration::from_millis(1000));
        assert_eq!(p.a.status().tx_interval_us, 50_000);
        assert_eq!(p.a.status().detect_time_us, 150_000);
        assert_eq!(p.changes.len(), n_changes);
        // An increase of our transmit interval waits for the Final (§6.8.3).
        p.a.set_config(cfg(400, 400, 3), p.now);
        let st = p.a.status();
        assert!(st.poll_active);
        assert_eq!(st.tx_interval_us, 50_000, "old interval until the Final");
        p.run(Duration::from_millis(2000));
        assert_eq!(p.a.status().tx_interval_us, 400_000);
        assert_eq!(p.changes.len(), n_changes);
    }

    /// FRR advertises a Required Min RX of 1 s until it is Up: once it lowers it, our next
    /// packet must not wait for the slow schedule (FRR would time us out).
    #[test]
    fn a_peer_lowering_its_rx_interval_speeds_us_up_at_once() {
        let now = Instant::now();
        let mut a = Session::new(cfg(100, 100, 3), 1, 7, now);
        let mut peer = Packet {
            diag: Diag::None,
            state: State::Down,
            poll: false,
            final_: false,
            control_plane_independent: false,
            demand: false,
            multipoint: false,
            detect_mult: 3,
            my_discr: 9,
            your_discr: 0,
            desired_min_tx_us: SLOW_TX_US,
            required_min_rx_us: SLOW_TX_US,
            required_min_echo_rx_us: 0,
            auth: None,
        };
        let _ = a.on_timer(now);
        let raw = peer.encode();
        a.on_packet(&peer, &raw, now).unwrap();
        assert_eq!(a.state(), State::Init);
        let t1 = now + Duration::from_millis(5);
        peer.state = State::Up;
        peer.your_discr = 1;
        let raw = peer.encode();
        a.on_packet(&peer, &raw, t1).unwrap();
        assert_eq!(a.state(), State::Up);
        let _ = a.on_timer(t1);
        // Still at 1 s: the peer asks for no more than one packet a second.
        assert!(a.next_deadline().unwrap() > t1 + Duration::from_millis(700));
        let t2 = t1 + Duration::from_millis(10);
        peer.required_min_rx_us = 100_000;
        peer.desired_min_tx_us = 100_000;
        peer.poll = true;
        let raw = peer.encode();
        let acts = a.on_packet(&peer, &raw, t2).unwrap();
        assert!(
            acts.iter().any(|x| matches!(x, Action::Send(_))),
            "the Final goes out at once"
        );
        assert!(a.next_deadline().unwrap() <= t2 + Duration::from_millis(100));
    }

    #[test]
    fn jitter_is_75_to_90_percent_whatever_the_multiplier() {
        let mut s = Session::new(cfg(100, 100, 1), 1, 99, Instant::now());
        for _ in 0..1000 {
            let d = s.jittered(100_000);
            assert!(
                d >= Duration::from_millis(75) && d <= Duration::from_millis(90),
                "{d:?}"
            );
        }
        let mut s = Session::new(cfg(100, 100, 3), 1, 99, Instant::now());
        let ds: Vec<_> = (0..1000).map(|_| s.jittered(100_000)).collect();
        assert!(
            ds.iter()
                .all(|d| *d >= Duration::from_millis(75) && *d <= Duration::from_millis(90))
        );
        assert!(ds.iter().any(|d| *d > Duration::from_millis(88)));
        assert!(ds.iter().any(|d| *d < Duration::from_millis(77)));
    }

    #[test]
    fn slow_while_down() {
        let now = Instant::now();
        let mut s = Session::new(cfg(50, 50, 3), 1, 5, now);
        let mut sent = 0;
        for ms in 0..5000 {
            for a in s.on_timer(now + Duration::from_millis(ms)) {
                if matches!(a, Action::Send(_)) {
                    sent += 1;
                }
            }
        }
        // At most one per 750 ms (1 s jittered), at least one per second.
        assert!((5..=7).contains(&sent), "{sent} packets in 5 s while Down");
    }

    #[test]
    fn authenticated_sessions_and_a_wrong_key() {
        let auth = |k: &[u8]| {
            Some(AuthConfig {
                auth_type: AuthType::MeticulousKeyedSha1,
                key_id: 1,
                secret: k.to_vec(),
            })
        };
        let mut ca = cfg(100, 100, 3);
        ca.auth = auth(b"secret");
        let mut cb = ca.clone();
        let mut p = Pair::new(ca.clone(), cb.clone());
        p.run(Duration::from_millis(500));
        assert_eq!((p.a.state(), p.b.state()), (State::Up, State::Up));

        cb.auth = auth(b"wrong");
        let now = Instant::now();
        let mut a = Session::new(ca, 1, 3, now);
        let mut b = Session::new(cb, 2, 4, now);
        let mut drops = 0;
        for ms in 0..3000 {
            let t = now + Duration::from_millis(ms);
            for act in a.on_timer(t) {
                if let Action::Send(raw) = act {
                    let pk = Packet::decode(&raw).unwrap();
                    if b.on_packet(&pk, &raw, t).is_err() {
                        drops += 1;
                    }
                }
            }
            let _ = b.on_timer(t);
        }
        assert!(drops >= 3);
        assert_eq!(b.state(), State::Down);
    }
}
