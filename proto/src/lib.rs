//! `ferrolb-proto` — the `.proto` definitions shared between ferrolb nodes and their generated
//! Rust types (tonic-prost-build with protox, so no `protoc` binary is needed).
//!
//! - [`consync`]: conntrack sync and role exchange (`proto/consync.proto`, TCP 22222).

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod consync {
    tonic::include_proto!("ferrolb.consync.v1");
}
