//! `ferrolb-bgp` — a BGP speaker that originates VIP routes (RFC 4271) toward ToR routers.
//!
//! ```text
//!  Speaker (set_global, upsert/remove/reset neighbour, set_routes, drain)
//!     │ watch<Routes>                     per neighbour: Session task
//!     └──────────────────────────────▶  Fsm (fsm.rs, sans-IO) + TcpStream + Adj-RIB-Out
//!                                        wire.rs: netgauze-bgp-pkt encode/decode
//! ```
//!
//! - [`wire`]: OPEN/UPDATE/KEEPALIVE/NOTIFICATION through `netgauze-bgp-pkt`, framing, RFC 7606
//!   attribute-error reporting.
//! - [`fsm`]: RFC 4271 §8 session state machine (active peer), timers as deadlines.
//! - [`speaker`]: the tasks and the handle.
//!
//! Received routes are decoded, validated and counted, never installed. The crate knows
//! nothing of BFD or the agent: the agent resets a neighbour when BFD reports it Down.

pub mod fsm;
pub mod socket;
pub mod speaker;
pub mod wire;

pub use fsm::State;
pub use speaker::{GlobalConfig, NeighborConfig, NeighborStatus, Routes, Speaker};
pub use wire::{GRACEFUL_SHUTDOWN, RouteAttrs};
