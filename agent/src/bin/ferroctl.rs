//! `ferroctl`: a loxicmd-style CLI for any ferrolb node's REST API. Human tables by default,
//! `--json` for scripts, `--url` to pick the node (`https://` with `--cacert`, or `--tls` for
//! the node's HTTPS port on 127.0.0.1).

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use ferrolb_agent::client::HttpResponse;
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(
    name = "ferroctl",
    version,
    about = "Control a ferrolb node over its REST API"
)]
struct Cli {
    /// Base URL of the node's API (http:// or https://).
    #[arg(long, global = true)]
    url: Option<String>,
    /// Talk HTTPS to the node's --tls-port (8091) when no --url is given.
    #[arg(long, global = true)]
    tls: bool,
    /// PEM file of the CA that signs the node's HTTPS certificate.
    #[arg(long, global = true, value_name = "FILE")]
    cacert: Option<std::path::PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to wait for the node.
    #[arg(long, global = true, default_value_t = 5)]
    timeout: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Show rules (lb), connections (ct), endpoint probes (ep), the HA state (ha), BFD
    /// sessions (bfd), BGP neighbours (bgp) or originated BGP routes (bgp routes).
    Get {
        #[arg(value_parser = ["lb", "ct", "ep", "ha", "bfd", "bgp"])]
        what: String,
        /// `routes` after `bgp`.
        #[arg(value_parser = ["routes"])]
        sub: Option<String>,
    },
    /// BGP graceful shutdown now: advertise with the GRACEFUL_SHUTDOWN community, then withdraw.
    Drain {
        /// Seconds between the graceful-shutdown advertisement and the withdrawal.
        #[arg(long, default_value_t = 3)]
        grace: u64,
    },
    /// Create a rule: `create lb VIP --tcp=PORT:TARGETPORT --endpoints=IP:WEIGHT,...`
    /// (IPv6: `[IP]:WEIGHT`, or a bare IP with weight 1).
    Create {
        #[command(subcommand)]
        what: CreateWhat,
    },
    /// Delete a rule: `delete lb VIP --tcp=PORT` (or `--name NAME`, or `--all`).
    Delete {
        #[command(subcommand)]
        what: DeleteWhat,
    },
    /// HA actions: `ha switchover` hands MASTER to the peer once it holds all state.
    Ha {
        #[command(subcommand)]
        what: HaWhat,
    },
    /// Show the node's version.
    Version,
}

#[derive(Debug, Subcommand)]
enum HaWhat {
    /// Planned switchover (on the MASTER): the peer takes MASTER after confirming it holds
    /// every flow of this node; then this node is BACKUP.
    Switchover,
}

#[derive(Debug, Subcommand)]
enum CreateWhat {
    Lb(CreateLb),
}

#[derive(Debug, Subcommand)]
enum DeleteWhat {
    Lb(DeleteLb),
}

#[derive(Debug, clap::Args)]
struct CreateLb {
    /// The VIP (external IP).
    vip: String,
    /// TCP ports: PORT[:TARGETPORT], comma-separated.
    #[arg(long)]
    tcp: Option<String>,
    /// UDP ports: PORT[:TARGETPORT], comma-separated.
    #[arg(long)]
    udp: Option<String>,
    /// SCTP ports: PORT[:TARGETPORT], comma-separated.
    #[arg(long)]
    sctp: Option<String>,
    /// Balance ICMP echo.
    #[arg(long)]
    icmp: bool,
    /// Endpoints: IP:WEIGHT, comma-separated.
    #[arg(long, required = true)]
    endpoints: String,
    /// NAT mode: default (DNAT), onearm, fullnat.
    #[arg(long, default_value = "default")]
    mode: String,
    /// Endpoint selection: rr, hash, priority, persist, lc.
    #[arg(long, default_value = "rr")]
    select: String,
    /// Rule name.
    #[arg(long, default_value = "")]
    name: String,
    /// Inactivity timeout in seconds (0 = protocol default).
    #[arg(long, default_value_t = 0)]
    inatimeout: u32,
    /// Sources allowed to connect: CIDRs, comma-separated (default: every source).
    #[arg(long, value_name = "CIDR,...")]
    sources: Option<String>,
}

#[derive(Debug, clap::Args)]
struct DeleteLb {
    /// The VIP (external IP).
    vip: Option<String>,
    #[arg(long)]
    tcp: Option<String>,
    #[arg(long)]
    udp: Option<String>,
    #[arg(long)]
    sctp: Option<String>,
    #[arg(long)]
    icmp: bool,
    /// Delete by rule name instead.
    #[arg(long)]
    name: Option<String>,
    /// Delete every rule.
    #[arg(long)]
    all: bool,
}

