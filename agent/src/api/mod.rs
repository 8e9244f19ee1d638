//! The REST API, wire-compatible with loxilb's `/netlox/v1` (see `docs/api.md` and
//! `docs/openapi.yaml`, served at `/netlox/v1/openapi.yaml`).
//!
//! Handlers are thin: parse and validate (400 naming the field), call a controller (the
//! engine on its own thread, BGP, BFD, roles, HA), map its error to a status (404 not found,
//! 409 exists or conflicts, 503 no room, 507 state volume full, 500 internal), and render
//! loxilb's JSON shapes (`models`).

pub mod bfd;
pub mod bgp;
pub mod ha;
pub mod health;
pub mod models;
pub mod onearm;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde_json::json;

use crate::lb::{EngineGone, EngineHandle};
use crate::metrics::Metrics;
use crate::model::Protocol;
use crate::rules::RuleError;
use models::{CiList, CiState, Version};

/// Request bodies above this are refused with 413.
pub const MAX_BODY_BYTES: usize = 1 << 20;

pub const OPENAPI: &str = include_str!("../../../docs/openapi.yaml");

/// The controllers the handlers call.
pub struct App {
    pub engine: EngineHandle,
    pub metrics: Arc<Metrics>,
    /// None when BFD could not start (UDP 3784 taken).
    pub bfd: Option<Arc<crate::bfd::Bfd>>,
    /// None without -b/--bgp.
    pub bgp: Option<Arc<crate::bgp::Bgp>>,
    /// None without --cluster.
    pub ha: Option<Arc<crate::ha::Ha>>,
    pub roles: Arc<crate::roles::Roles>,
    /// Conntrack read handles for the streamed listing.
    pub conntrack: Arc<ferrolb_bpf::CtReader>,
    /// Endpoint probes.
    pub health: Arc<crate::health::controller::Health>,
    /// `--config-path` (documents saved by API handlers).
    pub config_dir: std::path::PathBuf,
}

pub type Shared = Arc<App>;

