//! BGP over REST in loxilb's shapes (kube-loxilb's way): `POST /config/bgp/global`,
//! `POST /config/bgp/neigh`, `GET /config/bgp/neigh/all`, `DELETE /config/bgp/neigh/{ip}`;
//! roles with `POST /config/cistate`; ferrolb's `POST /config/bgp/drain`. The configuration is
//! saved in `<config-path>/bgp.json` and restored on start.
//!
//! Originated routes: a /32 for every VIP of a rule with `bgp: true`; the rule's HA instance
//! (its name after `:`, default `llb-inst0`) decides the attributes: MASTER and NOT_DEFINED
//! advertise plainly, BACKUP prepends its AS [`BACKUP_PREPEND`] times with MED [`BACKUP_MED`].

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ferrolb_bgp::{GlobalConfig, NeighborConfig, RouteAttrs, Routes, Speaker};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tracing::{info, warn};

use super::models::FieldError;
use super::{ApiError, Shared};
use crate::rules::RuleSet;
use crate::store::{save_status, write_atomic, write_atomic_shrinking};

pub const BGP_FILE: &str = "bgp.json";
pub const BACKUP_PREPEND: u8 = 3;
pub const BACKUP_MED: u32 = 200;
pub const DEFAULT_INSTANCE: &str = "llb-inst0";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeighSpec {
    pub address: IpAddr,
    pub remote_as: u32,
    pub remote_port: u16,
    pub hold_time_s: u16,
    pub bfd: bool,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub ttl_security: bool,
    #[serde(default)]
    pub passive: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BgpState {
    pub local_as: Option<u32>,
    pub router_id: Option<Ipv4Addr>,
    pub neighbors: BTreeMap<IpAddr, NeighSpec>,
    /// Role per cluster instance (MASTER, BACKUP, NOT_DEFINED).
    #[serde(default)]
    pub roles: BTreeMap<String, String>,
    #[serde(default)]
    pub policy: RoutePolicy,
}

/// Attributes of originated routes (set with `POST /config/bgp/global`, ferrolb's fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutePolicy {
    /// MED of MASTER / NOT_DEFINED routes (none by default).
    pub med: Option<u32>,
    pub backup_med: u32,
    pub backup_prepend: u8,
    /// LOCAL_PREF toward iBGP neighbours (100 when unset).
    pub local_pref: Option<u32>,
    pub backup_local_pref: Option<u32>,
    /// Added to every route.
    pub communities: Vec<u32>,
    pub large_communities: Vec<(u32, u32, u32)>,
}

impl Default for RoutePolicy {
    fn default() -> Self {
        RoutePolicy {
            med: None,
            backup_med: BACKUP_MED,
            backup_prepend: BACKUP_PREPEND,
            local_pref: None,
            backup_local_pref: None,
            communities: Vec::new(),
            large_communities: Vec::new(),
        }
    }
}

impl RoutePolicy {
    pub fn attrs(&self, backup: bool) -> RouteAttrs {
        RouteAttrs {
            med: if backup {
                Some(self.backup_med)
            } else {
                self.med
            },
            prepend: if backup { self.backup_prepend } else { 0 },
            communities: self.communities.clone(),
            large_communities: self.large_communities.clone(),
            local_pref: if backup {
                self.backup_local_pref
            } else {
                self.local_pref
            },
        }
    }
}

fn community(s: &str, field: &str) -> Result<u32, FieldError> {
    let (a, b) = s
        .split_once(':')
        .ok_or_else(|| FieldError::new(field, format!("'{s}' is not ASN:VALUE")))?;
    let a: u16 = a
        .parse()
        .map_err(|_| FieldError::new(field, format!("'{s}': {a} is not 0..=65535")))?;
    let b: u16 = b
        .parse()
        .map_err(|_| FieldError::new(field, format!("'{s}': {b} is not 0..=65535")))?;
    Ok((u32::from(a) << 16) | u32::from(b))
}

