//! `ferrolb-proto` — the `.proto` definitions shared between ferrolb nodes and their generated
//! Rust types (tonic-prost-build with protox, so no `protoc` binary is needed).
//!
//! Nothing is defined yet: the HA pair issue adds the conntrack sync service here.
