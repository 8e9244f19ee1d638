//! VIP ownership on `lo` and route queries, through iproute2 (`ip -j`).
//!
//! A VIP in use is put on `lo` as a /32 so the node answers ARP and ping for it; an address
//! this agent added is removed when no rule uses it any more. Addresses someone else put on
//! `lo` are never removed. One-arm mode asks the kernel which source address it would use
//! toward an endpoint.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::Command;

use anyhow::{Context, Result, bail};
use tracing::info;

fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("run ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Addresses currently on `lo`.
pub fn lo_addresses() -> Result<BTreeSet<IpAddr>> {
    let out = ip(&["-j", "addr", "show", "dev", "lo"])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("parse ip -j addr output")?;
    let mut set = BTreeSet::new();
    for link in v.as_array().into_iter().flatten() {
        for a in link["addr_info"].as_array().into_iter().flatten() {
            if let Some(ip) = a["local"].as_str().and_then(|s| s.parse().ok()) {
                set.insert(ip);
            }
        }
    }
    Ok(set)
}

/// Makes `lo` carry exactly the wanted VIPs among those we manage. Returns the new managed
/// set (wanted addresses we added or found, minus those we removed).
pub fn sync(wanted: &BTreeSet<IpAddr>, managed: &BTreeSet<IpAddr>) -> Result<BTreeSet<IpAddr>> {
    let present = lo_addresses()?;
    let mut now = managed.clone();
    for v in wanted {
        if !present.contains(v) {
            ip(&["addr", "add", &format!("{v}/32"), "dev", "lo"])?;
            info!(vip = %v, "VIP added to lo");
        }
        now.insert(*v);
    }
    for v in managed.difference(wanted) {
        if present.contains(v) {
            ip(&["addr", "del", &format!("{v}/32"), "dev", "lo"])?;
            info!(vip = %v, "VIP removed from lo");
        }
        now.remove(v);
    }
    Ok(now)
}

/// The source address the kernel would use to reach `dst`.
pub fn source_toward(dst: IpAddr) -> Result<IpAddr> {
    let out = ip(&["-j", "route", "get", &dst.to_string()])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("parse ip -j route output")?;
    v.get(0)
        .and_then(|r| r["prefsrc"].as_str())
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no source address toward {dst}"))
}