fn large_community(s: &str, field: &str) -> Result<(u32, u32, u32), FieldError> {
    let p: Vec<&str> = s.split(':').collect();
    let n = |x: &str| -> Result<u32, FieldError> {
        x.parse().map_err(|_| {
            FieldError::new(
                field,
                format!("'{s}' is not GLOBAL:DATA1:DATA2 (32-bit each)"),
            )
        })
    };
    if p.len() != 3 {
        return Err(FieldError::new(
            field,
            format!("'{s}' is not GLOBAL:DATA1:DATA2"),
        ));
    }
    Ok((n(p[0])?, n(p[1])?, n(p[2])?))
}

/// Reads ferrolb's route-policy fields of a global body into `p`.
fn parse_policy(o: &serde_json::Map<String, Value>, p: &mut RoutePolicy) -> Result<(), FieldError> {
    if let Some(v) = uint(o, "med", u64::from(u32::MAX))? {
        p.med = Some(v as u32);
    }
    if let Some(v) = uint(o, "backupMed", u64::from(u32::MAX))? {
        p.backup_med = v as u32;
    }
    if let Some(v) = uint(o, "backupPrepend", 32)? {
        p.backup_prepend = v as u8;
    }
    if let Some(v) = uint(o, "localPref", u64::from(u32::MAX))? {
        p.local_pref = Some(v as u32);
    }
    if let Some(v) = uint(o, "backupLocalPref", u64::from(u32::MAX))? {
        p.backup_local_pref = Some(v as u32);
    }
    let list = |name: &str| -> Result<Option<Vec<String>>, FieldError> {
        match get(o, name) {
            None => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| FieldError::new(name, "must be a list of strings"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(FieldError::new(name, "must be a list of strings")),
        }
    };
    if let Some(c) = list("communities")? {
        p.communities = c
            .iter()
            .map(|s| community(s, "communities"))
            .collect::<Result<_, _>>()?;
    }
    if let Some(c) = list("largeCommunities")? {
        p.large_communities = c
            .iter()
            .map(|s| large_community(s, "largeCommunities"))
            .collect::<Result<_, _>>()?;
    }
    Ok(())
}

pub struct BgpService {
    pub speaker: Speaker,
    pub dir: PathBuf,
    pub state: Mutex<BgpState>,
    /// Rules or roles changed: the route set is recomputed (coalesced, see [`sync_task`]).
    pub dirty: tokio::sync::Notify,
}

impl BgpService {
    pub fn load(dir: &std::path::Path) -> anyhow::Result<BgpState> {
        let path = dir.join(BGP_FILE);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                anyhow::anyhow!(
                    "{}: not a ferrolb BGP document ({e}); move it aside",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BgpState::default()),
            Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
        }
    }

    /// Saves the configuration; `shrinking` (a delete) may use the state volume's reserve.
    pub async fn save(&self, st: &BgpState, shrinking: bool) -> Result<(), ApiError> {
        let bytes = serde_json::to_vec_pretty(st).unwrap_or_default();
        let write = if shrinking {
            write_atomic_shrinking
        } else {
            write_atomic
        };
        write(&self.dir, BGP_FILE, &bytes)
            .map_err(|e| ApiError::new(save_status(&e), format!("saving BGP configuration: {e}")))
    }

    /// Applies the saved/current configuration to the speaker.
    pub fn apply(&self, st: &BgpState) {
        if let (Some(a), Some(r)) = (st.local_as, st.router_id) {
            self.speaker.set_global(GlobalConfig {
                local_as: a,
                router_id: r,
            });
        }
        for n in st.neighbors.values() {
            self.speaker.upsert_neighbor(neighbor_config(n));
        }
    }
}

pub fn neighbor_config(n: &NeighSpec) -> NeighborConfig {
    NeighborConfig {
        address: n.address,
        remote_as: n.remote_as,
        remote_port: n.remote_port,
        hold_time_s: n.hold_time_s,
        connect_retry_s: 1,
        password: n.password.clone(),
        ttl_security: n.ttl_security,
        passive: n.passive,
    }
}

