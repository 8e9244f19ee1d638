//! Command-line flags (loxilb-compatible names, `--flag=value` and `--flag value`) and the
//! validated [`Config`] they become.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{Result, anyhow, bail};
use clap::Parser;
use regex::Regex;

#[derive(Debug, Parser)]
#[command(
    name = "ferrolb",
    version,
    about = "ferrolb: an L4 load balancer with an eBPF datapath and a loxilb-compatible REST API",
    long_about = "ferrolb forwards TCP, UDP and ICMP to backends in eBPF (TC ingress on every \
interface except lo), tracks every connection, and is programmed through a REST API that is \
wire-compatible with loxilb's (base /netlox/v1), so kube-loxilb and loxicmd-style workflows \
work unchanged. Rules persist under --config-path and the datapath stays pinned in bpffs, so a \
restart (or a crash) does not drop established connections."
)]
pub struct Flags {
    /// REST API listen address.
    #[arg(long, default_value = "0.0.0.0", value_name = "IP")]
    pub host: IpAddr,

    /// REST API listen port (also serves /metrics).
    #[arg(long, default_value_t = 11111, value_name = "PORT")]
    pub port: u16,

    /// Do not serve the REST API (loxilb's `-a/--api` did this despite its help text; ferrolb
    /// spells it out).
    #[arg(long)]
    pub no_api: bool,

    /// State directory: rules are saved here atomically and restored on start.
    #[arg(long, default_value = "/etc/ferrolb/", value_name = "DIR")]
    pub config_path: PathBuf,

    /// Only attach to interfaces whose name matches this regex (lo never).
    #[arg(long, value_name = "REGEX")]
    pub whitelist: Option<String>,

    /// Never attach to interfaces whose name matches this regex.
    #[arg(long, value_name = "REGEX")]
    pub blacklist: Option<String>,

    /// Log level: trace, debug, info, warning (or warn), error.
    #[arg(long, default_value = "info", value_name = "LEVEL")]
    pub loglevel: String,

    /// Also serve the API over HTTPS on --tls-host:--tls-port (needs --tls-certificate and
    /// --tls-key).
    #[arg(long)]
    pub tls: bool,
    /// HTTPS listen address.
    #[arg(long, default_value = "0.0.0.0", value_name = "IP")]
    pub tls_host: IpAddr,
    /// HTTPS listen port.
    #[arg(long, default_value_t = 8091, value_name = "PORT")]
    pub tls_port: u16,
    /// HTTPS certificate (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_certificate: Option<PathBuf>,
    /// HTTPS private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// Most REST API connections open at once, HTTP and HTTPS together (more are closed at
    /// accept and counted).
    #[arg(long, default_value_t = 512, value_name = "N")]
    pub api_max_connections: usize,
    /// Most REST API connections open at once from one source address.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub api_max_connections_per_source: usize,
    /// A REST API connection that carries nothing either way for this long is closed.
    #[arg(long, default_value_t = 120, value_name = "SECONDS")]
    pub api_idle_timeout: u64,

    /// Accepted for loxilb compatibility: metrics are always served at /metrics.
    #[arg(short = 'p', long)]
    pub prometheus: bool,

    /// Also publish loxilb's metric names (active_conntrack_count, processed_bytes, ...) beside
    /// ferrolb_*, so dashboards made for loxilb (kube-loxilb's Grafana) work unchanged.
    #[arg(long)]
    pub loxilb_metrics: bool,

    /// Accepted for loxilb compatibility: the datapath needs no egress hook.
    #[arg(long)]
    pub egr_hooks: bool,

    /// Conntrack sync transport: grpc (netrpc is accepted with a warning and means grpc).
    #[arg(long, value_name = "netrpc|grpc")]
    pub rpc: Option<String>,

