//! `ferrolb-bfd` — Bidirectional Forwarding Detection (RFC 5880, single hop RFC 5881).
//!
//! ```text
//!  Handle (add/modify/remove, snapshot)  ──cmd──▶  runner task ──▶ Session (fsm.rs, sans-IO)
//!  broadcast::Receiver<Event>            ◀─event─      │   ▲
//!                                                socket.rs (UDP 3784, TTL 255 in and out)
//! ```
//!
//! - [`packet`]: the control packet and authentication section codec with the stateless
//!   reception checks.
//! - [`auth`]: simple password, keyed SHA1, meticulous keyed SHA1 (sequence rules of §6.7).
//! - [`fsm`]: one session's state machine, timers and Poll/Final sequences, driven by packets
//!   and a clock passed in.
//! - [`socket`]: UDP 3784 receive with TTL, per-session send sockets (TTL 255).
//! - [`runner`]: the task owning all sessions, and the [`Handle`] callers use.
//!
//! The crate knows nothing of the agent, BGP or HA: it detects, and reports state changes.

pub mod auth;
pub mod fsm;
pub mod packet;
pub mod runner;
pub mod socket;

pub use auth::{AuthConfig, AuthError};
pub use fsm::{Action, Session, SessionConfig, Status};
pub use packet::{AuthType, Diag, Packet, State};
pub use runner::{BfdError, Event, Handle, PeerConfig, PeerStatus, SessionCounters, spawn};