/// The routes the rules ask for, with role-driven attributes.
pub fn routes_for(
    rules: &RuleSet,
    roles: &BTreeMap<String, String>,
    policy: &RoutePolicy,
) -> Routes {
    let mut out = Routes::new();
    for r in rules.rules.values() {
        if !r.service.bgp {
            continue;
        }
        let vip = r.key.external_ip;
        let instance = r
            .service
            .name
            .rsplit_once(':')
            .map(|(_, i)| i)
            .filter(|i| !i.is_empty())
            .unwrap_or(DEFAULT_INSTANCE);
        let backup = roles.get(instance).is_some_and(|s| s == "BACKUP");
        let attrs = policy.attrs(backup);
        let Ok(net) = IpNet::new(vip, if vip.is_ipv6() { 128 } else { 32 }) else {
            continue;
        };
        // Two rules on one VIP in different roles: the plainer advertisement wins.
        out.entry(net)
            .and_modify(|a: &mut RouteAttrs| {
                if !backup {
                    *a = policy.attrs(false);
                }
            })
            .or_insert(attrs);
    }
    out
}

use super::models::field as get;

fn obj(body: &[u8]) -> Result<serde_json::Map<String, Value>, FieldError> {
    super::models::body_object(body)
}

fn uint(
    o: &serde_json::Map<String, Value>,
    name: &str,
    max: u64,
) -> Result<Option<u64>, FieldError> {
    match get(o, name) {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) if v <= max => Ok(Some(v)),
            _ => Err(FieldError::new(name, format!("must be 0..={max}, got {n}"))),
        },
        Some(_) => Err(FieldError::new(name, "must be an integer")),
    }
}

fn ipv4(o: &serde_json::Map<String, Value>, name: &str) -> Result<Option<Ipv4Addr>, FieldError> {
    match get(o, name) {
        None => Ok(None),
        Some(Value::String(s)) => s
            .parse()
            .map(Some)
            .map_err(|_| FieldError::new(name, format!("'{s}' is not an IPv4 address"))),
        Some(_) => Err(FieldError::new(name, "must be a string")),
    }
}

/// A neighbour's address: IPv4 or IPv6 (the session then carries the VIPs of that family).
fn neighbor_ip(o: &serde_json::Map<String, Value>) -> Result<IpAddr, FieldError> {
    let name = "ipAddress";
    let ip: IpAddr = match get(o, name) {
        None => return Err(FieldError::new(name, "required (an IPv4 or IPv6 address)")),
        Some(Value::String(s)) => super::models::strict_ip(s, name)?,
        Some(_) => return Err(FieldError::new(name, "must be a string")),
    };
    let ip = ip.to_canonical();
    if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
        return Err(FieldError::new(
            name,
            format!("{ip} cannot be a neighbour (unspecified, loopback or multicast)"),
        ));
    }
    if let IpAddr::V6(v6) = ip
        && v6.is_unicast_link_local()
    {
        return Err(FieldError::new(
            name,
            format!("{ip} is link-local: peer over a global or unique-local address"),
        ));
    }
    Ok(ip)
}

fn bad(e: FieldError) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, e.to_string())
}

fn service(app: &Shared) -> Result<&BgpService, ApiError> {
    app.bgp.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "BGP is not enabled on this node (start ferrolb with -b/--bgp)",
        )
    })
}

fn ok() -> Response {
    (StatusCode::OK, Json(json!({"result": "Success"}))).into_response()
}

/// `POST /config/bgp/global`.
pub async fn global(State(app): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let o = obj(&body).map_err(bad)?;
    let local_as = uint(&o, "localAs", u64::from(u32::MAX))
        .map_err(bad)?
        .filter(|a| *a != 0)
        .ok_or_else(|| bad(FieldError::new("localAs", "required, 1..=4294967295")))?;
    let router_id = ipv4(&o, "routerId")
        .map_err(bad)?
        .ok_or_else(|| bad(FieldError::new("routerId", "required (an IPv4 address)")))?;
    if let Some(p) = uint(&o, "listenPort", 65535).map_err(bad)?
        && p != 179
    {
        return Err(bad(FieldError::new(
            "listenPort",
            "only 179 is supported (ferrolb connects actively)",
        )));
    }
    let svc = service(&app)?;
    let mut st = svc.state.lock().await;
    let mut policy = st.policy.clone();
    parse_policy(&o, &mut policy).map_err(bad)?;
    st.local_as = Some(local_as as u32);
    st.router_id = Some(router_id);
    st.policy = policy;
    svc.apply(&st);
    svc.save(&st, false).await?;
    drop(st);
    sync(&app).await;
    Ok(ok())
}

