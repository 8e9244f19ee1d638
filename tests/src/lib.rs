//! Helpers for ferrolb's end-to-end tests on netns labs (the tests are in `tests/tests/`).
//!
//! - [`require`]: a test that needs root and host tools runs when it can; when it cannot, it
//!   fails if `CI` is set and otherwise prints why it skipped.
//! - [`TestLab`]: a lab under a unique per-run name and lab directory, torn down on drop
//!   (on panic too); its directory (node logs) is kept only when the test failed.

pub mod ha;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use ferrolb_lab::{Lab, LabError, UpOptions};

/// `promtool check metrics` on an exposition: (passed, what it printed).
pub fn promtool_check(text: &str) -> (bool, String) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return (false, format!("cannot run promtool: {e}")),
    };
    if let Some(mut stdin) = child.stdin.take()
        && let Err(e) = stdin.write_all(text.as_bytes())
    {
        return (false, format!("writing to promtool: {e}"));
    }
    match child.wait_with_output() {
        Ok(out) => (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ),
        Err(e) => (false, format!("promtool: {e}")),
    }
}

/// Checks what a privileged test needs: root and the named programs. Returns false (the test
/// should return) when something is missing and `CI` is not set; panics when `CI` is set.
pub fn require(test: &str, programs: &[&str]) -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root".to_string());
    }
    for p in programs {
        if !program_exists(p) {
            missing.push(format!("program '{p}'"));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let why = format!("{test}: cannot run: missing {}", missing.join(", "));
    if std::env::var_os("CI").is_some() {
        panic!("{why} (CI is set, so this is a failure; run scripts/deps.sh)");
    }
    eprintln!("SKIPPED {why} (set CI=1 to make this a failure)");
    false
}

fn program_exists(p: &str) -> bool {
    if p.starts_with('/') {
        return Path::new(p).exists();
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(p).is_file()))
        .unwrap_or(false)
}

/// Moves the calling thread into a new, empty network namespace with `lo` up (the test's
/// own: nothing on the host is touched, and it goes when the thread ends). False when the
/// test cannot run (see [`require`]).
pub fn private_netns(test: &str) -> bool {
    if !require(test, &["ip"]) {
        return false;
    }
    if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
        panic!("{test}: unshare(CLONE_NEWNET): {e}");
    }
    let up = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(up, "{test}: ip link set lo up failed");
    true
}

/// The pid of the ferrolb agent running on `node` (panics when there is none).
pub fn agent_pid(lab: &Lab, node: &str) -> i32 {
    lab.processes(node)
        .expect("the node's processes")
        .into_iter()
        .find(|p| p.comm == "ferrolb")
        .unwrap_or_else(|| panic!("no ferrolb agent runs on {node}"))
        .pid
}

