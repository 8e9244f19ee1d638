//! BFD over REST, in loxilb's shapes: `GET /config/bfd/all`, `POST /config/bfd`,
//! `DELETE /config/bfd/remoteIP/{ip}`; sessions created here are saved in `bfd.json` under
//! `--config-path` and restored on start (sessions from `--ka` come from the flags).
//!
//! Body: `{instance, remoteIp, sourceIp, interval (µs), retryCount}` (keys case-insensitive,
//! unknown keys ignored), plus ferrolb's `authType` (`simple`, `keyed-sha1`,
//! `meticulous-keyed-sha1`), `authKeyId` and `authKey`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ferrolb_bfd::runner::{MAX_INTERVAL_US, MIN_INTERVAL_US};
use ferrolb_bfd::{AuthConfig, AuthType, Handle, PeerConfig, SessionConfig};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Mutex;

use super::models::FieldError;
use super::{ApiError, Shared};
use crate::store::{save_status, write_atomic, write_atomic_shrinking};

pub const BFD_FILE: &str = "bfd.json";

/// A session as configured over REST (what `bfd.json` holds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BfdSpec {
    pub instance: String,
    pub remote: IpAddr,
    pub source: IpAddr,
    pub interval_us: u32,
    pub retry_count: u8,
    #[serde(default)]
    pub auth: Option<(String, u8, String)>,
}

impl BfdSpec {
    pub fn peer_config(&self) -> Result<PeerConfig, FieldError> {
        let auth = match &self.auth {
            None => None,
            Some((t, id, key)) => {
                let auth_type = match t.as_str() {
                    "simple" => AuthType::SimplePassword,
                    "keyed-sha1" => AuthType::KeyedSha1,
                    "meticulous-keyed-sha1" => AuthType::MeticulousKeyedSha1,
                    other => {
                        return Err(FieldError::new(
                            "authType",
                            format!("'{other}' is not simple, keyed-sha1 or meticulous-keyed-sha1"),
                        ));
                    }
                };
                let a = AuthConfig {
                    auth_type,
                    key_id: *id,
                    secret: key.as_bytes().to_vec(),
                };
                a.validate()
                    .map_err(|e| FieldError::new("authKey", e.to_string()))?;
                Some(a)
            }
        };
        Ok(PeerConfig {
            peer: self.remote,
            local: self.source,
            instance: self.instance.clone(),
            session: SessionConfig {
                desired_min_tx_us: self.interval_us,
                required_min_rx_us: self.interval_us,
                detect_mult: self.retry_count,
                auth,
            },
        })
    }
}

/// The agent's BFD service: the handle and the REST-configured sessions.
pub struct BfdService {
    pub handle: Handle,
    pub dir: PathBuf,
    pub specs: Mutex<BTreeMap<IpAddr, BfdSpec>>,
    /// Peers of `--ka` sessions: HA watches them, so the API may not remove them.
    pub keepalive_peers: std::collections::BTreeSet<IpAddr>,
}

/// Why a session may not be removed through the API, if it may not: a `--ka` session is the
/// HA pair's failure detector. Removing it would make the peer see our session go down and
/// take over while this node, which still holds the VIPs, would not know.
pub fn delete_refusal(
    ip: IpAddr,
    keepalive_peers: &std::collections::BTreeSet<IpAddr>,
) -> Option<String> {
    keepalive_peers.contains(&ip).then(|| {
        format!(
            "remoteIP: {ip} is this node's --ka keepalive peer (HA failure detection); \
             remove it from --ka and restart the agent to stop it"
        )
    })
}

impl BfdService {
    pub fn load(dir: &std::path::Path) -> anyhow::Result<BTreeMap<IpAddr, BfdSpec>> {
        let path = dir.join(BFD_FILE);
        match std::fs::read(&path) {
            Ok(b) => {
                let v: Vec<BfdSpec> = serde_json::from_slice(&b).map_err(|e| {
                    anyhow::anyhow!(
                        "{}: not a ferrolb BFD document ({e}); move it aside",
                        path.display()
                    )
                })?;
                Ok(v.into_iter().map(|s| (s.remote, s)).collect())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
        }
    }

    /// Saves the sessions; `shrinking` (a delete) may use the state volume's reserve.
    async fn save(
        &self,
        specs: &BTreeMap<IpAddr, BfdSpec>,
        shrinking: bool,
    ) -> Result<(), ApiError> {
        let v: Vec<&BfdSpec> = specs.values().collect();
        let bytes = serde_json::to_vec_pretty(&v).unwrap_or_default();
        let write = if shrinking {
            write_atomic_shrinking
        } else {
            write_atomic
        };
        write(&self.dir, BFD_FILE, &bytes)
            .map_err(|e| ApiError::new(save_status(&e), format!("saving BFD sessions: {e}")))
    }
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

fn service(app: &Shared) -> Result<&BfdService, ApiError> {
    app.bfd.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "BFD is not running on this node (UDP 3784 could not be bound at start)",
        )
    })
}

