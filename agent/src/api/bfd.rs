//! BFD over REST, in loxilb's shapes: `GET /config/bfd/all`, `POST /config/bfd`,
//! `DELETE /config/bfd/remoteIP/{ip}`; sessions created here are saved in `bfd.json` under
//! `--config-path` and restored on start (sessions from `--ka` come from the flags).
//!
//! Body: `{instance, remoteIp, sourceIp, interval (µs), retryCount}` (keys case-insensitive,
//! unknown keys ignored), plus ferrolb's `authType` (`simple`, `keyed-sha1`,
//! `meticulous-keyed-sha1`), `authKeyId` and `authKey`.

use std::net::IpAddr;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ferrolb_bfd::runner::{MAX_INTERVAL_US, MIN_INTERVAL_US};
use serde_json::{Value, json};

use super::models::FieldError;
use super::{ApiError, Shared};
use crate::bfd::{Bfd, BfdError, BfdSpec};

fn bfd_error(e: BfdError) -> ApiError {
    let status = match &e {
        BfdError::Invalid(_) => StatusCode::BAD_REQUEST,
        BfdError::Keepalive(_) => StatusCode::CONFLICT,
        BfdError::NotFound(_) => StatusCode::NOT_FOUND,
        BfdError::Save(s) => crate::store::save_status(s),
        BfdError::Runner(_) => StatusCode::INTERNAL_SERVER_ERROR,
        BfdError::Full => StatusCode::SERVICE_UNAVAILABLE,
    };
    ApiError::new(status, e.to_string())
}

use super::models::field as get;

fn ip_field(o: &serde_json::Map<String, Value>, name: &str) -> Result<IpAddr, FieldError> {
    let v = get(o, name).ok_or_else(|| FieldError::new(name, "required"))?;
    let s = v
        .as_str()
        .ok_or_else(|| FieldError::new(name, "must be a string"))?;
    super::models::strict_ip(s, name)
}

/// Parses a `POST /config/bfd` body.
pub fn parse_bfd(body: &[u8]) -> Result<BfdSpec, FieldError> {
    let o = &super::models::body_object(body)?;
    let remote = ip_field(o, "remoteIp")?;
    let source = ip_field(o, "sourceIp")?;
    if remote.is_ipv4() != source.is_ipv4() {
        return Err(FieldError::new(
            "sourceIp",
            format!("{source} and remoteIp {remote} are of different families"),
        ));
    }
    let int = |name: &str, default: i64| -> Result<i64, FieldError> {
        match get(o, name) {
            None => Ok(default),
            Some(Value::Number(n)) => n
                .as_i64()
                .ok_or_else(|| FieldError::new(name, format!("must be an integer, got {n}"))),
            Some(_) => Err(FieldError::new(name, "must be an integer")),
        }
    };
    let interval = int("interval", 100_000)?;
    if !(i64::from(MIN_INTERVAL_US)..=i64::from(MAX_INTERVAL_US)).contains(&interval) {
        return Err(FieldError::new(
            "interval",
            format!(
                "{interval} us out of range {MIN_INTERVAL_US}..={MAX_INTERVAL_US} (10 ms to 60 s)"
            ),
        ));
    }
    let retry = int("retryCount", 3)?;
    if !(1..=255).contains(&retry) {
        return Err(FieldError::new(
            "retryCount",
            format!("detect multiplier must be 1..=255, got {retry}"),
        ));
    }
    let instance = match get(o, "instance") {
        None => "default".to_string(),
        Some(Value::String(s)) if s.len() > super::models::MAX_INSTANCE => {
            return Err(FieldError::new(
                "instance",
                format!("at most {} bytes", super::models::MAX_INSTANCE),
            ));
        }
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(FieldError::new("instance", "must be a string")),
    };
    let auth = match get(o, "authType") {
        None => None,
        Some(Value::String(t)) => {
            let id = int("authKeyId", 1)?;
            if !(0..=255).contains(&id) {
                return Err(FieldError::new("authKeyId", "must be 0..=255"));
            }
            let key = match get(o, "authKey") {
                Some(Value::String(k)) => k.clone(),
                _ => return Err(FieldError::new("authKey", "required with authType")),
            };
            Some((t.clone(), id as u8, key))
        }
        Some(_) => return Err(FieldError::new("authType", "must be a string")),
    };
    let spec = BfdSpec {
        instance,
        remote,
        source,
        interval_us: interval as u32,
        retry_count: retry as u8,
        auth,
    };
    spec.peer_config()?;
    Ok(spec)
}

fn service(app: &Shared) -> Result<&Bfd, ApiError> {
    app.bfd.as_deref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "BFD is not running on this node (UDP 3784 could not be bound at start)",
        )
    })
}

pub async fn create(State(app): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let spec =
        parse_bfd(&body).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    service(&app)?.upsert(spec).await.map_err(bfd_error)?;
    Ok((StatusCode::OK, Json(json!({"result": "Success"}))).into_response())
}

