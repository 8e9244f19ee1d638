//! The alert rules shipped in `docs/prometheus/alerts.yml`: valid (`promtool check rules`),
//! firing as their unit tests say (`promtool test rules`), and written against metric names
//! the agent really exports.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use ferrolb_tests::{repo_root, require};

#[test]
fn alert_rules_check_and_pass_their_promtool_tests() {
    if !require(
        "alert_rules_check_and_pass_their_promtool_tests",
        &["promtool"],
    ) {
        return;
    }
    let dir = repo_root().join("docs/prometheus");
    for args in [
        &["check", "rules", "alerts.yml"][..],
        &["test", "rules", "alerts_test.yml"][..],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Every `ferrolb_*` name an alert uses is one the agent's exposition documents (the metrics
/// reference is kept in step with the renderer by the lab tests that scrape it).
#[test]
fn alert_rules_use_documented_metrics() {
    let root = repo_root();
    let rules = std::fs::read_to_string(root.join("docs/prometheus/alerts.yml")).unwrap();
    let doc = std::fs::read_to_string(root.join("docs/metrics.md")).unwrap();
    let mut names: Vec<&str> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("ferrolb_"))
        .collect();
    names.sort();
    names.dedup();
    assert!(!names.is_empty());
    for n in names {
        assert!(
            doc.contains(&format!("`{n}`")),
            "alerts.yml uses {n}, which docs/metrics.md does not list"
        );
    }
}