    /// Cluster peers for connection sync (gRPC, --sync-port), comma-separated: turns on
    /// cluster mode. With --ka the nodes decide MASTER/BACKUP themselves.
    #[arg(long, value_name = "IP[,IP...]")]
    pub cluster: Option<String>,

    /// This node's id in the cluster (0..N-1; the origin of the flows it creates). With --ka,
    /// the lowest id becomes MASTER when nodes start together.
    #[arg(long = "self", value_name = "N")]
    pub self_id: Option<u16>,

    /// TCP port of conntrack sync (every node listens on it; peers are dialled on it).
    #[arg(long, default_value_t = 22222, value_name = "PORT")]
    pub sync_port: u16,

    /// File holding the shared secret peers present on the sync channel (one line).
    #[arg(long, value_name = "FILE")]
    pub sync_token_file: Option<PathBuf>,

    /// Mutual TLS on the sync channel: this node's certificate (PEM; peers are dialled by IP,
    /// so it needs an IP subjectAltName).
    #[arg(long, value_name = "FILE", requires_all = ["sync_tls_key", "sync_tls_ca"])]
    pub sync_tls_cert: Option<PathBuf>,

    /// Mutual TLS: this node's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "sync_tls_cert")]
    pub sync_tls_key: Option<PathBuf>,

    /// Mutual TLS: the CA that signs every node's certificate (PEM).
    #[arg(long, value_name = "FILE", requires = "sync_tls_cert")]
    pub sync_tls_ca: Option<PathBuf>,

    /// With --ka: how long a (re)starting node waits for its first complete sync from every
    /// peer before it takes part in the election anyway (milliseconds).
    #[arg(long, default_value_t = 5000, value_name = "MS")]
    pub ha_join_timeout_ms: u64,

    /// BFD keepalive: REMOTE:SOURCE[:INTERVAL_US or :Nms], comma-separated for several peers;
    /// one BFD session (RFC 5880, multiplier 3, default 100 ms) per peer.
    #[arg(long, value_name = "REMOTE:SOURCE[:INTERVAL]")]
    pub ka: Option<String>,

