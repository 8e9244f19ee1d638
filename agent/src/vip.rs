//! VIP ownership on `lo`, and route queries.
//!
//! A VIP in use is put on `lo` as a /32 (IPv6: /128) so the node owns it (IPv4: the stack
//! answers ARP and ping for it; IPv6 neighbour discovery does not answer for `lo` addresses, so
//! the datapath answers solicitations for IPv6 VIPs); an address
//! this agent added is removed when no rule uses it any more. Addresses someone else put on
//! `lo` are never removed. Everything goes over rtnetlink ([`crate::netlink`]): no `ip`
//! subprocess. These calls block (one netlink round trip, bounded by a timeout): callers run
//! them on the engine's thread or the blocking pool.

use std::collections::BTreeSet;
use std::net::IpAddr;

use anyhow::{Context, Result};
use tracing::info;

use crate::netlink::{self, host_len};

fn lo_index() -> Result<u32> {
    netlink::if_index("lo").context("find lo")
}

/// Addresses currently on `lo`.
pub fn lo_addresses() -> Result<BTreeSet<IpAddr>> {
    let lo = lo_index()?;
    Ok(netlink::addresses()
        .context("list addresses")?
        .into_iter()
        .filter(|(i, _)| *i == lo)
        .map(|(_, a)| a)
        .collect())
}

/// Makes `lo` carry exactly the wanted VIPs among those we manage (start-up reconciliation).
/// Returns the new managed set.
pub fn sync(wanted: &BTreeSet<IpAddr>, managed: &BTreeSet<IpAddr>) -> Result<BTreeSet<IpAddr>> {
    let present = lo_addresses()?;
    let mut now = managed.clone();
    for v in wanted {
        if !present.contains(v) {
            add(*v)?;
            now.insert(*v);
        }
    }
    for v in managed.difference(wanted) {
        if present.contains(v) {
            del(*v)?;
        }
        now.remove(v);
    }
    Ok(now)
}

/// The interface that carries `addr` in this network namespace, if any.
pub fn interface_with(addr: IpAddr) -> Result<Option<String>> {
    Ok(netlink::addresses()
        .context("list addresses")?
        .into_iter()
        .find(|(_, a)| *a == addr)
        .map(|(i, _)| netlink::if_name(i).unwrap_or_else(|| format!("index {i}"))))
}

/// Puts `vip`/32 (/128) on `lo`. Returns false when the address was already there (someone
/// else's: the caller must not remove it later).
pub fn add(vip: IpAddr) -> Result<bool> {
    let added = netlink::add_address(lo_index()?, vip)
        .with_context(|| format!("add {vip}/{} to lo", host_len(vip)))?;
    if added {
        info!(%vip, "VIP added to lo");
    }
    Ok(added)
}

/// Removes `vip`/32 (/128) from `lo` (already gone is fine).
pub fn del(vip: IpAddr) -> Result<()> {
    netlink::del_address(lo_index()?, vip)
        .with_context(|| format!("remove {vip}/{} from lo", host_len(vip)))?;
    info!(%vip, "VIP removed from lo");
    Ok(())
}

/// The source address the kernel would use to reach `dst`. Blocking.
pub fn source_toward_blocking(dst: IpAddr) -> Result<IpAddr> {
    netlink::source_toward(dst).with_context(|| format!("no source address toward {dst}"))
}

/// [`source_toward_blocking`] from async code (on the blocking pool).
pub async fn source_toward(dst: IpAddr) -> Result<IpAddr> {
    tokio::task::spawn_blocking(move || source_toward_blocking(dst))
        .await
        .context("route lookup task")?
}
