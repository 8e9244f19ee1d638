//! HA over REST: `GET /config/ha` (ferrolb: roles, peers, sync state), `POST
//! /config/ha/switchover` (ferrolb: planned switchover) and `POST /config/cistate`
//! (kube-loxilb's roles, for nodes whose roles are not decided by the cluster).

use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::models::{FieldError, body_object, field};
use super::{ApiError, Shared};
use crate::ha::control::SwitchoverError;
use crate::ha::{DEFAULT_INSTANCE, Ha, Role};
use crate::roles::RolesError;

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

/// `POST /config/ha/switchover`.
pub async fn switchover(State(app): State<Shared>) -> Result<Response, ApiError> {
    let Some(ha) = &app.ha else {
        return Err(unavailable(
            StatusCode::NOT_FOUND,
            "not in cluster mode (start with --cluster)",
        ));
    };
    let (node, term) = crate::ha::control::switchover(ha).await.map_err(|e| {
        let status = match e {
            SwitchoverError::NotByCluster | SwitchoverError::NotMaster => StatusCode::CONFLICT,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, e.to_string())
    })?;
    Ok(axum::Json(json!({"code": 200, "master": node, "term": term})).into_response())
}

/// `POST /config/cistate`: `{"instance":"llb-inst0","state":"MASTER"|"BACKUP"|"NOT_DEFINED","vip":...}`.
/// Saved with or without BGP; refused (409) when the cluster decides roles (`--ka`).
pub async fn set_cistate(State(app): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let bad = |e: FieldError| ApiError::new(StatusCode::BAD_REQUEST, e.to_string());
    let o = body_object(&body).map_err(bad)?;
    let instance = match field(&o, "instance") {
        None => DEFAULT_INSTANCE.to_string(),
        Some(Value::String(s)) if !s.is_empty() && s.len() <= super::models::MAX_INSTANCE => {
            s.clone()
        }
        Some(_) => {
            return Err(bad(FieldError::new(
                "instance",
                "must be a non-empty string of at most 64 bytes",
            )));
        }
    };
    let state = match field(&o, "state") {
        Some(Value::String(s)) => s.to_ascii_uppercase(),
        _ => {
            return Err(bad(FieldError::new(
                "state",
                "required: MASTER, BACKUP or NOT_DEFINED",
            )));
        }
    };
    let Some(role) = Role::parse(&state) else {
        return Err(bad(FieldError::new(
            "state",
            format!("'{state}' is not MASTER, BACKUP or NOT_DEFINED"),
        )));
    };
    let roles = app.roles.clone();
    // Off the async workers: saving syncs to disk, and becoming MASTER adopts synced flows.
    tokio::task::spawn_blocking(move || roles.set(&instance, role))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| {
            let status = match &e {
                RolesError::DecidedByCluster => StatusCode::CONFLICT,
                RolesError::Save(s) => crate::store::save_status(s),
            };
            ApiError::new(status, e.to_string())
        })?;
    Ok(super::success())
}
