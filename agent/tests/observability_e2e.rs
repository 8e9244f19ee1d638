//! Observability of an HA pair, for real: a Prometheus server (Debian's `prometheus`, started
//! by the test in the ToR's namespace) scrapes both agents of `containerlab/ha-pair`; the HA,
//! BFD, BGP, sync and datapath series are queried through its HTTP API; `promtool check
//! metrics` passes on each agent's exposition, also with hostile text in a rule name and a
//! BFD instance; every series the Grafana dashboard (`docs/grafana/ferrolb.json`) queries is
//! exported and documented.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ferrolb_tests::ha::{LBS, VIP};
use ferrolb_tests::{TestLab, promtool_check, repo_root, rest};
use serde_json::{Value, json};

const FERROLB: &str = env!("CARGO_BIN_EXE_ferrolb");

/// A rule name and a BFD instance an operator (or an attacker with API access) might send:
/// quotes, backslashes, a newline and braces all end up in label values.
const EVIL_NAME: &str = "evil \"svc\" \\ {x=\"y\"}\nnext:llb-inst0";
const EVIL_INSTANCE: &str = "bfd\"} 1\n# HELP x";

/// An instant query against the test's Prometheus: the `result` list, or `None` while
/// Prometheus does not answer.
fn try_query(lab: &TestLab, q: &str) -> Option<Vec<Value>> {
    let out = lab
        .exec(
            "tor",
            &[
                "curl",
                "-sfG",
                "http://127.0.0.1:9090/api/v1/query",
                "--data-urlencode",
                &format!("query={q}"),
            ],
        )
        .ok()?;
    if !out.success() {
        return None;
    }
    let v: Value = serde_json::from_str(&out.stdout).ok()?;
    (v["status"] == "success").then(|| v["data"]["result"].as_array().cloned().unwrap_or_default())
}

fn query(lab: &TestLab, q: &str) -> Vec<Value> {
    try_query(lab, q).unwrap_or_else(|| panic!("Prometheus query {q} failed"))
}

