//! ferrolb's floating one-arm sources over REST: `POST /config/onearmsource`
//! (`{"source": "10.20.0.100/24"}`), `GET /config/onearmsource/all`,
//! `DELETE /config/onearmsource/{ip}`. Those made here are saved in
//! `<config-path>/onearm.json`; those of `--onearm-source` are listed, not changed.

use std::net::IpAddr;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::models::{FieldError, field as get};
use super::{ApiError, Shared};

pub const ONEARM_FILE: &str = "onearm.json";

fn bad(e: FieldError) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, e.to_string())
}

/// Parses `{"source": "IP/PREFIX"}`.
pub fn parse_source(body: &[u8]) -> Result<ipnet::IpNet, FieldError> {
    let o = super::models::body_object(body)?;
    let s = match get(&o, "source") {
        Some(Value::String(s)) if s.len() <= 64 => s.clone(),
        Some(Value::String(_)) => return Err(FieldError::new("source", "at most 64 bytes")),
        Some(_) => return Err(FieldError::new("source", "must be a string, IP/PREFIX")),
        None => {
            return Err(FieldError::new(
                "source",
                "required, IP/PREFIX (e.g. 10.20.0.100/24)",
            ));
        }
    };
    if s.contains(',') {
        return Err(FieldError::new("source", "one IP/PREFIX per call"));
    }
    crate::config::parse_onearm_sources(&s)
        .map_err(|e| FieldError::new("source", e.to_string().replace("--onearm-source: ", "")))?
        .pop()
        .ok_or_else(|| FieldError::new("source", "required"))
}

/// Reads the saved REST-made sources (missing file: none). Blocking; at start.
pub fn load(dir: &std::path::Path) -> anyhow::Result<Vec<ipnet::IpNet>> {
    let path = dir.join(ONEARM_FILE);
    match std::fs::read(&path) {
        Ok(b) => {
            let v: Vec<String> = serde_json::from_slice(&b).map_err(|e| {
                anyhow::anyhow!(
                    "{}: not a ferrolb one-arm source list ({e}); move it aside",
                    path.display()
                )
            })?;
            v.iter()
                .map(|s| {
                    crate::config::parse_onearm_sources(s)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
                        .and_then(|mut n| n.pop().ok_or_else(|| anyhow::anyhow!("empty")))
                })
                .collect()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
    }
}

async fn save(app: &Shared, shrinking: bool) -> Result<(), ApiError> {
    let list = app.engine.call(|e| e.rest_onearm_sources()).await?;
    let v: Vec<String> = list.iter().map(ToString::to_string).collect();
    let bytes = serde_json::to_vec_pretty(&v).unwrap_or_default();
    crate::store::save_document(app.config_dir.clone(), ONEARM_FILE, bytes, shrinking)
        .await
        .map_err(|e| ApiError::new(crate::store::save_status(&e), e.to_string()))
}

/// `POST /config/onearmsource`.
pub async fn create(State(app): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let n = parse_source(&body).map_err(bad)?;
    app.engine.call(move |e| e.add_onearm_source(n)).await??;
    save(&app, false).await?;
    Ok(super::success())
}

/// `GET /config/onearmsource/all`.
pub async fn list(State(app): State<Shared>) -> Result<Response, ApiError> {
    let l = app.engine.call(|e| e.onearm_source_list()).await?;
    let attr: Vec<Value> = l
        .into_iter()
        .map(|(n, rest, users)| {
            json!({"source": n.to_string(), "origin": if rest { "rest" } else { "flag" }, "endpoints": users})
        })
        .collect();
    Ok(Json(json!({"Attr": attr})).into_response())
}

/// `DELETE /config/onearmsource/{ip}`.
pub async fn delete(
    State(app): State<Shared>,
    Path(ip): Path<String>,
) -> Result<Response, ApiError> {
    let a: IpAddr = ip.parse().map_err(|_| {
        bad(FieldError::new(
            "ip",
            format!("'{ip}' is not an IP address"),
        ))
    })?;
    app.engine
        .call(move |e| e.remove_onearm_source(a))
        .await??;
    save(&app, true).await?;
    Ok(super::success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_bodies_are_checked_field_by_field() {
        let n = parse_source(br#"{"source":"10.20.0.100/24"}"#).unwrap();
        assert_eq!(n.addr(), "10.20.0.100".parse::<IpAddr>().unwrap());
        for (body, why) in [
            (&br#"{}"#[..], "required"),
            (br#"{"source":7}"#, "must be a string"),
            (br#"{"source":"10.20.0.0/24"}"#, "not a usable unicast"),
            (br#"{"source":"10.20.0.100"}"#, "not IP/PREFIX"),
            (br#"{"source":"10.0.0.1/24,10.0.0.2/24"}"#, "one IP/PREFIX"),
            (b"[1]", ""),
        ] {
            let e = parse_source(body).unwrap_err().to_string();
            assert!(e.contains(why), "{}: {e}", String::from_utf8_lossy(body));
        }
    }
}