/// `POST /config/bgp/neigh`.
pub async fn neigh(State(app): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let o = obj(&body).map_err(bad)?;
    let address = neighbor_ip(&o).map_err(bad)?;
    let remote_as = uint(&o, "remoteAs", u64::from(u32::MAX))
        .map_err(bad)?
        .filter(|a| *a != 0)
        .ok_or_else(|| bad(FieldError::new("remoteAs", "required, 1..=4294967295")))?;
    let remote_port = uint(&o, "remotePort", 65535).map_err(bad)?.unwrap_or(179);
    if remote_port == 0 {
        return Err(bad(FieldError::new("remotePort", "must be 1..=65535")));
    }
    if matches!(get(&o, "setMultiHop"), Some(Value::Bool(true))) {
        return Err(bad(FieldError::new(
            "setMultiHop",
            "multihop sessions are not supported yet",
        )));
    }
    let password = match get(&o, "password") {
        None => None,
        Some(Value::String(p)) if p.is_empty() => None,
        Some(Value::String(p)) if p.len() <= 80 => Some(p.clone()),
        Some(Value::String(_)) => {
            return Err(bad(FieldError::new(
                "password",
                "at most 80 bytes (TCP MD5 key)",
            )));
        }
        Some(_) => return Err(bad(FieldError::new("password", "must be a string"))),
    };
    let passive = match get(&o, "passive") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad(FieldError::new("passive", "must be true or false"))),
    };
    let ttl_security = match get(&o, "ttlSecurity") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad(FieldError::new("ttlSecurity", "must be true or false"))),
    };
    let hold = uint(&o, "holdTime", 65535).map_err(bad)?.unwrap_or(9);
    if hold == 1 || hold == 2 {
        return Err(bad(FieldError::new(
            "holdTime",
            "must be 0 or at least 3 seconds",
        )));
    }
    let bfd = match get(&o, "bfd") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad(FieldError::new("bfd", "must be true or false"))),
    };
    let svc = service(&app)?;
    let spec = NeighSpec {
        address,
        remote_as: remote_as as u32,
        remote_port: remote_port as u16,
        hold_time_s: hold as u16,
        bfd,
        password,
        ttl_security,
        passive,
    };
    let mut st = svc.state.lock().await;
    st.neighbors.insert(address, spec.clone());
    svc.speaker.upsert_neighbor(neighbor_config(&spec));
    svc.save(&st, false).await?;
    drop(st);
    if bfd {
        bfd_for_neighbor(&app, address).await;
    }
    Ok(ok())
}

/// A BFD session to a BGP neighbour with `bfd: true` (100 ms x 3 unless one exists already).
pub async fn bfd_for_neighbor(app: &Shared, address: IpAddr) {
    let Some(b) = &app.bfd else {
        warn!(%address, "BGP neighbour wants BFD but BFD is not running");
        return;
    };
    if b.handle
        .list()
        .await
        .is_ok_and(|l| l.iter().any(|p| p.peer == address))
    {
        return;
    }
    let source = match crate::vip::source_toward(address) {
        Ok(s) => s,
        Err(e) => {
            warn!(%address, error = %e, "no source address for BFD to the BGP neighbour");
            return;
        }
    };
    let pc = ferrolb_bfd::PeerConfig {
        peer: address,
        local: source,
        instance: "bgp".into(),
        session: ferrolb_bfd::SessionConfig::default(),
    };
    match b.handle.upsert(pc).await {
        Ok(_) => info!(%address, "BFD for the BGP neighbour"),
        Err(e) => warn!(%address, error = %e, "BFD for the BGP neighbour failed"),
    }
}