fn ports(spec: &str, what: &str) -> Result<Vec<(u16, u16)>> {
    spec.split(',')
        .map(|p| {
            let mut it = p.split(':');
            let port: u16 = it
                .next()
                .unwrap_or("")
                .trim()
                .parse()
                .map_err(|_| anyhow!("--{what}: '{p}' is not PORT[:TARGETPORT]"))?;
            let target: u16 = match it.next() {
                Some(t) => t
                    .trim()
                    .parse()
                    .map_err(|_| anyhow!("--{what}: '{p}' is not PORT[:TARGETPORT]"))?,
                None => port,
            };
            Ok((port, target))
        })
        .collect()
}

fn pick(names: &[&str], v: &str, flag: &str) -> Result<usize> {
    names
        .iter()
        .position(|n| *n == v)
        .ok_or_else(|| anyhow!("--{flag}: '{v}' is not one of {}", names.join(", ")))
}

struct Client {
    base: String,
    http: ferrolb_agent::client::Client,
}

impl Client {
    fn new(cli: &Cli, timeout: Duration) -> Result<Client> {
        let base = match (&cli.url, cli.tls) {
            (Some(u), _) => u.clone(),
            (None, true) => "https://127.0.0.1:8091".into(),
            (None, false) => "http://127.0.0.1:11111".into(),
        };
        Ok(Client {
            base,
            http: ferrolb_agent::client::Client::new(timeout, cli.cacert.as_deref())?,
        })
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<HttpResponse> {
        let url = format!("{}/netlox/v1{path}", self.base.trim_end_matches('/'));
        let bytes = body.map(|b| b.to_string().into_bytes());
        self.http
            .request(method, &url, bytes.as_deref())
            .with_context(|| format!("{method} {url}"))
    }

    fn ok(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let r = self.call(method, path, body)?;
        let v = r.json().unwrap_or(Value::Null);
        if r.status != 200 {
            let msg = v["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| r.text());
            bail!("{} {}: {msg}", r.status, path);
        }
        Ok(v)
    }
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(headers.iter().map(|s| s.to_string()).collect());
    out.push('\n');
    for r in rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    out
}

fn s(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// Any JSON value as a table cell: strings as they are, null as `-`.
fn val(v: &Value) -> String {
    match v {
        Value::String(x) => x.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn lb_table(v: &Value) -> String {
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for r in v["lbAttr"].as_array().into_iter().flatten() {
        let a = &r["serviceArguments"];
        for w in r["warnings"].as_array().into_iter().flatten() {
            notes.push(format!(
                "warning: {}:{} {}: {}",
                s(&a["externalIP"]),
                a["port"],
                s(&a["name"]),
                s(w)
            ));
        }
        let sel = a["sel"].as_u64().unwrap_or(0) as usize;
        let mode = a["mode"].as_u64().unwrap_or(0) as usize;
        let port = match a["portMax"].as_u64() {
            Some(m) if m > a["port"].as_u64().unwrap_or(0) => format!("{}-{m}", a["port"]),
            _ => a["port"].to_string(),
        };
        let sources: Vec<String> = r["allowedSources"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| s(&p["prefix"]))
            .collect();
        let rule = [
            s(&a["externalIP"]),
            sources.join(","),
            port,
            s(&a["protocol"]),
            s(&a["name"]),
            MODE.get(mode).unwrap_or(&"?").to_string(),
            SEL.get(sel).unwrap_or(&"?").to_string(),
        ];
        let eps: Vec<&Value> = r["endpoints"].as_array().into_iter().flatten().collect();
        if eps.is_empty() {
            let mut row = rule.to_vec();
            row.extend(["-".into(), String::new(), String::new(), String::new()]);
            rows.push(row);
        }
        for (i, e) in eps.into_iter().enumerate() {
            // The rule's columns only on its first line.
            let mut row: Vec<String> = if i == 0 {
                rule.to_vec()
            } else {
                vec![String::new(); rule.len()]
            };
            row.extend([
                format!("{}:{}", s(&e["endpointIP"]), e["targetPort"]),
                e["weight"].to_string(),
                s(&e["state"]),
                s(&e["counter"]),
            ]);
            rows.push(row);
        }
    }
    let t = table(
        &[
            "VIP",
            "SOURCE RANGES",
            "PORT",
            "PROTO",
            "NAME",
            "MODE",
            "SELECT",
            "ENDPOINT",
            "WEIGHT",
            "STATE",
            "PACKETS:BYTES",
        ],
        rows,
    );
    if notes.is_empty() {
        t
    } else {
        format!("{t}{}\n", notes.join("\n"))
    }
}

fn ep_table(v: &Value) -> String {
    let rows = v["Attr"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            vec![
                s(&e["hostName"]),
                s(&e["name"]),
                s(&e["probeType"]),
                e["probePort"].to_string(),
                format!("{}s x{}", e["probeDuration"], e["inactiveReTries"]),
                s(&e["currState"]),
                format!(
                    "{}/{}/{}",
                    s(&e["minDelay"]),
                    s(&e["avgDelay"]),
                    s(&e["maxDelay"])
                ),
                match &e["lastError"] {
                    Value::String(x) => x.clone(),
                    _ => "-".into(),
                },
                peers_cell(e),
            ]
        })
        .collect();
    table(
        &[
            "HOST",
            "NAME",
            "PROBE",
            "PORT",
            "EVERY",
            "STATE",
            "MIN/AVG/MAX",
            "LAST ERROR",
            "PEERS",
        ],
        rows,
    )
}

/// Each sync peer's verdict on the target, `!` where it disagrees with this node's (one
/// keeps the endpoint in selection, the other takes it out).
fn peers_cell(e: &Value) -> String {
    let ours_out = s(&e["currState"]) != "ok";
    let cells: Vec<String> = e["peerStates"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let who = match &p["node"] {
                Value::Number(n) => format!("node{n}"),
                _ => s(&p["peer"]),
            };
            let st = s(&p["state"]);
            let differs = st != "unknown" && (st != "ok") != ours_out;
            format!("{who}:{st}{}", if differs { "!" } else { "" })
        })
        .collect();
    if cells.is_empty() {
        "-".into()
    } else {
        cells.join(",")
    }
}

fn ct_table(v: &Value) -> String {
    let rows = v["ctAttr"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            vec![
                format!("{}:{}", s(&e["sourceIP"]), e["sourcePort"]),
                format!("{}:{}", s(&e["destinationIP"]), e["destinationPort"]),
                s(&e["protocol"]),
                s(&e["conntrackState"]),
                s(&e["conntrackAct"]),
                e["packets"].to_string(),
                e["bytes"].to_string(),
                s(&e["servName"]),
            ]
        })
        .collect();
    table(
        &[
            "SOURCE",
            "DESTINATION",
            "PROTO",
            "STATE",
            "ACTION",
            "PACKETS",
            "BYTES",
            "SERVICE",
        ],
        rows,
    )
}

fn bfd_table(v: &Value) -> String {
    let ms = |x: &Value| format!("{:.0}", x.as_f64().unwrap_or(0.0) / 1000.0);
    let rows = v["Attr"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            vec![
                s(&e["remoteIp"]),
                s(&e["sourceIP"]),
                s(&e["state"]).trim_start_matches("BFD").to_string(),
                format!("{}/{}", e["localDiscriminator"], e["remoteDiscriminator"]),
                ms(&e["txIntervalUs"]),
                ms(&e["rxIntervalUs"]),
                format!("{}x{}", ms(&e["interval"]), e["retryCount"]),
                ms(&e["detectTimeUs"]),
                format!("{:.1}", e["stateSeconds"].as_f64().unwrap_or(0.0)),
                s(&e["lastDiag"]),
            ]
        })
        .collect();
    table(
        &[
            "PEER",
            "SOURCE",
            "STATE",
            "DISCR LOCAL/REMOTE",
            "TX ms",
            "RX ms",
            "CONFIG",
            "DETECT ms",
            "IN STATE s",
            "LAST DIAG",
        ],
        rows,
    )
}

fn bgp_table(v: &Value) -> String {
    let rows = v["bgpNeiAttr"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            vec![
                s(&e["ipAddress"]),
                e["remoteAs"].to_string(),
                s(&e["state"]),
                e["updowntime"].to_string(),
                e["prefixesSent"].to_string(),
                e["prefixesReceived"].to_string(),
                e["lastError"].as_str().unwrap_or("-").to_string(),
            ]
        })
        .collect();
    table(
        &[
            "NEIGHBOR",
            "AS",
            "STATE",
            "UP/DOWN s",
            "SENT",
            "RECEIVED",
            "LAST ERROR",
        ],
        rows,
    )
}

