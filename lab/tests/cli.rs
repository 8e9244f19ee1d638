//! The `ferrolab` command line, end to end, on a small lab of plain hosts.
#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use std::path::PathBuf;
use std::process::Command;

fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let tools = ["ip", "ethtool", "ping", "sysctl"].iter().all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if root && tools {
        return true;
    }
    let why = "ferrolab CLI test needs root and ip, ethtool, ping, sysctl";
    if std::env::var_os("CI").is_some() {
        panic!("{why} (CI is set)");
    }
    eprintln!("SKIPPED {why}");
    false
}

fn ferrolab(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrolab"))
        .args(args)
        .output()
        .expect("run ferrolab");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn up_exec_inspect_ls_down() {
    if !privileged() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ferrolab-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let topo: PathBuf = dir.join("hosts.clab.yml");
    let lab = format!("cli{}", std::process::id());
    std::fs::write(
        &topo,
        "name: ${CLI_LAB:=unset}\ntopology:\n  defaults:\n    kind: linux\n    image: alpine:3\n    cmd: sleep 300\n  nodes:\n    h1:\n      exec: ['ip addr add 192.0.2.1/30 dev eth1']\n    h2:\n      exec: ['ip addr add 192.0.2.2/30 dev eth1']\n      mgmt-ipv4: 172.20.20.3\n  links:\n    - endpoints: [h1:eth1, h2:eth1]\n",
    )
    .unwrap();
    let t = topo.to_str().unwrap();
    let var = format!("CLI_LAB={lab}");
    let base = ["--var", var.as_str(), t];

    let (code, out, err) = ferrolab(&[&["up"][..], &base].concat());
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains(&format!("lab {lab} is up: 2 nodes, 1 links")),
        "{out}"
    );
    assert!(
        out.contains("warning: node h2: topology.nodes.h2.mgmt-ipv4: ignored"),
        "{out}"
    );
    assert!(
        out.contains(&format!("clab-{lab}-h1")) && out.contains("192.0.2.1/30"),
        "{out}"
    );

    let exec =
        |node: &str, cmd: &[&str]| ferrolab(&[&["exec"][..], &base, &[node, "--"], cmd].concat());
    let (code, out, _) = exec("h1", &["ping", "-c", "1", "-W", "2", "192.0.2.2"]);
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = exec("h2", &["sh", "-c", "hostname; exit 7"]);
    assert_eq!((code, out.trim()), (7, "h2"));
    let (code, _, err) = exec("nope", &["true"]);
    assert_ne!(code, 0);
    assert!(err.contains("no node named 'nope'"), "{err}");

    let (code, out, _) = ferrolab(&[&["inspect"][..], &base].concat());
    assert_eq!(code, 0);
    assert!(
        out.contains("eth1") && out.contains("192.0.2.2/30") && out.contains("sleep("),
        "{out}"
    );
    let (_, out, _) = ferrolab(&["ls"]);
    assert!(out.contains(&lab), "{out}");

    let (code, out, _) = ferrolab(&[&["down", "--cleanup"][..], &base].concat());
    assert_eq!(code, 0);
    assert!(out.contains(&format!("lab {lab} is down")), "{out}");
    let (code, out, _) = ferrolab(&[&["down"][..], &base].concat());
    assert_eq!(
        (code, out.trim()),
        (0, format!("lab {lab} is not up").as_str())
    );
    let (_, out, _) = ferrolab(&["ls"]);
    assert!(!out.contains(&lab), "{out}");
    assert!(!PathBuf::from(format!("/run/netns/clab-{lab}-h1")).exists());

    // A bad file is refused with the file, key and node named, and nothing is made.
    std::fs::write(&topo, "name: bad\ntopology:\n  nodes:\n    r1: {kind: linux}\n  links:\n    - endpoints: [r1:eth1, r9:eth1]\n").unwrap();
    let (code, _, err) = ferrolab(&["up", t]);
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!(
            "{t}: topology.links[0].endpoints[1]: unknown node 'r9'"
        )),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
