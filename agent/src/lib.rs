//! The ferrolb agent: flags, the REST API, the rule engine, persistence, VIP ownership and
//! metrics, wired to the datapath (`ferrolb-bpf`). Binaries: `ferrolb` (the daemon) and
//! `ferroctl` (the CLI). This is the only crate that wires components together.

pub mod agent;
pub mod api;
pub mod bfd;
pub mod bgp;
pub mod client;
pub mod config;
pub mod fib;
pub mod forwarding;
pub mod ha;
pub mod health;
pub mod lb;
pub mod listen;
pub mod loxilb_metrics;
pub mod metrics;
pub mod model;
pub mod netlink;
pub mod pins;
pub mod roles;
pub mod rules;
pub mod store;
pub mod tls;
pub mod vip;