    /// Real-time priority (SCHED_FIFO, 1-99) of the BFD thread, so that forwarding load and
    /// busy processes cannot delay BFD packets past a peer's detection time; 0 leaves it at
    /// normal priority. Refused by the kernel: a warning, and normal priority.
    #[arg(long, default_value_t = 10, value_name = "N",
          value_parser = clap::value_parser!(u8).range(0..=99))]
    pub bfd_rt_priority: u8,

    /// Real-time priority (SCHED_FIFO, 1-99) of the conntrack sync worker thread (keep it
    /// below --bfd-rt-priority), so that REST, scrapes and load beside the agent cannot hold a
    /// sync batch back (conntrackd's `Scheduler` option); its table walks stay at normal
    /// scheduling (nice -10). 0: nice -10 only. Refused by the kernel: a warning.
    #[arg(long, default_value_t = 5, value_name = "N",
          value_parser = clap::value_parser!(u8).range(0..=99))]
    pub sync_rt_priority: u8,

    /// Advertise VIPs over BGP (configured with /config/bgp/global and /config/bgp/neigh).
    #[arg(short = 'b', long)]
    pub bgp: bool,

    /// Seconds a drain (SIGTERM with --bgp) advertises the graceful-shutdown community before
    /// withdrawing the VIPs.
    #[arg(long, default_value_t = 3, value_name = "SECONDS")]
    pub bgp_drain_seconds: u64,

    /// bpffs directory for the pinned datapath (default /sys/fs/bpf/ferrolb/<netns>/v<layout>).
    #[arg(long, value_name = "DIR")]
    pub bpf_pin_dir: Option<PathBuf>,

    /// Datapath services (rules) the maps are sized for, at first creation.
    #[arg(long, default_value_t = 4096, value_name = "N")]
    pub max_services: u32,

    /// Conntrack entries (two per flow) the map is sized for, at first creation.
    #[arg(long, default_value_t = 1 << 20, value_name = "N")]
    pub max_conntrack: u32,

    /// Entries of the half-open table (TCP flows before their handshake completes: an LRU of
    /// its own, so a SYN flood evicts only half-open flows), at first creation; 0: a quarter
    /// of --max-conntrack.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub max_halfopen: u32,

    /// Half-open TCP flows made in the conntrack table itself, at first creation: their
    /// handshake completes in place, with no move between the tables at its end (the conntrack
    /// table has room of its own for them: two entries each beyond --max-conntrack). Past it,
    /// half-open flows go to the half-open table. Default: an eighth of the half-open table;
    /// 0: none.
    #[arg(long, value_name = "N")]
    pub halfopen_inplace: Option<u32>,

    /// Seconds between conntrack collector passes.
    #[arg(long, default_value_t = 5, value_name = "SECONDS")]
    pub gc_interval: u64,

    /// Remove the pinned datapath of this network namespace (detaches from every interface,
    /// frees the maps) and exit. Established flows stop being forwarded.
    #[arg(long)]
    pub remove_datapath: bool,

    /// Leave the kernel's forwarding sysctls alone (hosts whose sysctls are managed
    /// elsewhere). By default the agent turns `net.ipv4.conf.<if>.forwarding` and
    /// `net.ipv6.conf.<if>.forwarding` on for every interface it attaches to, since the
    /// datapath can forward only what the kernel would; with this flag it warns instead.
    #[arg(long)]
    pub no_forwarding_sysctl: bool,

    /// Forward through veth interfaces with a plain redirect. By default, a packet the
    /// datapath forwards out of a veth whose other end is in another network namespace is
    /// handed straight to that end (`bpf_redirect_peer`): it skips this side's transmit path
    /// (so this side's TX counters, egress qdisc and `tcpdump` do not see it; the other end's
    /// RX counters and captures do) and a trip through the per-CPU backlog.
    #[arg(long)]
    pub no_peer_redirect: bool,

    /// One-arm source addresses that float with the MASTER role, `IP/PREFIX[,...]`: one-arm
    /// rules translate traffic to endpoints inside PREFIX from IP (not from this node's own
    /// interface address), so their flows survive a failover. IP goes on `lo` of every node;
    /// only the MASTER answers ARP / neighbour solicitations for it and announces it on
    /// takeover. Give every node of the cluster the same list.
    #[arg(long, value_name = "IP/PREFIX[,...]")]
    pub onearm_source: Option<String>,

    /// This node's own full-NAT source address, `IP[,IP]` (at most one IPv4 and one IPv6;
    /// needs --cluster): full-NAT flows created here leave from it instead of the VIP, and
    /// BGP advertises it as a host route, plainly from this node and with a longer AS path
    /// from every peer (ring order after this node: the next one first). A flow's replies
    /// then return to the node that holds it whatever the ToR's ECMP hash or a partition
    /// does; when the node dies, its route moves to a survivor that holds its synced flows.
    /// The agent puts it on `lo`. Give every node a different address, outside every VIP and
    /// interface address.
    #[arg(long, value_name = "IP[,IP]")]
    pub node_snat: Option<String>,

    /// BFD interval (transmit and receive, milliseconds) of the sessions BGP neighbours get
    /// by default (passive unless the neighbour body says `"bfd": true`); `bfdInterval` in
    /// `POST /config/bgp/global` overrides it.
    #[arg(long, default_value_t = 100, value_name = "MS",
          value_parser = clap::value_parser!(u32).range(10..=60_000))]
    pub bgp_bfd_interval_ms: u32,

    /// BFD detection multiplier of those sessions (`bfdRetryCount` overrides it).
    #[arg(long, default_value_t = 3, value_name = "N",
          value_parser = clap::value_parser!(u8).range(1..=255))]
    pub bgp_bfd_multiplier: u8,
}