fn bgp_routes_table(v: &Value) -> String {
    let rows = v["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            vec![
                s(&e["prefix"]),
                e["med"]
                    .as_u64()
                    .map(|m| m.to_string())
                    .unwrap_or_else(|| "-".into()),
                e["prepend"].to_string(),
                e["communities"]
                    .as_array()
                    .map(|c| {
                        c.iter()
                            .map(|x| {
                                format!(
                                    "{}:{}",
                                    x.as_u64().unwrap_or(0) >> 16,
                                    x.as_u64().unwrap_or(0) & 0xffff
                                )
                            })
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_default(),
            ]
        })
        .collect();
    table(&["PREFIX", "MED", "PREPEND", "COMMUNITIES"], rows)
}

fn ha_table(v: &Value) -> String {
    let rows = v["Attr"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            vec![
                s(&e["instance"]),
                s(&e["state"]),
                s(&e["vip"]),
                val(&e["sync"]),
            ]
        })
        .collect();
    table(&["INSTANCE", "STATE", "VIP", "SYNCED"], rows)
}

/// The cluster view (`/config/ha`): this node, then one row per peer.
fn cluster_table(v: &Value) -> String {
    let mut out = format!(
        "node {} {} term {} ready {} transitions {} last failover {}\nsync: sent {} queue {} installed {} adopted {} refused {}\n",
        val(&v["nodeId"]),
        val(&v["role"]),
        val(&v["term"]),
        val(&v["ready"]),
        val(&v["transitions"]),
        v["lastFailoverSeconds"]
            .as_f64()
            .map(|f| format!("{:.0} ms", f * 1000.0))
            .unwrap_or_else(|| "-".into()),
        val(&v["sync"]["sent"]),
        val(&v["sync"]["queueDepth"]),
        val(&v["sync"]["installed"]),
        val(&v["sync"]["adopted"]),
        val(&v["sync"]["refused"]),
    );
    let rows = v["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            vec![
                val(&p["address"]),
                val(&p["nodeId"]),
                val(&p["role"]),
                val(&p["alive"]),
                val(&p["bfd"]),
                val(&p["syncConnected"]),
                val(&p["synced"]),
                val(&p["received"]),
                val(&p["applied"]),
                val(&p["resyncs"]),
                p["lagSeconds"]
                    .as_f64()
                    .map(|f| format!("{:.1} ms", f * 1000.0))
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "PEER", "NODE", "ROLE", "ALIVE", "BFD", "SYNC", "SYNCED", "IN", "APPLIED", "RESYNCS",
            "LAG",
        ],
        rows,
    ));
    out
}

