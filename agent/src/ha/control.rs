//! HA operations beyond the role machine: the planned switchover (REST and SIGTERM) and the
//! HA and sync series for `/metrics`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{DEFAULT_INSTANCE, Ha, Role};
use crate::metrics::{counter, gauge};

#[derive(Debug, thiserror::Error)]
pub enum SwitchoverError {
    #[error("roles on this node are set with POST /config/cistate (no --ka)")]
    NotByCluster,
    #[error("this node is not MASTER: run the switchover on the MASTER")]
    NotMaster,
    #[error("no live, ready peer to hand MASTER to")]
    NoPeer,
    #[error("conntrack sync is not running")]
    NoSync,
    #[error("{0}")]
    Failed(String),
}

/// Hands MASTER to the lowest live, ready peer once it confirms it holds all of this node's
/// state. Returns the new MASTER's node id and term. The role change goes out on the role
/// bus (BGP and the L2 follower act on it).
pub async fn switchover(ha: &Arc<Ha>) -> Result<(u32, u64), SwitchoverError> {
    if !ha.cfg.ka {
        return Err(SwitchoverError::NotByCluster);
    }
    if ha.role(DEFAULT_INSTANCE) != Role::Master {
        return Err(SwitchoverError::NotMaster);
    }
    let target = ha.switchover_target().ok_or(SwitchoverError::NoPeer)?;
    let cs = ha.consync.get().ok_or(SwitchoverError::NoSync)?;
    let reply = cs
        .handover(target, DEFAULT_INSTANCE, ha.term(), Duration::from_secs(5))
        .await
        .map_err(|e| SwitchoverError::Failed(e.to_string()))?;
    if !reply.accepted {
        return Err(SwitchoverError::Failed(format!(
            "node {target} refused the switchover: {}",
            reply.reason
        )));
    }
    ha.stepped_down(reply.term);
    Ok((target, reply.term))
}

/// 1 when every peer's first snapshot arrived and its channel is up.
pub fn synced(ha: &Ha) -> u32 {
    match ha.consync.get() {
        Some(c) => u32::from(c.peers().iter().all(|p| p.synced_once && p.connected)),
        None => 0,
    }
}

