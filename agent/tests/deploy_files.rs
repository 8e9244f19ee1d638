//! The files of `deploy/` that `docs/operations.md` tells operators to use: the systemd unit
//! and the Containerfile. Neither can be run here (no systemd; no container registry to pull
//! the base image from), so they are checked for syntax, and the agent's flags they carry
//! are parsed by the agent's own flag parser.
#![allow(clippy::unwrap_used)]

use clap::Parser;
use ferrolb_agent::config::{Config, Flags};

fn read(name: &str) -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Parses the agent's argv as `ferrolb` would at start (flags, then their meaning).
fn agent_accepts(argv: &[&str]) {
    let flags = Flags::try_parse_from(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    Config::from_flags(flags).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
}

#[test]
fn the_systemd_unit_is_well_formed_and_its_command_line_parses() {
    let unit = read("ferrolb.service");
    let known: &[(&str, &[&str])] = &[
        ("Unit", &["Description", "Documentation", "After", "Wants"]),
        (
            "Service",
            &[
                "Type",
                "EnvironmentFile",
                "ExecStart",
                "KillMode",
                "KillSignal",
                "TimeoutStopSec",
                "Restart",
                "RestartSec",
                "StateDirectory",
                "LimitMEMLOCK",
                "AmbientCapabilities",
            ],
        ),
        ("Install", &["WantedBy"]),
    ];
    let mut section: Option<&str> = None;
    let mut exec = None;
    let mut seen = Vec::new();
    for (n, line) in unit.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let s = known
                .iter()
                .find(|(k, _)| *k == name)
                .unwrap_or_else(|| panic!("line {}: unknown section [{name}]", n + 1));
            section = Some(s.0);
            seen.push(s.0);
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("line {}: not KEY=VALUE: {line}", n + 1));
        let sec = section.unwrap_or_else(|| panic!("line {}: outside a section", n + 1));
        let keys = known.iter().find(|(k, _)| *k == sec).unwrap().1;
        assert!(
            keys.contains(&key),
            "line {}: {key} is not expected in [{sec}]",
            n + 1
        );
        assert!(!value.is_empty(), "line {}: {key} has no value", n + 1);
        if key == "ExecStart" {
            exec = Some(value.to_string());
        }
        if key == "KillMode" {
            assert_eq!(value, "mixed", "SIGTERM must reach the agent alone");
        }
    }
    assert_eq!(seen, ["Unit", "Service", "Install"]);
    let exec = exec.expect("ExecStart");
    let argv: Vec<&str> = exec
        .split_whitespace()
        .filter(|a| *a != "$FERROLB_ARGS")
        .collect();
    assert_eq!(argv[0], "/usr/local/bin/ferrolb");
    agent_accepts(&argv);
    // With the flags the unit's header suggests for /etc/default/ferrolb.
    let mut with = argv.clone();
    with.extend([
        "-b",
        "--cluster=10.10.10.3",
        "--self=0",
        "--ka=10.10.10.3:10.10.10.2",
    ]);
    agent_accepts(&with);
}

#[test]
fn the_containerfile_is_well_formed_and_its_entrypoint_parses() {
    let file = read("Containerfile");
    let instructions = [
        "FROM",
        "RUN",
        "COPY",
        "VOLUME",
        "EXPOSE",
        "ENTRYPOINT",
        "CMD",
        "ENV",
        "LABEL",
    ];
    let mut logical = Vec::new();
    let mut cur = String::new();
    for line in file.lines() {
        let t = line.trim();
        if cur.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(head) => {
                cur.push_str(head);
                cur.push(' ');
            }
            None => {
                cur.push_str(t);
                logical.push(std::mem::take(&mut cur));
            }
        }
    }
    assert!(cur.is_empty(), "a continued line at the end");
    assert!(logical[0].starts_with("FROM "), "{}", logical[0]);
    let mut entry = None;
    for l in &logical {
        let (ins, rest) = l.split_once(' ').unwrap_or((l, ""));
        assert!(instructions.contains(&ins), "unknown instruction: {l}");
        assert!(!rest.trim().is_empty(), "{ins} without arguments");
        if ins == "ENTRYPOINT" {
            entry = Some(rest.trim().to_string());
        }
        if ins == "COPY" {
            let parts: Vec<&str> = rest.split_whitespace().collect();
            assert!(
                parts.contains(&"ferrolb") && parts.contains(&"ferroctl"),
                "{l}"
            );
        }
        if ins == "VOLUME" || ins == "ENTRYPOINT" {
            let _: Vec<String> = serde_json::from_str(rest.trim())
                .unwrap_or_else(|e| panic!("{ins} must be a JSON array ({e}): {l}"));
        }
    }
    let entry: Vec<String> = serde_json::from_str(&entry.expect("ENTRYPOINT")).unwrap();
    let mut argv: Vec<&str> = entry.iter().map(String::as_str).collect();
    agent_accepts(&argv);
    // `docker run ... ferrolb:latest -b` as the docs show.
    argv.extend([
        "-b",
        "--cluster=10.10.10.3",
        "--self=0",
        "--ka=10.10.10.3:10.10.10.2",
    ]);
    agent_accepts(&argv);
}