/// A parsed `--ka` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keepalive {
    pub remote: IpAddr,
    pub source: IpAddr,
    pub interval_us: u32,
}

#[derive(Debug)]
pub struct Config {
    pub flags: Flags,
    /// Sync peers from `--cluster`.
    pub cluster: Vec<IpAddr>,
    /// BFD sessions from `--ka`.
    pub keepalives: Vec<Keepalive>,
    /// From `--onearm-source`.
    pub onearm_sources: Vec<ipnet::IpNet>,
    /// From `--node-snat`: at most one per family.
    pub node_snat: Vec<IpAddr>,
    pub whitelist: Option<Regex>,
    pub blacklist: Option<Regex>,
    pub log_filter: &'static str,
}

pub fn log_filter(level: &str) -> Result<&'static str> {
    Ok(match level.to_ascii_lowercase().as_str() {
        "trace" => "trace",
        "debug" => "debug",
        "info" => "info",
        "warning" | "warn" => "warn",
        "error" | "critical" | "emergency" | "alert" => "error",
        other => bail!("--loglevel: unknown level '{other}' (trace, debug, info, warning, error)"),
    })
}

/// `--node-snat`: one or two unicast addresses, at most one per family.
pub fn parse_node_snat(s: &str) -> Result<Vec<IpAddr>> {
    let mut out: Vec<IpAddr> = Vec::new();
    for p in s.split(',').map(str::trim) {
        let a: IpAddr = p
            .parse()
            .map_err(|_| anyhow!("--node-snat: '{p}' is not an IP address"))?;
        if a.is_unspecified() || a.is_multicast() || a.is_loopback() {
            bail!("--node-snat: '{p}' is not a unicast address another host can reply to");
        }
        if let IpAddr::V4(v4) = a
            && v4.is_broadcast()
        {
            bail!("--node-snat: '{p}' is not a unicast address another host can reply to");
        }
        if out.iter().any(|o| o.is_ipv4() == a.is_ipv4()) {
            bail!("--node-snat: at most one IPv4 and one IPv6 address ('{p}' is a second one)");
        }
        out.push(a);
    }
    Ok(out)
}

pub fn parse_cluster(s: &str) -> Result<Vec<IpAddr>> {
    s.split(',')
        .map(|p| {
            p.trim()
                .parse()
                .map_err(|_| anyhow!("--cluster: '{p}' is not an IP address"))
        })
        .collect()
}

/// `--onearm-source`: `IP/PREFIX` items; the address must be a usable unicast address (not
/// the prefix's network address unless the prefix is a single address).
pub fn parse_onearm_sources(s: &str) -> Result<Vec<ipnet::IpNet>> {
    let mut out: Vec<ipnet::IpNet> = Vec::new();
    for item in s.split(',').map(str::trim) {
        let net: ipnet::IpNet = item.parse().map_err(|_| {
            anyhow!("--onearm-source: '{item}' is not IP/PREFIX (e.g. 10.10.10.100/24)")
        })?;
        let a = net.addr();
        let unusable = a.is_unspecified()
            || a.is_loopback()
            || a.is_multicast()
            || (net.prefix_len() < net.max_prefix_len() && a == net.network());
        if unusable {
            bail!("--onearm-source: {a} in '{item}' is not a usable unicast address");
        }
        if out.iter().any(|o| o.addr() == a) {
            bail!("--onearm-source: {a} is given twice");
        }
        out.push(net);
    }
    Ok(out)
}

