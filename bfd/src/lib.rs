//! `ferrolb-bfd` — Bidirectional Forwarding Detection (RFC 5880/5881).
//!
//! It will own the control-packet codec (with authentication sections), a sans-IO session
//! state machine (AdminDown, Down, Init, Up), single-hop UDP transport with GTSM (TTL 255), and
//! a handle API that adds, removes and modifies sessions and streams state changes. It knows
//! nothing of the agent or BGP.
//!
//! Nothing is implemented yet: the BFD issue fills this crate.
