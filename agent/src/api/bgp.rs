//! BGP over REST in loxilb's shapes (kube-loxilb's way): `POST /config/bgp/global`,
//! `POST /config/bgp/neigh`, `GET /config/bgp/neigh/all`, `DELETE /config/bgp/neigh/{ip}`;
//! ferrolb's `GET /config/bgp/routes` and `POST /config/bgp/drain`. Parsing and rendering
//! only: the BGP controller ([`crate::bgp`]) keeps the state and the routes.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::models::FieldError;
use super::{ApiError, Shared};
use crate::bgp::{BfdMode, Bgp, BgpError, NeighSpec, RoutePolicy};
use ferrolb_bfd::runner::{MAX_INTERVAL_US, MIN_INTERVAL_US};

fn bgp_error(e: BgpError) -> ApiError {
    let status = match &e {
        BgpError::NotFound(_) => StatusCode::NOT_FOUND,
        BgpError::Save(s) => crate::store::save_status(s),
        BgpError::Full => StatusCode::SERVICE_UNAVAILABLE,
    };
    ApiError::new(status, e.to_string())
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
    match get(o, "advertiseDeadVips") {
        None => {}
        Some(Value::Bool(b)) => p.advertise_dead_vips = *b,
        Some(_) => {
            return Err(FieldError::new(
                "advertiseDeadVips",
                "must be true or false",
            ));
        }
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

use super::models::field as get;

fn obj(body: &[u8]) -> Result<serde_json::Map<String, Value>, FieldError> {
    super::models::body_object(body)
}

pub(super) fn uint(
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

fn service(app: &Shared) -> Result<&Bgp, ApiError> {
    app.bgp.as_deref().ok_or_else(|| {
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
    let bfd_interval = uint(&o, "bfdInterval", u64::from(MAX_INTERVAL_US)).map_err(bad)?;
    if let Some(i) = bfd_interval
        && i < u64::from(MIN_INTERVAL_US)
    {
        return Err(bad(FieldError::new(
            "bfdInterval",
            format!("microseconds, {MIN_INTERVAL_US}..={MAX_INTERVAL_US}"),
        )));
    }
    let bfd_mult = uint(&o, "bfdRetryCount", 255).map_err(bad)?;
    if bfd_mult == Some(0) {
        return Err(bad(FieldError::new("bfdRetryCount", "must be 1..=255")));
    }
    let svc = service(&app)?;
    let mut policy = svc.config().await.policy;
    parse_policy(&o, &mut policy).map_err(bad)?;
    svc.set_global(
        local_as as u32,
        router_id,
        policy,
        (bfd_interval.map(|v| v as u32), bfd_mult.map(|v| v as u8)),
    )
    .await
    .map_err(bgp_error)?;
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
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
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
    svc.upsert_neighbor(spec).await.map_err(bgp_error)?;
    Ok(ok())
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
    let remote_as = match q.remote_as.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(ra) => Some(ra.parse::<u32>().map_err(|_| {
            bad(FieldError::new(
                "remoteAs",
                format!("'{ra}' is not an AS number"),
            ))
        })?),
    };
    service(&app)?
        .remove_neighbor(address, remote_as)
        .await
        .map_err(bgp_error)?;
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
    let bfd_modes: std::collections::BTreeMap<IpAddr, BfdMode> = svc
        .config()
        .await
        .neighbors
        .values()
        .map(|n| (n.address, n.bfd_mode()))
        .collect();
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
                "bfd": bfd_modes.get(&n.config.address).map(|m| match m {
                    BfdMode::Off => "off",
                    BfdMode::Passive => "passive",
                    BfdMode::Active => "active",
                }),
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
        .drain(Duration::from_secs(grace), crate::bgp::BACKUP_PREPEND)
        .await;
    Ok(ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_policy_fields_parse_and_bad_ones_are_refused() {
        let mut pol = RoutePolicy::default();
        let o: serde_json::Map<String, Value> = serde_json::from_str(
            r#"{"communities":["65100:10"],"largeCommunities":["65100:1:2"],"backupPrepend":5,"backupMed":300,"med":10}"#,
        )
        .unwrap();
        parse_policy(&o, &mut pol).unwrap();
        assert_eq!(
            (pol.backup_prepend, pol.backup_med, pol.med),
            (5, 300, Some(10))
        );
        assert_eq!(pol.communities, vec![(65100 << 16) | 10]);
        assert_eq!(pol.large_communities, vec![(65100, 1, 2)]);
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