/// Waits (up to 20 s) until the agent on `node` answers its REST API.
pub fn wait_api(lab: &Lab, node: &str) {
    lab.wait_until(&format!("{node}'s API"), Duration::from_secs(20), || {
        Ok(rest(lab, node, "GET", "", None).0 == 200)
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

/// Waits until each backend's HTTP server (the labs' `servers.py`, port 8080) answers from
/// `node` (up to 20 s each).
pub fn wait_http_backends(lab: &Lab, node: &str, backends: &[&str]) {
    for be in backends {
        let url = format!("http://{be}:8080/");
        let waited = lab.wait_until(&format!("backend {be}"), Duration::from_secs(20), || {
            Ok(lab
                .exec(node, &["curl", "-sf", "-m", "1", url.as_str()])?
                .success())
        });
        if let Err(e) = waited {
            panic!("{e}");
        }
    }
}

/// Programs every FRR lab needs.
pub const FRR_LAB: &[&str] = &[
    "ip",
    "nft",
    "ethtool",
    "sysctl",
    "ping",
    "vtysh",
    "/usr/lib/frr/frrinit.sh",
];

/// The repository root.
pub fn repo_root() -> PathBuf {
    // Cargo sets CARGO_MANIFEST_DIR for the test process too (the crate under test, one level
    // below the root). It wins over this crate's compile-time path: with a target directory
    // shared between clones, this crate may have been built from another clone.
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .filter(|d| d.join("../containerlab").is_dir())
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The Internet checksum (RFC 1071) of `data`, starting from the partial sum `init` (a pseudo
/// header), for tests and benchmarks that build packets byte by byte.
pub fn inet_csum(data: &[u8], init: u32) -> u16 {
    let mut s = init;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        s += u32::from(w);
    }
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// A lab name unique to this process and call: `t<pid>-<n>-<label>`.
pub fn unique_name(label: &str) -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    format!(
        "t{}-{}-{label}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// `SCHED_FIFO` priority of the lab routers' BFD daemons (FRR's `bfdd`), that of the agents'
/// BFD threads (`--bfd-rt-priority`' default).
const ROUTER_BFD_RT_PRIORITY: &str = "10";

/// Runs every FRR `bfdd` of the lab at real-time priority, as the agents run their BFD threads.
/// The lab's routers stand for routers with CPUs of their own; on this machine they share two
/// cores with the agents, the backends and the load, and a starved ToR `bfdd` once went silent
/// for 300 ms toward both LB nodes under a test's load (a fixture failure, not ferrolb's).
fn routers_realtime(lab: &Lab) {
    for node in lab.topology().nodes.iter().map(|n| n.name.as_str()) {
        let Ok(procs) = lab.processes(node) else {
            continue;
        };
        for p in procs.iter().filter(|p| p.comm == "bfdd") {
            let out = std::process::Command::new("chrt")
                .args(["-a", "-f", "-p", ROUTER_BFD_RT_PRIORITY, &p.pid.to_string()])
                .output();
            match out {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "warning: {node}'s bfdd ({}) stays at normal priority: {}",
                    p.pid,
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => eprintln!(
                    "warning: {node}'s bfdd ({}) stays at normal priority: chrt: {e}",
                    p.pid
                ),
            }
        }
    }
}

/// A lab owned by one test.
pub struct TestLab {
    lab: Option<Lab>,
    dir: PathBuf,
}

impl TestLab {
    /// Brings `topology` (relative to the repository root) up under a unique name, with
    /// `exec` failures treated as errors.
    pub fn up(topology: &str, label: &str) -> Result<TestLab, LabError> {
        TestLab::up_with(topology, label, &[])
    }

    /// [`TestLab::up`] with topology variables (`${VAR}` in the file).
    pub fn up_with(
        topology: &str,
        label: &str,
        vars: &[(&str, &str)],
    ) -> Result<TestLab, LabError> {
        let name = unique_name(label);
        let dir = std::env::temp_dir().join("ferrolb-tests").join(&name);
        let opts = UpOptions {
            name: Some(name),
            lab_dir: Some(dir.clone()),
            strict_exec: true,
            vars: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..UpOptions::default()
        };
        let lab = Lab::up(repo_root().join(topology), opts)?;
        routers_realtime(&lab);
        Ok(TestLab {
            lab: Some(lab),
            dir,
        })
    }

    /// Tears the lab down now, returning what could not be removed.
    pub fn down(mut self) -> Result<(), LabError> {
        match self.lab.take() {
            Some(lab) => lab.down(),
            None => Ok(()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl std::ops::Deref for TestLab {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        // Only `down` and `drop` take the lab, and both consume or end the TestLab.
        self.lab
            .as_ref()
            .unwrap_or_else(|| unreachable!("lab already torn down"))
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        if let Some(lab) = self.lab.take()
            && let Err(e) = lab.down()
        {
            eprintln!("teardown of {} incomplete: {e}", self.dir.display());
        }
        if std::thread::panicking() {
            eprintln!("lab directory kept for debugging: {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The state of a BGP neighbour as FRR reports it (`show bgp summary json`).
pub fn frr_bgp_state(lab: &Lab, node: &str, peer: &str) -> Result<String, LabError> {
    let v = lab.vtysh_json(node, "show bgp summary json")?;
    Ok(v["ipv4Unicast"]["peers"][peer]["state"]
        .as_str()
        .unwrap_or("absent")
        .to_string())
}

/// The BFD status of a peer as FRR reports it (`show bfd peers json`): "up", "down", ...
pub fn frr_bfd_status(lab: &Lab, node: &str, peer: &str) -> Result<String, LabError> {
    let v = lab.vtysh_json(node, "show bfd peers json")?;
    Ok(v.as_array()
        .and_then(|a| a.iter().find(|p| p["peer"].as_str() == Some(peer)))
        .and_then(|p| p["status"].as_str())
        .unwrap_or("absent")
        .to_string())
}

/// Waits until FRR on `node` has the BGP session to `peer` Established.
pub fn wait_established(
    lab: &Lab,
    node: &str,
    peer: &str,
    timeout: Duration,
) -> Result<Duration, LabError> {
    lab.wait_until(
        &format!("{node}: BGP to {peer} Established"),
        timeout,
        || Ok(frr_bgp_state(lab, node, peer)? == "Established"),
    )
}

/// A REST call to the ferrolb agent of `node` (through curl inside the node, on
/// 127.0.0.1:11111): the status and the JSON body (Null when it is not JSON).
pub fn rest(
    lab: &Lab,
    node: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let url = format!("http://127.0.0.1:11111/netlox/v1{path}");
    let mut argv = vec![
        "curl",
        "-s",
        "-m",
        "5",
        "-X",
        method,
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
    ];
    if body.is_some() {
        argv.extend([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            "@-",
        ]);
    }
    argv.push(&url);
    let Ok(out) = lab.exec_input(node, &argv, body.map(str::as_bytes)) else {
        return (0, serde_json::Value::Null);
    };
    let text = out.stdout.trim_end().to_string();
    let (payload, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    (
        code.trim().parse().unwrap_or(0),
        serde_json::from_str(payload).unwrap_or(serde_json::Value::Null),
    )
}

/// A rule on `node` through kube-loxilb's body (named `<protocol><port>:llb-inst0`): VIP:port
/// of `protocol` ("tcp", "udp") in NAT `mode` (0 DNAT, 1 one-arm, 2 full NAT) to `eps` on
/// `target`, round robin. Panics unless the agent answers 200 (it runs inside tests).
pub fn add_rule(
    lab: &Lab,
    node: &str,
    (vip, port, protocol): (&str, u16, &str),
    mode: u8,
    eps: &[&str],
    target: u16,
) {
    let body = serde_json::json!({
        "serviceArguments": {"externalIP": vip, "port": port, "protocol": protocol,
                             "sel": 0, "mode": mode, "name": format!("{protocol}{port}:llb-inst0")},
        "endpoints": eps.iter()
            .map(|ip| serde_json::json!({"endpointIP": ip, "targetPort": target, "weight": 1}))
            .collect::<Vec<_>>(),
    });
    let (st, v) = rest(
        lab,
        node,
        "POST",
        "/config/loadbalancer",
        Some(&body.to_string()),
    );
    assert_eq!(st, 200, "rule {vip}:{port}: {v}");
}

/// Makes a CA and node certificates (IP SAN 127.0.0.1) with the openssl CLI in `dir`.
/// Panics on failure (it runs inside tests).
#[allow(clippy::unwrap_used)]
pub fn certs(dir: &std::path::Path, ca: &str, nodes: &[&str]) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .unwrap();
    let ca_key = format!("{ca}.key");
    let ca_pem = format!("{ca}.pem");
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        &ca_key,
        "-out",
        &ca_pem,
        "-days",
        "2",
        "-subj",
        "/CN=ferrolb test CA",
    ]);
    for n in nodes {
        let (key, csr, pem) = (format!("{n}.key"), format!("{n}.csr"), format!("{n}.pem"));
        run(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={n}"),
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ]);
    }
}
