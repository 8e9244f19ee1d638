//! `ferrolb-bgp` — a BGP speaker that originates VIP routes.
//!
//! It will own a sans-IO RFC 4271 finite state machine, session tasks, the Adj-RIB-Out of
//! originated VIP routes with per-route attributes (MED, AS-path prepend, communities), RFC 7606
//! error handling for received UPDATEs and RFC 8326 graceful shutdown. The wire format comes
//! from `netgauze-bgp-pkt`. It knows nothing of the agent, BFD or sync.
//!
//! Nothing is implemented yet: the BGP speaker issue fills this crate.