/// An error reply in loxilb's shape.
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<RuleError> for ApiError {
    fn from(e: RuleError) -> ApiError {
        let status = match &e {
            RuleError::Invalid(_) => StatusCode::BAD_REQUEST,
            RuleError::NotFound(_) => StatusCode::NOT_FOUND,
            RuleError::Exists(_) | RuleError::Conflict(_) => StatusCode::CONFLICT,
            RuleError::Full(_) => StatusCode::SERVICE_UNAVAILABLE,
            RuleError::NoSpace(_) => StatusCode::INSUFFICIENT_STORAGE,
            RuleError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "code": self.status.as_u16(),
            "message": self.message,
            "result": self.message,
        });
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<EngineGone> for ApiError {
    fn from(e: EngineGone) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

pub(crate) fn success() -> Response {
    (StatusCode::OK, axum::Json(json!({"result": "Success"}))).into_response()
}

pub fn router(app: Shared) -> Router {
    let v1 = Router::new()
        .route("/", get(liveness))
        .route("/config/loadbalancer", post(create_lb))
        .route("/config/loadbalancer/all", get(list_lb).delete(delete_all_lb))
        .route(
            "/config/loadbalancer/externalipaddress/{ip}/port/{port}/protocol/{proto}",
            delete(delete_lb),
        )
        .route(
            "/config/loadbalancer/externalipaddress/{ip}/port/{port}/portmax/{portmax}/protocol/{proto}",
            delete(delete_lb_range),
        )
        .route("/config/loadbalancer/name/{name}", delete(delete_lb_name))
        .route("/config/conntrack/all", get(list_ct))
        .route("/config/cistate/all", get(list_cistate))
        .route("/config/cistate", post(ha::set_cistate))
        .route("/config/ha", get(ha::status))
        .route("/config/ha/switchover", post(ha::switchover))
        .route("/config/bgp/global", post(bgp::global))
        .route("/config/bgp/neigh", post(bgp::neigh))
        .route("/config/bgp/neigh/all", get(bgp::list_neigh))
        .route("/config/bgp/neigh/{ip}", delete(bgp::delete_neigh))
        .route("/config/bgp/routes", get(bgp::routes))
        .route("/config/bgp/drain", post(bgp::drain))
        .route("/config/bfd", post(bfd::create))
        .route("/config/bfd/all", get(bfd::list))
        .route("/config/bfd/remoteIP/{ip}", delete(bfd::delete))
        .route("/config/onearmsource", post(onearm::create))
        .route("/config/onearmsource/all", get(onearm::list))
        .route("/config/onearmsource/{ip}", delete(onearm::delete))
        .route("/config/endpoint", post(health::create))
        .route("/config/endpoint/all", get(health::list))
        .route("/config/endpoint/epipaddress/{ip}", delete(health::delete))
        .route("/config/endpointhoststate", post(health::host_state))
        .route("/version", get(version))
        .route("/metrics", get(prometheus))
        .route("/openapi.yaml", get(openapi));
    Router::new()
        // The base path answers with and without its trailing slash.
        .route("/netlox/v1/", get(liveness))
        .nest("/netlox/v1", v1)
        .route("/metrics", get(prometheus))
        .route("/version", get(version))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(app.clone(), count_requests))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(app)
}

async fn count_requests(State(app): State<Shared>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    // A client picks the method: only the standard ones become label values (bounded series).
    let method = match req.method().as_str() {
        m @ ("GET" | "POST" | "PUT" | "DELETE" | "PATCH" | "HEAD" | "OPTIONS") => m,
        _ => "other",
    }
    .to_string();
    let resp = json_errors(next.run(req).await).await;
    app.metrics
        .api_request(&method, &route, resp.status().as_u16());
    resp
}

/// Every error answer in loxilb's JSON shape, also those axum makes itself (a query string or
/// path it cannot decode, a body over the limit, a method the route does not have), so that a
/// client always gets `{"code","message","result"}`.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let mut out = ApiError::new(status, message).into_response();
    // Keep what the status needs (e.g. `Allow` on 405).
    for (k, v) in parts.headers.iter() {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such API path")
}

async fn liveness() -> Response {
    success()
}

async fn create_lb(State(app): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let spec = models::parse_rule(&body).map_err(|e| ApiError::bad(e.to_string()))?;
    app.engine.call(move |e| e.apply(spec)).await??;
    Ok(success())
}

async fn list_lb(State(app): State<Shared>) -> Result<Response, ApiError> {
    let list = app
        .engine
        .call(|e| {
            let rules: Vec<_> = e.rules().rules.values().collect();
            let ids: Vec<u32> = rules.iter().map(|r| r.id).collect();
            let eps: Vec<(u32, u32)> = rules
                .iter()
                .flat_map(|r| r.endpoints.iter().map(|ep| (r.id, u32::from(ep.slot))))
                .collect();
            let stats = e.datapath().stats_many(&ids, &eps).map(|(_, ep)| ep);
            let mut at = 0;
            models::LbList {
                lb_attr: rules
                    .iter()
                    .map(|r| {
                        let base = at;
                        at += r.endpoints.len();
                        models::lb_entry(
                            r,
                            |slot| {
                                let i = r.endpoints.iter().position(|ep| ep.slot == slot);
                                match (&stats, i) {
                                    (Ok(s), Some(i)) => {
                                        s.get(base + i).map_or((0, 0), |x| (x.packets, x.bytes))
                                    }
                                    _ => e.endpoint_stats(r, slot),
                                }
                            },
                            e.rule_warnings(r),
                        )
                    })
                    .collect(),
            }
        })
        .await?;
    Ok(axum::Json(list).into_response())
}

fn parse_path(ip: &str, port: &str, proto: &str) -> Result<(IpAddr, u16, Protocol), ApiError> {
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| ApiError::bad(format!("externalipaddress: '{ip}' is not an IP address")))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ApiError::bad(format!("port: must be 1..=65535, got '{port}'")))?;
    let proto =
        models::parse_protocol(proto, "protocol").map_err(|e| ApiError::bad(e.to_string()))?;
    Ok((ip, port, proto))
}

fn parse_block(q: &HashMap<String, String>) -> Result<u32, ApiError> {
    match q.get("block") {
        None => Ok(0),
        Some(b) if b.is_empty() => Ok(0),
        Some(b) => b
            .parse()
            .map_err(|_| ApiError::bad(format!("block: must be an integer, got '{b}'"))),
    }
}

/// Deletes the rules matching a loxilb delete path; 404 naming what was asked for when none.
async fn delete_by_key(
    app: &App,
    ip: &str,
    port: &str,
    portmax: Option<&str>,
    proto: &str,
    q: &HashMap<String, String>,
) -> Result<Response, ApiError> {
    let (ip, port, proto) = parse_path(ip, port, proto)?;
    let portmax: Option<u16> = portmax
        .map(|m| {
            m.parse()
                .map_err(|_| ApiError::bad(format!("portmax: must be 0..=65535, got '{m}'")))
        })
        .transpose()?;
    let block = parse_block(q)?;
    app.engine
        .call(move |e| {
            let keys = e.rules().find(ip, port, portmax, proto, Some(block));
            if keys.is_empty() {
                let range = portmax.map(|m| format!("-{m}")).unwrap_or_default();
                return Err(RuleError::NotFound(format!(
                    "lb-rule {ip}:{port}{range}/{} block {block} not found",
                    proto.name()
                )));
            }
            e.delete(&keys)
        })
        .await??;
    Ok(success())
}