#[derive(Deserialize)]
pub struct RemoteAs {
    #[serde(rename = "remoteAs")]
    remote_as: Option<String>,
}

/// `DELETE /config/bgp/neigh/{ip}?remoteAs=N`.
pub async fn delete_neigh(
    State(app): State<Shared>,
    Path(ip): Path<String>,
    Query(q): Query<RemoteAs>,
) -> Result<Response, ApiError> {
    let address: IpAddr = ip.parse().map(|a: IpAddr| a.to_canonical()).map_err(|_| {
        bad(FieldError::new(
            "ip",
            format!("'{ip}' is not an IP address"),
        ))
    })?;
    let svc = service(&app)?;
    let mut st = svc.state.lock().await;
    let Some(n) = st.neighbors.get(&address).cloned() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no BGP neighbour {address}"),
        ));
    };
    if let Some(ra) = q.remote_as.as_deref().filter(|s| !s.is_empty()) {
        let ra: u32 = ra.parse().map_err(|_| {
            bad(FieldError::new(
                "remoteAs",
                format!("'{ra}' is not an AS number"),
            ))
        })?;
        if ra != n.remote_as {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "BGP neighbour {address} has remote AS {}, not {ra}",
                    n.remote_as
                ),
            ));
        }
    }
    st.neighbors.remove(&address);
    svc.speaker.remove_neighbor(address);
    svc.save(&st, true).await?;
    if n.bfd
        && let Some(b) = &app.bfd
    {
        let _ = b.handle.remove(address).await;
    }
    Ok(ok())
}

