//! The REST API, wire-compatible with loxilb's `/netlox/v1` (see `docs/api.md` and
//! `docs/openapi.yaml`, served at `/netlox/v1/openapi.yaml`).
//!
//! Handlers only translate between HTTP and [`crate::lb::Engine`]: parse and validate (400
//! naming the field), call the engine, map its error to a status (404 not found, 409 exists
//! or conflicts, 503 no room, 500 internal), reply with loxilb's JSON shapes.

pub mod bfd;
pub mod bgp;
pub mod ha;
pub mod models;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde_json::json;

use crate::lb::Engine;
use crate::metrics::{self, Metrics};
use crate::model::Protocol;
use crate::rules::RuleError;
use models::{CiList, CiState, Version};

/// Request bodies above this are refused with 413.
pub const MAX_BODY_BYTES: usize = 1 << 20;

pub const OPENAPI: &str = include_str!("../../../docs/openapi.yaml");

pub struct App {
    pub engine: Mutex<Engine>,
    pub metrics: Metrics,
    /// None when BFD could not start (UDP 3784 taken).
    pub bfd: Option<bfd::BfdService>,
    /// None without -b/--bgp.
    pub bgp: Option<bgp::BgpService>,
    /// None without --cluster.
    pub ha: Option<Arc<crate::ha::Ha>>,
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

fn success() -> Response {
    (StatusCode::OK, axum::Json(json!({"result": "Success"}))).into_response()
}

fn engine(app: &App) -> Result<std::sync::MutexGuard<'_, Engine>, ApiError> {
    app.engine
        .lock()
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "engine lock poisoned"))
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
        .route("/config/cistate", post(bgp::set_cistate))
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
        .route("/version", get(version))
        .route("/metrics", get(prometheus))
        .route("/openapi.yaml", get(openapi));
    Router::new()
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
    let method = req.method().as_str().to_string();
    let resp = next.run(req).await;
    app.metrics
        .api_request(&method, &route, resp.status().as_u16());
    resp
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such API path")
}

async fn liveness() -> Response {
    success()
}

async fn create_lb(State(app): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let spec = models::parse_rule(&body).map_err(|e| ApiError::bad(e.to_string()))?;
    engine(&app)?.apply(spec)?;
    bgp::sync(&app).await;
    Ok(success())
}

async fn list_lb(State(app): State<Shared>) -> Result<Response, ApiError> {
    let list = {
        let e = engine(&app)?;
        models::LbList {
            lb_attr: e
                .rules()
                .rules
                .values()
                .map(|r| models::lb_entry(r, |slot| e.endpoint_stats(r, slot)))
                .collect(),
        }
    };
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
fn delete_by_key(
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
    let mut e = engine(app)?;
    let keys = e.rules().find(ip, port, portmax, proto, Some(block));
    if keys.is_empty() {
        let range = portmax.map(|m| format!("-{m}")).unwrap_or_default();
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "lb-rule {ip}:{port}{range}/{} block {block} not found",
                proto.name()
            ),
        ));
    }
    e.delete(&keys)?;
    Ok(success())
}

async fn delete_lb(
    State(app): State<Shared>,
    Path((ip, port, proto)): Path<(String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let r = delete_by_key(&app, &ip, &port, None, &proto, &q);
    bgp::sync(&app).await;
    r
}

async fn delete_lb_range(
    State(app): State<Shared>,
    Path((ip, port, portmax, proto)): Path<(String, String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let r = delete_by_key(&app, &ip, &port, Some(&portmax), &proto, &q);
    bgp::sync(&app).await;
    r
}

async fn delete_lb_name(
    State(app): State<Shared>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    {
        let mut e = engine(&app)?;
        let keys = e.find_by_name(&name);
        if keys.is_empty() {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no lb-rule named '{name}'"),
            ));
        }
        e.delete(&keys)?;
    }
    bgp::sync(&app).await;
    Ok(success())
}

async fn delete_all_lb(State(app): State<Shared>) -> Result<Response, ApiError> {
    {
        let mut e = engine(&app)?;
        let keys = e.all_keys();
        if !keys.is_empty() {
            e.delete(&keys)?;
        }
    }
    bgp::sync(&app).await;
    Ok(success())
}

async fn list_ct(State(app): State<Shared>) -> Result<Response, ApiError> {
    let flows = engine(&app)?.flows();
    let list = models::CtList {
        ct_attr: flows.iter().map(models::ct_entry).collect(),
    };
    Ok(axum::Json(list).into_response())
}

async fn list_cistate(State(app): State<Shared>) -> Response {
    if let Some(h) = &app.ha {
        let instances = match app.engine.lock() {
            Ok(e) => e
                .rules()
                .rules
                .values()
                .map(|r| ha::instance_of(&r.service.name).to_string())
                .collect(),
            Err(_) => Default::default(),
        };
        let sync = ha::synced(h);
        return axum::Json(CiList {
            attr: h
                .roles(&instances)
                .into_iter()
                .map(|r| CiState {
                    instance: r.instance,
                    state: r.role.name().to_string(),
                    vip: "0.0.0.0".into(),
                    sync,
                })
                .collect(),
        })
        .into_response();
    }
    let mut roles = bgp::roles(&app).await;
    roles
        .entry(bgp::DEFAULT_INSTANCE.to_string())
        .or_insert_with(|| "NOT_DEFINED".to_string());
    axum::Json(CiList {
        attr: roles
            .into_iter()
            .map(|(instance, state)| CiState {
                instance,
                state,
                vip: "0.0.0.0".into(),
                sync: 0,
            })
            .collect(),
    })
    .into_response()
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
    let mut text = {
        let e = engine(&app)?;
        metrics::render(&app.metrics, &e)
    };
    if let Some(b) = &app.bfd {
        text.push_str(&bfd::metrics(b).await);
    }
    if let Some(b) = &app.bgp {
        text.push_str(&bgp::metrics(b));
    }
    if let Some(h) = &app.ha {
        text.push_str(&ha::metrics(h));
    }
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