async fn delete_lb(
    State(app): State<Shared>,
    Path((ip, port, proto)): Path<(String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    delete_by_key(&app, &ip, &port, None, &proto, &q).await
}

async fn delete_lb_range(
    State(app): State<Shared>,
    Path((ip, port, portmax, proto)): Path<(String, String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    delete_by_key(&app, &ip, &port, Some(&portmax), &proto, &q).await
}

async fn delete_lb_name(
    State(app): State<Shared>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    app.engine
        .call(move |e| {
            let keys = e.find_by_name(&name);
            if keys.is_empty() {
                return Err(RuleError::NotFound(format!("no lb-rule named '{name}'")));
            }
            e.delete(&keys)
        })
        .await??;
    Ok(success())
}

async fn delete_all_lb(State(app): State<Shared>) -> Result<Response, ApiError> {
    app.engine
        .call(|e| {
            let keys = e.all_keys();
            if keys.is_empty() {
                return Ok(0);
            }
            e.delete(&keys)
        })
        .await??;
    Ok(success())
}

/// Flows per chunk of the streamed conntrack listing (one syscall each).
const CT_CHUNK: usize = 4096;

/// `GET /config/conntrack/all`, streamed: the table is read a chunk at a time on the
/// blocking pool and each chunk's JSON sent as it is ready, so memory stays bounded by a few
/// chunks whatever the table holds (1M flows included) and the engine is not held.
async fn list_ct(State(app): State<Shared>) -> Result<Response, ApiError> {
    let labels = app.engine.call(|e| e.labels_by_id()).await?;
    let reader = app.conntrack.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || {
        crate::lb::at_low_priority(|| {
            if tx
                .blocking_send(Ok(Bytes::from_static(b"{\"ctAttr\":[")))
                .is_err()
            {
                return;
            }
            let mut first = true;
            let mut batches = reader.batches(CT_CHUNK);
            loop {
                match batches.next_chunk() {
                    Ok(Some(chunk)) => {
                        let mut buf = Vec::with_capacity(chunk.len() * 160);
                        for (k, v) in &chunk {
                            if v.dir != 0 {
                                continue;
                            }
                            let peer = reader.get(&k.peer(v));
                            let f = crate::lb::flow_view(k, v, peer.as_ref(), &labels);
                            if !first {
                                buf.push(b',');
                            }
                            first = false;
                            if serde_json::to_writer(&mut buf, &models::ct_entry(&f)).is_err() {
                                return;
                            }
                        }
                        if !buf.is_empty() && tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "conntrack listing failed part way");
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                }
            }
            let _ = tx.blocking_send(Ok(Bytes::from_static(b"]}")));
        })
    });
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
        .into_response())
}

async fn list_cistate(State(app): State<Shared>) -> Result<Response, ApiError> {
    let instances = app
        .engine
        .call(|e| {
            e.rules()
                .rules
                .values()
                .map(|r| r.service.instance().to_string())
                .collect()
        })
        .await?;
    let sync = app.ha.as_deref().map_or(0, crate::ha::control::synced);
    Ok(axum::Json(CiList {
        attr: app
            .roles
            .list(&instances)
            .into_iter()
            .map(|(instance, role)| CiState {
                instance,
                state: role.name().to_string(),
                vip: "0.0.0.0".into(),
                sync,
            })
            .collect(),
    })
    .into_response())
}

async fn version() -> Response {
    axum::Json(Version {
        version: env!("CARGO_PKG_VERSION").into(),
        build_info: format!(
            "ferrolb {} (datapath layout v{})",
            env!("CARGO_PKG_VERSION"),
            ferrolb_bpf::maps::LAYOUT_VERSION
        ),
    })
    .into_response()
}

async fn prometheus(State(app): State<Shared>) -> Result<Response, ApiError> {
    // Everything is read first (the datapath on the engine's thread, in batches; BFD from its
    // thread), then recorded and rendered in one go.
    let dp = app
        .engine
        .call(|e| crate::metrics::DatapathSnapshot::take(e))
        .await?;
    let bfd = match &app.bfd {
        Some(b) => Some((
            b.handle.list().await.unwrap_or_default(),
            b.handle.counters.clone(),
        )),
        None => None,
    };
    // Recording and rendering tens of thousands of series takes tens of milliseconds of CPU:
    // on the blocking pool at low priority, never on the async workers that carry sync, BGP
    // and REST.
    let app2 = app.clone();
    let text = tokio::task::spawn_blocking(move || {
        crate::lb::at_low_priority(|| {
            crate::metrics::scrape(|| {
                crate::metrics::record(&app2.metrics, &dp);
                if app2.metrics.loxilb_names {
                    crate::loxilb_metrics::record(&dp);
                }
                if let Some((l, c)) = &bfd {
                    crate::bfd::record_metrics(l, c);
                }
                if let Some(b) = &app2.bgp {
                    b.record_metrics();
                }
                if let Some(h) = &app2.ha {
                    crate::ha::control::record_metrics(h);
                }
                crate::health::controller::record_metrics(&app2.health);
                crate::health::controller::record_peer_metrics(
                    &app2.health,
                    &health::peer_health(&app2),
                );
            })
        })
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI).into_response()
}
