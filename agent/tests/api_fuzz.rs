//! A schema-driven fuzzer against the REST API, for a bounded time: Schemathesis (PyPI,
//! pinned in `scripts/deps.sh`) generates requests from `docs/openapi.yaml` — valid ones
//! (rules, BGP and BFD configuration, roles) and invalid ones — and sends them to an agent
//! with BGP enabled on the lb-single lab. Every answer must be one the schema documents, with
//! the documented content type and body, and none may be a 5xx. Afterwards the agent still
//! answers and lists rules.
#![allow(clippy::unwrap_used)]

use ferrolb_tests::{TestLab, repo_root, require, rest, wait_api};

const FERROLB: &str = env!("CARGO_BIN_EXE_ferrolb");
const SCHEMATHESIS: &str = "/opt/ferrolb-venv/bin/schemathesis";

#[test]
fn schema_driven_fuzzing_finds_no_5xx_and_only_documented_answers() {
    let test = "schema_driven_fuzzing_finds_no_5xx_and_only_documented_answers";
    if !require(test, &["ip", "curl", "python3"]) {
        return;
    }
    if !std::path::Path::new(SCHEMATHESIS).exists() {
        let why = format!("{SCHEMATHESIS} missing (scripts/deps.sh installs it)");
        if std::env::var_os("CI").is_some() {
            panic!("{test}: {why}");
        }
        println!("SKIPPED {test}: {why}");
        return;
    }
    let lab = TestLab::up_with(
        "containerlab/lb-single/lb-single.clab.yml",
        "lbfuzz",
        &[("FERROLB", FERROLB)],
    )
    .expect("lab up");
    // The lab's agent runs without BGP; the fuzzer gets one with -b (no 503 for BGP calls).
    assert_eq!(lab.kill("lb1", "ferrolb").unwrap(), 1);
    lab.spawn(
        "lb1",
        "ferrolb-bgp",
        &[FERROLB, "-b", "--config-path", "/etc/ferrolb/"],
    )
    .unwrap();
    wait_api(&lab, "lb1");
    let schema = repo_root().join("docs/openapi.yaml");
    let out = lab
        .exec(
            "lb1",
            &[
                SCHEMATHESIS,
                "run",
                schema.to_str().unwrap(),
                "--url",
                "http://127.0.0.1:11111/netlox/v1",
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
                "--max-examples",
                "25",
                "--max-time",
                "80",
                "--workers",
                "1",
                "--request-timeout",
                "10",
                "--suppress-health-check",
                "all",
                // Draining withdraws BGP for up to graceSeconds and a switchover needs a
                // cluster: both are tested in their own labs.
                "--exclude-path",
                "/config/bgp/drain",
                "--exclude-path",
                "/config/ha/switchover",
                "--seed",
                "1",
            ],
        )
        .unwrap();
    assert!(
        out.success(),
        "schemathesis found problems:\n{}\n{}",
        out.stdout,
        out.stderr
    );
    assert!(out.stdout.contains("passed"), "{}", out.stdout);
    // Still serving, rules still listed; and the fuzzer did get valid rules through (the
    // schema describes them well enough to be generated).
    let (st, v) = rest(&lab, "lb1", "GET", "/config/loadbalancer/all", None);
    assert_eq!(st, 200, "{v}");
    let m = lab
        .exec_ok("lb1", &["curl", "-sf", "http://127.0.0.1:11111/metrics"])
        .unwrap();
    let created: f64 = m
        .lines()
        .filter(|l| {
            l.starts_with("ferrolb_api_requests_total{")
                && l.contains(r#"method="POST""#)
                && l.contains(r#"route="/netlox/v1/config/loadbalancer""#)
                && l.contains(r#"status="200""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "fuzzer: {created} valid rules generated and accepted"
    );
    assert!(created >= 1.0, "the fuzzer never produced a valid rule");
    lab.down().unwrap();
}