/// Records the HA and sync series.
pub fn record_metrics(ha: &Ha) {
    let role = ha.role(DEFAULT_INSTANCE);
    for r in [Role::Master, Role::Backup, Role::NotDefined] {
        gauge(
            "ferrolb_ha_role",
            "1 for this node's role per cluster instance.",
            &[
                ("instance", DEFAULT_INSTANCE.to_string()),
                ("role", r.name().to_string()),
            ],
            f64::from(u8::from(role == r)),
        );
    }
    gauge(
        "ferrolb_sync_thread_rt_priority",
        "SCHED_FIFO priority of the conntrack sync worker (--sync-rt-priority; 0: normal scheduling, also when the kernel refused).",
        &[],
        f64::from(crate::agent::SYNC_RT_PRIORITY.load(std::sync::atomic::Ordering::Relaxed)),
    );
    gauge(
        "ferrolb_ha_ready",
        "1 once this node finished its first sync from its peers (or the join timeout passed).",
        &[],
        f64::from(u8::from(ha.ready())),
    );
    gauge(
        "ferrolb_ha_term",
        "The election term of this node's role.",
        &[],
        ha.term() as f64,
    );
    counter(
        "ferrolb_ha_role_transitions_total",
        "Role changes of this node.",
        &[],
        ha.transitions(),
    );
    gauge(
        "ferrolb_ha_last_failover_seconds",
        "Last takeover: from the moment the old MASTER was last known alive to this node being MASTER (0: none yet).",
        &[],
        ha.last_failover_s().unwrap_or(0.0),
    );
    let c = &ha.counters;
    for (name, help, v) in [
        (
            "ferrolb_sync_entries_installed_total",
            "Peer flows installed in the datapath.",
            &c.installed,
        ),
        (
            "ferrolb_sync_entries_deleted_total",
            "Peer flows removed on their origin's request.",
            &c.deleted,
        ),
        (
            "ferrolb_sync_entries_stale_removed_total",
            "Peer flows removed because a snapshot no longer had them.",
            &c.stale_removed,
        ),
        (
            "ferrolb_sync_entries_skipped_total",
            "Peer flows not installed: this node holds a version whose owning direction carried a packet later (the sender's version is stale).",
            &c.skipped_local,
        ),
        (
            "ferrolb_sync_entries_malformed_total",
            "Peer flows refused as malformed.",
            &c.malformed,
        ),
        (
            "ferrolb_sync_entries_adopted_total",
            "Peer flows taken over (their origin died or handed over).",
            &c.adopted,
        ),
        (
            "ferrolb_sync_orphans_removed_total",
            "Dead peers' flows that no traffic reached, removed once idle past their timeout.",
            &c.orphans_removed,
        ),
        (
            "ferrolb_sync_changes_published_total",
            "Changes of this node's own flows put on the sync log.",
            &c.published,
        ),
        (
            "ferrolb_sync_event_resyncs_total",
            "Resyncs forced because the datapath lost conntrack events.",
            &c.event_resyncs,
        ),
    ] {
        counter(name, help, &[], v.load(Ordering::Relaxed));
    }
    for (way, v) in [("taken", &c.handoffs_taken), ("given", &c.handoffs_given)] {
        counter(
            "ferrolb_sync_handoffs_total",
            "Flow ownership changes: peers' flows this node claimed because it carries their owning direction now (taken), own flows a peer claimed (given).",
            &[("way", way.to_string())],
            v.load(Ordering::Relaxed),
        );
    }
    let Some(cs) = ha.consync.get() else {
        return;
    };
    let st = cs.stats();
    for (name, help, v) in [
        (
            "ferrolb_sync_entries_sent_total",
            "Flows and changes sent to subscribers (snapshots included).",
            &st.sent,
        ),
        (
            "ferrolb_sync_refused_total",
            "Sync connections and requests refused (address outside --cluster, address at its connection limit, bad or missing token, failed TLS handshake, forged Handover, Handover while one from the same peer is in progress).",
            &st.refused,
        ),
        (
            "ferrolb_sync_refused_address_total",
            "Sync connections refused because the address is not a --cluster peer's.",
            &st.refused_address,
        ),
        (
            "ferrolb_sync_refused_limit_total",
            "Sync connections refused because their address had the most connections allowed open, all in use, and Handover requests refused because one from the same peer was in progress.",
            &st.refused_limit,
        ),
        (
            "ferrolb_sync_connections_displaced_total",
            "Sync connections closed for a newer one from their address (they had carried no accepted request).",
            &st.evicted,
        ),
    ] {
        counter(name, help, &[], v.load(Ordering::Relaxed));
    }
    gauge(
        "ferrolb_sync_queue_depth",
        "Changes not yet sent to the slowest subscriber.",
        &[],
        cs.queue_depth() as f64,
    );
    gauge(
        "ferrolb_sync_connections",
        "Sync connections open from peer addresses.",
        &[],
        st.connections.load(Ordering::Relaxed) as f64,
    );
    for (reason, v) in [
        ("replaced", &st.streams_ended_limit),
        ("stalled", &st.streams_stalled),
    ] {
        counter(
            "ferrolb_sync_streams_ended_total",
            "Subscriptions this node ended: for a newer one from their address (replaced), or because the subscriber took nothing for the stall timeout (stalled).",
            &[("reason", reason.to_string())],
            v.load(Ordering::Relaxed),
        );
    }
    let peers = cs.peers();
    gauge(
        "ferrolb_sync_peers_connected",
        "Peers whose sync channel is up.",
        &[],
        peers.iter().filter(|p| p.connected).count() as f64,
    );
    for p in &peers {
        let l = [(
            "peer",
            p.addr.map(|a| a.ip().to_string()).unwrap_or_default(),
        )];
        gauge(
            "ferrolb_sync_peer_up",
            "1 when the sync channel from this peer is up (0 while BFD is up is the sync-cut alarm).",
            &l,
            f64::from(u8::from(p.connected)),
        );
        counter(
            "ferrolb_sync_entries_received_total",
            "Flows and changes received from the peer.",
            &l,
            p.received,
        );
        counter(
            "ferrolb_sync_entries_applied_total",
            "Flows and changes from the peer applied to the datapath.",
            &l,
            p.applied,
        );
        counter(
            "ferrolb_sync_resyncs_total",
            "Resyncs from the peer after a sequence gap.",
            &l,
            p.resyncs,
        );
        counter(
            "ferrolb_sync_snapshots_total",
            "Snapshots received from the peer.",
            &l,
            p.snapshots,
        );
        gauge(
            "ferrolb_sync_lag_seconds",
            "Send-to-apply delay of the last batch of changes from the peer.",
            &l,
            p.lag_s,
        );
        for (b, n) in ferrolb_consync::LAG_BUCKETS_MS.iter().zip(p.lag_batches) {
            let le = if *b == u64::MAX {
                "inf".to_string()
            } else {
                b.to_string()
            };
            counter(
                "ferrolb_sync_lag_batches_total",
                "Batches of changes from the peer applied within lag_le_ms milliseconds of being sent (cumulative).",
                &[l[0].clone(), ("lag_le_ms", le)],
                n,
            );
        }
        gauge(
            "ferrolb_sync_behind_changes",
            "Changes the peer had logged that we had not applied, at its last batch.",
            &l,
            p.behind as f64,
        );
    }
}
