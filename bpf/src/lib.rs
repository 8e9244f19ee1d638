//! `ferrolb-bpf` — the eBPF datapath and its typed Rust API.
//!
//! It will own the C programs (`bpf/c/*.c`, one shared header of map structs) built by
//! `build.rs` with clang-19, loaded and attached at TC ingress with `aya = "=0.14.0"`, and a
//! typed API over the maps: services, backends (with Maglev tables), conntrack (get, insert,
//! delete, iterate), per-CPU stats, and a ring-buffer stream of conntrack events. It knows
//! nothing about HA.
//!
//! Nothing is implemented yet: the single-node load balancer issue fills this crate.
