//! `ferrolb-lab` — runs containerlab topology files (`*.clab.yml`) on Linux network
//! namespaces, without Docker.
//!
//! ```text
//!   topology.rs  parse + validate (no side effects)        expand.rs  ${VAR}, magic variables
//!        │
//!   lab.rs       Lab::up / exec / spawn / faults / Drop ── registry.rs  /run/ferrolab/labs/*.json
//!        │
//!   ns.rs        netns + persistent mount/UTS namespaces (the only module that mounts or setns)
//! ```
//!
//! Each node is a "pseudo container": its own network namespace named like containerlab names
//! its containers (`clab-<lab>-<node>`), plus a mount and UTS namespace with a copy-on-write
//! `/etc`, private `/run/frr` and `/run/bird`, its own `/var/log` (kept in the lab directory),
//! and hostname = node name, so unmodified FRR and BIRD run per node. Tests use [`Lab`], whose
//! `Drop` removes every namespace, mount and process the lab made.

pub mod expand;
pub mod lab;
pub mod ns;
pub mod registry;
pub mod topology;

use std::time::Duration;

pub use lab::{DEFAULT_EXEC_TIMEOUT, ExecOutput, Lab, UpOptions, destroy};
pub use topology::{Topology, TopologyError};

/// Everything that can go wrong while running a lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error("{context}: {err}")]
    Io {
        context: String,
        err: std::io::Error,
    },
    #[error("{what}: exit code {status}: {stderr}")]
    Command {
        what: String,
        status: i32,
        stderr: String,
    },
    #[error("node {}: '{}' failed with exit code {}{}: {}", .0.node, .0.command, .0.code,
            if .0.timed_out { " (timed out)" } else { "" }, .0.stderr.trim())]
    Exec(Box<ExecOutput>),
    #[error("lab '{0}' is not up")]
    NotUp(String),
    #[error("timed out after {after:?} waiting for {what}{}", last_error.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default())]
    Timeout {
        what: String,
        after: Duration,
        last_error: Option<String>,
    },
    #[error("lab '{lab}': teardown incomplete: {}", problems.join("; "))]
    Teardown { lab: String, problems: Vec<String> },
    #[error("{0}")]
    Invalid(String),
}

impl LabError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        LabError::Io {
            context: context.into(),
            err: source,
        }
    }
    pub(crate) fn sys(context: impl Into<String>, errno: nix::errno::Errno) -> Self {
        LabError::Io {
            context: context.into(),
            err: std::io::Error::from(errno),
        }
    }
}