pub fn parse_ka(s: &str) -> Result<Vec<Keepalive>> {
    s.split(',')
        .map(|item| {
            let parts: Vec<&str> = item.trim().split(':').collect();
            if parts.len() < 2 || parts.len() > 3 {
                bail!("--ka: '{item}' must be REMOTE:SOURCE[:INTERVAL]");
            }
            let remote = parts[0]
                .parse()
                .map_err(|_| anyhow!("--ka: remote '{}' is not an IPv4 address", parts[0]))?;
            let source = parts[1]
                .parse()
                .map_err(|_| anyhow!("--ka: source '{}' is not an IPv4 address", parts[1]))?;
            let interval_us = match parts.get(2) {
                None => 100_000,
                Some(v) => {
                    let (num, mult) = match v.strip_suffix("ms") {
                        Some(n) => (n, 1000),
                        None => (*v, 1),
                    };
                    let n: u32 = num
                        .parse()
                        .map_err(|_| anyhow!("--ka: interval '{v}' is not a number"))?;
                    let us = n.saturating_mul(mult);
                    if !(10_000..=60_000_000).contains(&us) {
                        bail!("--ka: interval {us} us out of range 10000..=60000000 (10 ms..60 s)");
                    }
                    us
                }
            };
            Ok(Keepalive {
                remote,
                source,
                interval_us,
            })
        })
        .collect()
}

impl Config {
    pub fn from_flags(flags: Flags) -> Result<Config> {
        let log_filter = log_filter(&flags.loglevel)?;
        let re = |name: &str, v: &Option<String>| -> Result<Option<Regex>> {
            v.as_deref()
                .map(|s| Regex::new(s).map_err(|e| anyhow!("--{name}: invalid regex: {e}")))
                .transpose()
        };
        let whitelist = re("whitelist", &flags.whitelist)?;
        let blacklist = re("blacklist", &flags.blacklist)?;
        if let Some(r) = &flags.rpc {
            match r.as_str() {
                "grpc" | "netrpc" => {}
                other => bail!("--rpc: '{other}' is not netrpc or grpc"),
            }
        }
        let cluster = match &flags.cluster {
            Some(c) => parse_cluster(c)?,
            None => Vec::new(),
        };
        let keepalives = match &flags.ka {
            Some(k) => parse_ka(k)?,
            None => Vec::new(),
        };
        if flags.self_id.is_some() && cluster.is_empty() {
            bail!("--self: only meaningful with --cluster (the peers to sync with)");
        }
        if !keepalives.is_empty() && !cluster.is_empty() {
            for ka in &keepalives {
                if keepalives.len() > 1 && !cluster.contains(&ka.remote) {
                    bail!(
                        "--ka: {} is not in --cluster; with several peers each --ka remote must be a --cluster address",
                        ka.remote
                    );
                }
            }
        }
        if flags.sync_port == 0 {
            bail!("--sync-port: must be 1..=65535");
        }
        if flags.ha_join_timeout_ms > 600_000 {
            bail!("--ha-join-timeout-ms: at most 600000 (10 minutes)");
        }
        if !cluster.is_empty() && flags.sync_token_file.is_none() && flags.sync_tls_cert.is_none() {
            tracing::warn!(
                "conntrack sync without --sync-token-file or --sync-tls-*: any host that reaches the sync port can subscribe"
            );
        }
        if flags.tls {
            if flags.tls_certificate.is_none() || flags.tls_key.is_none() {
                bail!("--tls needs --tls-certificate and --tls-key (PEM files)");
            }
            if !flags.no_api && flags.tls_host == flags.host && flags.tls_port == flags.port {
                bail!(
                    "--tls-port: {} is already the plain API's port (--port)",
                    flags.tls_port
                );
            }
        }
        if flags.api_max_connections == 0 || flags.api_max_connections > 1 << 20 {
            bail!("--api-max-connections: must be 1..=1048576");
        }
        if flags.api_max_connections_per_source == 0 {
            bail!("--api-max-connections-per-source: must be at least 1");
        }
        if flags.api_idle_timeout == 0 || flags.api_idle_timeout > 86_400 {
            bail!("--api-idle-timeout: must be 1..=86400 seconds");
        }
        if flags.max_services == 0 || flags.max_services > 1 << 20 {
            bail!("--max-services: must be 1..=1048576");
        }
        if flags.max_conntrack < 1024 {
            bail!("--max-conntrack: must be at least 1024");
        }
        if flags.max_halfopen != 0 && flags.max_halfopen < 1024 {
            bail!("--max-halfopen: must be 0 (a quarter of --max-conntrack) or at least 1024");
        }
        if flags.halfopen_inplace.is_some_and(|n| n > 1 << 20) {
            bail!("--halfopen-inplace: must be at most 1048576");
        }
        if flags.gc_interval == 0 {
            bail!("--gc-interval: must be at least 1 second");
        }
        let onearm_sources = match &flags.onearm_source {
            Some(s) => parse_onearm_sources(s)?,
            None => Vec::new(),
        };
        let node_snat = match &flags.node_snat {
            Some(s) => parse_node_snat(s)?,
            None => Vec::new(),
        };
        if !node_snat.is_empty() && cluster.is_empty() {
            bail!(
                "--node-snat: only meaningful with --cluster (a single node's flows all return to it)"
            );
        }
        if let Some(a) = node_snat.iter().find(|a| cluster.contains(a)) {
            bail!("--node-snat: {a} is a --cluster peer's address");
        }
        Ok(Config {
            flags,
            cluster,
            onearm_sources,
            node_snat,
            whitelist,
            blacklist,
            log_filter,
            keepalives,
        })
    }

