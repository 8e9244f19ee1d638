//! `Lab`: brings a topology up on network namespaces, runs commands in its nodes, injects
//! faults, and tears everything down (on `Drop` too).
//!
//! Order of `up`, per node and following `stages` (wait-for) and `startup-delay`:
//! create (network, mount and UTS namespaces, `lo` up, sysctls) -> create-links (veth pairs,
//! named exactly as the file says, TX checksum offload off like containerlab) -> configure (the
//! image's daemons or `cmd`, then `exec`) -> healthy (`healthcheck`) -> exit.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use crate::LabError;
use crate::expand::Magic;
use crate::ns::{self, MountPlan, NodeNs, NsFds, ProcInfo, ResolvedBind};
use crate::registry::{self, LabRecord};
use crate::topology::{Node, Phase, Stage, Topology};

/// How long one `exec` command may run before it is killed (a lab must never hang `up`).
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(120);
const FRR_INIT: &str = "/usr/lib/frr/frrinit.sh";
const BIRD_BIN: &str = "/usr/sbin/bird";
const BLACKHOLE_TABLE: &str = "ferrolab_blackhole";
const PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Options of [`Lab::up`] (and of finding a lab again).
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// Lab directory; default `clab-<name>` beside the topology file, as containerlab does.
    pub lab_dir: Option<PathBuf>,
    /// Replaces the file's `name` (tests use it to run a lab under a unique name).
    pub name: Option<String>,
    /// Variables for `${VAR}` expansion, looked up before the process environment.
    pub vars: BTreeMap<String, String>,
    /// Fail `up` when an `exec` command fails (containerlab only reports it).
    pub strict_exec: bool,
    pub exec_timeout: Duration,
}

impl Default for UpOptions {
    fn default() -> Self {
        UpOptions {
            lab_dir: None,
            name: None,
            vars: BTreeMap::new(),
            strict_exec: false,
            exec_timeout: DEFAULT_EXEC_TIMEOUT,
        }
    }
}

impl UpOptions {
    /// Loads the topology the way `up` would (same variables, same name override).
    pub fn load_topology(&self, path: &Path) -> Result<Topology, LabError> {
        let lookup = |k: &str| self.vars.get(k).cloned().or_else(|| std::env::var(k).ok());
        let mut topo = Topology::load_with(path, &lookup)?;
        if let Some(name) = &self.name {
            topo.name = name.clone();
        }
        Ok(topo)
    }
}

/// The result of one command run in a node.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub node: String,
    pub command: String,
    /// Exit code; -1 when killed by a signal, not started, or timed out.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

impl ExecOutput {
    pub fn success(&self) -> bool {
        self.code == 0 && !self.timed_out
    }
}

/// A running lab. Dropping it tears the lab down unless [`Lab::keep`] was called.
#[derive(Debug)]
pub struct Lab {
    topo: Topology,
    lab_dir: PathBuf,
    fds: BTreeMap<String, NsFds>,
    children: Mutex<Vec<Child>>,
    exec_log: Vec<ExecOutput>,
    exec_timeout: Duration,
    owned: bool,
}