fn metric_names(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("ferrolb_"))
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn prometheus_scrapes_an_ha_pair_and_the_dashboard_queries_real_series() {
    let test = "prometheus_scrapes_an_ha_pair_and_the_dashboard_queries_real_series";
    if !ferrolb_tests::require(test, &["prometheus", "promtool"]) {
        return;
    }
    let Some(lab) = ferrolb_tests::ha::up(test, "hamon", "100ms", FERROLB) else {
        return;
    };
    // Hostile label text: a rule name on both nodes, a BFD instance on lb1.
    for (node, ..) in LBS {
        let r = json!({"serviceArguments": {"externalIP": VIP, "port": 9100, "protocol": "tcp", "mode": 2,
                                            "BGP": true, "name": EVIL_NAME},
                       "endpoints": [{"endpointIP": "10.10.10.11", "targetPort": 8080, "weight": 1}]});
        let (st, v) = rest(
            &lab,
            node,
            "POST",
            "/config/loadbalancer",
            Some(&r.to_string()),
        );
        assert_eq!(st, 200, "{v}");
    }
    let b = json!({"remoteIp": "192.0.2.99", "sourceIp": LBS[0].1, "interval": 200_000,
                   "retryCount": 3, "instance": EVIL_INSTANCE});
    let (st, v) = rest(&lab, "lb1", "POST", "/config/bfd", Some(&b.to_string()));
    assert_eq!(st, 200, "{v}");
    // Traffic through the evil rule, so its counters move.
    let probe = ferrolb_tests::ha::probe_path();
    lab.exec_ok("client", &["python3", &probe, "http", VIP, "9100", "2"])
        .unwrap();

    // Every agent's exposition is valid Prometheus text, label values escaped.
    let mut exported = Vec::new();
    for (node, ..) in LBS {
        let text = lab
            .exec_ok(node, &["curl", "-sf", "http://127.0.0.1:11111/metrics"])
            .unwrap();
        let (ok, out) = promtool_check(&text);
        assert!(ok, "promtool check metrics on {node}: {out}");
        assert!(
            text.contains(r#"service="evil \"svc\" \\ {x=\"y\"}\nnext:llb-inst0""#),
            "{node}: the rule name escaped in its label"
        );
        exported.extend(metric_names(&text));
    }
    exported.sort();
    exported.dedup();

    // A real Prometheus in the ToR's namespace scrapes both nodes every second, with the
    // shipped alert rules loaded.
    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = Dir(std::env::temp_dir().join(ferrolb_tests::unique_name("prometheus")));
    std::fs::create_dir_all(dir.0.join("data")).unwrap();
    let alerts = repo_root().join("docs/prometheus/alerts.yml");
    let targets: Vec<String> = LBS
        .iter()
        .map(|(_, me, ..)| format!("'{me}:11111'"))
        .collect();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - '{}'\nscrape_configs:\n  - job_name: ferrolb\n    static_configs:\n      - targets: [{}]\n",
        alerts.display(),
        targets.join(", ")
    );
    let cfg_path = dir.0.join("prometheus.yml");
    std::fs::write(&cfg_path, config).unwrap();
    let data = dir.0.join("data");
    lab.spawn(
        "tor",
        "prometheus",
        &[
            "prometheus",
            &format!("--config.file={}", cfg_path.display()),
            &format!("--storage.tsdb.path={}", data.display()),
            "--web.listen-address=127.0.0.1:9090",
        ],
    )
    .unwrap();
    lab.wait_until(
        "Prometheus scrapes both agents",
        Duration::from_secs(30),
        || Ok(try_query(&lab, "up == 1").is_some_and(|up| up.len() == 2)),
    )
    .unwrap();
    // Give the series two more scrapes.
    std::thread::sleep(Duration::from_secs(2));
    let masters = query(&lab, r#"ferrolb_ha_role{role="MASTER"} == 1"#);
    assert_eq!(masters.len(), 1, "exactly one MASTER: {masters:?}");
    assert_eq!(
        query(&lab, "ferrolb_sync_peer_up == 1").len(),
        2,
        "each node syncs from the other"
    );
    assert_eq!(
        query(&lab, "ferrolb_bgp_session_established == 1").len(),
        2,
        "both nodes peer with the ToR"
    );
    let bfd_up = query(&lab, "ferrolb_bfd_session_up == 1");
    assert!(bfd_up.len() >= 4, "ka and ToR sessions on both: {bfd_up:?}");
    let evil_bfd = query(&lab, "ferrolb_bfd_session_up == 0");
    assert!(
        evil_bfd
            .iter()
            .any(|s| s["metric"]["exported_instance"] == EVIL_INSTANCE),
        "the hostile BFD instance arrives intact: {evil_bfd:?}"
    );
    let evil = query(&lab, "ferrolb_service_packets_total > 0");
    assert!(
        evil.iter().any(|s| s["metric"]["service"] == EVIL_NAME),
        "the hostile rule name arrives intact: {evil:?}"
    );
    assert!(!query(&lab, "ferrolb_datapath_drops_total").is_empty());
    // No alert fires on a healthy pair (the hostile BFD session is down on purpose).
    let firing = query(&lab, r#"ALERTS{alertstate="firing"}"#);
    assert!(
        firing
            .iter()
            .all(|a| a["metric"]["alertname"] == "FerrolbBfdDown"),
        "{firing:?}"
    );

    // The Grafana dashboard queries only series the agents export (seen by Prometheus) and
    // docs/metrics.md documents.
    let dash = std::fs::read_to_string(repo_root().join("docs/grafana/ferrolb.json")).unwrap();
    let d: Value = serde_json::from_str(&dash).unwrap();
    let mut exprs = String::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            exprs.push_str(t["expr"].as_str().unwrap());
            exprs.push('\n');
        }
    }
    let doc = std::fs::read_to_string(repo_root().join("docs/metrics.md")).unwrap();
    let used = metric_names(&exprs);
    assert!(used.len() >= 10, "{used:?}");
    for n in used {
        assert!(
            exported.contains(&n),
            "the dashboard queries {n}, which no agent exports"
        );
        assert!(
            !query(&lab, &format!("count({n})")).is_empty(),
            "Prometheus has no {n}"
        );
        assert!(
            doc.contains(&format!("`{n}`")),
            "the dashboard queries {n}, which docs/metrics.md does not list"
        );
    }
    lab.down().unwrap();
}
