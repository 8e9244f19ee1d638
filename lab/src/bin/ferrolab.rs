//! `ferrolab`: brings containerlab topology files up on network namespaces.
//!
//! `up`, `down`, `exec`, `inspect`, `ls`; see `ferrolab --help`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ferrolb_lab::ns::{self, NodeNs};
use ferrolb_lab::registry;
use ferrolb_lab::{Lab, LabError, UpOptions};

#[derive(Parser)]
#[command(
    name = "ferrolab",
    version,
    about = "Run containerlab topology files on Linux network namespaces, without Docker",
    long_about = "Run containerlab topology files (*.clab.yml) on Linux network namespaces, without \
                  Docker. Each node gets a network namespace named clab-<lab>-<node> and a private \
                  mount and UTS namespace (copy-on-write /etc, private /run/frr and /run/bird, its \
                  own /var/log in the lab directory). FRR and BIRD images start those daemons from \
                  the host's packages. Needs root."
)]
struct Cli {
    /// Log level (error, warn, info, debug, trace).
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args, Clone)]
struct LabArgs {
    /// The topology file.
    topology: PathBuf,
    /// Run under this lab name instead of the file's `name`.
    #[arg(long)]
    name: Option<String>,
    /// Set a variable for ${VAR} expansion in the file (repeatable): KEY=VALUE.
    #[arg(long = "var", value_name = "KEY=VALUE")]
    vars: Vec<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Bring a lab up (a lab of the same name that is up is torn down first).
    Up {
        #[command(flatten)]
        lab: LabArgs,
        /// Lab directory (default: clab-<name> beside the topology file).
        #[arg(long)]
        lab_dir: Option<PathBuf>,
        /// Fail (and tear down) when an `exec` command fails; containerlab only reports it.
        #[arg(long)]
        strict: bool,
    },
    /// Tear a lab down: every process, namespace, mount and veth it made. Safe to repeat.
    Down {
        #[command(flatten)]
        lab: LabArgs,
        /// Also remove the lab directory (node logs and /etc overlays).
        #[arg(long)]
        cleanup: bool,
    },
    /// Run a command in a node; exits with the command's exit code.
    Exec {
        #[command(flatten)]
        lab: LabArgs,
        /// The node.
        node: String,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Show the nodes of a lab: namespace, interfaces with addresses, processes.
    Inspect {
        #[command(flatten)]
        lab: LabArgs,
    },
    /// List the labs that are up.
    Ls,
}

fn options(lab: &LabArgs) -> Result<UpOptions> {
    let mut opts = UpOptions {
        name: lab.name.clone(),
        ..UpOptions::default()
    };
    for kv in &lab.vars {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--var {kv}: expected KEY=VALUE"))?;
        opts.vars.insert(k.to_string(), v.to_string());
    }
    Ok(opts)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferrolab: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd) -> Result<ExitCode> {
    match cmd {
        Cmd::Up {
            lab,
            lab_dir,
            strict,
        } => {
            let mut opts = options(&lab)?;
            opts.lab_dir = lab_dir;
            opts.strict_exec = strict;
            let lab = Lab::up(&lab.topology, opts)?;
            let mut failed = 0;
            for out in lab.exec_log() {
                let mark = if out.success() { "ok" } else { "FAILED" };
                println!("[{}] {} -> {mark} (rc={})", out.node, out.command, out.code);
                for line in out.stdout.lines().chain(out.stderr.lines()) {
                    println!("    {line}");
                }
                failed += usize::from(!out.success());
            }
            for w in &lab.topology().warnings {
                println!("warning: {w}");
            }
            println!(
                "lab {} is up: {} nodes, {} links; lab directory {}",
                lab.name(),
                lab.topology().nodes.len(),
                lab.topology().links.len(),
                lab.lab_dir().display()
            );
            if failed > 0 {
                println!("warning: {failed} exec command(s) failed (see above)");
            }
            print_inspect(&lab)?;
            lab.keep();
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Down { lab, cleanup } => {
            let opts = options(&lab)?;
            let topo = opts.load_topology(&lab.topology)?;
            let rec = registry::load(&topo.name)?;
            let any_ns = topo
                .nodes
                .iter()
                .any(|n| NodeNs::new(topo.namespace_of(&n.name)).exists());
            if rec.is_none() && !any_ns {
                println!("lab {} is not up", topo.name);
            } else {
                ferrolb_lab::destroy(&topo.name, Some(&topo))?;
                println!("lab {} is down", topo.name);
            }
            if cleanup {
                let dir = rec
                    .map(|r| r.lab_dir)
                    .unwrap_or_else(|| topo.dir.join(format!("clab-{}", topo.name)));
                if dir.exists() {
                    std::fs::remove_dir_all(&dir)
                        .with_context(|| format!("remove {}", dir.display()))?;
                    println!("removed {}", dir.display());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Exec { lab, node, command } => {
            let opts = options(&lab)?;
            let lab = Lab::attach(&lab.topology, &opts)?;
            let code = lab.exec_interactive(&node, &command)?;
            Ok(ExitCode::from(
                u8::try_from(code.clamp(0, 255)).unwrap_or(1),
            ))
        }
        Cmd::Inspect { lab } => {
            let opts = options(&lab)?;
            let lab = Lab::attach(&lab.topology, &opts)?;
            print_inspect(&lab)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Ls => {
            let labs = registry::list()?;
            if labs.is_empty() {
                println!("no lab is up");
                return Ok(ExitCode::SUCCESS);
            }
            let mut rows = vec![vec![
                "LAB".to_string(),
                "NODES".into(),
                "STATE".into(),
                "TOPOLOGY".into(),
                "LAB DIRECTORY".into(),
            ]];
            for rec in labs {
                match rec {
                    Ok(r) => {
                        let up = r
                            .nodes
                            .iter()
                            .filter(|(_, n)| NodeNs::new(n).exists())
                            .count();
                        let state = if up == r.nodes.len() {
                            "up".to_string()
                        } else {
                            format!("partial ({up}/{} namespaces)", r.nodes.len())
                        };
                        rows.push(vec![
                            r.name,
                            r.nodes.len().to_string(),
                            state,
                            r.topology.display().to_string(),
                            r.lab_dir.display().to_string(),
                        ]);
                    }
                    Err(e) => rows.push(vec![
                        "?".into(),
                        "?".into(),
                        format!("unreadable: {e}"),
                        String::new(),
                        String::new(),
                    ]),
                }
            }
            print_table(&rows);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_inspect(lab: &Lab) -> Result<()> {
    let mut rows = vec![vec![
        "NODE".to_string(),
        "NAMESPACE".into(),
        "INTERFACE".into(),
        "STATE".into(),
        "ADDRESSES".into(),
        "PROCESSES".into(),
    ]];
    for node in &lab.topology().nodes {
        let netns = lab.namespace(&node.name)?;
        let ifaces =
            interfaces(&netns).unwrap_or_else(|e| vec![("?".into(), "?".into(), e.to_string())]);
        let procs = lab
            .processes(&node.name)?
            .iter()
            .map(|p| format!("{}({})", p.comm, p.pid))
            .collect::<Vec<_>>()
            .join(" ");
        for (i, (name, state, addrs)) in ifaces.into_iter().enumerate() {
            let first = i == 0;
            rows.push(vec![
                if first {
                    node.name.clone()
                } else {
                    String::new()
                },
                if first { netns.clone() } else { String::new() },
                name,
                state,
                addrs,
                if first { procs.clone() } else { String::new() },
            ]);
        }
    }
    print_table(&rows);
    Ok(())
}

/// (name, state, addresses) of every interface of a namespace, from `ip -j addr`.
fn interfaces(netns: &str) -> Result<Vec<(String, String, String)>, LabError> {
    let out = ns::run(
        &format!("list interfaces of {netns}"),
        std::process::Command::new("ip").args(["-j", "-n", netns, "addr", "show"]),
    )?;
    let v: serde_json::Value = serde_json::from_str(&out)
        .map_err(|e| LabError::Invalid(format!("ip -j addr: unexpected output: {e}")))?;
    let mut rows = Vec::new();
    for link in v.as_array().map(Vec::as_slice).unwrap_or_default() {
        let name = link["ifname"].as_str().unwrap_or("?").to_string();
        let state = link["operstate"].as_str().unwrap_or("?").to_string();
        let addrs = link["addr_info"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter(|a| a["scope"].as_str() != Some("link"))
            .filter_map(|a| {
                Some(format!(
                    "{}/{}",
                    a["local"].as_str()?,
                    a["prefixlen"].as_u64()?
                ))
            })
            .collect::<Vec<_>>()
            .join(" ");
        rows.push((name, state, addrs));
    }
    Ok(rows)
}

fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, s)| format!("{s:<w$}", w = widths[c]))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}
