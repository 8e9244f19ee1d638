//! Parsing and validation of containerlab topology files (`*.clab.yml`).
//!
//! The file is expanded (environment variables), parsed as YAML, and every node is resolved
//! with containerlab's precedence: node > group > kind > defaults. Scalars take the most
//! specific value; `env`, `sysctls` and `labels` merge key by key; `exec` lists concatenate
//! (defaults first); `binds` merge by destination path. Links are accepted in the brief
//! (`endpoints: ["a:eth1", "b:eth1"]`) and extended (`type: veth`) forms.
//!
//! What ferrolab cannot honour is an error (`network-mode`, non-linux kinds, link types other
//! than veth) or a warning that names the node and key (`mgmt-ipv4`, `ports`, ...). This module
//! touches nothing on the system: it only reads the topology file and the `env-files` it names.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_yaml_ng::{Mapping, Value};

use crate::expand::{ExpandError, expand_env};

/// containerlab's default veth MTU (`DefaultLinkMTU`).
pub const DEFAULT_MTU: u32 = 9500;
/// Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
const IFNAME_MAX_LEN: usize = 15;

/// A topology file that cannot be used, with the file and the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: variable expansion failed at {source}")]
    Expand { file: String, source: ExpandError },
    #[error("{file}: invalid YAML: {reason}")]
    Yaml { file: String, reason: String },
    #[error("{file}: {key}: {reason}")]
    Invalid {
        file: String,
        key: String,
        reason: String,
    },
}

