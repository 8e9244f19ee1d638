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
    if cfg.flags.remove_datapath {
        return ferrolb_agent::agent::remove_datapath(&cfg);
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(ferrolb_agent::agent::run(cfg))
}