impl Lab {
    /// Brings a topology up. A lab of the same name that is (partly) up is torn down first.
    /// On failure everything made so far is removed before the error is returned.
    pub fn up(path: impl AsRef<Path>, opts: UpOptions) -> Result<Lab, LabError> {
        require_root()?;
        // Daemons that detach (watchfrr, bird) are re-parented to us rather than to PID 1, so
        // teardown can reap them: no zombie outlives the lab even where PID 1 does not reap.
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        let topo = opts.load_topology(path.as_ref())?;
        let lab_dir = std::path::absolute(
            opts.lab_dir
                .clone()
                .unwrap_or_else(|| topo.dir.join(format!("clab-{}", topo.name))),
        )
        .map_err(|e| LabError::io("resolve the lab directory", e))?;
        // Everything that can be checked is checked before anything is made.
        let mut plans = BTreeMap::new();
        let mut warnings = topo.warnings.clone();
        for node in &topo.nodes {
            let (plan, w) = mount_plan(&topo, &lab_dir, node)?;
            warnings.extend(w);
            check_profile(node)?;
            plans.insert(node.name.clone(), plan);
        }
        for w in &warnings {
            tracing::warn!("{w}");
        }
        destroy(&topo.name, Some(&topo))?;
        ns::ensure_ns_dir()?;
        for (dir, user) in [("/run/frr", "frr"), ("/run/bird", "bird")] {
            // Mount points for the nodes' private tmpfs; the packages' own tmpfiles.d would
            // make these at boot under systemd, which these machines do not run.
            if nix::unistd::User::from_name(user).ok().flatten().is_some() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| LabError::io(format!("create {dir}"), e))?;
            }
        }
        let record = LabRecord {
            name: topo.name.clone(),
            topology: topo.file.clone(),
            lab_dir: lab_dir.clone(),
            nodes: topo
                .nodes
                .iter()
                .map(|n| (n.name.clone(), topo.namespace_of(&n.name)))
                .collect(),
            created_unix_s: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        registry::save(&record)?;
        let mut lab = Lab {
            topo,
            lab_dir,
            fds: BTreeMap::new(),
            children: Mutex::new(Vec::new()),
            exec_log: Vec::new(),
            exec_timeout: opts.exec_timeout,
            owned: true,
        };
        match lab.run_stages(&plans, opts.strict_exec) {
            Ok(()) => Ok(lab),
            Err(e) => {
                if let Err(td) = lab.teardown() {
                    tracing::error!("cleanup after the failed up was incomplete: {td}");
                }
                Err(e)
            }
        }
    }

    /// Finds a lab that is up (made by this or another process). The returned handle does not
    /// own the lab: dropping it leaves the lab up.
    pub fn attach(path: impl AsRef<Path>, opts: &UpOptions) -> Result<Lab, LabError> {
        let topo = opts.load_topology(path.as_ref())?;
        let rec = registry::load(&topo.name)?.ok_or_else(|| LabError::NotUp(topo.name.clone()))?;
        let mut fds = BTreeMap::new();
        for (node, netns) in &rec.nodes {
            fds.insert(node.clone(), NsFds::open(&NodeNs::new(netns))?);
        }
        Ok(Lab {
            topo,
            lab_dir: rec.lab_dir,
            fds,
            children: Mutex::new(Vec::new()),
            exec_log: Vec::new(),
            exec_timeout: opts.exec_timeout,
            owned: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.topo.name
    }
    pub fn topology(&self) -> &Topology {
        &self.topo
    }
    pub fn lab_dir(&self) -> &Path {
        &self.lab_dir
    }
    /// The node's directory; its `log/` is the node's `/var/log`.
    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.lab_dir.join(node)
    }
    pub fn log_dir(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("log")
    }
    /// The network namespace of a node (`clab-<lab>-<node>`).
    pub fn namespace(&self, node: &str) -> Result<String, LabError> {
        self.topo
            .node(node)
            .map(|n| self.topo.namespace_of(&n.name))
            .ok_or_else(|| self.unknown_node(node))
    }
    /// Output of every command `up` ran (daemon start, `exec`, stage commands), in order.
    pub fn exec_log(&self) -> &[ExecOutput] {
        &self.exec_log
    }

    /// Leaves the lab up when this handle is dropped.
    pub fn keep(mut self) {
        self.owned = false;
    }

    fn unknown_node(&self, node: &str) -> LabError {
        LabError::Invalid(format!(
            "lab {}: no node named '{node}' (nodes: {})",
            self.topo.name,
            self.topo
                .nodes
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }

    fn node_fds(&self, node: &str) -> Result<&NsFds, LabError> {
        self.fds.get(node).ok_or_else(|| self.unknown_node(node))
    }

    fn node_env(&self, node: &Node) -> Vec<(String, String)> {
        let magic = Magic {
            lab: &self.topo.name,
            lab_dir: &self.lab_dir,
            node: &node.name,
        };
        let intfs = self
            .topo
            .links
            .iter()
            .flat_map(|l| [&l.a, &l.b])
            .filter(|e| e.node == node.name)
            .count();
        let mut env = vec![
            ("PATH".to_string(), PATH_ENV.to_string()),
            ("HOME".to_string(), "/root".to_string()),
            ("HOSTNAME".to_string(), node.name.clone()),
            ("CLAB_INTFS".to_string(), intfs.to_string()),
        ];
        env.extend(node.env.iter().map(|(k, v)| (k.clone(), magic.apply(v))));
        env
    }

    /// Builds a command that runs inside `node`.
    fn node_command(&self, node: &str, argv: &[String], detach: bool) -> Result<Command, LabError> {
        let n = self
            .topo
            .node(node)
            .ok_or_else(|| self.unknown_node(node))?;
        let (prog, args) = argv
            .split_first()
            .ok_or_else(|| LabError::Invalid("empty command".into()))?;
        let mut cmd = Command::new(prog);
        cmd.args(args).env_clear().envs(self.node_env(n));
        self.node_fds(node)?
            .enter(&mut cmd, Path::new("/"), detach)?;
        Ok(cmd)
    }

    /// Runs a command in a node and waits for it (at most the exec timeout).
    pub fn exec<S: AsRef<str>>(&self, node: &str, argv: &[S]) -> Result<ExecOutput, LabError> {
        self.exec_input(node, argv, None)
    }

    /// Like [`Lab::exec`], with data on the command's standard input.
    pub fn exec_input<S: AsRef<str>>(
        &self,
        node: &str,
        argv: &[S],
        input: Option<&[u8]>,
    ) -> Result<ExecOutput, LabError> {
        let argv: Vec<String> = argv.iter().map(|s| s.as_ref().to_string()).collect();
        let cmd = self.node_command(node, &argv, false)?;
        run_captured(
            node,
            &shlex::try_join(argv.iter().map(String::as_str)).unwrap_or_default(),
            cmd,
            input,
            self.exec_timeout,
        )
    }

    /// Runs a command in a node; its standard output, or an error with its stderr.
    pub fn exec_ok<S: AsRef<str>>(&self, node: &str, argv: &[S]) -> Result<String, LabError> {
        let out = self.exec(node, argv)?;
        if out.success() {
            Ok(out.stdout)
        } else {
            Err(LabError::Exec(Box::new(out)))
        }
    }

    /// Runs a command with the caller's stdin/stdout/stderr; returns its exit code.
    pub fn exec_interactive<S: AsRef<str>>(&self, node: &str, argv: &[S]) -> Result<i32, LabError> {
        let argv: Vec<String> = argv.iter().map(|s| s.as_ref().to_string()).collect();
        let mut cmd = self.node_command(node, &argv, false)?;
        if let Ok(term) = std::env::var("TERM") {
            cmd.env("TERM", term);
        }
        let status = cmd
            .status()
            .map_err(|e| LabError::io(format!("node {node}: run {}", argv[0]), e))?;
        Ok(status
            .code()
            .unwrap_or(128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)))
    }

    /// Starts a long-lived process in a node. Its stdout and stderr go to
    /// `<node dir>/log/<name>.log` (the node's `/var/log/<name>.log`). Returns its pid.
    pub fn spawn<S: AsRef<str>>(
        &self,
        node: &str,
        name: &str,
        argv: &[S],
    ) -> Result<u32, LabError> {
        let argv: Vec<String> = argv.iter().map(|s| s.as_ref().to_string()).collect();
        if name.is_empty() || name.contains('/') {
            return Err(LabError::Invalid(format!(
                "process name '{name}' must be a plain file name"
            )));
        }
        let log_path = self.log_dir(node).join(format!("{name}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| LabError::io(format!("open {}", log_path.display()), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| LabError::io(format!("dup {}", log_path.display()), e))?;
        let mut cmd = self.node_command(node, &argv, true)?;
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
        let child = cmd.spawn().map_err(|e| {
            LabError::io(
                format!(
                    "node {node}: start {} ({})",
                    argv[0],
                    shlex::try_join(argv.iter().map(String::as_str)).unwrap_or_default()
                ),
                e,
            )
        })?;
        let pid = child.id();
        self.children
            .lock()
            .map_err(|_| LabError::Invalid("process list poisoned".into()))?
            .push(child);
        Ok(pid)
    }

    /// Polls `cond` every 20 ms until it returns true; the time it took, or a timeout error
    /// naming `what`. An error from `cond` is kept and reported if the time runs out.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut() -> Result<bool, LabError>,
    ) -> Result<Duration, LabError> {
        let start = Instant::now();
        let mut last_err = None;
        loop {
            match cond() {
                Ok(true) => return Ok(start.elapsed()),
                Ok(false) => {}
                Err(e) => last_err = Some(e.to_string()),
            }
            if start.elapsed() >= timeout {
                return Err(LabError::Timeout {
                    what: what.to_string(),
                    after: timeout,
                    last_error: last_err,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sets a node's interface administratively down (the peer sees carrier loss).
    pub fn link_down(&self, node: &str, iface: &str) -> Result<(), LabError> {
        self.exec_ok(node, &["ip", "link", "set", iface, "down"])
            .map(drop)
    }

    pub fn link_up(&self, node: &str, iface: &str) -> Result<(), LabError> {
        self.exec_ok(node, &["ip", "link", "set", iface, "up"])
            .map(drop)
    }

    /// Drops every IPv4/IPv6 packet into and out of the node with nftables (loopback and ARP
    /// untouched): the node looks silently dead to its peers. A TC/XDP program on the node
    /// (ferrolb's datapath) sees packets before netfilter and keeps forwarding: to kill such a
    /// node, cut its links from the other side.
    pub fn blackhole(&self, node: &str) -> Result<(), LabError> {
        let script = format!(
            "table inet {BLACKHOLE_TABLE}\ndelete table inet {BLACKHOLE_TABLE}\n\
             table inet {BLACKHOLE_TABLE} {{\n\
               chain in {{ type filter hook prerouting priority -500; policy drop; iifname \"lo\" accept; }}\n\
               chain out {{ type filter hook output priority -500; policy drop; oifname \"lo\" accept; }}\n\
             }}\n"
        );
        let out = self.exec_input(node, &["nft", "-f", "-"], Some(script.as_bytes()))?;
        if out.success() {
            Ok(())
        } else {
            Err(LabError::Exec(Box::new(out)))
        }
    }

    /// Removes a [`Lab::blackhole`].
    pub fn restore(&self, node: &str) -> Result<(), LabError> {
        self.exec_ok(node, &["nft", "delete", "table", "inet", BLACKHOLE_TABLE])
            .map(drop)
    }

    /// Processes running in a node (its network or mount namespace).
    pub fn processes(&self, node: &str) -> Result<Vec<ProcInfo>, LabError> {
        let ns = NodeNs::new(self.namespace(node)?);
        Ok(ns::processes_in(ns.net_inode(), ns.mnt_inode()))
    }

    /// Kills (SIGKILL) every process of `node` whose command name is `process`; how many.
    pub fn kill(&self, node: &str, process: &str) -> Result<usize, LabError> {
        let victims: Vec<ProcInfo> = self
            .processes(node)?
            .into_iter()
            .filter(|p| p.comm == process)
            .collect();
        if victims.is_empty() {
            return Err(LabError::Invalid(format!(
                "node {node}: no process named '{process}'"
            )));
        }
        for p in &victims {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        self.reap();
        Ok(victims.len())
    }

    /// `vtysh -c CMD` in an FRR node, parsed as JSON.
    pub fn vtysh_json(&self, node: &str, command: &str) -> Result<serde_json::Value, LabError> {
        let out = self.exec_ok(node, &["vtysh", "-c", command])?;
        serde_json::from_str(&out).map_err(|e| {
            LabError::Invalid(format!(
                "node {node}: '{command}' did not print JSON ({e}): {}",
                out.trim()
            ))
        })
    }

    fn reap(&self) {
        if let Ok(mut children) = self.children.lock() {
            children.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
        }
    }

    /// Tears the lab down now (what `Drop` does), reporting anything that could not be removed.
    pub fn down(mut self) -> Result<(), LabError> {
        self.owned = false;
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), LabError> {
        self.fds.clear();
        let result = destroy(&self.topo.name, Some(&self.topo));
        if let Ok(mut children) = self.children.lock() {
            for c in children.iter_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
            children.clear();
        }
        result
    }

    // ---- up -------------------------------------------------------------------------------

    fn run_stages(
        &mut self,
        plans: &BTreeMap<String, MountPlan>,
        strict: bool,
    ) -> Result<(), LabError> {
        let nodes: Vec<Node> = self.topo.nodes.clone();
        let index: BTreeMap<&str, usize> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.as_str(), i))
            .collect();
        let stages = Stage::ALL;
        // deps[(node, stage)] = items that must be done first.
        let mut deps: BTreeMap<(usize, Stage), BTreeSet<(usize, Stage)>> = BTreeMap::new();
        for (i, n) in nodes.iter().enumerate() {
            for (si, s) in stages.iter().enumerate() {
                let d = deps.entry((i, *s)).or_default();
                if si > 0 {
                    d.insert((i, stages[si - 1]));
                }
                if let Some(spec) = n.stages.get(s) {
                    for w in &spec.wait_for {
                        d.insert((index[w.node.as_str()], w.stage));
                    }
                }
            }
        }
        for l in &self.topo.links {
            let (a, b) = (index[l.a.node.as_str()], index[l.b.node.as_str()]);
            if a != b {
                deps.entry((a, Stage::Configure))
                    .or_default()
                    .insert((b, Stage::CreateLinks));
                deps.entry((b, Stage::Configure))
                    .or_default()
                    .insert((a, Stage::CreateLinks));
            }
        }
        let t0 = Instant::now();
        let not_before = |item: &(usize, Stage)| -> Instant {
            if item.1 == Stage::Configure {
                t0 + nodes[item.0].startup_delay
            } else {
                t0
            }
        };
        let mut done: BTreeSet<(usize, Stage)> = BTreeSet::new();
        while done.len() < deps.len() {
            let next = deps
                .iter()
                .filter(|(item, d)| !done.contains(*item) && d.iter().all(|x| done.contains(x)))
                .map(|(item, _)| *item)
                .min_by_key(|item| (not_before(item), item.1, item.0));
            let Some(item) = next else {
                let stuck: BTreeSet<&str> = deps
                    .keys()
                    .filter(|i| !done.contains(*i))
                    .map(|i| nodes[i.0].name.as_str())
                    .collect();
                return Err(LabError::Invalid(format!(
                    "{}: stages: wait-for dependencies form a cycle among nodes {}",
                    self.topo.file.display(),
                    stuck.into_iter().collect::<Vec<_>>().join(", ")
                )));
            };
            let wait = not_before(&item).saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                tracing::info!(
                    "node {}: startup-delay, waiting {:?}",
                    nodes[item.0].name,
                    wait
                );
                std::thread::sleep(wait);
            }
            let node = &nodes[item.0];
            self.run_stage_commands(node, item.1, Phase::OnEnter, strict)?;
            match item.1 {
                Stage::Create => self.create_node(node, &plans[&node.name])?,
                Stage::CreateLinks => {
                    let entered: BTreeSet<&str> = done
                        .iter()
                        .filter(|(_, s)| *s == Stage::CreateLinks)
                        .map(|(i, _)| nodes[*i].name.as_str())
                        .collect();
                    for l in self.topo.links.clone() {
                        let peer = if l.a.node == node.name {
                            &l.b.node
                        } else if l.b.node == node.name {
                            &l.a.node
                        } else {
                            continue;
                        };
                        if peer == &node.name || entered.contains(peer.as_str()) {
                            self.create_link(&l)?;
                        }
                    }
                }
                Stage::Configure => self.configure_node(node, strict)?,
                Stage::Healthy => self.wait_healthy(node)?,
                Stage::Exit => {}
            }
            self.run_stage_commands(node, item.1, Phase::OnExit, strict)?;
            done.insert(item);
        }
        Ok(())
    }

    fn create_node(&mut self, node: &Node, plan: &MountPlan) -> Result<(), LabError> {
        let nsname = self.topo.namespace_of(&node.name);
        let ns = NodeNs::new(&nsname);
        // The node directory starts empty, like a fresh container.
        let dir = self.node_dir(&node.name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| LabError::io(format!("clear {}", dir.display()), e))?;
        }
        for d in [plan.etc_upper(), plan.etc_work(), plan.log_dir()] {
            std::fs::create_dir_all(&d)
                .map_err(|e| LabError::io(format!("create {}", d.display()), e))?;
        }
        for user in ["frr", "bird"] {
            if let Ok(Some(u)) = nix::unistd::User::from_name(user) {
                let d = plan.log_dir().join(user);
                std::fs::create_dir_all(&d)
                    .map_err(|e| LabError::io(format!("create {}", d.display()), e))?;
                nix::unistd::chown(&d, Some(u.uid), Some(u.gid))
                    .map_err(|e| LabError::sys(format!("chown {}", d.display()), e))?;
            }
        }
        ns::run(
            &format!("node {}: create network namespace {nsname}", node.name),
            Command::new("ip").args(["netns", "add", &nsname]),
        )?;
        ns::create_node_namespaces(&ns, plan)?;
        self.fds.insert(node.name.clone(), NsFds::open(&ns)?);
        ns::run(
            &format!("node {}: set lo up", node.name),
            Command::new("ip").args(["-n", &nsname, "link", "set", "lo", "up"]),
        )?;
        // Docker hosts forward; containerlab turns IPv6 on in linux nodes. Node sysctls win.
        let mut sysctls: BTreeMap<String, String> = BTreeMap::from([
            ("net.ipv4.ip_forward".to_string(), "1".to_string()),
            (
                "net.ipv6.conf.all.disable_ipv6".to_string(),
                "0".to_string(),
            ),
        ]);
        sysctls.extend(node.sysctls.clone());
        let mut argv = vec!["sysctl".to_string(), "-q".to_string(), "-w".to_string()];
        argv.extend(sysctls.iter().map(|(k, v)| format!("{k}={v}")));
        let out = self.exec(&node.name, &argv)?;
        if !out.success() {
            return Err(LabError::Invalid(format!(
                "node {}: sysctls: {}",
                node.name,
                out.stderr.trim()
            )));
        }
        Ok(())
    }

    fn create_link(&mut self, l: &crate::topology::Link) -> Result<(), LabError> {
        let (na, nb) = (
            self.topo.namespace_of(&l.a.node),
            self.topo.namespace_of(&l.b.node),
        );
        let mtu = l.mtu.to_string();
        let mut args: Vec<&str> = vec!["link", "add", "name", &l.a.interface];
        if let Some(mac) = &l.a.mac {
            args.extend(["address", mac]);
        }
        args.extend([
            "mtu",
            &mtu,
            "netns",
            &na,
            "type",
            "veth",
            "peer",
            "name",
            &l.b.interface,
        ]);
        if let Some(mac) = &l.b.mac {
            args.extend(["address", mac]);
        }
        args.extend(["mtu", &mtu, "netns", &nb]);
        ns::run(
            &format!("link {} <-> {}", l.a, l.b),
            Command::new("ip").args(&args),
        )?;
        for e in [&l.a, &l.b] {
            // containerlab turns TX checksum offload off on every veth end.
            let out = self.exec(&e.node, &["ethtool", "-K", &e.interface, "tx", "off"])?;
            if !out.success() {
                return Err(LabError::Invalid(format!(
                    "{e}: ethtool -K tx off: {}",
                    out.stderr.trim()
                )));
            }
            self.exec_ok(&e.node, &["ip", "link", "set", &e.interface, "up"])?;
        }
        Ok(())
    }

    fn configure_node(&mut self, node: &Node, strict: bool) -> Result<(), LabError> {
        let (lab, lab_dir) = (self.topo.name.clone(), self.lab_dir.clone());
        let magic = Magic {
            lab: &lab,
            lab_dir: &lab_dir,
            node: &node.name,
        };
        match profile(node) {
            Profile::Command(line) => {
                let line = magic.apply(&line);
                let argv = shlex::split(&line).ok_or_else(|| {
                    LabError::Invalid(format!(
                        "node {}: cmd '{line}' has unbalanced quotes",
                        node.name
                    ))
                })?;
                if !argv.is_empty() {
                    self.spawn(&node.name, "cmd", &argv)?;
                }
            }
            Profile::Frr => {
                let out = self.exec(&node.name, &[FRR_INIT, "start"])?;
                let ok = out.success();
                self.exec_log.push(out.clone());
                if !ok {
                    return Err(LabError::Exec(Box::new(out)));
                }
            }
            Profile::Bird => {
                let out = self.exec(
                    &node.name,
                    &[
                        BIRD_BIN,
                        "-c",
                        "/etc/bird/bird.conf",
                        "-s",
                        "/run/bird/bird.ctl",
                        "-P",
                        "/run/bird/bird.pid",
                    ],
                )?;
                let ok = out.success();
                self.exec_log.push(out.clone());
                if !ok {
                    return Err(LabError::Exec(Box::new(out)));
                }
            }
            Profile::Plain => {}
        }
        for line in &node.exec {
            self.run_exec_line(node, &magic.apply(line), strict)?;
        }
        Ok(())
    }

    fn run_stage_commands(
        &mut self,
        node: &Node,
        stage: Stage,
        phase: Phase,
        strict: bool,
    ) -> Result<(), LabError> {
        let Some(spec) = node.stages.get(&stage) else {
            return Ok(());
        };
        // There is no node before `create`: its on-enter commands run with its on-exit ones.
        let effective = |p: Phase| {
            if stage == Stage::Create {
                Phase::OnExit
            } else {
                p
            }
        };
        if effective(phase) != phase {
            return Ok(());
        }
        let magic = Magic {
            lab: &self.topo.name,
            lab_dir: &self.lab_dir,
            node: &node.name,
        };
        let lines: Vec<String> = spec
            .exec
            .iter()
            .filter(|e| effective(e.phase) == phase)
            .map(|e| magic.apply(&e.command))
            .collect();
        for line in lines {
            self.run_exec_line(node, &line, strict)?;
        }
        Ok(())
    }

    /// One `exec` line: split like a shell would, run without a shell (containerlab).
    fn run_exec_line(&mut self, node: &Node, line: &str, strict: bool) -> Result<(), LabError> {
        let out = match shlex::split(line) {
            Some(argv) if !argv.is_empty() => self.exec(&node.name, &argv)?,
            _ => ExecOutput {
                node: node.name.clone(),
                command: line.to_string(),
                code: -1,
                stdout: String::new(),
                stderr: "cannot split the command (unbalanced quotes?)".into(),
                timed_out: false,
            },
        };
        let out = ExecOutput {
            command: line.to_string(),
            ..out
        };
        if !out.success() {
            tracing::warn!(
                "node {}: exec '{}' failed ({}): {}",
                node.name,
                line,
                out.code,
                out.stderr.trim()
            );
        }
        self.exec_log.push(out.clone());
        if strict && !out.success() {
            return Err(LabError::Exec(Box::new(out)));
        }
        Ok(())
    }

    fn wait_healthy(&mut self, node: &Node) -> Result<(), LabError> {
        let Some(hc) = node.healthcheck.clone() else {
            return Ok(());
        };
        std::thread::sleep(hc.start_period);
        let mut failures = 0;
        loop {
            let cmd = self.node_command(&node.name, &hc.argv, false)?;
            let out = run_captured(&node.name, &hc.argv.join(" "), cmd, None, hc.timeout)?;
            if out.success() {
                return Ok(());
            }
            failures += 1;
            if failures >= hc.retries {
                return Err(LabError::Invalid(format!(
                    "node {}: healthcheck failed {failures} times: {}",
                    node.name,
                    out.stderr.trim()
                )));
            }
            std::thread::sleep(hc.interval);
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.owned {
            if let Err(e) = self.teardown() {
                tracing::error!("lab {}: teardown incomplete: {e}", self.topo.name);
            }
        } else {
            self.reap();
        }
    }
}

/// What a node runs at start, as its image would.
enum Profile {
    /// `cmd`/`entrypoint` set: run that (an FRR image with `cmd` does not autostart FRR).
    Command(String),
    Frr,
    Bird,
    Plain,
}

fn profile(node: &Node) -> Profile {
    if node.cmd.is_some() || node.entrypoint.is_some() {
        let line = [node.entrypoint.as_deref(), node.cmd.as_deref()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" ");
        return Profile::Command(line);
    }
    let image = node.image.as_deref().unwrap_or("").to_ascii_lowercase();
    // The repository part only: "quay.io/frrouting/frr:9.1" -> "quay.io/frrouting/frr".
    let repo = image
        .rsplit_once(':')
        .filter(|(_, tag)| !tag.contains('/'))
        .map_or(image.as_str(), |(r, _)| r);
    let last = repo.rsplit('/').next().unwrap_or(repo);
    if last.contains("frr") {
        Profile::Frr
    } else if last.contains("bird") {
        Profile::Bird
    } else {
        Profile::Plain
    }
}

fn check_profile(node: &Node) -> Result<(), LabError> {
    let (bin, pkg) = match profile(node) {
        Profile::Frr => (FRR_INIT, "frr"),
        Profile::Bird => (BIRD_BIN, "bird2"),
        _ => return Ok(()),
    };
    if Path::new(bin).exists() {
        Ok(())
    } else {
        Err(LabError::Invalid(format!(
            "node {}: image '{}' needs {bin}, which is not installed (apt-get install {pkg})",
            node.name,
            node.image.as_deref().unwrap_or("")
        )))
    }
}

/// Resolves a node's binds and returns its mount plan plus warnings for binds it cannot honour.
fn mount_plan(
    topo: &Topology,
    lab_dir: &Path,
    node: &Node,
) -> Result<(MountPlan, Vec<String>), LabError> {
    let magic = Magic {
        lab: &topo.name,
        lab_dir,
        node: &node.name,
    };
    let node_dir = lab_dir.join(&node.name);
    let mut binds = Vec::new();
    let mut warnings = Vec::new();
    for (i, b) in node.binds.iter().enumerate() {
        let key = format!("topology.nodes.{}.binds[{i}]", node.name);
        let src = magic.apply(&b.source);
        let src = match src.strip_prefix("~/") {
            Some(rest) => {
                PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(rest)
            }
            None => topo.dir.join(&src),
        };
        let target = PathBuf::from(magic.apply(&b.target));
        let create_target = if target.starts_with("/var/log") {
            !node_dir
                .join("log")
                .join(target.strip_prefix("/var/log").unwrap_or(&target))
                .exists()
        } else if target.starts_with("/etc") {
            !target.exists()
        } else if target.exists() {
            false
        } else {
            warnings.push(format!(
                "node {}: {key}: ignored: target {} does not exist on this host and is outside /etc and /var/log, \
                 so ferrolab cannot create it without changing the host",
                node.name,
                target.display()
            ));
            continue;
        };
        let md = std::fs::metadata(&src).map_err(|e| {
            LabError::Topology(crate::TopologyError::Invalid {
                file: topo.file.display().to_string(),
                key: key.clone(),
                reason: format!("node {}: source {}: {e}", node.name, src.display()),
            })
        })?;
        binds.push(ResolvedBind {
            source: src,
            target,
            read_only: b.read_only,
            source_is_dir: md.is_dir(),
            create_target,
            key,
        });
    }
    Ok((
        MountPlan {
            hostname: node.name.clone(),
            node_dir,
            binds,
        },
        warnings,
    ))
}

fn require_root() -> Result<(), LabError> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(LabError::Invalid(
            "ferrolab needs root (network namespaces, mounts and veth pairs)".into(),
        ))
    }
}

/// Removes everything of lab `name`: processes, mount/UTS/network namespaces (and with them
/// every veth and mount), then its record. Finds the nodes from the record and, when given,
/// the topology, so a half-made lab is removed too. Safe to call when nothing is up.
pub fn destroy(name: &str, topo: Option<&Topology>) -> Result<(), LabError> {
    let mut nodes: BTreeSet<String> = BTreeSet::new();
    if let Some(rec) = registry::load(name)? {
        nodes.extend(rec.nodes.into_iter().map(|(_, ns)| ns));
    }
    if let Some(t) = topo {
        nodes.extend(t.nodes.iter().map(|n| t.namespace_of(&n.name)));
    }
    let nss: Vec<NodeNs> = nodes.into_iter().map(NodeNs::new).collect();
    let mut problems = Vec::new();
    let pids: Vec<i32> = processes_of(&nss).iter().map(|p| p.pid).collect();
    kill_processes(&nss);
    reap_pids(&pids);
    for ns in &nss {
        problems.extend(ns::destroy_node_namespaces(ns));
    }
    let leftover = processes_of(&nss);
    if !leftover.is_empty() {
        problems.push(format!(
            "processes still alive: {}",
            leftover
                .iter()
                .map(|p| format!("{}({})", p.comm, p.pid))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if problems.is_empty() {
        registry::remove(name)?;
        Ok(())
    } else {
        Err(LabError::Teardown {
            lab: name.to_string(),
            problems,
        })
    }
}

fn processes_of(nss: &[NodeNs]) -> Vec<ProcInfo> {
    nss.iter()
        .flat_map(|ns| ns::processes_in(ns.net_inode(), ns.mnt_inode()))
        .collect()
}

/// Reaps the given pids where they are our children (re-parented to us as subreaper): waits up
/// to 500 ms in all for each to finish exiting. Others answer ECHILD and are left alone.
fn reap_pids(pids: &[i32]) {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let deadline = Instant::now() + Duration::from_millis(500);
    for &pid in pids {
        loop {
            match waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                _ => break,
            }
        }
    }
}

/// SIGTERM to every process of the nodes, SIGKILL to what is left after 3 s.
fn kill_processes(nss: &[NodeNs]) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    for (signal, grace) in [
        (Signal::SIGTERM, Duration::from_secs(3)),
        (Signal::SIGKILL, Duration::from_secs(2)),
    ] {
        let procs = processes_of(nss);
        if procs.is_empty() {
            return;
        }
        for p in &procs {
            let _ = kill(Pid::from_raw(p.pid), signal);
        }
        let start = Instant::now();
        while start.elapsed() < grace && !processes_of(nss).is_empty() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs `cmd`, capturing output in anonymous files (a daemon that keeps our stdout open can
/// then not hang us), feeding `input`, and killing it after `timeout`.
fn run_captured(
    node: &str,
    command: &str,
    mut cmd: Command,
    input: Option<&[u8]>,
    timeout: Duration,
) -> Result<ExecOutput, LabError> {
    let anon = || {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .mode(0o600)
            .open("/tmp")
            .map_err(|e| LabError::io("create an anonymous file in /tmp", e))
    };
    let (mut out_f, mut err_f) = (anon()?, anon()?);
    cmd.stdout(out_f.try_clone().map_err(|e| LabError::io("dup", e))?)
        .stderr(err_f.try_clone().map_err(|e| LabError::io("dup", e))?)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Ok(ExecOutput {
                node: node.to_string(),
                command: command.to_string(),
                code: -1,
                stdout: String::new(),
                stderr: format!("cannot start: {e}"),
                timed_out: false,
            });
        }
    };
    if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        });
    }
    let start = Instant::now();
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if start.elapsed() >= timeout => {
                timed_out = true;
                let _ = child.kill();
                break child.wait().ok();
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => {
                return Err(LabError::io(
                    format!("node {node}: wait for '{command}'"),
                    e,
                ));
            }
        }
    };
    let read = |f: &mut File| -> String {
        let mut s = Vec::new();
        let _ = f.rewind();
        let _ = f.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    };
    Ok(ExecOutput {
        node: node.to_string(),
        command: command.to_string(),
        code: status.and_then(|s| s.code()).unwrap_or(-1),
        stdout: read(&mut out_f),
        stderr: if timed_out {
            format!("{}\n(killed after {:?})", read(&mut err_f), timeout)
        } else {
            read(&mut err_f)
        },
        timed_out,
    })
}
