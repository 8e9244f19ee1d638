//! Endpoint probes over REST, in loxilb's shapes: `GET /config/endpoint/all`,
//! `POST /config/endpoint`, `DELETE /config/endpoint/epipaddress/{ip}`, and
//! `POST /config/endpointhoststate` (force an endpoint down, or let its probes decide again).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::bgp::uint;
use super::models::{FieldError, field as get};
use super::{ApiError, Shared};
use crate::health::Forced;
use crate::health::controller::{HealthError, Manual, ManualTarget};
use crate::health::view::{Key, PeerHealth};
use crate::model::{MAX_PROBE_INTERVAL_S, MAX_PROBE_RETRIES, ProbeKind, Protocol};

fn health_error(e: HealthError) -> ApiError {
    let status = match &e {
        HealthError::NotFound(_) => StatusCode::NOT_FOUND,
        HealthError::InUse(_) => StatusCode::CONFLICT,
        HealthError::Full => StatusCode::SERVICE_UNAVAILABLE,
        HealthError::Save(s) => crate::store::save_status(s),
    };
    ApiError::new(status, e.to_string())
}

fn bad(e: FieldError) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, e.to_string())
}

fn string<'a>(
    o: &'a serde_json::Map<String, Value>,
    name: &str,
    max: usize,
) -> Result<Option<&'a str>, FieldError> {
    match get(o, name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.len() > max => {
            Err(FieldError::new(name, format!("at most {max} bytes")))
        }
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(FieldError::new(name, "must be a string")),
    }
}

/// Parses a `POST /config/endpoint` body: `{hostName, name, inactiveReTries, probeType,
/// probeReq, probeResp, probeDuration, probePort}`.
pub fn parse_endpoint(body: &[u8]) -> Result<Manual, FieldError> {
    let o = &super::models::body_object(body)?;
    let host = string(o, "hostName", 64)?.ok_or_else(|| FieldError::new("hostName", "required"))?;
    let ip = super::models::strict_ip(host, "hostName")?;
    let kind_s = string(o, "probeType", super::models::MAX_PROBE_TYPE)?
        .unwrap_or("ping")
        .to_ascii_lowercase();
    let kind = ProbeKind::from_name(&kind_s).ok_or_else(|| {
        FieldError::new(
            "probeType",
            format!("unknown probe type '{kind_s}' (none, ping, tcp, udp, http, https)"),
        )
    })?;
    let port = uint(o, "probePort", 65535)?.unwrap_or(0) as u16;
    if kind.has_port() && port == 0 {
        return Err(FieldError::new(
            "probePort",
            format!("a {} probe needs a port (1..=65535)", kind.name()),
        ));
    }
    if !kind.has_port() && port != 0 {
        return Err(FieldError::new(
            "probePort",
            format!("a {} probe has no port; leave it 0", kind.name()),
        ));
    }
    let interval = uint(o, "probeDuration", u64::from(MAX_PROBE_INTERVAL_S))?.unwrap_or(0) as u32;
    let fall = uint(o, "inactiveReTries", u64::from(MAX_PROBE_RETRIES))?.unwrap_or(0) as u32;
    let request = string(o, "probeReq", super::models::MAX_TEXT)?
        .unwrap_or("")
        .to_string();
    let response = string(o, "probeResp", super::models::MAX_TEXT)?
        .unwrap_or("")
        .to_string();
    let default_name = format!("{ip}_{}_{port}", kind.name());
    let name = string(o, "name", super::models::MAX_TEXT)?
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .unwrap_or(default_name);
    Ok(Manual {
        name,
        target: ManualTarget {
            ip,
            port,
            kind: kind.name().to_string(),
            request,
            response,
        },
        interval_s: if interval == 0 {
            crate::model::DEFAULT_PROBE_INTERVAL_S
        } else {
            interval
        },
        fall: if fall == 0 {
            crate::model::DEFAULT_PROBE_FALL
        } else {
            fall
        },
    })
}

pub async fn create(State(app): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let m = parse_endpoint(&body).map_err(bad)?;
    app.health.upsert_manual(m).await.map_err(health_error)?;
    Ok(super::success())
}

pub async fn delete(
    State(app): State<Shared>,
    Path(ip): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let ip: IpAddr = super::models::strict_ip(&ip, "epipaddress").map_err(bad)?;
    let port = match q.get("probe_port") {
        None => None,
        Some(p) => Some(p.parse::<u16>().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("probe_port: '{p}' is not a port (0..=65535)"),
            )
        })?),
    };
    app.health
        .remove_manual(
            ip,
            q.get("name").map(String::as_str),
            q.get("probe_type").map(String::as_str),
            port,
        )
        .await
        .map_err(health_error)?;
    Ok(super::success())
}

/// Go's duration text for a delay ("1.234ms"), as loxilb shows them.
fn go_duration(d: Option<Duration>) -> String {
    match d {
        None => "0s".into(),
        Some(d) if d < Duration::from_millis(1) => format!("{:.3}µs", d.as_secs_f64() * 1e6),
        Some(d) if d < Duration::from_secs(1) => format!("{:.3}ms", d.as_secs_f64() * 1e3),
        Some(d) => format!("{:.3}s", d.as_secs_f64()),
    }
}

/// Each sync peer's endpoint-health view, from its last status: (peer, node id, view);
/// `None` for a peer whose channel is down (its last view only grows stale) or that sent
/// no status yet.
pub fn peer_health(app: &Shared) -> Vec<(std::net::SocketAddr, Option<u32>, Option<PeerHealth>)> {
    let Some(ha) = &app.ha else {
        return Vec::new();
    };
    ha.peer_views()
        .into_iter()
        .map(|(addr, v)| {
            let view = v
                .status
                .as_ref()
                .filter(|_| v.connected)
                .map(PeerHealth::from_status);
            (addr, v.node_id, view)
        })
        .collect()
}

