//! A host as it comes, in a network namespace of this test's own, with the agent started the
//! way people start it by hand (`ip netns exec`): forwarding is off, bpffs is not mounted.
//! The agent turns forwarding on for the interfaces it attaches to (or, with
//! `--no-forwarding-sysctl`, warns), and warns that the bpffs it had to mount in the private
//! mount namespace of `ip netns exec` dies with it.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ferrolb_tests::require;

const FERROLB: &str = env!("CARGO_BIN_EXE_ferrolb");

/// The namespace, the running agent and its state directory; all removed on drop.
struct Host {
    ns: String,
    dir: std::path::PathBuf,
    agent: Option<Child>,
}

impl Drop for Host {
    fn drop(&mut self) {
        self.stop();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Host {
    fn new(tag: &str) -> Host {
        let ns = format!("flb{tag}{}", std::process::id());
        let dir = std::env::temp_dir().join(&ns);
        let h = Host {
            ns,
            dir,
            agent: None,
        };
        std::fs::create_dir_all(&h.dir).unwrap();
        h.ip(&["netns", "add", &h.ns]);
        h
    }

    fn ip(&self, args: &[&str]) {
        let out = Command::new("ip").args(args).output().unwrap();
        assert!(out.status.success(), "ip {args:?}: {out:?}");
    }

    fn exec(&self, argv: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(argv)
            .output()
            .unwrap();
        assert!(out.status.success(), "{argv:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts the agent with `extra` flags; its log lines come out of the returned channel.
    fn start(&mut self, extra: &[&str]) -> mpsc::Receiver<String> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns, FERROLB, "--config-path"])
            .arg(&self.dir)
            .args(["--gc-interval", "1"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            });
        }
        self.agent = Some(child);
        rx
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Reads log lines until one contains every part of `want` (or 20 s pass); returns it.
fn wait_line(rx: &mpsc::Receiver<String>, want: &[&str], seen: &mut Vec<String>) -> String {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(l) = seen.iter().find(|l| want.iter().all(|w| l.contains(w))) {
            return l.clone();
        }
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => seen.push(l),
            Err(_) => panic!(
                "no log line with {want:?}; the agent said:\n{}",
                seen.join("\n")
            ),
        }
    }
}

fn forwarding(h: &Host, iface: &str) -> String {
    h.exec(&[
        "cat",
        &format!("/proc/sys/net/ipv4/conf/{iface}/forwarding"),
    ])
    .trim()
    .to_string()
}

#[test]
fn a_fresh_host_gets_forwarding_on_and_a_warning_about_its_bpffs() {
    let test = "a_fresh_host_gets_forwarding_on_and_a_warning_about_its_bpffs";
    if !require(test, &["ip"]) {
        return;
    }
    let mut h = Host::new("fresh");
    h.exec(&["ip", "link", "set", "lo", "up"]);
    h.exec(&[
        "ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1",
    ]);
    h.exec(&["ip", "link", "set", "v0", "up"]);
    h.exec(&["ip", "link", "set", "v1", "up"]);
    h.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=0"]);
    assert_eq!(forwarding(&h, "v0"), "0", "a host as it comes");

    let rx = h.start(&[]);
    let mut seen = Vec::new();
    // Where PID 1 is in another user namespace (a CI container), its mount namespace cannot
    // be read and the agent says so instead of "not PID 1's".
    let l = wait_line(
        &rx,
        &["may not outlive this agent", "mounted bpffs itself"],
        &mut seen,
    );
    assert!(l.contains("WARN") && l.contains("/sys/fs/bpf"), "{l}");
    for iface in ["v0", "v1"] {
        wait_line(
            &rx,
            &[
                "forwarding turned on",
                &format!("net.ipv4.conf.{iface}.forwarding"),
            ],
            &mut seen,
        );
        assert_eq!(forwarding(&h, iface), "1", "{iface}");
    }
    assert_eq!(
        forwarding(&h, "all"),
        "0",
        "only the attached interfaces are changed"
    );
    assert_eq!(forwarding(&h, "lo"), "0", "lo is never attached");
    h.stop();

    // Sysctls managed elsewhere: left alone, with a warning per interface.
    h.exec(&["sysctl", "-qw", "net.ipv4.conf.v0.forwarding=0"]);
    let rx = h.start(&["--no-forwarding-sysctl"]);
    let mut seen = Vec::new();
    wait_line(
        &rx,
        &[
            "forwarding is off",
            "net.ipv4.conf.v0.forwarding",
            "--no-forwarding-sysctl",
        ],
        &mut seen,
    );
    wait_line(&rx, &["datapath attached", "v1"], &mut seen);
    assert_eq!(forwarding(&h, "v0"), "0");
    assert!(
        !seen.iter().any(|l| l.contains("forwarding turned on")),
        "{seen:?}"
    );
    h.stop();
}
