//! `ferrolb-agent` — the only crate that wires ferrolb together.
//!
//! It will own the `ferrolb` daemon (loxilb-compatible flags, the REST API under
//! `/netlox/v1`, persistence of rules, VIP ownership on `lo`, the HA controller that decides
//! roles per cluster instance, and the Prometheus registry) and the `ferroctl` CLI.
//!
//! Nothing is implemented yet: the single-node load balancer issue fills this crate. Until then
//! the crate deliberately exposes no API, so nothing can mistake it for a working agent.