fn unix_s(t: Option<SystemTime>) -> u64 {
    t.and_then(|t| SystemTime::now().duration_since(t).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `GET /config/bgp/neigh/all`.
pub async fn list_neigh(State(app): State<Shared>) -> Result<Response, ApiError> {
    let svc = service(&app)?;
    let attr: Vec<Value> = svc
        .speaker
        .neighbors()
        .iter()
        .map(|n| {
            json!({
                "ipAddress": n.config.address.to_string(),
                "remoteAs": n.config.remote_as,
                "state": n.state.name(),
                "updowntime": unix_s(n.since),
                // ferrolb's additions:
                "prefixesSent": n.prefixes_sent,
                "prefixesReceived": n.prefixes_received,
                "updatesIn": n.updates_in,
                "updatesOut": n.updates_out,
                "treatAsWithdraw": n.treat_as_withdraw,
                "lastError": n.last_error,
                "localAddress": n.local.map(|a| a.ip().to_string()),
            })
        })
        .collect();
    Ok(Json(json!({"bgpNeiAttr": attr})).into_response())
}

/// `GET /config/bgp/routes` (ferrolb): what is originated, with attributes.
pub async fn routes(State(app): State<Shared>) -> Result<Response, ApiError> {
    let svc = service(&app)?;
    let r: Vec<Value> = svc
        .speaker
        .routes()
        .iter()
        .map(|(p, a)| json!({"prefix": p.to_string(), "med": a.med, "prepend": a.prepend, "communities": a.communities}))
        .collect();
    Ok(Json(json!({"routes": r})).into_response())
}

/// `POST /config/bgp/drain` (ferrolb): graceful shutdown now; `{"graceSeconds": N}`.
pub async fn drain(State(app): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let grace = if body.is_empty() {
        3
    } else {
        let o = obj(&body).map_err(bad)?;
        uint(&o, "graceSeconds", 600).map_err(bad)?.unwrap_or(3)
    };
    let svc = service(&app)?;
    svc.speaker
        .drain(Duration::from_secs(grace), BACKUP_PREPEND)
        .await;
    Ok(ok())
}

/// How long changes are gathered before the route set is recomputed (a burst of 10,000 rule
/// changes costs a few recomputations, not 10,000).
pub const SYNC_COALESCE: Duration = Duration::from_millis(20);

/// Asks for the originated routes to follow the rules and roles.
pub async fn sync(app: &Shared) {
    if let Some(svc) = &app.bgp {
        svc.dirty.notify_one();
    }
}

/// Recomputes the originated routes from the rules and roles now.
pub async fn sync_now(app: &Shared) {
    let Some(svc) = &app.bgp else { return };
    let (roles, policy) = {
        let st = svc.state.lock().await;
        (st.roles.clone(), st.policy.clone())
    };
    let routes = match app.engine.lock() {
        Ok(e) => match &app.ha {
            // Under --ka the nodes decide roles; saved REST roles do not apply.
            Some(ha) if ha.cfg.ka => routes_for(
                e.rules(),
                &super::ha::roles_for_rules(ha, e.rules()),
                &policy,
            ),
            _ => routes_for(e.rules(), &roles, &policy),
        },
        Err(_) => return,
    };
    svc.speaker.set_routes(routes);
}

/// The task behind [`sync`]: waits for a change, gathers for [`SYNC_COALESCE`], recomputes.
pub async fn sync_task(app: Shared) {
    let Some(svc) = &app.bgp else { return };
    loop {
        svc.dirty.notified().await;
        tokio::time::sleep(SYNC_COALESCE).await;
        sync_now(&app).await;
    }
}

/// `POST /config/cistate`: `{"instance":"llb-inst0","state":"MASTER"|"BACKUP"|"NOT_DEFINED","vip":...}`.
pub async fn set_cistate(State(app): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let o = obj(&body).map_err(bad)?;
    let instance = match get(&o, "instance") {
        None => DEFAULT_INSTANCE.to_string(),
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(_) => {
            return Err(bad(FieldError::new(
                "instance",
                "must be a non-empty string",
            )));
        }
    };
    let state = match get(&o, "state") {
        Some(Value::String(s)) => s.to_ascii_uppercase(),
        _ => {
            return Err(bad(FieldError::new(
                "state",
                "required: MASTER, BACKUP or NOT_DEFINED",
            )));
        }
    };
    if !matches!(state.as_str(), "MASTER" | "BACKUP" | "NOT_DEFINED") {
        return Err(bad(FieldError::new(
            "state",
            format!("'{state}' is not MASTER, BACKUP or NOT_DEFINED"),
        )));
    }
    if let Some(ha) = &app.ha {
        if ha.cfg.ka {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "roles on this node are decided by the cluster (--ka); use POST /config/ha/switchover (ferroctl ha switchover)",
            ));
        }
        if let Some(role) = crate::ha::Role::parse(&state) {
            ha.set_external(&instance, role);
        }
        if app.bgp.is_none() {
            return Ok(ok());
        }
    }
    let svc = service(&app)?;
    {
        let mut st = svc.state.lock().await;
        st.roles.insert(instance, state);
        svc.save(&st, false).await?;
    }
    sync(&app).await;
    Ok(ok())
}

/// Roles for `GET /config/cistate/all` (empty without BGP).
pub async fn roles(app: &Shared) -> BTreeMap<String, String> {
    match &app.bgp {
        Some(s) => s.state.lock().await.roles.clone(),
        None => BTreeMap::new(),
    }
}

