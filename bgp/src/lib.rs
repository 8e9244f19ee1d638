//! `ferrolb-bgp` — a BGP speaker that originates VIP routes (RFC 4271).

pub mod fsm;
pub mod wire;