    /// Whether the agent manages an interface.
    pub fn wants(&self, iface: &str) -> bool {
        if iface == "lo" {
            return false;
        }
        if let Some(w) = &self.whitelist
            && !w.is_match(iface)
        {
            return false;
        }
        if let Some(b) = &self.blacklist
            && b.is_match(iface)
        {
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn onearm_sources_name_the_address_and_its_prefix() {
        let v = parse_onearm_sources("10.10.10.100/24, fd00:10::100/64").unwrap();
        assert_eq!(v[0].addr(), "10.10.10.100".parse::<IpAddr>().unwrap());
        assert!(v[0].contains(&"10.10.10.11".parse::<IpAddr>().unwrap()));
        assert!(v[1].contains(&"fd00:10::11".parse::<IpAddr>().unwrap()));
        for bad in [
            "10.10.10.100",
            "10.10.10.0/24",
            "0.0.0.0/0",
            "127.0.0.2/8",
            "224.0.0.1/24",
            "10.0.0.1/24,10.0.0.1/16",
            "x/24",
        ] {
            let e = parse_onearm_sources(bad).unwrap_err().to_string();
            assert!(e.contains("--onearm-source"), "{bad}: {e}");
        }
        assert_eq!(
            crate::lb::floating_source("10.10.10.12".parse().unwrap(), &v),
            Some("10.10.10.100".parse().unwrap())
        );
        assert_eq!(
            crate::lb::floating_source("10.20.0.1".parse().unwrap(), &v),
            None
        );
    }

    #[test]
    fn node_snat_takes_one_address_per_family_and_needs_a_cluster() {
        let c = cfg(&[
            "--cluster=10.10.10.3",
            "--self=0",
            "--node-snat=203.0.113.201,2001:db8::201",
        ])
        .unwrap();
        assert_eq!(
            c.node_snat,
            vec![
                "203.0.113.201".parse::<IpAddr>().unwrap(),
                "2001:db8::201".parse().unwrap()
            ]
        );
        for (args, why) in [
            (
                &["--node-snat=203.0.113.201"][..],
                "only meaningful with --cluster",
            ),
            (
                &["--cluster=10.10.10.3", "--node-snat=10.0.0.1,10.0.0.2"][..],
                "at most one IPv4",
            ),
            (
                &["--cluster=10.10.10.3", "--node-snat=10.10.10.3"][..],
                "peer's address",
            ),
            (
                &["--cluster=10.10.10.3", "--node-snat=0.0.0.0"][..],
                "not a unicast",
            ),
            (
                &["--cluster=10.10.10.3", "--node-snat=255.255.255.255"][..],
                "not a unicast",
            ),
            (
                &["--cluster=10.10.10.3", "--node-snat=ff02::1"][..],
                "not a unicast",
            ),
            (
                &["--cluster=10.10.10.3", "--node-snat=snat"][..],
                "not an IP address",
            ),
        ] {
            let e = cfg(args).unwrap_err().to_string();
            assert!(
                e.contains("--node-snat") && e.contains(why),
                "{args:?}: {e}"
            );
        }
    }

    fn cfg(args: &[&str]) -> Result<Config> {
        let mut v = vec!["ferrolb"];
        v.extend_from_slice(args);
        Config::from_flags(Flags::try_parse_from(v)?)
    }

    /// The tables' sizes: each bound named in its error; the in-place budget's default (None:
    /// the datapath takes an eighth of the half-open table) and its edges.
    #[test]
    fn table_sizes_are_bounded_and_named() {
        let d = cfg(&[]).unwrap();
        assert_eq!(d.flags.halfopen_inplace, None);
        for ok in ["0", "128", "1048576"] {
            let c = cfg(&["--halfopen-inplace", ok]).unwrap();
            assert_eq!(c.flags.halfopen_inplace, Some(ok.parse().unwrap()));
        }
        for (args, flag) in [
            (&["--halfopen-inplace", "1048577"][..], "--halfopen-inplace"),
            (&["--halfopen-inplace=-1"][..], "--halfopen-inplace"),
            (&["--max-conntrack", "1023"][..], "--max-conntrack"),
            (&["--max-halfopen", "1023"][..], "--max-halfopen"),
            (&["--max-services", "0"][..], "--max-services"),
            (&["--max-services", "1048577"][..], "--max-services"),
        ] {
            let e = cfg(args).unwrap_err().to_string();
            assert!(e.contains(flag), "{args:?}: {e}");
        }
        assert!(cfg(&["--max-halfopen", "0"]).is_ok(), "0: the default size");
    }

    #[test]
    fn loxilb_style_flags_parse_both_ways() {
        let c = cfg(&[
            "--port=2222",
            "--host",
            "127.0.0.1",
            "-p",
            "--egr-hooks",
            "--rpc=netrpc",
        ])
        .unwrap();
        assert_eq!(c.flags.port, 2222);
        assert_eq!(c.flags.host.to_string(), "127.0.0.1");
        let d = cfg(&[]).unwrap();
        assert_eq!(d.flags.port, 11111);
        assert_eq!(d.flags.config_path, PathBuf::from("/etc/ferrolb/"));
        assert_eq!(d.log_filter, "info");
        assert_eq!(cfg(&["--loglevel=warning"]).unwrap().log_filter, "warn");
        assert!(
            cfg(&["--loglevel=loud"])
                .unwrap_err()
                .to_string()
                .contains("--loglevel")
        );
    }

    #[test]
    fn ha_flags() {
        let c = cfg(&[
            "--cluster=192.168.58.111",
            "--self=1",
            "--ka=192.168.58.111:192.168.58.110",
        ])
        .unwrap();
        assert_eq!(c.cluster, vec!["192.168.58.111".parse::<IpAddr>().unwrap()]);
        assert_eq!(c.flags.self_id, Some(1));
        assert_eq!(c.flags.sync_port, 22222);
        let e = cfg(&["--self=1"]).unwrap_err().to_string();
        assert!(e.contains("--self: only meaningful with --cluster"), "{e}");
        let e = cfg(&[
            "--cluster=10.0.0.2,10.0.0.3",
            "--ka=10.0.0.2:10.0.0.1,10.0.0.9:10.0.0.1",
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("--ka: 10.0.0.9 is not in --cluster"), "{e}");
        assert!(cfg(&["--cluster=10.0.0.2", "--sync-tls-key=k"]).is_err());
        assert!(cfg(&["--cluster=10.0.0.2", "--sync-port=0"]).is_err());
        // --ka alone starts BFD sessions.
        let c = cfg(&["--ka=192.168.58.111:192.168.58.110:50ms,10.0.0.2:10.0.0.1"]).unwrap();
        assert_eq!(c.keepalives.len(), 2);
        assert_eq!(c.keepalives[0].interval_us, 50_000);
        let e = cfg(&["--cluster=1.2.3"]).unwrap_err().to_string();
        assert!(e.contains("--cluster: '1.2.3' is not an IP address"), "{e}");
        let e = cfg(&["--ka=1.1.1.1"]).unwrap_err().to_string();
        assert!(e.contains("REMOTE:SOURCE"), "{e}");
        assert!(cfg(&["-b"]).is_ok(), "-b enables the BGP speaker");
        assert!(cfg(&["--rpc=carrier-pigeon"]).is_err());
        let e = cfg(&["--tls"]).unwrap_err().to_string();
        assert!(e.contains("--tls-certificate"), "{e}");
        let e = cfg(&[
            "--tls",
            "--tls-certificate=c",
            "--tls-key=k",
            "--tls-port=11111",
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("--tls-port"), "{e}");
        assert!(cfg(&["--tls", "--tls-certificate=c", "--tls-key=k"]).is_ok());
    }

    #[test]
    fn keepalive_intervals() {
        let k = parse_ka("10.0.0.2:10.0.0.1:200000,10.0.0.3:10.0.0.1:50ms").unwrap();
        assert_eq!(k[0].interval_us, 200_000);
        assert_eq!(k[1].interval_us, 50_000);
        assert_eq!(
            parse_ka("10.0.0.2:10.0.0.1").unwrap()[0].interval_us,
            100_000
        );
        assert!(parse_ka("10.0.0.2:10.0.0.1:5").is_err());
    }

    #[test]
    fn api_connection_limits() {
        let f = cfg(&[]).unwrap().flags;
        assert_eq!(
            (
                f.api_max_connections,
                f.api_max_connections_per_source,
                f.api_idle_timeout
            ),
            (512, 64, 120)
        );
        for (bad, flag) in [
            ("--api-max-connections=0", "--api-max-connections"),
            (
                "--api-max-connections-per-source=0",
                "--api-max-connections-per-source",
            ),
            ("--api-idle-timeout=0", "--api-idle-timeout"),
            ("--api-idle-timeout=86401", "--api-idle-timeout"),
        ] {
            let e = cfg(&[bad]).unwrap_err().to_string();
            assert!(e.starts_with(flag), "{bad}: {e}");
        }
    }

    #[test]
    fn bfd_thread_priority() {
        assert_eq!(cfg(&[]).unwrap().flags.bfd_rt_priority, 10);
        assert_eq!(cfg(&[]).unwrap().flags.sync_rt_priority, 5);
        let e = cfg(&["--sync-rt-priority=100"]).unwrap_err().to_string();
        assert!(e.contains("--sync-rt-priority"), "{e}");
        assert_eq!(
            cfg(&["--bfd-rt-priority=0"]).unwrap().flags.bfd_rt_priority,
            0
        );
        let e = cfg(&["--bfd-rt-priority=100"]).unwrap_err().to_string();
        assert!(e.contains("--bfd-rt-priority"), "{e}");
    }

    #[test]
    fn interface_selection() {
        let c = cfg(&["--whitelist=^eth", "--blacklist=eth9"]).unwrap();
        assert!(c.wants("eth1"));
        assert!(!c.wants("eth9"));
        assert!(!c.wants("veth0"));
        assert!(!c.wants("lo"));
        assert!(!cfg(&[]).unwrap().wants("lo"));
        assert!(
            cfg(&["--whitelist=("])
                .unwrap_err()
                .to_string()
                .contains("--whitelist")
        );
    }
}