pub async fn delete(
    State(app): State<Shared>,
    Path(ip): Path<String>,
) -> Result<Response, ApiError> {
    let ip: IpAddr = ip.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("remoteIP: '{ip}' is not an IP address"),
        )
    })?;
    service(&app)?.remove(ip).await.map_err(bfd_error)?;
    Ok((StatusCode::OK, Json(json!({"result": "Success"}))).into_response())
}

fn secs(d: Option<Duration>) -> f64 {
    d.map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

pub async fn list(State(app): State<Shared>) -> Result<Response, ApiError> {
    let svc = service(&app)?;
    let l = svc
        .handle
        .list()
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let attr: Vec<Value> = l
        .iter()
        .map(|p| {
            let s = &p.status;
            json!({
                "instance": p.instance,
                "remoteIp": p.peer.to_string(),
                "sourceIP": p.local.ip().to_string(),
                "port": p.local.port(),
                "interval": s.config.desired_min_tx_us,
                "retryCount": s.config.detect_mult,
                "state": s.state.loxilb_name(),
                // ferrolb's additions (loxicmd ignores them):
                "remoteState": s.remote_state.loxilb_name(),
                "localDiscriminator": s.local_discr,
                "remoteDiscriminator": s.remote_discr,
                "txIntervalUs": s.tx_interval_us,
                "rxIntervalUs": s.rx_interval_us,
                "detectTimeUs": s.detect_time_us,
                "remoteDetectMult": s.remote_detect_mult,
                "stateSeconds": secs(p.since),
                "lastChangeUnixMs": p.changed_at
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_millis() as u64),
                "lastDiag": s.local_diag.name(),
                "lastDetectionSeconds": secs(p.last_detection),
                "authType": s.config.auth.as_ref().map(|a| format!("{:?}", a.auth_type)),
                "packetsIn": p.counters.rx,
                "packetsOut": p.counters.tx,
                "droppedAuth": p.counters.drop_auth,
                "stateChanges": p.counters.state_changes,
            })
        })
        .collect();
    Ok(Json(json!({ "Attr": attr })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrolb_bfd::AuthType;

    #[test]
    fn loxilb_body_and_bad_values() {
        let s = parse_bfd(br#"{"instance":"default","remoteIp":"10.0.0.2","sourceIp":"10.0.0.1","interval":200000,"retryCount":3}"#).unwrap();
        assert_eq!((s.interval_us, s.retry_count), (200_000, 3));
        let s = parse_bfd(br#"{"RemoteIP":"10.0.0.2","SourceIP":"10.0.0.1"}"#).unwrap();
        assert_eq!(
            (s.interval_us, s.retry_count, s.instance.as_str()),
            (100_000, 3, "default")
        );
        let cases: &[(&str, &str)] = &[
            (
                r#"{"remoteIp":"10.0.0.2","sourceIp":"10.0.0.1","interval":9999}"#,
                "interval: 9999 us out of range",
            ),
            (
                r#"{"remoteIp":"10.0.0.2","sourceIp":"10.0.0.1","interval":60000001}"#,
                "interval: 60000001 us out of range",
            ),
            (
                r#"{"remoteIp":"10.0.0.2","sourceIp":"10.0.0.1","retryCount":0}"#,
                "retryCount: detect multiplier must be 1..=255",
            ),
            (
                r#"{"remoteIp":"10.0.0.x","sourceIp":"10.0.0.1"}"#,
                "remoteIp: '10.0.0.x' is not an IP address",
            ),
            (r#"{"sourceIp":"10.0.0.1"}"#, "remoteIp: required"),
            (
                r#"{"remoteIp":"10.0.0.2","sourceIp":"::1"}"#,
                "different families",
            ),
            (
                r#"{"remoteIp":"10.0.0.2","sourceIp":"10.0.0.1","authType":"md5","authKey":"x"}"#,
                "authType: 'md5'",
            ),
            (
                r#"{"remoteIp":"10.0.0.2","sourceIp":"10.0.0.1","authType":"keyed-sha1"}"#,
                "authKey: required",
            ),
            (
                r#"{"remoteIp":"10.0.0.2","sourceIp":"10.0.0.1","interval":"fast"}"#,
                "interval: must be an integer",
            ),
            ("[", "invalid JSON"),
        ];
        for (b, want) in cases {
            let e = parse_bfd(b.as_bytes()).unwrap_err().to_string();
            assert!(e.contains(want), "{b}: {e}");
        }
        let s = parse_bfd(br#"{"remoteIp":"10.0.0.2","sourceIp":"10.0.0.1","authType":"meticulous-keyed-sha1","authKeyId":2,"authKey":"k"}"#).unwrap();
        let a = s.peer_config().unwrap().session.auth.unwrap();
        assert_eq!((a.auth_type, a.key_id), (AuthType::MeticulousKeyedSha1, 2));
    }
}
