//! HA over REST: `GET /config/ha` (ferrolb: roles, peers, sync state), `POST
//! /config/ha/switchover` (ferrolb: planned switchover), the cluster's side of
//! `/config/cistate`, and the HA and sync metrics.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{ApiError, Shared};
use crate::ha::{DEFAULT_INSTANCE, Ha, Role};
use crate::rules::RuleSet;

/// The instance a rule belongs to: the part of its name after `:` (default `llb-inst0`).
pub fn instance_of(name: &str) -> &str {
    name.rsplit_once(':')
        .map(|(_, i)| i)
        .filter(|i| !i.is_empty())
        .unwrap_or(DEFAULT_INSTANCE)
}

/// Roles by instance for BGP under `--ka` (the node's role for every instance in use).
pub fn roles_for_rules(ha: &Ha, rules: &RuleSet) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for r in rules.rules.values() {
        let i = instance_of(&r.service.name);
        out.entry(i.to_string())
            .or_insert_with(|| ha.advertised_role(i).name().to_string());
    }
    out.insert(
        DEFAULT_INSTANCE.to_string(),
        ha.advertised_role(DEFAULT_INSTANCE).name().to_string(),
    );
    out
}

/// 1 when every peer's first snapshot arrived and its channel is up.
pub fn synced(ha: &Ha) -> u32 {
    match ha.consync.get() {
        Some(c) => u32::from(c.peers().iter().all(|p| p.synced_once && p.connected)),
        None => 0,
    }
}

fn unavailable(status: StatusCode, msg: impl Into<String>) -> ApiError {
    ApiError::new(status, msg)
}

/// `GET /config/ha`.
pub async fn status(State(app): State<Shared>) -> Result<Response, ApiError> {
    let Some(ha) = &app.ha else {
        return Err(unavailable(
            StatusCode::NOT_FOUND,
            "not in cluster mode (start with --cluster)",
        ));
    };
    Ok(axum::Json(status_json(ha)).into_response())
}

pub fn status_json(ha: &Ha) -> Value {
    let cs = ha.consync.get();
    let sync_peers = cs.map(|c| c.peers()).unwrap_or_default();
    let peers: Vec<Value> = ha
        .peer_views()
        .into_iter()
        .map(|(addr, v)| {
            let s = sync_peers.iter().find(|p| p.addr == Some(addr));
            let role = v
                .status
                .as_ref()
                .and_then(|st| st.instances.first())
                .map(|i| match i.role {
                    1 => "MASTER",
                    2 => "BACKUP",
                    _ => "NOT_DEFINED",
                })
                .unwrap_or("UNKNOWN");
            json!({
                "address": addr.ip().to_string(),
                "port": addr.port(),
                "nodeId": v.node_id,
                "role": role,
                "ready": v.status.as_ref().map(|s| s.ready),
                "alive": v.alive,
                "bfd": v.bfd_peer.map(|_| if v.bfd_up { "BFDUp" } else { "BFDDown" }),
                "syncConnected": v.connected,
                "syncCuts": v.sync_cuts,
                "synced": s.map(|p| p.synced_once),
                "snapshots": s.map(|p| p.snapshots),
                "received": s.map(|p| p.received),
                "applied": s.map(|p| p.applied),
                "resyncs": s.map(|p| p.resyncs),
                "behind": s.map(|p| p.behind),
                "lagSeconds": s.map(|p| p.lag_s),
                "lastError": s.and_then(|p| p.last_error.clone()),
            })
        })
        .collect();
    let (epoch, next) = cs.map(|c| c.position()).unwrap_or((0, 0));
    json!({
        "nodeId": ha.cfg.node_id,
        "ka": ha.cfg.ka,
        "ready": ha.ready(),
        "role": ha.role(DEFAULT_INSTANCE).name(),
        "term": ha.term(),
        "transitions": ha.transitions(),
        "lastFailoverSeconds": ha.last_failover_s(),
        "peers": peers,
        "sync": {
            "epoch": epoch,
            "nextSeq": next,
            "sent": cs.map(|c| c.stats().sent.load(Ordering::Relaxed)),
            "queueDepth": cs.map(|c| c.queue_depth()),
            "refused": cs.map(|c| c.stats().refused.load(Ordering::Relaxed)),
            "installed": ha.counters.installed.load(Ordering::Relaxed),
            "deleted": ha.counters.deleted.load(Ordering::Relaxed),
            "adopted": ha.counters.adopted.load(Ordering::Relaxed),
            "published": ha.counters.published.load(Ordering::Relaxed),
        },
    })
}