/// Prometheus lines for BGP: one family per metric, one line per neighbour and label set.
pub fn metrics(svc: &BgpService) -> String {
    use std::fmt::Write;
    type Lines = fn(&ferrolb_bgp::NeighborStatus) -> Vec<(String, u64)>;
    let families: [(&str, &str, &str, Lines); 6] = [
        (
            "ferrolb_bgp_session_established",
            "gauge",
            "1 when the BGP session is Established.",
            |n| {
                vec![(
                    String::new(),
                    u64::from(n.state == ferrolb_bgp::State::Established),
                )]
            },
        ),
        (
            "ferrolb_bgp_state_transitions_total",
            "counter",
            "BGP FSM state changes.",
            |n| vec![(String::new(), n.transitions)],
        ),
        (
            "ferrolb_bgp_updates_total",
            "counter",
            "UPDATE messages per direction.",
            |n| {
                vec![
                    (",direction=\"in\"".into(), n.updates_in),
                    (",direction=\"out\"".into(), n.updates_out),
                ]
            },
        ),
        (
            "ferrolb_bgp_prefixes",
            "gauge",
            "Prefixes advertised to and received from the neighbour.",
            |n| {
                vec![
                    (",direction=\"advertised\"".into(), n.prefixes_sent),
                    (",direction=\"received\"".into(), n.prefixes_received),
                ]
            },
        ),
        (
            "ferrolb_bgp_notifications_total",
            "counter",
            "NOTIFICATION messages by direction and error code.",
            |n| {
                let by = |dir: &str, m: &BTreeMap<u8, u64>| {
                    m.iter()
                        .map(|(code, c)| (format!(",direction=\"{dir}\",code=\"{code}\""), *c))
                        .collect::<Vec<_>>()
                };
                let mut v = by("in", &n.notifications_in);
                v.extend(by("out", &n.notifications_out));
                v
            },
        ),
        (
            "ferrolb_bgp_treat_as_withdraw_total",
            "counter",
            "Received UPDATEs treated as withdraw (RFC 7606).",
            |n| vec![(String::new(), n.treat_as_withdraw)],
        ),
    ];
    let ns = svc.speaker.neighbors();
    let mut o = String::new();
    for (name, kind, help, lines) in families {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for n in &ns {
            for (labels, v) in lines(n) {
                let _ = writeln!(o, "{name}{{neighbor=\"{}\"{labels}}} {v}", n.config.address);
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::models::parse_rule;

    #[test]
    fn routes_follow_bgp_flag_and_roles() {
        let mut rs = RuleSet::default();
        for (port, bgp, name) in [
            (80, true, "default_a:llb-inst0"),
            (81, false, "default_b:llb-inst0"),
            (82, true, "x:inst1"),
        ] {
            let ip = if port == 82 {
                "203.0.113.11"
            } else {
                "203.0.113.10"
            };
            let b = format!(
                r#"{{"serviceArguments":{{"externalIP":"{ip}","port":{port},"BGP":{bgp},"name":"{name}"}},"endpoints":[]}}"#
            );
            let c = rs.plan(parse_rule(b.as_bytes()).unwrap(), 16).unwrap();
            rs.apply(&c);
        }
        let pol = RoutePolicy::default();
        let plain = routes_for(&rs, &BTreeMap::new(), &pol);
        assert_eq!(plain.len(), 2);
        assert!(plain.values().all(|a| *a == RouteAttrs::default()));
        let roles = BTreeMap::from([("llb-inst0".to_string(), "BACKUP".to_string())]);
        let r = routes_for(&rs, &roles, &pol);
        let a = &r[&"203.0.113.10/32".parse().unwrap()];
        assert_eq!((a.prepend, a.med), (BACKUP_PREPEND, Some(BACKUP_MED)));
        assert_eq!(
            r[&"203.0.113.11/32".parse().unwrap()],
            RouteAttrs::default(),
            "another instance"
        );
        // A configured policy: communities on every route, its own BACKUP values.
        let mut pol = RoutePolicy::default();
        let o: serde_json::Map<String, Value> = serde_json::from_str(
            r#"{"communities":["65100:10"],"largeCommunities":["65100:1:2"],"backupPrepend":5,"backupMed":300,"med":10}"#,
        )
        .unwrap();
        parse_policy(&o, &mut pol).unwrap();
        let r = routes_for(&rs, &roles, &pol);
        let a = &r[&"203.0.113.10/32".parse().unwrap()];
        assert_eq!((a.prepend, a.med), (5, Some(300)));
        assert_eq!(a.communities, vec![(65100 << 16) | 10]);
        assert_eq!(a.large_communities, vec![(65100, 1, 2)]);
        assert_eq!(r[&"203.0.113.11/32".parse().unwrap()].med, Some(10));
        for bad in [
            r#"{"communities":["65100"]}"#,
            r#"{"communities":["70000:1"]}"#,
            r#"{"largeCommunities":["1:2"]}"#,
            r#"{"backupPrepend":40}"#,
        ] {
            let o: serde_json::Map<String, Value> = serde_json::from_str(bad).unwrap();
            assert!(
                parse_policy(&o, &mut RoutePolicy::default()).is_err(),
                "{bad}"
            );
        }
    }
}