const SEL: [&str; 5] = ["rr", "hash", "priority", "persist", "lc"];
const MODE: [&str; 3] = ["default", "onearm", "fullnat"];

fn main() -> Result<()> {
    let cli = Cli::parse();
    let c = Client::new(&cli, Duration::from_secs(cli.timeout.max(1)))?;
    match cli.cmd {
        Cmd::Version => {
            let v = c.ok("GET", "/version", None)?;
            if cli.json {
                println!("{v}");
            } else {
                println!("{}", v["buildInfo"].as_str().unwrap_or_default());
            }
        }
        Cmd::Drain { grace } => {
            let c = Client::new(&cli, Duration::from_secs(grace + 10))?;
            let v = c.ok(
                "POST",
                "/config/bgp/drain",
                Some(&json!({"graceSeconds": grace})),
            )?;
            if cli.json {
                println!("{v}");
            } else {
                println!("drained: VIPs withdrawn, BGP sessions closed");
            }
        }
        Cmd::Ha {
            what: HaWhat::Switchover,
        } => {
            let c = Client::new(&cli, Duration::from_secs(15))?;
            let v = c.ok("POST", "/config/ha/switchover", None)?;
            if cli.json {
                println!("{v}");
            } else {
                println!(
                    "switched over: node {} is MASTER (term {})",
                    val(&v["master"]),
                    val(&v["term"])
                );
            }
        }
        Cmd::Get { what, sub } => {
            let routes = sub.as_deref() == Some("routes");
            if routes && what != "bgp" {
                bail!("'routes' only goes with 'get bgp'");
            }
            let path = match what.as_str() {
                "lb" => "/config/loadbalancer/all",
                "ct" => "/config/conntrack/all",
                "ep" => "/config/endpoint/all",
                "bfd" => "/config/bfd/all",
                "bgp" if routes => "/config/bgp/routes",
                "bgp" => "/config/bgp/neigh/all",
                _ => "/config/cistate/all",
            };
            let v = c.ok("GET", path, None)?;
            if cli.json {
                println!("{v}");
            } else {
                print!(
                    "{}",
                    match what.as_str() {
                        "lb" => lb_table(&v),
                        "ct" => ct_table(&v),
                        "ep" => ep_table(&v),
                        "bfd" => bfd_table(&v),
                        "bgp" if routes => bgp_routes_table(&v),
                        "bgp" => bgp_table(&v),
                        _ => ha_table(&v),
                    }
                );
                if what == "ha"
                    && let Ok(cl) = c.ok("GET", "/config/ha", None)
                {
                    print!("{}", cluster_table(&cl));
                }
            }
        }
        Cmd::Create {
            what: CreateWhat::Lb(a),
        } => {
            let sel = pick(&SEL, &a.select, "select")?;
            let mode = pick(&MODE, &a.mode, "mode").or_else(|_| {
                if a.mode == "dnat" {
                    Ok(0)
                } else {
                    Err(anyhow!(
                        "--mode: '{}' is not one of default, onearm, fullnat",
                        a.mode
                    ))
                }
            })?;
            let eps: Vec<(String, u16)> = a
                .endpoints
                .split(',')
                .map(endpoint_arg)
                .collect::<Result<_>>()?;
            let mut rules: Vec<(String, u16, u16)> = Vec::new();
            if let Some(t) = &a.tcp {
                rules.extend(
                    ports(t, "tcp")?
                        .into_iter()
                        .map(|(p, t)| ("tcp".into(), p, t)),
                );
            }
            for (proto, spec) in [("udp", &a.udp), ("sctp", &a.sctp)] {
                if let Some(u) = spec {
                    rules.extend(
                        ports(u, proto)?
                            .into_iter()
                            .map(|(p, t)| (proto.to_string(), p, t)),
                    );
                }
            }
            if a.icmp {
                rules.push(("icmp".into(), 1, 0));
            }
            if rules.is_empty() {
                bail!("give at least one of --tcp, --udp, --sctp, --icmp");
            }
            // Checked by the node, which names a bad entry.
            let sources: Vec<&str> = a
                .sources
                .as_deref()
                .map(|s| {
                    s.split(',')
                        .map(str::trim)
                        .filter(|p| !p.is_empty())
                        .collect()
                })
                .unwrap_or_default();
            for (proto, port, target) in rules {
                let body = json!({
                    "serviceArguments": {
                        "externalIP": a.vip, "port": port, "protocol": proto,
                        "sel": sel, "mode": mode, "name": a.name,
                        "inactiveTimeOut": a.inatimeout,
                    },
                    "allowedSources": sources.iter().map(|p| json!({"prefix": p})).collect::<Vec<_>>(),
                    "endpoints": eps.iter().map(|(ip, w)| json!({
                        "endpointIP": ip, "targetPort": target, "weight": w
                    })).collect::<Vec<_>>(),
                });
                let v = c.ok("POST", "/config/loadbalancer", Some(&body))?;
                if cli.json {
                    println!("{v}");
                } else {
                    println!("created {}:{port}/{proto}", a.vip);
                }
            }
        }
        Cmd::Delete {
            what: DeleteWhat::Lb(a),
        } => {
            let mut paths = Vec::new();
            if a.all {
                paths.push("/config/loadbalancer/all".to_string());
            } else if let Some(n) = &a.name {
                paths.push(format!("/config/loadbalancer/name/{n}"));
            } else {
                let vip = a
                    .vip
                    .as_deref()
                    .ok_or_else(|| anyhow!("give the VIP, --name or --all"))?;
                for (flag, proto) in [(&a.tcp, "tcp"), (&a.udp, "udp"), (&a.sctp, "sctp")] {
                    if let Some(p) = flag {
                        for (port, _) in ports(p, proto)? {
                            paths.push(format!(
                                "/config/loadbalancer/externalipaddress/{vip}/port/{port}/protocol/{proto}"
                            ));
                        }
                    }
                }
                if a.icmp {
                    paths.push(format!(
                        "/config/loadbalancer/externalipaddress/{vip}/port/1/protocol/icmp"
                    ));
                }
                if paths.is_empty() {
                    bail!("give at least one of --tcp, --udp, --sctp, --icmp");
                }
            }
            for p in paths {
                c.ok("DELETE", &p, None)?;
                if !cli.json {
                    println!("deleted {p}");
                }
            }
        }
    }
    Ok(())
}