pub async fn create(State(app): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let spec =
        parse_bfd(&body).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    let svc = service(&app)?;
    let cfg = spec
        .peer_config()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    let mut specs = svc.specs.lock().await;
    svc.handle
        .upsert(cfg)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    specs.insert(spec.remote, spec);
    svc.save(&specs, false).await?;
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
    let svc = service(&app)?;
    if let Some(why) = delete_refusal(ip, &svc.keepalive_peers) {
        return Err(ApiError::new(StatusCode::CONFLICT, why));
    }
    let mut specs = svc.specs.lock().await;
    let existed = svc
        .handle
        .remove(ip)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if !existed {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no BFD session to {ip}"),
        ));
    }
    if specs.remove(&ip).is_some() {
        svc.save(&specs, true).await?;
    }
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

/// Prometheus lines for BFD (sessions, packets, drops, transitions, detection).
pub async fn metrics(svc: &BfdService) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let Ok(l) = svc.handle.list().await else {
        return o;
    };
    let fam = |o: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    fam(
        &mut o,
        "ferrolb_bfd_session_up",
        "gauge",
        "1 when the BFD session is Up.",
    );
    for p in &l {
        let _ = writeln!(
            o,
            "ferrolb_bfd_session_up{{peer=\"{}\",instance=\"{}\"}} {}",
            p.peer,
            p.instance,
            u8::from(p.status.state == ferrolb_bfd::State::Up)
        );
    }
    fam(
        &mut o,
        "ferrolb_bfd_state_transitions_total",
        "counter",
        "BFD state changes per session.",
    );
    for p in &l {
        let _ = writeln!(
            o,
            "ferrolb_bfd_state_transitions_total{{peer=\"{}\"}} {}",
            p.peer, p.counters.state_changes
        );
    }
    fam(
        &mut o,
        "ferrolb_bfd_packets_total",
        "counter",
        "BFD control packets per session and direction.",
    );
    for p in &l {
        let _ = writeln!(
            o,
            "ferrolb_bfd_packets_total{{peer=\"{}\",direction=\"in\"}} {}",
            p.peer, p.counters.rx
        );
        let _ = writeln!(
            o,
            "ferrolb_bfd_packets_total{{peer=\"{}\",direction=\"out\"}} {}",
            p.peer, p.counters.tx
        );
    }
    fam(
        &mut o,
        "ferrolb_bfd_last_detection_seconds",
        "gauge",
        "Silence before the session's last detection timeout (0: none yet).",
    );
    for p in &l {
        let _ = writeln!(
            o,
            "ferrolb_bfd_last_detection_seconds{{peer=\"{}\"}} {:.6}",
            p.peer,
            secs(p.last_detection)
        );
    }
    fam(
        &mut o,
        "ferrolb_bfd_drops_total",
        "counter",
        "BFD packets dropped, by reason.",
    );
    let c = &svc.handle.counters;
    let auth: u64 = l.iter().map(|p| p.counters.drop_auth).sum();
    use std::sync::atomic::Ordering::Relaxed;
    for (reason, n) in [
        ("bad_ttl", c.drop_bad_ttl.load(Relaxed)),
        ("malformed", c.drop_malformed.load(Relaxed)),
        ("no_session", c.drop_no_session.load(Relaxed)),
        ("auth", auth),
    ] {
        let _ = writeln!(o, "ferrolb_bfd_drops_total{{reason=\"{reason}\"}} {n}");
    }
    fam(
        &mut o,
        "ferrolb_bfd_timers_late_total",
        "counter",
        "BFD timer runs more than 10 ms after their deadline (the node is too busy for its BFD intervals).",
    );
    let _ = writeln!(
        o,
        "ferrolb_bfd_timers_late_total {}",
        c.timers_late.load(Relaxed)
    );
    fam(
        &mut o,
        "ferrolb_bfd_timer_late_max_seconds",
        "gauge",
        "The latest a BFD timer has run after its deadline.",
    );
    let _ = writeln!(
        o,
        "ferrolb_bfd_timer_late_max_seconds {}",
        c.timer_late_max_us.load(Relaxed) as f64 / 1e6
    );
    fam(
        &mut o,
        "ferrolb_bfd_thread_rt_priority",
        "gauge",
        "SCHED_FIFO priority of the BFD thread (0: normal scheduling).",
    );
    let _ = writeln!(
        o,
        "ferrolb_bfd_thread_rt_priority {}",
        c.rt_priority.load(Relaxed)
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn the_keepalive_session_cannot_be_deleted_through_the_api() {
        let ka: std::collections::BTreeSet<IpAddr> = ["10.0.0.2".parse().unwrap()].into();
        let why = delete_refusal("10.0.0.2".parse().unwrap(), &ka).unwrap();
        assert!(why.contains("remoteIP") && why.contains("--ka"), "{why}");
        assert_eq!(delete_refusal("10.0.0.3".parse().unwrap(), &ka), None);
    }
}