/// The stages of a node's life during `up`, in order (containerlab's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    Create,
    CreateLinks,
    Configure,
    Healthy,
    Exit,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Stage::Create,
        Stage::CreateLinks,
        Stage::Configure,
        Stage::Healthy,
        Stage::Exit,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Create => "create",
            Stage::CreateLinks => "create-links",
            Stage::Configure => "configure",
            Stage::Healthy => "healthy",
            Stage::Exit => "exit",
        }
    }

    fn parse(s: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|st| st.name() == s)
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `stages.<stage>.wait-for` entry: this node enters its stage only after `node` reached `stage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitFor {
    pub node: String,
    pub stage: Stage,
}

/// When a stage's command runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    OnEnter,
    OnExit,
}

/// `stages.<stage>.exec` entry (target `container` only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageExec {
    pub command: String,
    pub phase: Phase,
}

/// Per-stage settings of one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StageSpec {
    pub wait_for: Vec<WaitFor>,
    pub exec: Vec<StageExec>,
}

/// Docker-style health check (`healthcheck`), all durations in seconds in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Healthcheck {
    /// The argv to run (`CMD-SHELL x` becomes `sh -c x`).
    pub argv: Vec<String>,
    pub start_period: Duration,
    pub interval: Duration,
    pub timeout: Duration,
    pub retries: u32,
}

/// A `binds` entry: `source:target[:options]`, source relative to the topology file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// As written (magic variables not yet applied).
    pub source: String,
    pub target: String,
    pub read_only: bool,
}

impl Bind {
    fn parse(s: &str) -> Result<Bind, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let (source, target, opts) = match parts.as_slice() {
            [src, dst] => (*src, *dst, ""),
            [src, dst, opts] => (*src, *dst, *opts),
            _ => return Err(format!("'{s}' is not 'source:target[:options]'")),
        };
        if source.is_empty() || target.is_empty() {
            return Err(format!("'{s}' has an empty source or target"));
        }
        if !target.starts_with('/') {
            return Err(format!("target '{target}' must be an absolute path"));
        }
        Ok(Bind {
            source: source.to_string(),
            target: target.to_string(),
            read_only: opts.split(',').any(|o| o == "ro"),
        })
    }
}

/// A node with every inherited setting resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub kind: String,
    pub group: Option<String>,
    pub image: Option<String>,
    pub binds: Vec<Bind>,
    /// Commands run after the node's links exist, each split like a shell would, no shell.
    pub exec: Vec<String>,
    pub cmd: Option<String>,
    pub entrypoint: Option<String>,
    /// `env-files` first, `env` on top.
    pub env: BTreeMap<String, String>,
    pub sysctls: BTreeMap<String, String>,
    pub startup_delay: Duration,
    pub stages: BTreeMap<Stage, StageSpec>,
    pub healthcheck: Option<Healthcheck>,
}

/// One end of a veth link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub node: String,
    pub interface: String,
    pub mac: Option<String>,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.node, self.interface)
    }
}

/// A veth pair between two node interfaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub a: Endpoint,
    pub b: Endpoint,
    pub mtu: u32,
}

/// A parsed, validated topology.
#[derive(Debug, Clone)]
pub struct Topology {
    pub name: String,
    /// `prefix` as written; `None` means containerlab's default `clab`.
    pub prefix: Option<String>,
    /// Absolute path of the topology file.
    pub file: PathBuf,
    /// Directory of the topology file: relative bind sources resolve against it.
    pub dir: PathBuf,
    /// In file order.
    pub nodes: Vec<Node>,
    pub links: Vec<Link>,
    /// Things in the file that ferrolab accepts but does not honour, each naming node and key.
    pub warnings: Vec<String>,
}

impl Topology {
    /// Reads, expands and validates a topology file, looking variables up in the process
    /// environment.
    pub fn load(path: &Path) -> Result<Topology, TopologyError> {
        Self::load_with(path, &|k| std::env::var(k).ok())
    }

    /// Like [`Topology::load`] with an explicit variable lookup.
    pub fn load_with(
        path: &Path,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Topology, TopologyError> {
        let file_name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Read {
            file: file_name.clone(),
            source,
        })?;
        let abs = std::path::absolute(path).map_err(|source| TopologyError::Read {
            file: file_name.clone(),
            source,
        })?;
        let dir = abs.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::parse_str(&text, &abs, &dir, lookup)
    }

    /// Parses topology text as if it were the file `file` in directory `dir`.
    pub fn parse_str(
        text: &str,
        file: &Path,
        dir: &Path,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Topology, TopologyError> {
        let p = Parser {
            file: file.display().to_string(),
            dir: dir.to_path_buf(),
            warnings: Vec::new(),
        };
        p.parse(text, file, lookup)
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The container (here: network namespace) name of a node, as containerlab names it.
    pub fn namespace_of(&self, node: &str) -> String {
        namespace_name(self.prefix.as_deref(), &self.name, node)
    }
}

/// containerlab's container naming: `clab-<lab>-<node>` by default; `prefix: ""` gives the bare
/// node name, `prefix: __lab-name` gives `<lab>-<node>`, any other prefix `<prefix>-<lab>-<node>`.
pub fn namespace_name(prefix: Option<&str>, lab: &str, node: &str) -> String {
    match prefix {
        None => format!("clab-{lab}-{node}"),
        Some("") => node.to_string(),
        Some("__lab-name") => format!("{lab}-{node}"),
        Some(p) => format!("{p}-{lab}-{node}"),
    }
}

/// Node keys and what ferrolab does with them.
enum KeyUse {
    /// Implemented.
    Honoured,
    /// Metadata with no runtime effect here or in containerlab for linux nodes.
    Inert,
    /// Accepted but not honoured: a warning with this reason.
    Ignored(&'static str),
    /// Refused: an error with this reason.
    Refused(&'static str),
}

fn node_key_use(key: &str) -> Option<KeyUse> {
    use KeyUse::*;
    Some(match key {
        "kind" | "group" | "image" | "binds" | "exec" | "cmd" | "entrypoint" | "env"
        | "env-files" | "sysctls" | "startup-delay" | "stages" | "healthcheck" => Honoured,
        "labels" | "image-pull-policy" | "restart-policy" | "auto-remove" | "license" | "type"
        | "position" | "config" | "certificate" => Inert,
        "startup-config" | "enforce-startup-config" | "suppress-startup-config" => {
            Ignored("has no effect on linux nodes (use binds)")
        }
        "mgmt-ipv4" | "mgmt-ipv6" => Ignored("ferrolab builds no management network (no eth0)"),
        "ports" => Ignored("ports are not published on the host"),
        "user" => Ignored("processes run as root"),
        "memory" | "cpu" | "cpu-set" | "shm-size" => Ignored("resource limits are not applied"),
        "cap-add" | "devices" | "dns" | "extras" | "aliases" | "runtime" | "publish"
        | "sandbox" | "kernel" | "components" | "extra-hosts" => {
            Ignored("not supported by ferrolab")
        }
        "network-mode" => Refused(
            "network-mode is not supported: every node gets its own network namespace \
             (host networking would touch the host)",
        ),
        _ => return None,
    })
}

const NOS_KIND_HINT: &str = "ferrolab runs only kind 'linux' nodes (network OS images such as \
                             srlinux, ceos or vr-* need their own VMs/containers)";

struct Parser {
    file: String,
    dir: PathBuf,
    warnings: Vec<String>,
}

impl Parser {
    fn err(&self, key: impl Into<String>, reason: impl Into<String>) -> TopologyError {
        TopologyError::Invalid {
            file: self.file.clone(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    fn parse(
        mut self,
        text: &str,
        file: &Path,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Topology, TopologyError> {
        let expanded = expand_env(text, lookup).map_err(|source| TopologyError::Expand {
            file: self.file.clone(),
            source,
        })?;
        let doc: Value = serde_yaml_ng::from_str(&expanded).map_err(|e| TopologyError::Yaml {
            file: self.file.clone(),
            reason: e.to_string(),
        })?;
        let root = match &doc {
            Value::Mapping(m) => m,
            Value::Null => return Err(self.err("(document)", "the file is empty")),
            _ => return Err(self.err("(document)", "the top level must be a mapping")),
        };
        for key in root.keys() {
            let k = key_str(key);
            match k.as_str() {
                "name" | "prefix" | "topology" | "settings" => {}
                "mgmt" => self.warnings.push(
                    "mgmt: ignored: ferrolab builds no management network (no eth0 in nodes)"
                        .into(),
                ),
                other => self
                    .warnings
                    .push(format!("{other}: unknown top-level key, ignored")),
            }
        }
        let name = match root.get("name") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::String(_)) => return Err(self.err("name", "must not be empty")),
            Some(v) if scalar_string(v).is_some() => scalar_string(v).unwrap_or_default(),
            Some(_) => return Err(self.err("name", "must be a string")),
            None => return Err(self.err("name", "missing (every lab needs a name)")),
        };
        check_name(&name).map_err(|r| self.err("name", r))?;
        let prefix = match root.get("prefix") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(self.err("prefix", "must be a string")),
        };
        let topo = match root.get("topology") {
            Some(Value::Mapping(m)) => m,
            Some(_) => return Err(self.err("topology", "must be a mapping")),
            None => return Err(self.err("topology", "missing")),
        };
        for key in topo.keys() {
            let k = key_str(key);
            if !matches!(
                k.as_str(),
                "defaults" | "kinds" | "groups" | "nodes" | "links"
            ) {
                self.warnings
                    .push(format!("topology.{k}: unknown key, ignored"));
            }
        }
        let empty = Mapping::new();
        let defaults = self.section_map(topo, "defaults")?.unwrap_or(&empty);
        let kinds = self.section_map(topo, "kinds")?.unwrap_or(&empty);
        let groups = self.section_map(topo, "groups")?.unwrap_or(&empty);
        let nodes_map = match topo.get("nodes") {
            Some(Value::Mapping(m)) if !m.is_empty() => m,
            Some(Value::Mapping(_)) | Some(Value::Null) | None => {
                return Err(self.err("topology.nodes", "missing or empty: a lab needs nodes"));
            }
            Some(_) => return Err(self.err("topology.nodes", "must be a mapping of node names")),
        };

        let mut nodes = Vec::new();
        for (k, v) in nodes_map {
            let node_name = key_str(k);
            let key = format!("topology.nodes.{node_name}");
            check_name(&node_name).map_err(|r| self.err(&key, r))?;
            let node_def = match v {
                Value::Mapping(m) => m,
                Value::Null => &empty,
                _ => return Err(self.err(&key, "must be a mapping")),
            };
            nodes.push(self.resolve_node(&node_name, node_def, defaults, kinds, groups)?);
        }
        let names: BTreeSet<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        for node in &nodes {
            for (stage, spec) in &node.stages {
                for (i, w) in spec.wait_for.iter().enumerate() {
                    if !names.contains(w.node.as_str()) {
                        return Err(self.err(
                            format!(
                                "topology.nodes.{}.stages.{stage}.wait-for[{i}].node",
                                node.name
                            ),
                            format!("unknown node '{}'", w.node),
                        ));
                    }
                    let without_healthcheck = nodes
                        .iter()
                        .any(|n| n.name == w.node && n.healthcheck.is_none());
                    if w.stage == Stage::Healthy && without_healthcheck {
                        return Err(self.err(
                            format!(
                                "topology.nodes.{}.stages.{stage}.wait-for[{i}]",
                                node.name
                            ),
                            format!(
                                "waits for node '{}' to be healthy, but that node has no healthcheck",
                                w.node
                            ),
                        ));
                    }
                }
            }
        }
        let links = self.parse_links(topo, &nodes)?;
        Ok(Topology {
            name,
            prefix,
            file: file.to_path_buf(),
            dir: self.dir.clone(),
            nodes,
            links,
            warnings: self.warnings,
        })
    }

    fn section_map<'a>(
        &self,
        topo: &'a Mapping,
        key: &str,
    ) -> Result<Option<&'a Mapping>, TopologyError> {
        match topo.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Mapping(m)) => Ok(Some(m)),
            Some(_) => Err(self.err(format!("topology.{key}"), "must be a mapping")),
        }
    }

    fn resolve_node(
        &mut self,
        name: &str,
        node: &Mapping,
        defaults: &Mapping,
        kinds: &Mapping,
        groups: &Mapping,
    ) -> Result<Node, TopologyError> {
        let nkey = format!("topology.nodes.{name}");
        let group_name = match node.get("group").or_else(|| defaults.get("group")) {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                scalar_string(v)
                    .ok_or_else(|| self.err(format!("{nkey}.group"), "must be a string"))?,
            ),
        };
        let empty = Mapping::new();
        let group = match &group_name {
            None => &empty,
            Some(g) => match groups.get(g.as_str()) {
                Some(Value::Mapping(m)) => m,
                Some(Value::Null) => &empty,
                Some(_) => {
                    return Err(self.err(format!("topology.groups.{g}"), "must be a mapping"));
                }
                None => {
                    return Err(self.err(
                        format!("{nkey}.group"),
                        format!("unknown group '{g}' (not under topology.groups)"),
                    ));
                }
            },
        };
        // containerlab: node kind, else the group's kind, else defaults' kind.
        let kind = [node, group, defaults]
            .iter()
            .find_map(|m| m.get("kind").and_then(scalar_string))
            .ok_or_else(|| {
                self.err(
                    format!("{nkey}.kind"),
                    "missing (set it on the node, its group or topology.defaults)",
                )
            })?;
        match kind.as_str() {
            "linux" => {}
            "bridge" | "ovs-bridge" => {
                return Err(self.err(
                    format!("{nkey}.kind"),
                    format!(
                        "kind '{kind}' is a host bridge; ferrolab never changes host networking"
                    ),
                ));
            }
            "host" | "ext-container" => {
                return Err(self.err(
                    format!("{nkey}.kind"),
                    format!("kind '{kind}' is not supported: it would touch the host or a foreign container"),
                ));
            }
            other => {
                return Err(self.err(
                    format!("{nkey}.kind"),
                    format!("kind '{other}' is not supported: {NOS_KIND_HINT}"),
                ));
            }
        }
        let kind_def = match kinds.get(kind.as_str()) {
            Some(Value::Mapping(m)) => m,
            Some(Value::Null) | None => &empty,
            Some(_) => return Err(self.err(format!("topology.kinds.{kind}"), "must be a mapping")),
        };
        // Most specific first.
        let layers: [(&Mapping, String); 4] = [
            (node, nkey.clone()),
            (
                group,
                format!("topology.groups.{}", group_name.as_deref().unwrap_or("?")),
            ),
            (kind_def, format!("topology.kinds.{kind}")),
            (defaults, "topology.defaults".to_string()),
        ];
        // Keys: warn or refuse what is not honoured, once per node, naming where it was set.
        let mut seen = BTreeSet::new();
        for (layer, lkey) in &layers {
            for k in layer.keys() {
                let k = key_str(k);
                if !seen.insert(k.clone()) {
                    continue;
                }
                match node_key_use(&k) {
                    Some(KeyUse::Honoured) | Some(KeyUse::Inert) => {}
                    Some(KeyUse::Ignored(why)) => self
                        .warnings
                        .push(format!("node {name}: {lkey}.{k}: ignored: {why}")),
                    Some(KeyUse::Refused(why)) => {
                        return Err(self.err(format!("{lkey}.{k}"), format!("node {name}: {why}")));
                    }
                    None => self.warnings.push(format!(
                        "node {name}: {lkey}.{k}: unknown node key, ignored"
                    )),
                }
            }
        }
        let scalar = |key: &str| -> Result<Option<String>, TopologyError> {
            for (layer, lkey) in &layers {
                match layer.get(key) {
                    None | Some(Value::Null) => continue,
                    Some(v) => {
                        return scalar_string(v)
                            .map(Some)
                            .ok_or_else(|| self.err(format!("{lkey}.{key}"), "must be a string"));
                    }
                }
            }
            Ok(None)
        };
        let image = scalar("image")?;
        let cmd = scalar("cmd")?;
        let entrypoint = scalar("entrypoint")?;
        let startup_delay = match scalar("startup-delay")? {
            None => Duration::ZERO,
            Some(s) => Duration::from_secs(s.parse::<u64>().map_err(|_| {
                self.err(
                    format!("{nkey}.startup-delay"),
                    format!("'{s}' is not a whole number of seconds"),
                )
            })?),
        };

        // Maps merge, most specific wins; list order: least specific first.
        let mut env = BTreeMap::new();
        let mut sysctls = BTreeMap::new();
        let mut env_files = Vec::new();
        let mut exec = Vec::new();
        let mut binds_by_target: Vec<Bind> = Vec::new();
        for (layer, lkey) in layers.iter().rev() {
            if let Some(v) = layer.get("env-files") {
                for (i, f) in self
                    .string_list(v, &format!("{lkey}.env-files"))?
                    .into_iter()
                    .enumerate()
                {
                    env_files.push((f, format!("{lkey}.env-files[{i}]")));
                }
            }
            self.merge_map(layer.get("env"), &mut env, &format!("{lkey}.env"))?;
            self.merge_map(
                layer.get("sysctls"),
                &mut sysctls,
                &format!("{lkey}.sysctls"),
            )?;
            if let Some(v) = layer.get("exec") {
                exec.extend(self.string_list(v, &format!("{lkey}.exec"))?);
            }
            if let Some(v) = layer.get("binds") {
                for (i, b) in self
                    .string_list(v, &format!("{lkey}.binds"))?
                    .iter()
                    .enumerate()
                {
                    let bind = Bind::parse(b).map_err(|r| {
                        self.err(format!("{lkey}.binds[{i}]"), format!("node {name}: {r}"))
                    })?;
                    binds_by_target.retain(|x| x.target != bind.target);
                    binds_by_target.push(bind);
                }
            }
        }
        // env-files first, env on top (containerlab).
        let mut merged_env = BTreeMap::new();
        for (f, key) in env_files {
            let path = self.dir.join(&f);
            let text = std::fs::read_to_string(&path).map_err(|e| {
                self.err(
                    &key,
                    format!("node {name}: cannot read '{}': {e}", path.display()),
                )
            })?;
            for (lineno, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let line = line.strip_prefix("export ").unwrap_or(line);
                let (k, v) = line.split_once('=').ok_or_else(|| {
                    self.err(
                        &key,
                        format!(
                            "node {name}: {}:{}: expected KEY=VALUE",
                            path.display(),
                            lineno + 1
                        ),
                    )
                })?;
                let v = v.trim();
                let v = v
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                    .unwrap_or(v);
                merged_env.insert(k.trim().to_string(), v.to_string());
            }
        }
        merged_env.extend(env);

        let stages = self.parse_stages(name, &layers)?;
        let healthcheck = match layers
            .iter()
            .find_map(|(l, k)| l.get("healthcheck").map(|v| (v, k)))
        {
            None => None,
            Some((v, lkey)) => {
                Some(self.parse_healthcheck(v, &format!("{lkey}.healthcheck"), name)?)
            }
        };
        for k in sysctls.keys() {
            if !k.starts_with("net.") {
                return Err(self.err(
                    format!("{nkey}.sysctls.{k}"),
                    "only net.* sysctls are per network namespace; others would change the host",
                ));
            }
        }

        Ok(Node {
            name: name.to_string(),
            kind,
            group: group_name,
            image,
            binds: binds_by_target,
            exec,
            cmd,
            entrypoint,
            env: merged_env,
            sysctls,
            startup_delay,
            stages,
            healthcheck,
        })
    }

    fn merge_map(
        &self,
        v: Option<&Value>,
        into: &mut BTreeMap<String, String>,
        key: &str,
    ) -> Result<(), TopologyError> {
        match v {
            None | Some(Value::Null) => Ok(()),
            Some(Value::Mapping(m)) => {
                for (k, v) in m {
                    let k = key_str(k);
                    let v = match v {
                        Value::Null => String::new(),
                        v => scalar_string(v)
                            .ok_or_else(|| self.err(format!("{key}.{k}"), "must be a scalar"))?,
                    };
                    into.insert(k, v);
                }
                Ok(())
            }
            Some(_) => Err(self.err(key, "must be a mapping")),
        }
    }

    fn string_list(&self, v: &Value, key: &str) -> Result<Vec<String>, TopologyError> {
        match v {
            Value::Null => Ok(Vec::new()),
            Value::Sequence(seq) => seq
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    scalar_string(item)
                        .ok_or_else(|| self.err(format!("{key}[{i}]"), "must be a string"))
                })
                .collect(),
            _ => Err(self.err(key, "must be a list of strings")),
        }
    }

    fn parse_stages(
        &self,
        node: &str,
        layers: &[(&Mapping, String); 4],
    ) -> Result<BTreeMap<Stage, StageSpec>, TopologyError> {
        let mut out: BTreeMap<Stage, StageSpec> = BTreeMap::new();
        // Least specific first, so that node-level entries come last.
        for (layer, lkey) in layers.iter().rev() {
            let stages = match layer.get("stages") {
                None | Some(Value::Null) => continue,
                Some(Value::Mapping(m)) => m,
                Some(_) => return Err(self.err(format!("{lkey}.stages"), "must be a mapping")),
            };
            for (sk, sv) in stages {
                let sname = key_str(sk);
                let skey = format!("{lkey}.stages.{sname}");
                let stage = Stage::parse(&sname).ok_or_else(|| {
                    self.err(
                        &skey,
                        "unknown stage (stages are create, create-links, configure, healthy, exit)",
                    )
                })?;
                let spec = out.entry(stage).or_default();
                let sm = match sv {
                    Value::Null => continue,
                    Value::Mapping(m) => m,
                    _ => return Err(self.err(&skey, "must be a mapping")),
                };
                for (k, v) in sm {
                    let k = key_str(k);
                    match k.as_str() {
                        "wait-for" => {
                            let seq = v.as_sequence().ok_or_else(|| {
                                self.err(format!("{skey}.wait-for"), "must be a list")
                            })?;
                            for (i, w) in seq.iter().enumerate() {
                                let wkey = format!("{skey}.wait-for[{i}]");
                                let m = w.as_mapping().ok_or_else(|| {
                                    self.err(&wkey, "must be a mapping with node and stage")
                                })?;
                                let wnode = m
                                    .get("node")
                                    .and_then(scalar_string)
                                    .ok_or_else(|| self.err(format!("{wkey}.node"), "missing"))?;
                                let wstage = match m.get("stage").and_then(scalar_string) {
                                    None => Stage::Create,
                                    Some(s) => Stage::parse(&s).ok_or_else(|| {
                                        self.err(
                                            format!("{wkey}.stage"),
                                            format!("unknown stage '{s}'"),
                                        )
                                    })?,
                                };
                                if wnode == node {
                                    return Err(
                                        self.err(&wkey, format!("node {node} waits for itself"))
                                    );
                                }
                                spec.wait_for.push(WaitFor {
                                    node: wnode,
                                    stage: wstage,
                                });
                            }
                        }
                        "exec" => {
                            let seq = v.as_sequence().ok_or_else(|| {
                                self.err(format!("{skey}.exec"), "must be a list")
                            })?;
                            for (i, e) in seq.iter().enumerate() {
                                let ekey = format!("{skey}.exec[{i}]");
                                let m = e.as_mapping().ok_or_else(|| {
                                    self.err(&ekey, "must be a mapping with command, target, phase")
                                })?;
                                let command =
                                    m.get("command").and_then(scalar_string).ok_or_else(|| {
                                        self.err(format!("{ekey}.command"), "missing")
                                    })?;
                                match m.get("target").and_then(scalar_string).as_deref() {
                                    None | Some("container") => {}
                                    Some("host") => {
                                        return Err(self.err(
                                            format!("{ekey}.target"),
                                            format!("node {node}: target 'host' is not supported: ferrolab does not run topology commands on the host"),
                                        ));
                                    }
                                    Some(t) => {
                                        return Err(self.err(
                                            format!("{ekey}.target"),
                                            format!("unknown target '{t}'"),
                                        ));
                                    }
                                }
                                let phase = match m.get("phase").and_then(scalar_string).as_deref()
                                {
                                    None | Some("on-enter") => Phase::OnEnter,
                                    Some("on-exit") => Phase::OnExit,
                                    Some(p) => {
                                        return Err(self.err(
                                            format!("{ekey}.phase"),
                                            format!("unknown phase '{p}' (on-enter or on-exit)"),
                                        ));
                                    }
                                };
                                spec.exec.push(StageExec { command, phase });
                            }
                        }
                        other => {
                            return Err(self
                                .err(format!("{skey}.{other}"), "unknown key (wait-for or exec)"));
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    fn parse_healthcheck(
        &self,
        v: &Value,
        key: &str,
        node: &str,
    ) -> Result<Healthcheck, TopologyError> {
        let m = v
            .as_mapping()
            .ok_or_else(|| self.err(key, "must be a mapping"))?;
        let test = m
            .get("test")
            .ok_or_else(|| self.err(format!("{key}.test"), format!("node {node}: missing")))?;
        let argv = match test {
            Value::String(s) => vec!["sh".into(), "-c".into(), s.clone()],
            Value::Sequence(_) => {
                let list = self.string_list(test, &format!("{key}.test"))?;
                match list.first().map(String::as_str) {
                    Some("CMD") if list.len() > 1 => list[1..].to_vec(),
                    Some("CMD-SHELL") if list.len() == 2 => {
                        vec!["sh".into(), "-c".into(), list[1].clone()]
                    }
                    _ => {
                        return Err(self.err(
                            format!("{key}.test"),
                            "must be [CMD, arg...] or [CMD-SHELL, command]",
                        ));
                    }
                }
            }
            _ => return Err(self.err(format!("{key}.test"), "must be a string or a list")),
        };
        let secs = |name: &str, default: u64| -> Result<u64, TopologyError> {
            match m.get(name) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v.as_u64().ok_or_else(|| {
                    self.err(format!("{key}.{name}"), "must be a whole number of seconds")
                }),
            }
        };
        let retries = secs("retries", 3)?;
        Ok(Healthcheck {
            argv,
            start_period: Duration::from_secs(secs("start-period", 0)?),
            interval: Duration::from_secs(secs("interval", 30)?.max(1)),
            timeout: Duration::from_secs(secs("timeout", 30)?.max(1)),
            retries: u32::try_from(retries.max(1))
                .map_err(|_| self.err(format!("{key}.retries"), "too large"))?,
        })
    }

    fn parse_links(&mut self, topo: &Mapping, nodes: &[Node]) -> Result<Vec<Link>, TopologyError> {
        let seq = match topo.get("links") {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Sequence(s)) => s,
            Some(_) => return Err(self.err("topology.links", "must be a list")),
        };
        let names: BTreeSet<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        let mut used: HashMap<(String, String), String> = HashMap::new();
        let mut links = Vec::new();
        for (i, l) in seq.iter().enumerate() {
            let lkey = format!("topology.links[{i}]");
            let m = l
                .as_mapping()
                .ok_or_else(|| self.err(&lkey, "must be a mapping with endpoints"))?;
            let ltype = m.get("type").and_then(scalar_string);
            let eps = match m.get("endpoints") {
                Some(Value::Sequence(s)) => s,
                Some(_) => return Err(self.err(format!("{lkey}.endpoints"), "must be a list")),
                None if ltype.is_some() => {
                    return Err(self.err(
                        format!("{lkey}.type"),
                        format!(
                            "link type '{}' is not supported: ferrolab makes veth links between nodes only \
                             (host, mgmt-net, macvlan and vxlan links would touch the host; no dummy module here)",
                            ltype.unwrap_or_default()
                        ),
                    ));
                }
                None => return Err(self.err(format!("{lkey}.endpoints"), "missing")),
            };
            if eps.len() != 2 {
                return Err(self.err(
                    format!("{lkey}.endpoints"),
                    format!("a veth link has exactly 2 endpoints, found {}", eps.len()),
                ));
            }
            let brief = eps.iter().all(|e| matches!(e, Value::String(_)));
            let mut ends = Vec::new();
            if brief {
                if let Some(t) = &ltype
                    && t != "veth"
                {
                    return Err(self.err(
                        format!("{lkey}.type"),
                        format!("link type '{t}' is not supported (veth only)"),
                    ));
                }
                for (j, e) in eps.iter().enumerate() {
                    let ekey = format!("{lkey}.endpoints[{j}]");
                    let s = e.as_str().unwrap_or_default();
                    let (node, iface) = s
                        .split_once(':')
                        .ok_or_else(|| self.err(&ekey, format!("'{s}' is not 'node:interface'")))?;
                    if matches!(
                        node,
                        "host" | "mgmt-net" | "macvlan" | "bridge" | "ovs-bridge"
                    ) && !names.contains(node)
                    {
                        return Err(self.err(
                            &ekey,
                            format!("'{node}:' endpoints are not supported: ferrolab never changes host networking"),
                        ));
                    }
                    ends.push(Endpoint {
                        node: node.to_string(),
                        interface: iface.to_string(),
                        mac: None,
                    });
                }
                for fam in ["ipv4", "ipv6"] {
                    if m.get(fam).is_some() {
                        self.warnings.push(format!(
                            "{lkey}.{fam}: ignored: containerlab does not apply link addresses to linux nodes either (use exec)"
                        ));
                    }
                }
            } else {
                match ltype.as_deref() {
                    Some("veth") => {}
                    None => {
                        return Err(self.err(
                            format!("{lkey}.type"),
                            "missing: extended links need 'type: veth'",
                        ));
                    }
                    Some(t) => {
                        return Err(self.err(format!("{lkey}.type"), format!(
                            "link type '{t}' is not supported: ferrolab makes veth links between nodes only"
                        )));
                    }
                }
                for (j, e) in eps.iter().enumerate() {
                    let ekey = format!("{lkey}.endpoints[{j}]");
                    let em = e.as_mapping().ok_or_else(|| {
                        self.err(&ekey, "must be a mapping with node and interface (or use the brief 'node:iface' form for both)")
                    })?;
                    let node = em
                        .get("node")
                        .and_then(scalar_string)
                        .ok_or_else(|| self.err(format!("{ekey}.node"), "missing"))?;
                    let iface = em
                        .get("interface")
                        .and_then(scalar_string)
                        .ok_or_else(|| self.err(format!("{ekey}.interface"), "missing"))?;
                    let mac = match em.get("mac") {
                        None | Some(Value::Null) => None,
                        Some(v) => {
                            let s = scalar_string(v).unwrap_or_default();
                            check_mac(&s).map_err(|r| {
                                self.err(format!("{ekey}.mac"), format!("node {node}: {r}"))
                            })?;
                            Some(s)
                        }
                    };
                    for k in em.keys() {
                        let k = key_str(k);
                        match k.as_str() {
                            "node" | "interface" | "mac" => {}
                            "ipv4" | "ipv6" => self.warnings.push(format!(
                                "{ekey}.{k}: ignored: containerlab does not apply link addresses to linux nodes either (use exec)"
                            )),
                            other => self.warnings.push(format!("{ekey}.{other}: unknown key, ignored")),
                        }
                    }
                    ends.push(Endpoint {
                        node,
                        interface: iface,
                        mac,
                    });
                }
            }
            let mtu = match m.get("mtu") {
                None | Some(Value::Null) => DEFAULT_MTU,
                Some(v) => v
                    .as_u64()
                    .and_then(|x| u32::try_from(x).ok())
                    .filter(|x| (68..=65535).contains(x))
                    .ok_or_else(|| {
                        self.err(format!("{lkey}.mtu"), "must be a number from 68 to 65535")
                    })?,
            };
            for k in m.keys() {
                let k = key_str(k);
                if !matches!(
                    k.as_str(),
                    "endpoints" | "type" | "mtu" | "ipv4" | "ipv6" | "vars" | "labels"
                ) {
                    self.warnings
                        .push(format!("{lkey}.{k}: unknown key, ignored"));
                }
            }
            for (j, e) in ends.iter().enumerate() {
                let ekey = format!("{lkey}.endpoints[{j}]");
                if !names.contains(e.node.as_str()) {
                    return Err(self.err(
                        &ekey,
                        format!("unknown node '{}' (not under topology.nodes)", e.node),
                    ));
                }
                check_ifname(&e.interface)
                    .map_err(|r| self.err(&ekey, format!("node {}: {r}", e.node)))?;
                if let Some(prev) = used.insert((e.node.clone(), e.interface.clone()), ekey.clone())
                {
                    return Err(self.err(
                        &ekey,
                        format!(
                            "node {}: interface {} is already used by {prev}",
                            e.node, e.interface
                        ),
                    ));
                }
            }
            let b = ends.pop();
            let a = ends.pop();
            if let (Some(a), Some(b)) = (a, b) {
                links.push(Link { a, b, mtu });
            }
        }
        Ok(links)
    }
}

fn key_str(v: &Value) -> String {
    scalar_string(v).unwrap_or_else(|| format!("{v:?}"))
}

/// A YAML scalar as text (numbers and booleans too: `net.ipv4.ip_forward: 1`).
fn scalar_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "'{name}' contains '{c}': use letters, digits, '-', '_' and '.' only"
        ));
    }
    if name.starts_with('.') {
        return Err(format!("'{name}' must not start with '.'"));
    }
    Ok(())
}

fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty interface name".into());
    }
    if name.len() > IFNAME_MAX_LEN {
        return Err(format!(
            "interface name '{name}' is longer than {IFNAME_MAX_LEN} characters"
        ));
    }
    if name == "lo" || name == "." || name == ".." {
        return Err(format!("'{name}' cannot be a link interface"));
    }
    if name == "eth0" {
        return Err(
            "eth0 is containerlab's management interface and cannot be used in a link (use eth1 and up)"
                .into(),
        );
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(format!(
            "interface name '{name}' contains '/', ':' or whitespace"
        ));
    }
    Ok(())
}

fn check_mac(s: &str) -> Result<(), String> {
    let parts: Vec<&str> = s.split(':').collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()));
    if !ok {
        return Err(format!("'{s}' is not a MAC address like aa:c1:ab:00:00:01"));
    }
    let first = u8::from_str_radix(parts[0], 16).unwrap_or(0);
    if first & 1 == 1 {
        return Err(format!("'{s}' is a multicast MAC address"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Topology, TopologyError> {
        parse_vars(text, &[])
    }

    fn parse_vars(text: &str, vars: &[(&str, &str)]) -> Result<Topology, TopologyError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Topology::parse_str(
            text,
            Path::new("/labs/t.clab.yml"),
            Path::new("/labs"),
            &move |k| vars.get(k).cloned(),
        )
    }

    fn err(text: &str) -> String {
        match parse(text) {
            Ok(t) => panic!("expected an error, parsed {} nodes", t.nodes.len()),
            Err(e) => e.to_string(),
        }
    }

    const INHERIT: &str = r#"
name: inh
topology:
  defaults:
    kind: linux
    image: alpine
    env: {A: defaults, B: defaults}
    sysctls: {net.ipv4.ip_forward: 0}
    exec: ["echo defaults"]
    binds: ["d.conf:/etc/x.conf", "d2:/etc/y"]
  kinds:
    linux:
      image: frrouting/frr:v8.4.0
      env: {B: kind, C: kind}
      exec: ["echo kind"]
  groups:
    spines:
      cmd: sleep infinity
      env: {C: group}
      sysctls: {net.ipv4.conf.all.rp_filter: 0}
      exec: ["echo group"]
      binds: ["g.conf:/etc/x.conf"]
  nodes:
    s1:
      group: spines
      env: {D: node}
      exec: ["echo node"]
      sysctls: {net.ipv4.ip_forward: 1}
      startup-delay: 2
    plain:
      image: nicolaka/netshoot
"#;

    #[test]
    fn inheritance_precedence_node_group_kind_defaults() {
        let t = parse(INHERIT).unwrap();
        let s1 = t.node("s1").unwrap();
        assert_eq!(s1.kind, "linux");
        assert_eq!(s1.group.as_deref(), Some("spines"));
        assert_eq!(
            s1.image.as_deref(),
            Some("frrouting/frr:v8.4.0"),
            "kind beats defaults"
        );
        assert_eq!(s1.cmd.as_deref(), Some("sleep infinity"), "from the group");
        let env: Vec<(&str, &str)> = s1
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            env,
            [
                ("A", "defaults"),
                ("B", "kind"),
                ("C", "group"),
                ("D", "node")
            ]
        );
        assert_eq!(
            s1.sysctls["net.ipv4.ip_forward"], "1",
            "node beats defaults"
        );
        assert_eq!(s1.sysctls["net.ipv4.conf.all.rp_filter"], "0", "maps merge");
        assert_eq!(
            s1.exec,
            ["echo defaults", "echo kind", "echo group", "echo node"]
        );
        let binds: Vec<(&str, &str)> = s1
            .binds
            .iter()
            .map(|b| (b.source.as_str(), b.target.as_str()))
            .collect();
        assert_eq!(
            binds,
            [("d2", "/etc/y"), ("g.conf", "/etc/x.conf")],
            "binds merge by target"
        );
        assert_eq!(s1.startup_delay, Duration::from_secs(2));
        let plain = t.node("plain").unwrap();
        assert_eq!(plain.image.as_deref(), Some("nicolaka/netshoot"));
        assert_eq!(plain.cmd, None);
        assert_eq!(plain.exec, ["echo defaults", "echo kind"]);
        assert_eq!(t.namespace_of("s1"), "clab-inh-s1");
    }

    #[test]
    fn group_kind_is_used_when_node_has_none() {
        let t = parse("name: g\ntopology:\n  groups:\n    hosts: {kind: linux}\n  nodes:\n    h: {group: hosts}\n").unwrap();
        assert_eq!(t.node("h").unwrap().kind, "linux");
    }

    #[test]
    fn both_link_forms() {
        let t = parse(
            r#"
name: links
topology:
  defaults: {kind: linux}
  nodes: {a: {}, b: {}}
  links:
    - endpoints: ["a:eth1", "b:eth1"]
    - type: veth
      mtu: 1500
      endpoints:
        - {node: a, interface: eth2, mac: "aa:c1:ab:00:00:01"}
        - {node: b, interface: e2}
"#,
        )
        .unwrap();
        assert_eq!(t.links.len(), 2);
        assert_eq!(t.links[0].mtu, DEFAULT_MTU);
        assert_eq!(t.links[0].a.to_string(), "a:eth1");
        assert_eq!(t.links[1].mtu, 1500);
        assert_eq!(t.links[1].a.mac.as_deref(), Some("aa:c1:ab:00:00:01"));
        assert_eq!(t.links[1].b.interface, "e2");
        assert!(t.warnings.is_empty(), "{:?}", t.warnings);
    }

    #[test]
    fn variables_expand_before_parsing() {
        let text = "name: ${LAB:=dflt}-x\ntopology:\n  nodes:\n    n1: {kind: linux, exec: ['echo $$HOME ${LAB}', 'ip addr add ${ADDR:-10.0.0.1/24} dev eth1']}\n";
        let t = parse(text).unwrap();
        assert_eq!(t.name, "dflt-x");
        assert_eq!(
            t.node("n1").unwrap().exec,
            ["echo $HOME dflt", "ip addr add 10.0.0.1/24 dev eth1"]
        );
        let t = parse_vars(text, &[("LAB", "given"), ("ADDR", "192.0.2.1/30")]).unwrap();
        assert_eq!(t.name, "given-x");
        assert_eq!(
            t.node("n1").unwrap().exec[1],
            "ip addr add 192.0.2.1/30 dev eth1"
        );
    }

    #[test]
    fn magic_variables_stay_for_runtime() {
        let t = parse("name: m\ntopology:\n  nodes:\n    r1: {kind: linux, binds: ['__clabNodeName__/frr.conf:/etc/frr/frr.conf:ro']}\n").unwrap();
        let b = &t.node("r1").unwrap().binds[0];
        assert_eq!(b.source, "__clabNodeName__/frr.conf");
        assert!(b.read_only);
    }

    #[test]
    fn prefix_changes_namespace_names() {
        assert_eq!(namespace_name(Some(""), "lab", "n"), "n");
        assert_eq!(namespace_name(Some("__lab-name"), "lab", "n"), "lab-n");
        assert_eq!(namespace_name(Some("x"), "lab", "n"), "x-lab-n");
    }

    #[test]
    fn unknown_node_in_link_names_file_key_and_node() {
        let e = err(
            "name: l\ntopology:\n  nodes: {a: {kind: linux}}\n  links:\n    - endpoints: [\"a:eth1\", \"r9:eth1\"]\n",
        );
        assert!(
            e.starts_with("/labs/t.clab.yml: topology.links[0].endpoints[1]: unknown node 'r9'"),
            "{e}"
        );
    }

    #[test]
    fn interface_used_twice_names_both_places() {
        let e = err(
            "name: l\ntopology:\n  defaults: {kind: linux}\n  nodes: {a: {}, b: {}, c: {}}\n  links:\n    - endpoints: [\"a:eth1\", \"b:eth1\"]\n    - endpoints: [\"c:eth1\", \"b:eth1\"]\n",
        );
        assert!(e.contains("/labs/t.clab.yml: topology.links[1].endpoints[1]: node b: interface eth1 is already used by topology.links[0].endpoints[1]"), "{e}");
    }

    #[test]
    fn missing_topology_and_invalid_yaml() {
        let e = err("name: x\n");
        assert_eq!(e, "/labs/t.clab.yml: topology: missing");
        let e = err("name: x\ntopology:\n  nodes:\n    a: {kind: linux\n");
        assert!(
            e.starts_with("/labs/t.clab.yml: invalid YAML:") && e.contains("line"),
            "{e}"
        );
        let e = err("topology:\n  nodes: {a: {kind: linux}}\n");
        assert!(e.contains(": name: missing"), "{e}");
        let e = err("name: x\ntopology:\n  nodes: {}\n");
        assert!(e.contains("topology.nodes: missing or empty"), "{e}");
    }

    #[test]
    fn refused_features_name_key_and_node() {
        let e = err("name: x\ntopology:\n  nodes:\n    r1: {kind: linux, network-mode: host}\n");
        assert!(
            e.contains("topology.nodes.r1.network-mode: node r1: network-mode is not supported"),
            "{e}"
        );
        let e = err("name: x\ntopology:\n  nodes:\n    srl: {kind: nokia_srlinux}\n");
        assert!(
            e.contains("topology.nodes.srl.kind: kind 'nokia_srlinux' is not supported"),
            "{e}"
        );
        let e = err(
            "name: x\ntopology:\n  nodes: {a: {kind: linux}}\n  links:\n    - endpoints: [\"a:eth1\", \"host:a-eth1\"]\n",
        );
        assert!(
            e.contains("topology.links[0].endpoints[1]: 'host:' endpoints are not supported"),
            "{e}"
        );
        let e = err(
            "name: x\ntopology:\n  nodes: {a: {kind: linux}}\n  links:\n    - type: dummy\n      endpoint: {node: a, interface: d0}\n",
        );
        assert!(
            e.contains("topology.links[0].type: link type 'dummy' is not supported"),
            "{e}"
        );
        let e =
            err("name: x\ntopology:\n  nodes: {a: {kind: linux, sysctls: {kernel.pid_max: 10}}}\n");
        assert!(
            e.contains("topology.nodes.a.sysctls.kernel.pid_max: only net.*"),
            "{e}"
        );
        let e = err(
            "name: x\ntopology:\n  nodes: {a: {kind: linux}, b: {kind: linux}}\n  links:\n    - endpoints: [\"a:eth0\", \"b:eth1\"]\n",
        );
        assert!(
            e.contains("endpoints[0]: node a: eth0 is containerlab's management interface"),
            "{e}"
        );
        let e = err(
            "name: x\ntopology:\n  nodes: {a: {kind: linux}, b: {kind: linux}}\n  links:\n    - endpoints: [\"a:averyveryverylongname\", \"b:eth1\"]\n",
        );
        assert!(e.contains("longer than 15"), "{e}");
        let e = err("name: x\ntopology:\n  nodes: {a: {group: nope}}\n");
        assert!(
            e.contains("topology.nodes.a.group: unknown group 'nope'"),
            "{e}"
        );
        let e = err("name: x\ntopology:\n  nodes: {a: {}}\n");
        assert!(e.contains("topology.nodes.a.kind: missing"), "{e}");
    }

    #[test]
    fn ignored_keys_warn_with_node_and_key() {
        let t = parse("name: x\nmgmt: {network: m}\ntopology:\n  kinds:\n    linux: {ports: ['80:80']}\n  nodes:\n    a: {kind: linux, mgmt-ipv4: 172.20.20.2, frobnicate: 1}\n").unwrap();
        let w = t.warnings.join("\n");
        assert!(w.contains("mgmt: ignored"), "{w}");
        assert!(
            w.contains(
                "node a: topology.nodes.a.mgmt-ipv4: ignored: ferrolab builds no management network"
            ),
            "{w}"
        );
        assert!(
            w.contains("node a: topology.kinds.linux.ports: ignored"),
            "{w}"
        );
        assert!(
            w.contains("node a: topology.nodes.a.frobnicate: unknown node key"),
            "{w}"
        );
    }

    #[test]
    fn stages_and_healthcheck() {
        let t = parse(
            r#"
name: st
topology:
  defaults: {kind: linux}
  nodes:
    tor:
      healthcheck: {test: ["CMD-SHELL", "vtysh -c 'show version'"], interval: 1, retries: 5}
    lb:
      stages:
        configure:
          wait-for: [{node: tor, stage: healthy}]
          exec: [{command: "echo hi", phase: on-exit}]
"#,
        )
        .unwrap();
        let lb = t.node("lb").unwrap();
        let spec = &lb.stages[&Stage::Configure];
        assert_eq!(
            spec.wait_for,
            [WaitFor {
                node: "tor".into(),
                stage: Stage::Healthy
            }]
        );
        assert_eq!(spec.exec[0].phase, Phase::OnExit);
        let hc = t.node("tor").unwrap().healthcheck.clone().unwrap();
        assert_eq!(hc.argv[..2], ["sh".to_string(), "-c".to_string()]);
        assert_eq!(hc.retries, 5);
        let e = err(
            "name: x\ntopology:\n  defaults: {kind: linux}\n  nodes:\n    a: {}\n    b: {stages: {create: {wait-for: [{node: a, stage: healthy}]}}}\n",
        );
        assert!(e.contains("topology.nodes.b.stages.create.wait-for[0]: waits for node 'a' to be healthy, but that node has no healthcheck"), "{e}");
        let e = err("name: x\ntopology:\n  nodes:\n    b: {kind: linux, stages: {boot: {}}}\n");
        assert!(
            e.contains("topology.nodes.b.stages.boot: unknown stage"),
            "{e}"
        );
    }

    #[test]
    fn env_files_are_read_relative_to_the_topology() {
        let dir = std::env::temp_dir().join(format!("ferrolab-envfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("vars.env"),
            "# comment\nX=from-file\nexport Y=\"quoted\"\n",
        )
        .unwrap();
        let text = "name: e\ntopology:\n  nodes:\n    a: {kind: linux, env-files: [vars.env], env: {Y: env-wins}}\n";
        let t = Topology::parse_str(text, &dir.join("t.clab.yml"), &dir, &|_| None).unwrap();
        let env = &t.node("a").unwrap().env;
        assert_eq!(env["X"], "from-file");
        assert_eq!(env["Y"], "env-wins");
        let text = "name: e\ntopology:\n  nodes:\n    a: {kind: linux, env-files: [missing.env]}\n";
        let e = Topology::parse_str(text, &dir.join("t.clab.yml"), &dir, &|_| None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("topology.nodes.a.env-files[0]: node a: cannot read"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