/// One `--endpoints` item: `IP:WEIGHT`, `[IPv6]:WEIGHT`, or a bare address (weight 1).
fn endpoint_arg(e: &str) -> Result<(String, u16)> {
    let e = e.trim();
    let bad = || anyhow!("--endpoints: '{e}' is not IP:WEIGHT ([IPv6]:WEIGHT for IPv6)");
    if e.parse::<std::net::IpAddr>().is_ok() {
        return Ok((e.to_string(), 1));
    }
    let (ip, w) = if let Some(rest) = e.strip_prefix('[') {
        let (ip, tail) = rest.split_once(']').ok_or_else(bad)?;
        match tail {
            "" => (ip, "1"),
            t => (ip, t.strip_prefix(':').ok_or_else(bad)?),
        }
    } else {
        e.rsplit_once(':').ok_or_else(bad)?
    };
    ip.parse::<std::net::IpAddr>().map_err(|_| bad())?;
    let w: u16 = w.parse().map_err(|_| bad())?;
    Ok((ip.to_string(), w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_table_marks_peers_that_disagree() {
        let v = serde_json::json!({"Attr": [
            {"hostName": "10.0.0.1", "name": "a", "probeType": "tcp", "probePort": 80,
             "probeDuration": 1, "inactiveReTries": 2, "currState": "ok",
             "peerStates": [{"peer": "10.0.0.9:22222", "node": 1, "state": "nok"},
                            {"peer": "10.0.0.8:22222", "node": null, "state": "ok"}]},
            {"hostName": "10.0.0.2", "name": "b", "probeType": "udp", "probePort": 53,
             "probeDuration": 1, "inactiveReTries": 2, "currState": "red",
             "peerStates": [{"peer": "10.0.0.9:22222", "node": 1, "state": "nok"},
                            {"peer": "10.0.0.8:22222", "node": 2, "state": "unknown"}]},
            {"hostName": "10.0.0.3", "name": "c", "probeType": "tcp", "probePort": 81,
             "probeDuration": 1, "inactiveReTries": 2, "currState": "ok"}
        ]});
        let t = ep_table(&v);
        assert!(t.contains("PEERS"), "{t}");
        assert!(t.contains("node1:nok!,10.0.0.8:22222:ok"), "{t}");
        assert!(t.contains("node1:nok,node2:unknown"), "{t}");
        assert!(!t.contains("node1:nok!,node2"), "{t}");
    }

    #[test]
    fn rule_table_shows_source_ranges() {
        let v = serde_json::json!({"lbAttr": [
            {"serviceArguments": {"externalIP": "203.0.113.10", "port": 80, "protocol": "tcp",
                                  "name": "web", "sel": 0, "mode": 2},
             "allowedSources": [{"prefix": "10.0.0.0/8"}, {"prefix": "192.0.2.0/24"}],
             "endpoints": [{"endpointIP": "10.10.10.11", "targetPort": 8080, "weight": 1,
                            "state": "active", "counter": "0:0"}]},
            {"serviceArguments": {"externalIP": "203.0.113.11", "port": 53, "protocol": "udp",
                                  "name": "dns", "sel": 0, "mode": 0},
             "allowedSources": [], "endpoints": []}
        ]});
        let t = lb_table(&v);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].contains("SOURCE RANGES"), "{t}");
        assert!(
            lines
                .iter()
                .any(|l| l.contains("203.0.113.10") && l.contains("10.0.0.0/8,192.0.2.0/24")),
            "{t}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("203.0.113.11") && !l.contains('/')),
            "{t}"
        );
    }

    #[test]
    fn endpoint_arguments_of_both_families() {
        assert_eq!(endpoint_arg("10.0.0.1:3").unwrap(), ("10.0.0.1".into(), 3));
        assert_eq!(endpoint_arg("10.0.0.1").unwrap(), ("10.0.0.1".into(), 1));
        assert_eq!(
            endpoint_arg("fd00:10::11").unwrap(),
            ("fd00:10::11".into(), 1)
        );
        assert_eq!(
            endpoint_arg("[fd00:10::11]:2").unwrap(),
            ("fd00:10::11".into(), 2)
        );
        assert_eq!(
            endpoint_arg("[fd00:10::11]").unwrap(),
            ("fd00:10::11".into(), 1)
        );
        for bad in [
            "[fd00::1",
            "[fd00::1]x",
            "host:1",
            "10.0.0.1:x",
            "[10.0.0.1]:70000",
        ] {
            assert!(endpoint_arg(bad).is_err(), "{bad}");
        }
    }
}
