//! Endpoint-probe benchmark (root; `cargo bench --bench health [-- SECONDS]`). Not a test: it
//! measures and prints a JSON summary against a baseline measured in the same run.
//!
//! 10,016 endpoints (313 rules x 32, kube-loxilb's bodies with `Monitor: true`: TCP connect
//! probes every second, ferrolb's defaults) probed by one agent, in a network namespace of the
//! benchmark's own where 10.99.0.0/16 is local (one `local` route) and one listener accepts
//! every connection (an acceptor thread in Python: it runs in both measurements and is part of
//! the load the 2 cores share). Measured over the window: the agent's CPU (utime + stime from
//! `/proc`) as a share of one core, and its probes' start delay (the
//! `ferrolb_probe_start_delay_total` buckets: how late after its schedule each probe began).
//! Baseline, same namespace, same targets, same window: a minimal asyncio prober in Python
//! (connect, close, every target once a second at a hashed phase) — what the cheapest
//! scripted health checker costs.
#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

const FERROLB: &str = env!("CARGO_BIN_EXE_ferrolb");
const RULES: usize = 313;
const PER_RULE: usize = 32;

struct Bench {
    ns: String,
    dir: std::path::PathBuf,
    procs: Vec<Child>,
}

impl Drop for Bench {
    fn drop(&mut self) {
        for c in &mut self.procs {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const ACCEPTOR: &str = r#"
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080)); s.listen(4096)
while True:
    c, _ = s.accept(); c.close()
"#;

/// Posts the rules from inside the namespace (the API listens there).
const POSTER: &str = r#"
import json, sys, urllib.request
rules, per = int(sys.argv[1]), int(sys.argv[2])
for r in range(rules):
    eps = []
    for e in range(per):
        i = r * per + e
        eps.append({"endpointIP": "10.99.%d.%d" % (i // 250, 1 + i % 250), "targetPort": 8080, "weight": 1, "state": "", "counter": ""})
    body = {"serviceArguments": {"externalIP": "203.0.113.10", "privateIP": "", "port": 10000 + r, "protocol": "tcp",
            "sel": 0, "mode": 2, "BGP": False, "Monitor": True, "inactiveTimeOut": 1800, "block": 0, "managed": True,
            "probetype": "", "probeport": 0, "probereq": "", "proberesp": "", "name": "default_svc%d:llb-inst0" % r},
            "secondaryIPs": [], "allowedSources": [], "endpoints": eps}
    req = urllib.request.Request("http://127.0.0.1:11111/netlox/v1/config/loadbalancer", data=json.dumps(body).encode(), method="POST")
    urllib.request.urlopen(req, timeout=10).read()
"#;

/// The baseline prober: every target once a second at a hashed phase, connect then close.
const BASELINE: &str = r#"
import asyncio, json, sys, time, zlib
n, seconds = int(sys.argv[1]), float(sys.argv[2])
targets = ["10.99.%d.%d" % (i // 250, 1 + i % 250) for i in range(n)]
start = time.monotonic()
delays = []
async def probe(ip):
    t0 = start + (zlib.crc32(ip.encode()) % 1000) / 1000
    k = 0
    while True:
        due = t0 + k
        now = time.monotonic()
        if due > now: await asyncio.sleep(due - now)
        if due - start > 2: delays.append(time.monotonic() - due)
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(ip, 8080), 0.75)
            w.transport.abort()
        except Exception:
            pass
        k += 1
async def main():
    tasks = [asyncio.create_task(probe(ip)) for ip in targets]
    await asyncio.sleep(seconds)
    d = max(len(delays), 1)
    within = {ms: round(sum(1 for x in delays if x * 1000 <= int(ms)) / d, 3) for ms in ["1", "5", "10", "25", "100"]}
    print(json.dumps({"probes_per_s": round(len(delays) / (seconds - 2)), "start_delay_within_ms": within}))
asyncio.run(main())
"#;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {out:?}");
}

fn in_ns(ns: &str, argv: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).args(argv);
    c
}

/// utime + stime of a process, in seconds.
fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    // Fields 14 and 15 of stat (utime, stime) are 12 and 13 after the command.
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn scrape(ns: &str) -> String {
    let out = in_ns(
        ns,
        &["curl", "-s", "-m", "10", "http://127.0.0.1:11111/metrics"],
    )
    .output()
    .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of a series (`name{labels}` as printed) in a scrape.
fn series(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn active_endpoints(ns: &str) -> usize {
    let out = in_ns(
        ns,
        &[
            "curl",
            "-s",
            "-m",
            "20",
            "http://127.0.0.1:11111/netlox/v1/config/loadbalancer/all",
        ],
    )
    .output()
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["lbAttr"]
        .as_array()
        .map(|r| {
            r.iter()
                .flat_map(|r| r["endpoints"].as_array().cloned().unwrap_or_default())
                .filter(|e| e["state"] == "active")
                .count()
        })
        .unwrap_or(0)
}

fn main() {
    let seconds: f64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse::<f64>().ok())
        .unwrap_or(30.0)
        .max(10.0);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("health bench: needs root (network namespaces)");
        return;
    }
    let ns = format!("flbhb{}", std::process::id());
    let mut b = Bench {
        ns: ns.clone(),
        dir: std::env::temp_dir().join(&ns),
        procs: Vec::new(),
    };
    std::fs::create_dir_all(&b.dir).unwrap();
    ip(&["netns", "add", &ns]);
    ip(&["-n", &ns, "link", "set", "lo", "up"]);
    ip(&[
        "-n",
        &ns,
        "route",
        "add",
        "local",
        "10.99.0.0/16",
        "dev",
        "lo",
    ]);
    b.procs.push(
        in_ns(&ns, &["python3", "-c", ACCEPTOR])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let n = RULES * PER_RULE;

    // Baseline first (nothing else running but the acceptor). Its CPU is sampled while it
    // runs, from 2 s in (after its tasks started) to 1 s before its window ends.
    let base = in_ns(
        &ns,
        &[
            "python3",
            "-c",
            BASELINE,
            &n.to_string(),
            &seconds.to_string(),
        ],
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let base_pid = base.id();
    std::thread::sleep(Duration::from_secs(2));
    let (c0, t0) = (cpu_s(base_pid), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(seconds - 3.0));
    let (c1, t1) = (cpu_s(base_pid), Instant::now());
    let base_share = (c1 - c0) / (t1 - t0).as_secs_f64();
    let out = base.wait_with_output().unwrap();
    let base_v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();

    // ferrolb.
    let agent = in_ns(&ns, &[FERROLB, "--config-path"])
        .arg(&b.dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let agent_pid = agent.id();
    b.procs.push(agent);
    let up = Instant::now();
    while in_ns(
        &ns,
        &[
            "curl",
            "-s",
            "-m",
            "1",
            "-o",
            "/dev/null",
            "http://127.0.0.1:11111/netlox/v1/config/loadbalancer/all",
        ],
    )
    .status()
    .map(|s| !s.success())
    .unwrap_or(true)
    {
        assert!(up.elapsed() < Duration::from_secs(30), "agent API");
        std::thread::sleep(Duration::from_millis(200));
    }
    let st = in_ns(
        &ns,
        &[
            "python3",
            "-c",
            POSTER,
            &RULES.to_string(),
            &PER_RULE.to_string(),
        ],
    )
    .status()
    .unwrap();
    assert!(st.success(), "posting the rules");
    let settle = Instant::now();
    while active_endpoints(&ns) < n {
        assert!(
            settle.elapsed() < Duration::from_secs(60),
            "endpoints did not all come up"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    std::thread::sleep(Duration::from_secs(3));
    let m0 = scrape(&ns);
    let (a0, w0) = (cpu_s(agent_pid), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let (a1, w1) = (cpu_s(agent_pid), Instant::now());
    let m1 = scrape(&ns);
    let wall = (w1 - w0).as_secs_f64();
    let agent_share = (a1 - a0) / wall;
    let d = |name: &str| series(&m1, name) - series(&m0, name);
    let probes = d("ferrolb_probes_total");
    let le = |ms: &str| {
        d(&format!(
            "ferrolb_probe_start_delay_total{{delay_le_ms=\"{ms}\"}}"
        ))
    };
    let total = le("inf").max(1.0);
    let frac = |ms: &str| (le(ms) / total * 1000.0).round() / 1000.0;
    println!(
        "{}",
        json!({
            "endpoints": n,
            "window_s": wall,
            "ferrolb": {
                "cpu_share_of_a_core": (agent_share * 1000.0).round() / 1000.0,
                "probes_per_s": (probes / wall).round(),
                "start_delay_within_ms": {"1": frac("1"), "5": frac("5"), "10": frac("10"), "25": frac("25"), "100": frac("100")},
                "late_total": d("ferrolb_probes_late_total"),
                "failures": d("ferrolb_probe_failures_total{reason=\"timeout\"}") + d("ferrolb_probe_failures_total{reason=\"refused\"}"),
            },
            "baseline_asyncio": {
                "cpu_share_of_a_core": (base_share * 1000.0).round() / 1000.0,
                "probes_per_s": base_v["probes_per_s"],
                "start_delay_within_ms": base_v["start_delay_within_ms"],
            },
            "cpu_ratio_ferrolb_to_baseline": (agent_share / base_share.max(1e-9) * 100.0).round() / 100.0,
            "cpu_us_per_probe": {
                "ferrolb": (agent_share / (probes / wall).max(1.0) * 1e6).round(),
                "baseline": (base_share / base_v["probes_per_s"].as_f64().unwrap_or(0.0).max(1.0) * 1e6).round(),
            },
            "bottleneck": "2 cores shared by the prober, the acceptor (Python, one accept per probe) and the kernel's TCP handshakes on lo",
        })
    );
}
