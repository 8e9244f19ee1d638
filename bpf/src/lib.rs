//! ferrolb's eBPF datapath: the C program (`c/lb.bpf.c`, built by `build.rs` with clang) and
//! its Rust side.
//!
//! ```text
//!   packet -> TC ingress flb_ingress -> conntrack hit? --yes--> translate -> FIB redirect
//!                                         | no
//!                                         v
//!                              services / ranges -> backends[slot] (endpoints + lookup table)
//!                                         |
//!                                select endpoint (rr, Maglev hash, weighted, persist, lc)
//!                                         |
//!                              both conntrack entries + ring-buffer event
//! ```
//!
//! - [`maps`]: `#[repr(C)]` mirrors of `c/ferrolb.h` (one header shared with the C side).
//! - [`lut`]: endpoint lookup tables (Maglev, round-robin, weighted), built in user space.
//! - [`datapath`]: load, pin, adopt, attach, and the typed map API.
//!
//! The crate knows nothing about HA: it installs rules, reads and writes conntrack entries
//! and hands out the event stream. The agent decides what to do with them.

pub mod batch;
pub mod datapath;
pub mod lut;
pub mod maps;
pub mod testrun;

pub use datapath::{
    COLLECT_CHUNK, Capacity, Collector, CtReader, Datapath, DatapathConfig, EventStream,
    FibInvalidator, SyncTable, default_pin_dir, ensure_bpffs, monotonic_ns, other_layouts, purge,
};
pub use testrun::TestRunner;

use std::path::PathBuf;

/// Datapath errors.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("loading the eBPF object: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("{context}: {source}")]
    Program {
        context: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("{context}: {source}")]
    Link {
        context: String,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("pinning {}: {source}", path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("map {map}: {source}")]
    Map {
        map: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, BpfError>;
