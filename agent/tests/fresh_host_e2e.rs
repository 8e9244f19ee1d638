//! A host as it comes, in a network namespace of this test's own, with the agent started the
//! way people start it by hand or in a container (`ip netns exec`: a new mount namespace at
//! every start): forwarding is off, bpffs is not mounted. The agent turns forwarding on for the
//! interfaces it attaches to (or, with `--no-forwarding-sysctl`, warns), and warns that the
//! bpffs it had to mount in that private mount namespace dies with it. With a bpffs that
//! outlives it bound in (the host's, as `docker run -v /sys/fs/bpf:/sys/fs/bpf` does), a
//! `kill -9` and a restart keep a TCP stream; without, they drop it.
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
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, FERROLB, "--config-path"])
            .arg(&self.dir)
            .args(["--gc-interval", "1"])
            .args(extra);
        self.spawn_agent(cmd)
    }

    /// Runs `cmd` as the agent; its output lines (colour codes removed) come out of the
    /// returned channel.
    fn spawn_agent(&mut self, mut cmd: Command) -> mpsc::Receiver<String> {
        let mut child = cmd
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
                    if tx.send(plain(&line)).is_err() {
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

/// A log line without its terminal colour codes (`ESC [ ... m`).
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
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

/// A bpffs mount of this test's own in the host's mount namespace: it stands for the host's
/// `/sys/fs/bpf`, outliving every agent start. Unmounted and removed on drop.
struct HostBpffs(std::path::PathBuf);

impl HostBpffs {
    fn new() -> HostBpffs {
        let p = std::env::temp_dir().join(format!("flbbpffs{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        let out = Command::new("mount")
            .args(["-t", "bpf", "bpffs"])
            .arg(&p)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount bpffs: {out:?}");
        HostBpffs(p)
    }
}

impl Drop for HostBpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A client and a backend namespace joined to the host's: client 198.51.100.2 -> VIP
/// 203.0.113.10:9000 -> backend 10.10.10.11:9000 (an echo server), DNAT.
struct Edge {
    names: [String; 2],
    server: Option<Child>,
}

impl Drop for Edge {
    fn drop(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

const ECHO_SERVER: &str = r#"
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9000)); s.listen(16)
def serve(c):
    while True:
        d = c.recv(4096)
        if not d: return
        c.sendall(d)
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// One TCP stream: a line every 50 ms for `seconds`, each echoed back in order; prints
/// `ok <lines>` or `broken <why>`.
const STREAM_CLIENT: &str = r#"
import socket, sys, time
n = int(float(sys.argv[1]) / 0.05)
s = socket.create_connection(("203.0.113.10", 9000), timeout=3)
s.settimeout(3)
buf = b""
try:
    for i in range(n):
        s.sendall(b"%d\n" % i)
        while b"\n" not in buf:
            d = s.recv(4096)
            if not d: raise OSError("closed")
            buf += d
        line, buf = buf.split(b"\n", 1)
        if line != b"%d" % i: raise OSError("out of order: %r" % line)
        time.sleep(0.05)
    print("ok", n)
except OSError as e:
    print("broken", e)
"#;

impl Edge {
    fn new(h: &Host) -> Edge {
        let pid = std::process::id();
        let (c, b) = (format!("flbc{pid}"), format!("flbb{pid}"));
        let e = Edge {
            names: [c.clone(), b.clone()],
            server: None,
        };
        h.ip(&["netns", "add", &c]);
        h.ip(&["netns", "add", &b]);
        h.ip(&[
            "link", "add", "c0", "netns", &c, "type", "veth", "peer", "name", "l0", "netns", &h.ns,
        ]);
        h.ip(&[
            "link", "add", "b0", "netns", &b, "type", "veth", "peer", "name", "l1", "netns", &h.ns,
        ]);
        for (ns, cmds) in [
            (
                &c,
                vec![
                    "addr add 198.51.100.2/24 dev c0",
                    "link set c0 up",
                    "link set lo up",
                    "route add default via 198.51.100.1",
                ],
            ),
            (
                &b,
                vec![
                    "addr add 10.10.10.11/24 dev b0",
                    "link set b0 up",
                    "link set lo up",
                    "route add default via 10.10.10.1",
                ],
            ),
            (
                &h.ns,
                vec![
                    "addr add 198.51.100.1/24 dev l0",
                    "addr add 10.10.10.1/24 dev l1",
                    "link set l0 up",
                    "link set l1 up",
                    "link set lo up",
                ],
            ),
        ] {
            for cmd in cmds {
                let mut argv = vec!["-n", ns.as_str()];
                argv.extend(cmd.split(' '));
                h.ip(&argv);
            }
        }
        let mut e = e;
        e.server = Some(
            Command::new("ip")
                .args(["netns", "exec", &b, "python3", "-c", ECHO_SERVER])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        e
    }

    fn stream(&self, seconds: f64) -> Child {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.names[0],
                "python3",
                "-c",
                STREAM_CLIENT,
            ])
            .arg(seconds.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

fn rest_post(h: &Host, path: &str, body: &str) -> String {
    h.exec(&[
        "curl",
        "-s",
        "-m",
        "5",
        "-X",
        "POST",
        &format!("http://127.0.0.1:11111/netlox/v1{path}"),
        "-d",
        body,
    ])
}

/// Starts the agent (`bpffs`: bind that mount on /sys/fs/bpf first), waits for its API.
fn start_agent(h: &mut Host, bpffs: Option<&HostBpffs>) -> mpsc::Receiver<String> {
    let rx = match bpffs {
        Some(m) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &h.ns, "sh", "-c"]).arg(format!(
                "mount --bind {} /sys/fs/bpf && exec {FERROLB} --config-path {} --gc-interval 1",
                m.0.display(),
                h.dir.display()
            ));
            h.spawn_agent(cmd)
        }
        None => h.start(&[]),
    };
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        let ok = Command::new("ip")
            .args([
                "netns",
                "exec",
                &h.ns,
                "curl",
                "-s",
                "-m",
                "1",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ])
            .arg("http://127.0.0.1:11111/netlox/v1/config/loadbalancer/all")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "200")
            .unwrap_or(false);
        if ok {
            return rx;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the agent's API did not come up");
}

/// A stream through the datapath while the agent is killed (-9) and restarted; returns what
/// the client printed and the second start's log.
fn kill9_under_a_stream(tag: &str, bound: bool) -> (String, Vec<String>) {
    let bpffs = bound.then(HostBpffs::new);
    let mut h = Host::new(tag);
    let _edge = Edge::new(&h);
    let edge = &_edge;
    let _ = start_agent(&mut h, bpffs.as_ref());
    let out = rest_post(
        &h,
        "/config/loadbalancer",
        r#"{"serviceArguments":{"externalIP":"203.0.113.10","port":9000,"protocol":"tcp","sel":0,"mode":0,"name":"echo"},"endpoints":[{"endpointIP":"10.10.10.11","targetPort":9000,"weight":1}]}"#,
    );
    assert!(out.contains("Success"), "{out}");
    std::thread::sleep(Duration::from_millis(500));
    let client = edge.stream(6.0);
    std::thread::sleep(Duration::from_secs(2));
    h.stop(); // kill -9: the pinned datapath is all that is left
    std::thread::sleep(Duration::from_millis(500));
    let rx = start_agent(&mut h, bpffs.as_ref());
    let out = client.wait_with_output().unwrap();
    let printed = format!(
        "{} {}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
    .trim()
    .to_string();
    std::thread::sleep(Duration::from_millis(300));
    let log: Vec<String> = rx.try_iter().collect();
    h.stop();
    (printed, log)
}

#[test]
fn kill9_and_restart_keep_a_stream_only_with_a_bpffs_that_outlives_the_agent() {
    let test = "kill9_and_restart_keep_a_stream_only_with_a_bpffs_that_outlives_the_agent";
    if !require(test, &["ip", "curl", "python3", "mount", "umount"]) {
        return;
    }
    // The host's bpffs bound in: the restarted agent adopts the pinned datapath and the
    // stream never notices; no warning.
    let (printed, log) = kill9_under_a_stream("pinok", true);
    assert!(
        printed.starts_with("ok"),
        "stream with the host's bpffs: {printed}\n{}",
        log.join("\n")
    );
    assert!(
        log.iter().any(|l| l.contains("adopted=true")),
        "the restarted agent adopted the pinned datapath: {log:?}"
    );
    assert!(
        !log.iter().any(|l| l.contains("may not outlive")),
        "{log:?}"
    );
    // Without it the pins went with the first agent's mount namespace: the restarted agent
    // starts afresh, warns again, and the stream dies.
    let (printed, log) = kill9_under_a_stream("pinlost", false);
    assert!(printed.starts_with("broken"), "stream without: {printed}");
    assert!(log.iter().any(|l| l.contains("may not outlive")), "{log:?}");
}
