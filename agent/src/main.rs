//! `ferrolb`: flags -> Config -> run.

use anyhow::Result;
use clap::Parser;
use ferrolb_agent::config::{Config, Flags};

fn main() -> Result<()> {
    let cfg = Config::from_flags(Flags::parse())?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(cfg.log_filter)),
        )
        .with_target(false)
        .init();
    if cfg.flags.rpc.as_deref() == Some("netrpc") {
        tracing::warn!("--rpc=netrpc: ferrolb syncs over gRPC only; netrpc is taken as grpc");
    }
    if cfg.flags.egr_hooks {
        tracing::info!("--egr-hooks: accepted; the datapath needs no egress hook");
    }
    raise_fd_limit();
    if cfg.flags.remove_datapath {
        return ferrolb_agent::agent::remove_datapath(&cfg);
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(ferrolb_agent::agent::run(cfg))
}

/// Each BFD session holds a socket: lift the soft open-file limit to the hard one.
fn raise_fd_limit() {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 && rl.rlim_cur < rl.rlim_max {
            rl.rlim_cur = rl.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) != 0 {
                tracing::warn!("could not raise the open-file limit");
            }
        }
    }
}
