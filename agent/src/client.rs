//! The REST client of `ferroctl`: `ureq` (blocking HTTP/1.1, rustls) for `http://` and
//! `https://` URLs, with the node's CA given by `--cacert` (otherwise the web's roots).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("reply is not JSON: {}", self.text()))
    }
}

/// Replies larger than this are refused (a conntrack listing of a million flows fits).
const MAX_REPLY: u64 = 1 << 30;

pub struct Client {
    agent: ureq::Agent,
}

impl Client {
    /// `cacert`: PEM file of the CA(s) that sign the node's HTTPS certificate.
    pub fn new(timeout: Duration, cacert: Option<&std::path::Path>) -> Result<Client> {
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(path) = cacert {
            let pem = std::fs::read(path)
                .with_context(|| format!("--cacert: read {}", path.display()))?;
            let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect::<Result<_, _>>()
                .map_err(|e| anyhow!("--cacert: {}: {e}", path.display()))?;
            if certs.is_empty() {
                anyhow::bail!("--cacert: {} holds no certificate", path.display());
            }
            tls = tls.root_certs(ureq::tls::RootCerts::Specific(Arc::new(certs)));
        }
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .tls_config(tls.build())
            .build()
            .new_agent();
        Ok(Client { agent })
    }

    /// One request; any HTTP status is an answer (only transport failures are errors).
    pub fn request(&self, method: &str, url: &str, body: Option<&[u8]>) -> Result<HttpResponse> {
        let resp = match (method, body) {
            ("GET", _) => self.agent.get(url).call(),
            ("DELETE", _) => self.agent.delete(url).call(),
            ("POST", b) => self
                .agent
                .post(url)
                .header("content-type", "application/json")
                .send(b.unwrap_or_default()),
            (m, _) => return Err(anyhow!("unsupported method {m}")),
        }
        .map_err(|e| anyhow!("{e}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .with_config()
            .limit(MAX_REPLY)
            .read_to_vec()
            .map_err(|e| anyhow!("reading the reply: {e}"))?;
        Ok(HttpResponse { status, body })
    }
}