pub async fn list(State(app): State<Shared>) -> Result<Response, ApiError> {
    let peers: Vec<_> = peer_health(&app)
        .into_iter()
        .filter_map(|(a, n, p)| Some((a, n, p?)))
        .collect();
    let forced = app.health.forced();
    let names: HashMap<_, _> = app
        .health
        .manual()
        .into_iter()
        .filter_map(|m| m.target().map(|(t, _)| (t, m.name)))
        .collect();
    let attr: Vec<Value> = app
        .health
        .statuses()
        .into_iter()
        .map(|(t, s)| {
            let state = crate::health::controller::target_state(&forced, &t, &s);
            let name = names
                .get(&t)
                .cloned()
                .unwrap_or_else(|| format!("{}_{}_{}", t.ip, t.kind.name(), t.port));
            json!({
                "hostName": t.ip.to_string(),
                "name": name,
                "inactiveReTries": s.timing.fall,
                "probeType": t.kind.name(),
                "probeReq": t.request,
                "probeResp": t.response,
                "probeDuration": s.timing.interval.as_secs(),
                "probePort": t.port,
                "minDelay": go_duration(s.min),
                "avgDelay": go_duration(s.avg()),
                "maxDelay": go_duration(s.max),
                "currState": state.name(),
                // ferrolb's additions:
                "sourceIP": t.source.map(|a| a.to_string()),
                "probes": s.probes,
                "lastError": s.last.and_then(|r| r.err()).map(|f| f.name()),
                "stateSeconds": s.since.elapsed().as_secs_f64(),
                "transitions": s.tracker.transitions,
                // Each peer's verdict on the same target (its sync status): "unknown" when
                // its list of down targets was cut short.
                "peerStates": peers.iter().map(|(addr, node, p)| {
                    let k = Key { ip: t.ip, port: t.port, kind: t.kind };
                    json!({
                        "peer": addr.to_string(),
                        "node": node,
                        "state": p.state(&k).map_or("unknown", |x| x.name()),
                    })
                }).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(Json(json!({ "Attr": attr })).into_response())
}

/// Parses `POST /config/endpointhoststate`: `{hostName, epPort, epProto, state}` with state
/// `red` (forced down), `green` or `yellow` (the probes decide).
pub fn parse_host_state(body: &[u8]) -> Result<(Forced, bool), FieldError> {
    let o = &super::models::body_object(body)?;
    let host = string(o, "hostName", 64)?.ok_or_else(|| FieldError::new("hostName", "required"))?;
    let ip = super::models::strict_ip(host, "hostName")?;
    let port = uint(o, "epPort", 65535)?.unwrap_or(0) as u16;
    let protocol = match string(o, "epProto", 16)? {
        None | Some("") => None,
        Some(p) => Some(Protocol::from_name(&p.to_ascii_lowercase()).ok_or_else(|| {
            FieldError::new(
                "epProto",
                format!("unknown protocol '{p}' (tcp, udp, icmp)"),
            )
        })?),
    };
    let state = string(o, "state", 16)?.ok_or_else(|| FieldError::new("state", "required"))?;
    let down = match state.to_ascii_lowercase().as_str() {
        "red" => true,
        "green" | "yellow" => false,
        other => {
            return Err(FieldError::new(
                "state",
                format!(
                    "'{other}' is not a host state (red: force down; green or yellow: probes decide)"
                ),
            ));
        }
    };
    Ok((Forced { ip, port, protocol }, down))
}

pub async fn host_state(State(app): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let (f, down) = parse_host_state(&body).map_err(bad)?;
    app.health.set_forced(f, down).await.map_err(health_error)?;
    Ok(super::success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_bodies_parse_and_bad_ones_name_the_field() {
        let m = parse_endpoint(
            br#"{"hostName":"10.0.0.5","probeType":"tcp","probePort":8080,"probeDuration":5,"inactiveReTries":3}"#,
        )
        .unwrap();
        assert_eq!(m.name, "10.0.0.5_tcp_8080");
        assert_eq!((m.interval_s, m.fall), (5, 3));
        for (body, want) in [
            (r#"{"probeType":"tcp","probePort":1}"#, "hostName: required"),
            (
                r#"{"hostName":"10.0.0.5","probeType":"tcp"}"#,
                "probePort: a tcp probe needs a port",
            ),
            (
                r#"{"hostName":"10.0.0.5","probeType":"ping","probePort":9}"#,
                "probePort: a ping probe has no port",
            ),
            (
                r#"{"hostName":"10.0.0.5","probeType":"gopher"}"#,
                "probeType: unknown probe type",
            ),
            (
                r#"{"hostName":"10.0.0.5","inactiveReTries":-1}"#,
                "inactiveReTries: must be 0..=100",
            ),
            (r#"{"hostName":"10.0.0.500"}"#, "hostName:"),
        ] {
            let e = parse_endpoint(body.as_bytes()).unwrap_err().to_string();
            assert!(e.starts_with(want), "{body}: {e}");
        }
    }

    #[test]
    fn host_state_bodies() {
        let (f, down) = parse_host_state(
            br#"{"hostName":"10.0.0.5","epPort":80,"epProto":"TCP","state":"red"}"#,
        )
        .unwrap();
        assert!(down);
        assert_eq!((f.port, f.protocol), (80, Some(Protocol::Tcp)));
        let (_, down) = parse_host_state(br#"{"hostName":"10.0.0.5","state":"green"}"#).unwrap();
        assert!(!down);
        let e = parse_host_state(br#"{"hostName":"10.0.0.5","state":"blue"}"#).unwrap_err();
        assert_eq!(e.field, "state");
    }
}