/// Hands MASTER to the lowest live, ready peer once it confirms it holds all of this node's
/// state. Returns the new MASTER's node id and term.
pub async fn switchover_now(app: &Shared) -> Result<(u32, u64), ApiError> {
    let Some(ha) = &app.ha else {
        return Err(unavailable(
            StatusCode::NOT_FOUND,
            "not in cluster mode (start with --cluster)",
        ));
    };
    if !ha.cfg.ka {
        return Err(unavailable(
            StatusCode::CONFLICT,
            "roles on this node are set with POST /config/cistate (no --ka)",
        ));
    }
    if ha.role(DEFAULT_INSTANCE) != Role::Master {
        return Err(unavailable(
            StatusCode::CONFLICT,
            "this node is not MASTER: run the switchover on the MASTER",
        ));
    }
    let Some(target) = ha.switchover_target() else {
        return Err(unavailable(
            StatusCode::SERVICE_UNAVAILABLE,
            "no live, ready peer to hand MASTER to",
        ));
    };
    let Some(cs) = ha.consync.get() else {
        return Err(unavailable(
            StatusCode::SERVICE_UNAVAILABLE,
            "conntrack sync is not running",
        ));
    };
    let reply = cs
        .handover(target, DEFAULT_INSTANCE, ha.term(), Duration::from_secs(5))
        .await
        .map_err(|e| unavailable(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    if !reply.accepted {
        return Err(unavailable(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("node {target} refused the switchover: {}", reply.reason),
        ));
    }
    ha.stepped_down(reply.term);
    super::bgp::sync_now(app).await;
    Ok((target, reply.term))
}

/// `POST /config/ha/switchover`.
pub async fn switchover(State(app): State<Shared>) -> Result<Response, ApiError> {
    let (node, term) = switchover_now(&app).await?;
    Ok(axum::Json(json!({"code": 200, "master": node, "term": term})).into_response())
}

/// Prometheus lines for HA and sync.
pub fn metrics(ha: &Ha) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let role = ha.role(DEFAULT_INSTANCE);
    let _ = writeln!(
        s,
        "# HELP ferrolb_ha_role 1 for this node's role per cluster instance.\n# TYPE ferrolb_ha_role gauge"
    );
    for r in [Role::Master, Role::Backup, Role::NotDefined] {
        let _ = writeln!(
            s,
            "ferrolb_ha_role{{instance=\"{DEFAULT_INSTANCE}\",role=\"{}\"}} {}",
            r.name(),
            u8::from(role == r)
        );
    }
    let gauge = |s: &mut String, name: &str, help: &str, kind: &str, v: String| {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    };
    gauge(
        &mut s,
        "ferrolb_ha_ready",
        "1 once this node finished its first sync from its peers (or the join timeout passed).",
        "gauge",
        u8::from(ha.ready()).to_string(),
    );
    gauge(
        &mut s,
        "ferrolb_ha_term",
        "The election term of this node's role.",
        "gauge",
        ha.term().to_string(),
    );
    gauge(
        &mut s,
        "ferrolb_ha_role_transitions_total",
        "Role changes of this node.",
        "counter",
        ha.transitions().to_string(),
    );
    if let Some(f) = ha.last_failover_s() {
        gauge(
            &mut s,
            "ferrolb_ha_last_failover_seconds",
            "Last takeover: from the moment the old MASTER was last known alive to this node being MASTER.",
            "gauge",
            format!("{f:.6}"),
        );
    }
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
            "Peer flows not installed because this node, as MASTER, owns the flow.",
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
        gauge(
            &mut s,
            name,
            help,
            "counter",
            v.load(Ordering::Relaxed).to_string(),
        );
    }
    let Some(cs) = ha.consync.get() else {
        return s;
    };
    let st = cs.stats();
    gauge(
        &mut s,
        "ferrolb_sync_entries_sent_total",
        "Flows and changes sent to subscribers (snapshots included).",
        "counter",
        st.sent.load(Ordering::Relaxed).to_string(),
    );
    gauge(
        &mut s,
        "ferrolb_sync_queue_depth",
        "Changes not yet sent to the slowest subscriber.",
        "gauge",
        cs.queue_depth().to_string(),
    );
    gauge(
        &mut s,
        "ferrolb_sync_refused_total",
        "Sync connections and requests refused (address outside --cluster, bad or missing token, failed TLS handshake, forged Handover).",
        "counter",
        st.refused.load(Ordering::Relaxed).to_string(),
    );
    gauge(
        &mut s,
        "ferrolb_sync_refused_address_total",
        "Sync connections refused because the address is not a --cluster peer's.",
        "counter",
        st.refused_address.load(Ordering::Relaxed).to_string(),
    );
    let peers = cs.peers();
    gauge(
        &mut s,
        "ferrolb_sync_peers_connected",
        "Peers whose sync channel is up.",
        "gauge",
        peers.iter().filter(|p| p.connected).count().to_string(),
    );
    type Field = fn(&ferrolb_consync::PeerInfo) -> String;
    let families: [(&str, &str, &str, Field); 7] = [
        (
            "ferrolb_sync_peer_up",
            "1 when the sync channel from this peer is up (0 while BFD is up is the sync-cut alarm).",
            "gauge",
            |p| u8::from(p.connected).to_string(),
        ),
        (
            "ferrolb_sync_entries_received_total",
            "Flows and changes received from the peer.",
            "counter",
            |p| p.received.to_string(),
        ),
        (
            "ferrolb_sync_entries_applied_total",
            "Flows and changes from the peer applied to the datapath.",
            "counter",
            |p| p.applied.to_string(),
        ),
        (
            "ferrolb_sync_resyncs_total",
            "Resyncs from the peer after a sequence gap.",
            "counter",
            |p| p.resyncs.to_string(),
        ),
        (
            "ferrolb_sync_snapshots_total",
            "Snapshots received from the peer.",
            "counter",
            |p| p.snapshots.to_string(),
        ),
        (
            "ferrolb_sync_lag_seconds",
            "Send-to-apply delay of the last batch of changes from the peer.",
            "gauge",
            |p| format!("{:.6}", p.lag_s),
        ),
        (
            "ferrolb_sync_behind_changes",
            "Changes the peer had logged that we had not applied, at its last batch.",
            "gauge",
            |p| p.behind.to_string(),
        ),
    ];
    for (name, help, kind, f) in families {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for p in &peers {
            let addr = p.addr.map(|a| a.ip().to_string()).unwrap_or_default();
            let _ = writeln!(s, "{name}{{peer=\"{addr}\"}} {}", f(p));
        }
    }
    s
}
