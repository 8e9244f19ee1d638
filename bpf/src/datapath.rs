//! Loading, pinning and attaching the datapath, and the typed map API the agent uses.
//!
//! With a pin directory, every map and every TC link is pinned there: a map that is already
//! pinned is adopted (its contents and size kept), and an interface whose link is already
//! pinned gets the new program swapped in atomically (`bpf_link_update`). Stopping the agent
//! therefore leaves the datapath forwarding; [`purge`] removes it.
//!
//! This module knows nothing of rules, REST or HA: it reads and writes map entries.

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues, RingBuf};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, ProgramError, SchedClassifier, TcAttachType, TestRun};
use aya::{Ebpf, EbpfLoader};
use tracing::{debug, info, warn};

use crate::maps::*;
use crate::{BpfError, Result};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb.bpf.o"));

const PROGRAM: &str = "flb_ingress";
/// The benchmark's floor program (see `floor_runner`).
const FLOOR: &str = "flb_floor";
/// The benchmark's zero (see `nop_runner`).
const NOP: &str = "flb_nop";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Load-time parameters. Sizes apply when the maps are created; adopted pinned maps keep
/// theirs (read them back with [`Datapath::capacity`]).
#[derive(Debug, Clone)]
pub struct DatapathConfig {
    /// Where maps and links are pinned; `None` keeps everything private to this process
    /// (tests).
    pub pin_dir: Option<PathBuf>,
    pub max_services: u32,
    pub max_conntrack: u32,
    /// `ct_new`: TCP flows before their handshake completes (an LRU of its own); 0 picks a
    /// quarter of `max_conntrack`.
    pub max_halfopen: u32,
    pub max_affinity: u32,
    /// Written into every conntrack entry this node creates (`origin`).
    pub node_id: u16,
    /// This node's own full-NAT source addresses (at most one per family); a family without
    /// one uses the VIP.
    pub fullnat_sources: Vec<std::net::IpAddr>,
    /// Flow events (created, established, closed, removed) go to the ring buffer: only a node
    /// that syncs its flows reads them. NAT-pressure signals are sent either way.
    pub flow_events: bool,
    /// How many TCP flows may be half-open in `conntrack` itself at once (`HALFOPEN_INPLACE`
    /// in `c/lb.bpf.c`; `conntrack` is sized two entries a flow larger for it); past that, and
    /// with `Some(0)`, half-open flows go through `ct_new`. `None`: an eighth of `ct_new`.
    pub halfopen_inplace: Option<u32>,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        DatapathConfig {
            pin_dir: None,
            max_services: 4096,
            max_conntrack: 1 << 20,
            max_halfopen: 0,
            max_affinity: 65536,
            node_id: 0,
            fullnat_sources: Vec::new(),
            flow_events: true,
            halfopen_inplace: None,
        }
    }
}

/// Actual map sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub services: u32,
    pub conntrack: u32,
    /// `ct_new`, the half-open flows' table.
    pub halfopen: u32,
    /// `src_ranges`: allowed source prefixes of all rules together.
    pub sources: u32,
}

/// The loaded datapath: the program and typed handles on its maps.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
    services: HashMap<MapData, SvcKey, Svc>,
    ranges: HashMap<MapData, RangeKey, Ranges>,
    backends: Array<MapData, Backends>,
    src_ranges: LpmTrie<MapData, SrcKey, u8>,
    src_drops: PerCpuArray<MapData, u64>,
    conntrack: CtTables,
    ct_budget: Array<MapData, Budget>,
    affinity: HashMap<MapData, AffinityKey, Affinity>,
    rr_state: Array<MapData, u32>,
    ep_conns: Array<MapData, u32>,
    svc_stats: PerCpuArray<MapData, Stats>,
    ep_stats: PerCpuArray<MapData, Stats>,
    counters: PerCpuArray<MapData, u64>,
    ha_flags: Array<MapData, u32>,
    /// ifindex -> MAC (`struct flb_mac`: 6 bytes and 2 of padding).
    if_macs: HashMap<MapData, u32, [u8; 8]>,
    /// `struct flb_if_out` slots (not pinned), and what this process last wrote to them.
    if_out: Array<MapData, [u8; 12]>,
    if_out_slots: Vec<[u8; 12]>,
    events: Option<RingBuf<MapData>>,
    capacity: Capacity,
    collector_ids: (u32, u32, u32, u32),
    /// `HALFOPEN_INPLACE` as loaded.
    inplace: u32,
    sync_ids: [u32; 4],
    /// `fib_gen` (not pinned), for [`Datapath::fib_invalidator`].
    fib_gen_id: u32,
    attached: Vec<String>,
}

/// A handle on the datapath's FIB generation (`fib_gen`): [`FibInvalidator::bump`] makes every
/// cached FIB answer stale at once (the agent calls it when the kernel reports a route, rule,
/// neighbour or link change), [`FibInvalidator::set_ports_free`] says for which families the
/// cache may key its questions without ports. Its own map handle, so it works without whoever
/// owns the [`Datapath`].
pub struct FibInvalidator {
    map: Array<MapData, FibGen>,
    value: FibGen,
}

impl FibInvalidator {
    /// The next generation: cached answers of earlier ones are not used.
    pub fn bump(&mut self) -> Result<()> {
        self.value.generation = self.value.generation.wrapping_add(1);
        self.write()
    }

    fn write(&mut self) -> Result<()> {
        self.map.set(0, self.value, 0).map_err(map_err("fib_gen"))
    }

    /// For which families (`FIB_PORTS_FREE_*` bits) no answer of the FIB depends on the ports,
    /// until `until_ns` (CLOCK_MONOTONIC, [`crate::monotonic_ns`]; renewed with
    /// [`FibInvalidator::renew`]), with a new generation in the same write (answers cached
    /// before are not used). The caller proves it: no policy rule selects on ports or
    /// protocol, and multipath hashes addresses only.
    pub fn set_ports_free(&mut self, flags: u32, until_ns: u64) -> Result<()> {
        self.value.flags = flags & (FIB_PORTS_FREE_V4 | FIB_PORTS_FREE_V6);
        self.value.ports_free_until_ns = until_ns;
        self.bump()
    }

    /// The same families stay keyed without ports until `until_ns` (no new generation).
    pub fn renew(&mut self, until_ns: u64) -> Result<()> {
        self.value.ports_free_until_ns = until_ns;
        self.write()
    }

    /// The families whose questions are keyed without ports now.
    pub fn ports_free(&self) -> u32 {
        self.value.flags
    }

    /// The generation the datapath reads now.
    pub fn current(&self) -> Result<u32> {
        self.map
            .get(&0, 0)
            .map(|v| v.generation)
            .map_err(map_err("fib_gen"))
    }
}

/// The default pin directory for the current network namespace:
/// `<base>/<netns inode>/v<layout>`.
pub fn default_pin_dir(base: &Path) -> Result<PathBuf> {
    let meta = std::fs::metadata("/proc/thread-self/ns/net").map_err(|e| BpfError::Io {
        context: "stat /proc/thread-self/ns/net".into(),
        source: e,
    })?;
    use std::os::unix::fs::MetadataExt;
    Ok(base
        .join(meta.ino().to_string())
        .join(format!("v{LAYOUT_VERSION}")))
}

/// Mounts bpffs on `/sys/fs/bpf` when the directory holding `dir` is not on one (a fresh
/// machine or a lab node's private sysfs). True when this call mounted it.
pub fn ensure_bpffs(dir: &Path) -> Result<bool> {
    let root = Path::new("/sys/fs/bpf");
    if !dir.starts_with(root) {
        return Ok(false);
    }
    if fs_magic(root)? == BPF_FS_MAGIC {
        return Ok(false);
    }
    info!("mounting bpffs on /sys/fs/bpf");
    let src = c"bpffs";
    let target = c"/sys/fs/bpf";
    let fstype = c"bpf";
    // SAFETY: all pointers are valid NUL-terminated strings; data is null.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(BpfError::Io {
            context: "mount bpffs on /sys/fs/bpf".into(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(true)
}

fn fs_magic(p: &Path) -> Result<i64> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| BpfError::Invalid(format!("path {} has a NUL byte", p.display())))?;
    // SAFETY: statfs writes into the zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string, st a valid out pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(BpfError::Io {
            context: format!("statfs {}", p.display()),
            source: io::Error::last_os_error(),
        });
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64)
}

/// Pin directories of other layout versions beside `pin_dir` (`.../v<N>`): datapaths an
/// older (or newer) ferrolb pinned in this network namespace. Their program would still be
/// attached through its pinned links.
pub fn other_layouts(pin_dir: &Path) -> Vec<PathBuf> {
    let Some(parent) = pin_dir.parent() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p != pin_dir)
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix('v'))
                .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect();
    out.sort();
    out
}

/// Removes a pinned datapath: unpinning the links detaches the program from every interface,
/// unpinning the maps frees them. Returns how many pins were removed.
pub fn purge(pin_dir: &Path) -> Result<usize> {
    let entries = match std::fs::read_dir(pin_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => {
            return Err(BpfError::Io {
                context: format!("read {}", pin_dir.display()),
                source: e,
            });
        }
    };
    let mut n = 0;
    for e in entries.flatten() {
        std::fs::remove_file(e.path()).map_err(|err| BpfError::Io {
            context: format!("unpin {}", e.path().display()),
            source: err,
        })?;
        n += 1;
    }
    let _ = std::fs::remove_dir(pin_dir);
    if let Some(parent) = pin_dir.parent() {
        let _ = std::fs::remove_dir(parent);
    }
    Ok(n)
}

fn map_err(name: &str) -> impl Fn(aya::maps::MapError) -> BpfError + '_ {
    move |e| BpfError::Map {
        map: name.to_string(),
        source: e,
    }
}

fn map_data<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a MapData> {
    use aya::maps::Map;
    match ebpf.map(name) {
        Some(Map::HashMap(d) | Map::LruHashMap(d) | Map::Array(d) | Map::LpmTrie(d)) => Ok(d),
        Some(_) => Err(BpfError::Invalid(format!(
            "map '{name}' has an unexpected type"
        ))),
        None => Err(BpfError::Invalid(format!("the object has no map '{name}'"))),
    }
}

fn map_id(ebpf: &Ebpf, name: &'static str) -> Result<u32> {
    Ok(map_data(ebpf, name)?.info().map_err(map_err(name))?.id())
}

fn max_entries(ebpf: &Ebpf, name: &'static str) -> Result<u32> {
    use aya::maps::Map;
    let m = ebpf
        .map(name)
        .ok_or_else(|| BpfError::Invalid(format!("the object has no map '{name}'")))?;
    let data = match m {
        Map::HashMap(d) | Map::LruHashMap(d) | Map::Array(d) | Map::LpmTrie(d) => d,
        _ => {
            return Err(BpfError::Invalid(format!(
                "map '{name}' has an unexpected type"
            )));
        }
    };
    Ok(data.info().map_err(map_err(name))?.max_entries())
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let m = ebpf
        .take_map(name)
        .ok_or_else(|| BpfError::Invalid(format!("the object has no map '{name}'")))?;
    T::try_from(m).map_err(map_err(name))
}

/// One of the benchmark's programs, loaded (through the verifier) on first use.
fn bench_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier> {
    let prog = program(ebpf, name)?;
    if prog.fd().is_err() {
        prog.load().map_err(|e| BpfError::Program {
            context: format!("load {name} (verifier)"),
            source: e,
        })?;
    }
    Ok(prog)
}

const MAPS: [&str; 17] = [
    "services",
    "ranges",
    "src_ranges",
    "src_drops",
    "backends",
    "conntrack",
    "ct_new",
    "ct_budget",
    "affinity",
    "rr_state",
    "ep_conns",
    "svc_stats",
    "ep_stats",
    "counters",
    "events",
    "ha_flags",
    "if_macs",
];

impl Datapath {
    /// Loads the program and creates (or adopts) the maps. Nothing is attached yet.
    pub fn load(cfg: &DatapathConfig) -> Result<Datapath> {
        Self::load_object(cfg, OBJECT)
    }

    /// [`Datapath::load`] from another build of `c/lb.bpf.c` (benchmarks of variants, e.g.
    /// `-DFLB_CT_NEW_MAP_FLAGS=0`); `object` must be aligned as an ELF file is read.
    pub fn load_object(cfg: &DatapathConfig, object: &[u8]) -> Result<Datapath> {
        if cfg.max_services == 0 || cfg.max_services > 1 << 20 {
            return Err(BpfError::Invalid(format!(
                "max services {} out of range 1..={}",
                cfg.max_services,
                1 << 20
            )));
        }
        if cfg.max_conntrack < 1024 {
            return Err(BpfError::Invalid(format!(
                "max conntrack entries {} below 1024",
                cfg.max_conntrack
            )));
        }
        let pins: Vec<(&'static str, PathBuf)> = match &cfg.pin_dir {
            Some(dir) => {
                ensure_bpffs(dir)?;
                std::fs::create_dir_all(dir).map_err(|e| BpfError::Io {
                    context: format!("create {}", dir.display()),
                    source: e,
                })?;
                MAPS.iter().map(|m| (*m, dir.join(m))).collect()
            }
            None => Vec::new(),
        };
        let svc = cfg.max_services;
        let ep = svc * MAX_ENDPOINTS as u32;
        let halfopen = if cfg.max_halfopen == 0 {
            (cfg.max_conntrack / 4).max(1024)
        } else {
            cfg.max_halfopen.max(1024)
        };
        // At most an eighth of the half-open table made in conntrack itself; conntrack has
        // room for their two entries each beyond --max-conntrack. A pinned conntrack adopted
        // from an earlier version keeps its size: only the room it has beyond
        // --max-conntrack is used (none: every half-open flow goes through ct_new).
        let mut inplace = cfg
            .halfopen_inplace
            .unwrap_or((halfopen / 8).max(128))
            .min(1 << 20);
        if let Some((_, pin)) = pins.iter().find(|(m, _)| *m == "conntrack")
            && let Ok(m) = MapData::from_pin(pin)
            && let Ok(info) = m.info()
        {
            let room = info.max_entries().saturating_sub(cfg.max_conntrack) / 2;
            if room < inplace {
                warn!(
                    inplace,
                    room,
                    "the pinned conntrack table has less room beyond --max-conntrack than \
                     in-place half-open flows need; using what it has (fresh pins give it all)"
                );
                inplace = room;
            }
        }
        let csum_ipv6 = u8::from(csum_ipv6());
        let flow_events = u8::from(cfg.flow_events);
        let mut src4 = [0u32; 4];
        let mut src6 = [0u32; 4];
        for a in &cfg.fullnat_sources {
            let (w, family) = crate::maps::addr_words(*a);
            if family == crate::maps::FAMILY_V6 {
                src6 = w;
            } else {
                src4 = w;
            }
        }
        let mut loader = EbpfLoader::new();
        loader
            .override_global("NODE_ID", &cfg.node_id, true)
            .override_global("FULLNAT_SRC4", &src4, true)
            .override_global("FULLNAT_SRC6", &src6, true)
            .override_global("CSUM_IPV6", &csum_ipv6, true)
            .override_global("FLOW_EVENTS", &flow_events, true)
            .override_global("HALFOPEN_INPLACE", &inplace, true)
            .map_max_entries("services", svc)
            .map_max_entries("ranges", svc)
            .map_max_entries("backends", svc * 2)
            .map_max_entries("conntrack", cfg.max_conntrack.saturating_add(2 * inplace))
            .map_max_entries("ct_new", halfopen)
            .map_max_entries("affinity", cfg.max_affinity.max(1024))
            .map_max_entries("rr_state", svc)
            .map_max_entries("ep_conns", ep)
            .map_max_entries("svc_stats", svc)
            .map_max_entries("src_drops", svc)
            .map_max_entries("ep_stats", ep);
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(object).map_err(BpfError::Load)?;
        let prog: &mut SchedClassifier = program(&mut ebpf, PROGRAM)?;
        prog.load().map_err(|e| BpfError::Program {
            context: "load flb_ingress (verifier)".into(),
            source: e,
        })?;

        let capacity = Capacity {
            services: max_entries(&ebpf, "services")?,
            conntrack: max_entries(&ebpf, "conntrack")?,
            halfopen: max_entries(&ebpf, "ct_new")?,
            sources: max_entries(&ebpf, "src_ranges")?,
        };
        let collector_ids = (
            map_id(&ebpf, "conntrack")?,
            map_id(&ebpf, "ct_new")?,
            map_id(&ebpf, "ep_conns")?,
            map_id(&ebpf, "ct_budget")?,
        );
        let sync_ids = [
            map_id(&ebpf, "conntrack")?,
            map_id(&ebpf, "services")?,
            map_id(&ebpf, "ranges")?,
            map_id(&ebpf, "backends")?,
        ];
        let fib_gen_id = map_id(&ebpf, "fib_gen")?;
        let services: HashMap<MapData, SvcKey, Svc> = take(&mut ebpf, "services")?;
        let conntrack = CtTables {
            main: take(&mut ebpf, "conntrack")?,
            new: take(&mut ebpf, "ct_new")?,
            take_works: true,
        };
        Ok(Datapath {
            ranges: take(&mut ebpf, "ranges")?,
            backends: take(&mut ebpf, "backends")?,
            src_ranges: take(&mut ebpf, "src_ranges")?,
            src_drops: take(&mut ebpf, "src_drops")?,
            affinity: take(&mut ebpf, "affinity")?,
            rr_state: take(&mut ebpf, "rr_state")?,
            ep_conns: take(&mut ebpf, "ep_conns")?,
            ct_budget: take(&mut ebpf, "ct_budget")?,
            svc_stats: take(&mut ebpf, "svc_stats")?,
            ep_stats: take(&mut ebpf, "ep_stats")?,
            counters: take(&mut ebpf, "counters")?,
            ha_flags: take(&mut ebpf, "ha_flags")?,
            if_macs: take(&mut ebpf, "if_macs")?,
            if_out: take(&mut ebpf, "if_out")?,
            if_out_slots: vec![[0u8; 12]; crate::maps::IF_OUT_SLOTS as usize],
            events: Some(take(&mut ebpf, "events")?),
            services,
            conntrack,
            capacity,
            collector_ids,
            inplace,
            sync_ids,
            fib_gen_id,
            pin_dir: cfg.pin_dir.clone(),
            ebpf,
            attached: Vec::new(),
        })
    }

    /// The in-place budget (`HALFOPEN_INPLACE`: how many half-open TCP flows may be made in
    /// `conntrack` itself; 0: none) and how many it counts now.
    pub fn halfopen_inplace(&self) -> (u32, i64) {
        (
            self.inplace,
            read_budget(&self.ct_budget).map_or(0, budget_count),
        )
    }

    pub fn capacity(&self) -> Capacity {
        self.capacity
    }

    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    /// Interfaces this process attached to (or took over).
    pub fn attached(&self) -> &[String] {
        &self.attached
    }

    /// Attaches at TC ingress of `iface`. With a pin directory, an existing pinned link is
    /// updated in place (no packet sees a gap) and a new link is pinned.
    pub fn attach(&mut self, iface: &str) -> Result<()> {
        // Neighbour advertisements for IPv6 VIPs carry the interface's MAC.
        match (ifindex_of(iface), mac_of(iface)) {
            (Some(i), Some(m)) => self.set_if_mac(i, m)?,
            _ => debug!(
                iface,
                "no MAC address: IPv6 VIPs get no neighbour advertisement here"
            ),
        }
        let pin = self
            .pin_dir
            .as_ref()
            .map(|d| d.join(format!("link_ingress_{iface}")));
        let prog: &mut SchedClassifier = program(&mut self.ebpf, PROGRAM)?;
        let perr =
            |context: String| move |e: ProgramError| BpfError::Program { context, source: e };
        if let Some(pin) = &pin {
            match PinnedLink::from_pin(pin) {
                Ok(old) => {
                    let link: SchedClassifierLink = FdLink::from(old).try_into().map_err(
                        |e: aya::programs::links::LinkError| BpfError::Link {
                            context: format!("adopt pinned link {}", pin.display()),
                            source: e,
                        },
                    )?;
                    match prog.attach_to_link(link) {
                        Ok(id) => {
                            // The pin keeps the link; our fd may close.
                            let _ = prog.take_link(id);
                            // A link whose interface was deleted accepts the update but
                            // attaches nothing: check that we really sit on this interface.
                            if attached_to(prog, iface) {
                                info!(iface, "took over the pinned datapath link");
                                self.attached.push(iface.to_string());
                                return Ok(());
                            }
                            warn!(
                                iface,
                                "pinned link belongs to a deleted interface; attaching anew"
                            );
                            let _ = std::fs::remove_file(pin);
                        }
                        Err(e) => {
                            warn!(iface, error = %e, "pinned link is stale; attaching anew");
                            let _ = std::fs::remove_file(pin);
                        }
                    }
                }
                Err(e) => debug!(iface, error = %e, "no pinned link"),
            }
        }
        let id = prog
            .attach_with_options(
                iface,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(perr(format!("attach to {iface} ingress")))?;
        if let Some(pin) = &pin {
            let link = prog
                .take_link(id)
                .map_err(perr(format!("take link of {iface}")))?;
            let fd: FdLink = link.try_into().map_err(|e| BpfError::Link {
                context: format!("link of {iface} is not a bpf_link"),
                source: e,
            })?;
            fd.pin(pin).map_err(|e| BpfError::Pin {
                path: pin.clone(),
                source: e,
            })?;
        }
        self.attached.push(iface.to_string());
        Ok(())
    }

    /// Runs the program once on `packet` with `BPF_PROG_TEST_RUN`. Returns the TC verdict and
    /// the packet as the program left it.
    pub fn test_run(&mut self, packet: &[u8]) -> Result<(u32, Vec<u8>)> {
        self.test_run_ctx(packet, None)
    }

    /// Like [`Datapath::test_run`], as if the packet had arrived on interface `ifindex` (the
    /// FIB lookup then answers for that interface: its forwarding setting, its routes).
    pub fn test_run_on(&mut self, packet: &[u8], ifindex: u32) -> Result<(u32, Vec<u8>)> {
        // `struct __sk_buff` (192 bytes): ingress_ifindex at 36, ifindex at 40; the kernel
        // refuses the other fields it does not let a test set unless they are zero.
        let mut ctx = [0u8; 192];
        ctx[36..40].copy_from_slice(&ifindex.to_ne_bytes());
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        self.test_run_ctx(packet, Some(&ctx))
    }

    fn test_run_ctx(&mut self, packet: &[u8], ctx: Option<&[u8]>) -> Result<(u32, Vec<u8>)> {
        let prog: &mut SchedClassifier = program(&mut self.ebpf, PROGRAM)?;
        let mut out = vec![0u8; packet.len() + 256];
        let opts = aya::programs::TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ctx_in: ctx,
            ..Default::default()
        };
        let r = prog.test_run(opts).map_err(|e| BpfError::Program {
            context: "BPF_PROG_TEST_RUN".into(),
            source: e,
        })?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out))
    }

    /// A handle that runs the program with `BPF_PROG_TEST_RUN` from any thread.
    pub fn test_runner(&mut self) -> Result<crate::TestRunner> {
        runner(program(&mut self.ebpf, PROGRAM)?)
    }

    /// A runner for the benchmark's floor program (`flb_floor`: FIB lookup, MAC rewrite,
    /// redirect; never attached), loaded on first use.
    pub fn floor_runner(&mut self) -> Result<crate::TestRunner> {
        self.bench_runner(FLOOR)
    }

    /// A runner for the benchmark's zero (`flb_nop`: returns at once; never attached): the
    /// cost of a `BPF_PROG_TEST_RUN` call itself on this machine.
    pub fn nop_runner(&mut self) -> Result<crate::TestRunner> {
        self.bench_runner(NOP)
    }

    /// Attaches one of the benchmark's programs at TC ingress of `iface` instead of the
    /// datapath (`floor`: FIB lookup, MAC rewrite, redirect; `nop`: returns at once, so the
    /// kernel routes): the lab benchmark's decomposition of ferrolb's cost per connection
    /// (`scripts/bench_cps_ab.py --aa --baseline-program`). Never called by the agent. The
    /// link lasts as long as this `Datapath`.
    pub fn attach_bench_program(&mut self, iface: &str, name: &str) -> Result<()> {
        let name = match name {
            "floor" => FLOOR,
            "nop" => NOP,
            other => {
                return Err(BpfError::Invalid(format!(
                    "bench program {other:?}: must be floor or nop"
                )));
            }
        };
        let prog = bench_program(&mut self.ebpf, name)?;
        prog.attach_with_options(
            iface,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(|e| BpfError::Program {
            context: format!("attach {name} to {iface} ingress"),
            source: e,
        })?;
        Ok(())
    }

    fn bench_runner(&mut self, name: &str) -> Result<crate::TestRunner> {
        runner(bench_program(&mut self.ebpf, name)?)
    }

    // --- services -------------------------------------------------------------------------

    pub fn set_service(&mut self, key: &SvcKey, svc: &Svc) -> Result<()> {
        self.services
            .insert(key, svc, 0)
            .map_err(map_err("services"))
    }

    pub fn delete_service(&mut self, key: &SvcKey) -> Result<()> {
        ignore_missing(self.services.remove(key)).map_err(map_err("services"))
    }

    pub fn service_keys(&self) -> Vec<SvcKey> {
        self.services.keys().filter_map(|k| k.ok()).collect()
    }

    pub fn set_ranges(&mut self, key: &RangeKey, r: &Ranges) -> Result<()> {
        self.ranges.insert(key, r, 0).map_err(map_err("ranges"))
    }

    pub fn delete_ranges(&mut self, key: &RangeKey) -> Result<()> {
        ignore_missing(self.ranges.remove(key)).map_err(map_err("ranges"))
    }

    pub fn range_keys(&self) -> Vec<RangeKey> {
        self.ranges.keys().filter_map(|k| k.ok()).collect()
    }

    /// Allows `addr/prefix_len` to open flows of service `svc_id` (effective once the
    /// service carries [`SVCF_SOURCES`]).
    pub fn set_source(
        &mut self,
        svc_id: u32,
        addr: std::net::IpAddr,
        prefix_len: u8,
    ) -> Result<()> {
        self.src_ranges
            .insert(&source_key(svc_id, addr, prefix_len), 1u8, 0)
            .map_err(map_err("src_ranges"))
    }

    pub fn delete_source(
        &mut self,
        svc_id: u32,
        addr: std::net::IpAddr,
        prefix_len: u8,
    ) -> Result<()> {
        ignore_missing(
            self.src_ranges
                .remove(&source_key(svc_id, addr, prefix_len)),
        )
        .map_err(map_err("src_ranges"))
    }

    /// Every allowed-source entry, as (service id, raw key): the address family is the
    /// service's, which the map does not record.
    pub fn source_entries(&self) -> Vec<(u32, u32, SrcKey)> {
        self.src_ranges
            .keys()
            .filter_map(|k| k.ok())
            .map(|k| {
                let d = k.data();
                (u32::from_be(d.svc_id_be), k.prefix_len(), d)
            })
            .collect()
    }

    /// Adds an entry in the raw form [`Datapath::source_entries`] lists.
    pub fn set_source_raw(&mut self, prefix_len: u32, key: SrcKey) -> Result<()> {
        self.src_ranges
            .insert(&LpmKey::new(prefix_len, key), 1u8, 0)
            .map_err(map_err("src_ranges"))
    }

    /// Removes one entry listed by [`Datapath::source_entries`].
    pub fn delete_source_raw(&mut self, prefix_len: u32, key: SrcKey) -> Result<()> {
        ignore_missing(self.src_ranges.remove(&LpmKey::new(prefix_len, key)))
            .map_err(map_err("src_ranges"))
    }

    /// [`Datapath::source_drops`] of many services in a few syscalls, in the order asked.
    pub fn source_drops_many(&self, ids: &[u32]) -> Result<Vec<u64>> {
        use aya::maps::IterableMap;
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|i| ids[*i]);
        let sorted: Vec<u32> = order.iter().map(|i| ids[*i]).collect();
        let sums = crate::batch::percpu_array_sums::<1>(self.src_drops.map(), &sorted, nr_cpus()?)
            .map_err(|e| BpfError::Io {
                context: "batched read of src_drops".into(),
                source: e,
            })?;
        let mut out = vec![0; ids.len()];
        for (k, i) in order.into_iter().enumerate() {
            out[i] = sums[k][0];
        }
        Ok(out)
    }

    /// First packets of service `id` dropped for their source, summed over CPUs.
    pub fn source_drops(&self, id: u32) -> u64 {
        self.src_drops
            .get(&id, 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }

    pub fn set_backends(&mut self, slot: u32, be: &Backends) -> Result<()> {
        self.backends.set(slot, be, 0).map_err(map_err("backends"))
    }

    pub fn backends(&self, slot: u32) -> Result<Backends> {
        self.backends.get(&slot, 0).map_err(map_err("backends"))
    }

    /// Resets the per-service selection state (round-robin counter, least-connection counts)
    /// before an id is reused for a new service.
    pub fn reset_service_state(&mut self, id: u32) -> Result<()> {
        self.rr_state.set(id, 0, 0).map_err(map_err("rr_state"))?;
        for i in 0..MAX_ENDPOINTS as u32 {
            self.ep_conns
                .set(id * MAX_ENDPOINTS as u32 + i, 0, 0)
                .map_err(map_err("ep_conns"))?;
        }
        Ok(())
    }

    /// Zeroes one endpoint slot's counters and connection count (the slot now holds another
    /// endpoint).
    pub fn reset_endpoint(&mut self, id: u32, ep: u32) -> Result<()> {
        let idx = id * MAX_ENDPOINTS as u32 + ep;
        self.ep_conns.set(idx, 0, 0).map_err(map_err("ep_conns"))?;
        self.ep_stats
            .set(idx, zero_stats()?, 0)
            .map_err(map_err("ep_stats"))
    }

    /// Active-connection count of an endpoint (least-connections).
    pub fn ep_conns(&self, id: u32, ep: u32) -> u32 {
        self.ep_conns
            .get(&(id * MAX_ENDPOINTS as u32 + ep), 0)
            .unwrap_or(0)
    }

    // --- conntrack ------------------------------------------------------------------------

    /// The entry under `key`, in whichever table holds it.
    pub fn ct_get(&self, key: &CtKey) -> Result<Option<Ct>> {
        self.conntrack.get(key)
    }

    /// Into `ct_new` when the entry is flagged [`CTF_NEW`], else into `conntrack`.
    pub fn ct_insert(&mut self, key: &CtKey, val: &Ct) -> Result<()> {
        self.conntrack.insert(key, val)
    }

    pub fn ct_delete(&mut self, key: &CtKey) -> Result<()> {
        self.conntrack.delete(key)
    }

    /// Every conntrack entry of both tables (batched lookups; the iterator when the kernel
    /// refuses them).
    pub fn ct_entries(&self) -> Vec<(CtKey, Ct)> {
        self.conntrack.entries()
    }

    /// Deletes entries idle past their timeout (a flow is idle when both of its entries
    /// are). Runs beside the datapath: map operations lock one bucket at a time. Returns the
    /// number of entries removed.
    pub fn ct_collect(&mut self, now_ns: u64) -> usize {
        let entries = self.ct_entries();
        self.ct_collect_from(&entries, now_ns)
    }

    /// [`Datapath::ct_collect`] over a listing the caller already took.
    pub fn ct_collect_from(&mut self, entries: &[(CtKey, Ct)], now_ns: u64) -> usize {
        collect(&mut self.conntrack, &mut self.ep_conns, entries, now_ns).len()
    }

    /// Separate handles on the conntrack and least-connection maps, so a collector can walk
    /// conntrack without holding whoever owns this `Datapath`.
    pub fn collector(&self) -> Result<Collector> {
        let open = |id: u32, name: &str| {
            aya::maps::MapData::from_id(id).map_err(|e| BpfError::Map {
                map: name.to_string(),
                source: e,
            })
        };
        let lc = aya::maps::Map::Array(open(self.collector_ids.2, "ep_conns")?);
        let budget = aya::maps::Map::Array(open(self.collector_ids.3, "ct_budget")?);
        Ok(Collector {
            conntrack: CtTables::open(self.collector_ids.0, self.collector_ids.1)?,
            walk: CtTables::open(self.collector_ids.0, self.collector_ids.1)?,
            pending_max: SWEEP_PENDING_MAX,
            ep_conns: Array::try_from(lc).map_err(map_err("ep_conns"))?,
            budget: Array::try_from(budget).map_err(map_err("ct_budget"))?,
        })
    }

    /// A separate handle on the FIB generation, for whoever watches the kernel's routes,
    /// neighbours and links.
    pub fn fib_invalidator(&self) -> Result<FibInvalidator> {
        let data = aya::maps::MapData::from_id(self.fib_gen_id).map_err(|e| BpfError::Map {
            map: "fib_gen".to_string(),
            source: e,
        })?;
        let map: Array<MapData, FibGen> =
            Array::try_from(aya::maps::Map::Array(data)).map_err(map_err("fib_gen"))?;
        let value = map.get(&0, 0).map_err(map_err("fib_gen"))?;
        Ok(FibInvalidator { map, value })
    }

    /// Separate handles for conntrack sync: conntrack to read and write, and the service
    /// maps to resolve a peer's flow to this node's service and endpoint numbers.
    pub fn sync_table(&self) -> Result<SyncTable> {
        let [ct, svc, rng, be] = self.sync_ids;
        SyncTable::open([ct, svc, rng, be, self.collector_ids.2])
    }

    /// Drops the conntrack entries `gone` picks, in one pass.
    pub fn ct_remove_where(&mut self, gone: impl Fn(&CtKey, &Ct) -> bool) -> usize {
        let mut n = 0;
        for (k, v) in self.ct_entries() {
            if gone(&k, &v) && self.conntrack.delete(&k).is_ok() {
                n += 1;
            }
        }
        n
    }

    pub fn affinity_flush(&mut self, svc_id: u32) {
        let keys: Vec<AffinityKey> = self
            .affinity
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.svc_id == svc_id)
            .collect();
        for k in keys {
            let _ = self.affinity.remove(&k);
        }
    }

    // --- statistics -----------------------------------------------------------------------

    fn sum(v: PerCpuValues<Stats>) -> Stats {
        v.iter().fold(Stats::default(), |a, s| Stats {
            packets: a.packets + s.packets,
            bytes: a.bytes + s.bytes,
        })
    }

    /// Per-service and per-endpoint counters of many rules in a few syscalls (windows of
    /// 1024 entries) instead of one per entry. `services`: service ids; `endpoints`: (service
    /// id, endpoint slot). Sums in the order asked.
    pub fn stats_many(
        &self,
        services: &[u32],
        endpoints: &[(u32, u32)],
    ) -> Result<(Vec<Stats>, Vec<Stats>)> {
        use aya::maps::IterableMap;
        let cpus = aya::util::nr_cpus().map_err(|(c, e)| BpfError::Io {
            context: c.to_string(),
            source: e,
        })?;
        let read = |map: &PerCpuArray<MapData, Stats>, name: &str, idx: Vec<u32>| {
            // Sorted for the windows; answers put back in the order asked.
            let mut order: Vec<usize> = (0..idx.len()).collect();
            order.sort_by_key(|i| idx[*i]);
            let sorted: Vec<u32> = order.iter().map(|i| idx[*i]).collect();
            let sums =
                crate::batch::percpu_array_sums::<2>(map.map(), &sorted, cpus).map_err(|e| {
                    BpfError::Io {
                        context: format!("batched read of {name}"),
                        source: e,
                    }
                })?;
            let mut out = vec![Stats::default(); idx.len()];
            for (k, i) in order.into_iter().enumerate() {
                out[i] = Stats {
                    packets: sums[k][0],
                    bytes: sums[k][1],
                };
            }
            Ok::<_, BpfError>(out)
        };
        let svc = read(&self.svc_stats, "svc_stats", services.to_vec())?;
        let ep = read(
            &self.ep_stats,
            "ep_stats",
            endpoints
                .iter()
                .map(|(id, slot)| id * MAX_ENDPOINTS as u32 + slot)
                .collect(),
        )?;
        Ok((svc, ep))
    }

    /// Separate conntrack handles for listing the table a chunk at a time (the REST listing
    /// streams it without holding the engine).
    pub fn ct_reader(&self) -> Result<CtReader> {
        Ok(CtReader {
            conntrack: CtTables::open(self.collector_ids.0, self.collector_ids.1)?,
        })
    }

    pub fn service_stats(&self, id: u32) -> Stats {
        self.svc_stats
            .get(&id, 0)
            .map(Self::sum)
            .unwrap_or_default()
    }

    pub fn endpoint_stats(&self, id: u32, ep: u32) -> Stats {
        self.ep_stats
            .get(&(id * MAX_ENDPOINTS as u32 + ep), 0)
            .map(Self::sum)
            .unwrap_or_default()
    }

    /// Zeroes a service's counters (when its id is given to a new service).
    pub fn reset_stats(&mut self, id: u32) -> Result<()> {
        self.svc_stats
            .set(id, zero_stats()?, 0)
            .map_err(map_err("svc_stats"))?;
        let zeros = PerCpuValues::try_from(vec![0u64; nr_cpus()?]).map_err(|e| BpfError::Io {
            context: "per-CPU values".into(),
            source: e,
        })?;
        self.src_drops
            .set(id, zeros, 0)
            .map_err(map_err("src_drops"))?;
        for i in 0..MAX_ENDPOINTS as u32 {
            self.ep_stats
                .set(id * MAX_ENDPOINTS as u32 + i, zero_stats()?, 0)
                .map_err(map_err("ep_stats"))?;
        }
        Ok(())
    }

    /// One of the datapath's global counters, summed over CPUs.
    pub fn counter(&self, c: Counter) -> u64 {
        self.counters
            .get(&(c as u32), 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }

    /// The datapath's global counters (drops by reason and others), summed over CPUs.
    pub fn counters(&self) -> [u64; COUNTERS] {
        let mut out = [0u64; COUNTERS];
        for (i, o) in out.iter_mut().enumerate() {
            if let Ok(v) = self.counters.get(&(i as u32), 0) {
                *o = v.iter().sum();
            }
        }
        out
    }

    /// Records an interface's MAC address for the datapath's neighbour advertisements.
    pub fn set_if_mac(&mut self, ifindex: u32, mac: [u8; 6]) -> Result<()> {
        let mut v = [0u8; 8];
        v[..6].copy_from_slice(&mac);
        self.if_macs
            .insert(ifindex, v, 0)
            .map_err(map_err("if_macs"))
    }

    /// The interfaces packets are forwarded out of with `bpf_redirect_peer` (index, MAC),
    /// replacing the previous set: only veths whose other end is in another network
    /// namespace, which the caller checks (the kernel drops what is redirected to the peer of
    /// anything else). The datapath honours a mark only while the interface's MAC is still
    /// the one given. Interfaces share a slot when their indexes are equal modulo
    /// [`IF_OUT_SLOTS`]: the lowest index gets it, the others a
    /// plain redirect. Only changed slots are written.
    pub fn set_peer_redirects(&mut self, marked: &[(u32, [u8; 6])]) -> Result<()> {
        let n = crate::maps::IF_OUT_SLOTS as usize;
        let mut want = vec![[0u8; 12]; n];
        let mut sorted = marked.to_vec();
        sorted.sort();
        for (index, mac) in sorted {
            let slot = &mut want[index as usize % n];
            if index != 0 && *slot == [0u8; 12] {
                slot[..4].copy_from_slice(&index.to_ne_bytes());
                slot[4..10].copy_from_slice(&mac);
                slot[10] = crate::maps::IFF_PEER;
            }
        }
        for (i, v) in want.into_iter().enumerate() {
            if self.if_out_slots[i] != v {
                self.if_out.set(i as u32, v, 0).map_err(map_err("if_out"))?;
                self.if_out_slots[i] = v;
            }
        }
        Ok(())
    }

    /// The interfaces marked for `bpf_redirect_peer` (index, MAC), as the datapath holds them.
    pub fn peer_redirects(&self) -> Vec<(u32, [u8; 6])> {
        let mut out = Vec::new();
        for i in 0..crate::maps::IF_OUT_SLOTS {
            if let Ok(v) = self.if_out.get(&i, 0) {
                let index = u32::from_ne_bytes([v[0], v[1], v[2], v[3]]);
                if index != 0 && v[10] & crate::maps::IFF_PEER != 0 {
                    let mut mac = [0u8; 6];
                    mac.copy_from_slice(&v[4..10]);
                    out.push((index, mac));
                }
            }
        }
        out.sort();
        out
    }

    /// Sets the HA flags the datapath reads (`HA_*` bits).
    pub fn set_ha_flags(&mut self, flags: u32) -> Result<()> {
        self.ha_flags.set(0, flags, 0).map_err(map_err("ha_flags"))
    }

    /// The HA flags in force.
    pub fn ha_flags(&self) -> u32 {
        self.ha_flags.get(&0, 0).unwrap_or(0)
    }

    /// The ring buffer of conntrack events; taken once (by the task that consumes it).
    pub fn take_events(&mut self) -> Option<EventStream> {
        self.events.take().map(|rb| EventStream { rb })
    }
}

/// `entries` without the datapath's own `fin` bits ([`FIN_DATAPATH`]): an entry the agent read
/// while a CPU held it (for a few hundred nanoseconds) and writes back (adopted, claimed from a
/// peer) must not carry a claim nobody will release, or the datapath would drop its key's new
/// flows and the collector never remove it; nor a half-open mark the datapath never counted
/// (settling it would free a place in the in-place budget that was never taken). Copies only
/// when one does.
fn unclaimed(entries: &[(CtKey, Ct)]) -> std::borrow::Cow<'_, [(CtKey, Ct)]> {
    if entries.iter().all(|(_, v)| v.fin & FIN_DATAPATH == 0) {
        return std::borrow::Cow::Borrowed(entries);
    }
    std::borrow::Cow::Owned(
        entries
            .iter()
            .map(|(k, v)| {
                (
                    *k,
                    Ct {
                        fin: v.fin & !FIN_DATAPATH,
                        ..*v
                    },
                )
            })
            .collect(),
    )
}

/// Removes idle flows (both entries idle past their timeout) from `entries`, keeping the
/// least-connection counts right, and returns the removed entries: a [`Sweep`] fed `entries`
/// a chunk at a time, as the collector's walk feeds it.
fn collect(
    conntrack: &mut CtTables,
    ep_conns: &mut Array<MapData, u32>,
    entries: &[(CtKey, Ct)],
    now_ns: u64,
) -> Vec<(CtKey, Ct)> {
    let mut sweep = Sweep::new(now_ns, SWEEP_PENDING_MAX);
    let mut removed = Vec::new();
    for chunk in entries.chunks(COLLECT_CHUNK) {
        sweep.feed(conntrack, ep_conns, chunk, &mut removed);
    }
    let _ = sweep.finish(conntrack, ep_conns, &mut removed);
    removed
}

/// Entries per syscall of the collector's walk.
pub const COLLECT_CHUNK: usize = 4096;

/// Idle entries a [`Sweep`] holds while it waits for their flow's other entry: ~210 bytes
/// each, ~14 MB at most, whatever the size of the table.
const SWEEP_PENDING_MAX: usize = 65_536;

/// One pass of the collector over a walk of the tables, fed a chunk at a time: removes idle
/// flows (both entries idle past their timeout), keeping the least-connection counts right.
/// Entries synced from a peer never idle here (their origin removes them). Map operations
/// lock one bucket at a time.
///
/// The walk takes a while: a new flow may have taken a key since it was listed, so every
/// entry is decided as it is now, not as listed. A flow whose two entries were both listed
/// idle (a closed connection: nearly all of them) is taken whole, each entry removed and read
/// in one step ([`CtTables::take`]) and put back if it turns out to be alive; the others are
/// read, then removed ([`collect_entry`]). On a node that opens and closes tens of thousands
/// of connections a second this pass is what forgets them, and each touch of an entry is a
/// cache miss in a table of a million (`cargo bench -p ferrolb-bpf --bench collect`): two
/// touches per flow instead of six.
///
/// Memory is bounded by the chunk and by `pending_max`, not by the table: the two entries of
/// a flow are listed in any order, chunks apart, so an idle entry waits here for the other
/// one; while `pending_max` entries wait, an idle entry that finds its flow's other one not
/// waiting is decided at once, on its own (read, peer read, removed: more syscalls, no
/// memory), and the waiting ones keep pairing with theirs as they come.
struct Sweep {
    now_ns: u64,
    pending_max: usize,
    /// Idle original-direction entries listed, by the key of their reply entry.
    origs: std::collections::HashMap<CtKey, (CtKey, Ct)>,
    /// Idle reply entries listed, by their key.
    replies: std::collections::HashMap<CtKey, Ct>,
    /// Entries decided on their own because too many waited (for the benchmark's figures).
    spilled: usize,
    /// The most entries that waited at once.
    peak: usize,
}

impl Sweep {
    fn new(now_ns: u64, pending_max: usize) -> Sweep {
        Sweep {
            now_ns,
            pending_max: pending_max.max(1),
            origs: Default::default(),
            replies: Default::default(),
            spilled: 0,
            peak: 0,
        }
    }

    fn idle(now_ns: u64, k: &CtKey, v: &Ct) -> bool {
        v.flags & CTF_SYNCED == 0 && v.expired(k.proto, now_ns)
    }

    /// The next chunk of the walk; removed entries are appended to `removed`.
    fn feed(
        &mut self,
        conntrack: &mut CtTables,
        ep_conns: &mut Array<MapData, u32>,
        chunk: &[(CtKey, Ct)],
        removed: &mut Vec<(CtKey, Ct)>,
    ) {
        let now = self.now_ns;
        for (k, v) in chunk.iter().filter(|(k, v)| Sweep::idle(now, k, v)) {
            let full = self.origs.len() + self.replies.len() >= self.pending_max;
            if v.dir == 0 {
                let peer = k.peer(v);
                let met = self
                    .replies
                    .get(&peer)
                    .copied()
                    .filter(|pv| conntrack.take_works && peer.peer(pv) == *k);
                if let Some(pv) = met {
                    self.replies.remove(&peer);
                    take_flow(conntrack, ep_conns, (k, v), &pv, now, removed);
                } else if full {
                    self.spilled += 1;
                    collect_entry(conntrack, ep_conns, k, v, now, removed);
                } else if let Some((ok, ov)) = self.origs.insert(peer, (*k, *v)) {
                    // Two listed flows name one reply key (one of them an orphan): the
                    // earlier is decided on its own.
                    collect_entry(conntrack, ep_conns, &ok, &ov, now, removed);
                }
            } else {
                let met = self
                    .origs
                    .get(k)
                    .copied()
                    .filter(|(ok, _)| conntrack.take_works && k.peer(v) == *ok);
                if let Some((ok, ov)) = met {
                    self.origs.remove(k);
                    take_flow(conntrack, ep_conns, (&ok, &ov), v, now, removed);
                } else if full {
                    self.spilled += 1;
                    collect_entry(conntrack, ep_conns, k, v, now, removed);
                } else {
                    self.replies.insert(*k, *v);
                }
            }
        }
        self.peak = self.peak.max(self.origs.len() + self.replies.len());
    }

    /// The end of the walk: entries whose flow's other entry was not listed idle (alive, or
    /// not there: an orphan) are decided one by one.
    fn finish(
        mut self,
        conntrack: &mut CtTables,
        ep_conns: &mut Array<MapData, u32>,
        removed: &mut Vec<(CtKey, Ct)>,
    ) -> (usize, usize) {
        self.decide_waiting(conntrack, ep_conns, removed);
        (self.spilled, self.peak)
    }

    /// Original-direction entries first, then reply entries (whose flow may have gone with
    /// them), each in key order.
    fn decide_waiting(
        &mut self,
        conntrack: &mut CtTables,
        ep_conns: &mut Array<MapData, u32>,
        removed: &mut Vec<(CtKey, Ct)>,
    ) {
        let mut origs: Vec<(CtKey, Ct)> = self.origs.drain().map(|(_, e)| e).collect();
        origs.sort_unstable_by_key(|e| e.0);
        let mut replies: Vec<(CtKey, Ct)> = self.replies.drain().collect();
        replies.sort_unstable_by_key(|e| e.0);
        for (k, v) in origs.iter().chain(replies.iter()) {
            collect_entry(conntrack, ep_conns, k, v, self.now_ns, removed);
        }
    }
}

/// Removes the idle entry `k` (as listed: `v`) unless it is alive now, or held by a CPU of the
/// datapath, or its flow's other entry is.
fn collect_entry(
    conntrack: &mut CtTables,
    ep_conns: &mut Array<MapData, u32>,
    k: &CtKey,
    v: &Ct,
    now_ns: u64,
    removed: &mut Vec<(CtKey, Ct)>,
) {
    let Ok(Some((v, new))) = conntrack.get_hinted(k, v.flags & CTF_NEW != 0) else {
        return;
    };
    // A CPU of the datapath holding either entry (FIN_CLAIMED) is replacing or removing this
    // dead flow at this moment: deleting here could delete the new flow it writes.
    if v.flags & CTF_SYNCED != 0 || !v.expired(k.proto, now_ns) || v.fin & FIN_CLAIMED != 0 {
        return;
    }
    if let Ok(Some((pv, _))) = conntrack.get_hinted(&k.peer(&v), new)
        && (!pv.expired(k.proto, now_ns) || pv.fin & FIN_CLAIMED != 0)
    {
        return;
    }
    if conntrack.remove_from(k, new) {
        lc_release(ep_conns, &v);
        removed.push((*k, v));
    }
}

/// Removes the flow whose entries `k` (listed as `v`) and its peer (listed as `pv`) were both
/// idle in the listing: each entry taken (read and removed in one step), and put back when it
/// is alive after all (a new flow took the key since the listing) or held by a CPU of the
/// datapath. A key that went meanwhile went with its flow (the datapath replaced it).
fn take_flow(
    conntrack: &mut CtTables,
    ep_conns: &mut Array<MapData, u32>,
    (k, v): (&CtKey, &Ct),
    pv: &Ct,
    now_ns: u64,
    removed: &mut Vec<(CtKey, Ct)>,
) {
    let dead = |k: &CtKey, v: &Ct| {
        v.flags & CTF_SYNCED == 0 && v.expired(k.proto, now_ns) && v.fin & FIN_CLAIMED == 0
    };
    let peer = k.peer(v);
    let new = v.flags & CTF_NEW != 0;
    let taken = match conntrack.take(k, new) {
        Ok(Some(t)) => t,
        // Gone since the listing: the other entry is decided on its own.
        Ok(None) => return collect_entry(conntrack, ep_conns, &peer, pv, now_ns, removed),
        Err(()) => {
            collect_entry(conntrack, ep_conns, k, v, now_ns, removed);
            return collect_entry(conntrack, ep_conns, &peer, pv, now_ns, removed);
        }
    };
    if !dead(k, &taken) || k.peer(&taken) != peer {
        conntrack.put_back(k, &taken, new);
        return;
    }
    let p_new = pv.flags & CTF_NEW != 0;
    match conntrack.take(&peer, p_new) {
        // Another flow's entry under that key (it took the NAT port since the listing): not
        // judged here but on its own; `k`, whose peer key it was, is an orphan and goes.
        Ok(Some(pt)) if peer.peer(&pt) != *k => conntrack.put_back(&peer, &pt, p_new),
        // The flow's other entry lives (a one-way flow), or a CPU holds it: both stay.
        Ok(Some(pt)) if !dead(&peer, &pt) => {
            conntrack.put_back(&peer, &pt, p_new);
            conntrack.put_back(k, &taken, new);
            return;
        }
        Ok(Some(pt)) => {
            lc_release(ep_conns, &pt);
            removed.push((peer, pt));
        }
        Ok(None) => {}
        Err(()) => {
            conntrack.put_back(k, &taken, new);
            return;
        }
    }
    lc_release(ep_conns, &taken);
    removed.push((*k, taken));
}

/// A flow this node counted for least-connections (its original-direction entry `v`) no
/// longer counts here: its endpoint's active count goes down by one.
fn lc_release(ep_conns: &mut Array<MapData, u32>, v: &Ct) {
    if v.dir == 0
        && v.flags & CTF_LC != 0
        && v.state() < CtState::TimeWait
        && v.ep_idx < MAX_ENDPOINTS as u16
    {
        let idx = v.svc_id * MAX_ENDPOINTS as u32 + u32::from(v.ep_idx);
        if let Ok(n) = ep_conns.get(&idx, 0) {
            let _ = ep_conns.set(idx, n.saturating_sub(1), 0);
        }
    }
}

/// The conntrack collector's own map handles (see [`Datapath::collector`]).
pub struct Collector {
    conntrack: CtTables,
    /// Handles of their own for the walk (it reads while the pass removes).
    walk: CtTables,
    ep_conns: Array<MapData, u32>,
    pending_max: usize,
    budget: Array<MapData, Budget>,
}

/// The original-direction entry of a half-open flow the in-place budget counts.
fn is_inplace_halfopen(v: &Ct) -> bool {
    v.dir == 0 && v.flags & CTF_NEW == 0 && v.fin & FIN_HALFOPEN != 0
}

/// The in-place budget's two halves (`ct_budget`): the datapath's, and the agent's refunds.
fn read_budget(m: &Array<MapData, Budget>) -> Option<(Budget, Budget)> {
    Some((m.get(&0, 0).ok()?, m.get(&1, 0).ok()?))
}

/// Half-open flows in conntrack itself by the budget's count.
fn budget_count((d, a): (Budget, Budget)) -> i64 {
    d.made.wrapping_sub(d.settled).wrapping_sub(a.settled) as i64
}

/// How many of the flows the in-place budget counts are provably gone without the datapath
/// knowing (removed by the collector, a rule's flush, a peer's claim): `after`, read at the
/// end of a pass, counts `count(after)` flows; every one of them that is really there was
/// either made during the pass (`made` grew by that much since `before`) or was there during
/// the whole walk, listed with its mark and not removed by the pass (`seen`). Whatever is
/// beyond that went. Never more than what went (a flow listed and settled since only makes
/// `seen` larger), so the budget is never given more room than it has.
pub fn budget_refund(before: (Budget, Budget), after: (Budget, Budget), seen: u64) -> u64 {
    let made = after.0.made.wrapping_sub(before.0.made);
    let gone = budget_count(after) - seen as i64 - made as i64;
    gone.max(0) as u64
}

/// What a [`Collector::pass`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PassStats {
    /// Entries listed (both tables).
    pub listed: usize,
    /// Entries removed.
    pub removed: usize,
    /// Idle entries decided on their own because too many waited for their flows' other
    /// entry (the memory bound, [`Collector::set_pending_max`]).
    pub spilled: usize,
    /// The most idle entries that waited at once for their flow's other entry.
    pub peak_waiting: usize,
    /// Half-open flows of the in-place budget listed in `conntrack` itself and not removed
    /// by the pass.
    pub halfopen_inplace: usize,
    /// Places given back to the in-place budget for flows that went without the datapath
    /// knowing ([`budget_refund`]).
    pub refunded: u64,
}

impl Collector {
    /// Every conntrack entry, of both tables.
    pub fn entries(&self) -> Vec<(CtKey, Ct)> {
        self.conntrack.entries()
    }

    /// At most `n` idle entries of a [`Collector::pass`] wait for their flow's other entry
    /// (~210 bytes each; 65,536 by default); past that they are decided one by one.
    pub fn set_pending_max(&mut self, n: usize) {
        self.pending_max = n.max(1);
    }

    /// Removes idle flows among `entries`; returns the entries that went.
    pub fn collect_from(&mut self, entries: &[(CtKey, Ct)], now_ns: u64) -> Vec<(CtKey, Ct)> {
        collect(&mut self.conntrack, &mut self.ep_conns, entries, now_ns)
    }

    /// One collector pass over both tables, `chunk` entries per syscall, in memory bounded
    /// by the chunk (not by the table; see [`Sweep`]): each chunk as listed is handed to
    /// `listed` (census, ownership), then its idle flows are removed; the entries removed are
    /// handed to `removed` as they go, a chunk's worth at a time.
    pub fn pass(
        &mut self,
        now_ns: u64,
        chunk: usize,
        mut listed: impl FnMut(&[(CtKey, Ct)]),
        mut removed: impl FnMut(&[(CtKey, Ct)]),
    ) -> PassStats {
        let mut stats = PassStats::default();
        let mut sweep = Sweep::new(now_ns, self.pending_max);
        let mut gone = Vec::new();
        let before = read_budget(&self.budget);
        // Half-open flows of the in-place budget listed, and removed by this pass.
        let marked = |c: &[(CtKey, Ct)]| c.iter().filter(|(_, v)| is_inplace_halfopen(v)).count();
        let (mut listed_marked, mut removed_marked) = (0, 0);
        let mut each = |c: &[(CtKey, Ct)], stats: &mut PassStats, sweep: &mut Sweep| {
            stats.listed += c.len();
            listed_marked += marked(c);
            listed(c);
            sweep.feed(&mut self.conntrack, &mut self.ep_conns, c, &mut gone);
            if !gone.is_empty() {
                stats.removed += gone.len();
                removed_marked += marked(&gone);
                removed(&gone);
                gone.clear();
            }
        };
        let mut b = self.walk.batches(chunk);
        loop {
            match b.next_chunk() {
                Ok(Some(c)) => each(&c, &mut stats, &mut sweep),
                Ok(None) => break,
                Err(e) => {
                    // Kernels without batched lookups: the whole table at once, as before.
                    debug!(error = %e, "batched conntrack lookups refused; iterating");
                    let all = self.walk.entries();
                    for c in all.chunks(chunk.max(1)) {
                        each(c, &mut stats, &mut sweep);
                    }
                    break;
                }
            }
        }
        (stats.spilled, stats.peak_waiting) =
            sweep.finish(&mut self.conntrack, &mut self.ep_conns, &mut gone);
        if !gone.is_empty() {
            stats.removed += gone.len();
            removed_marked += marked(&gone);
            removed(&gone);
        }
        // Listed and not removed by this pass: there all along (unless the datapath removed or
        // established them since, which only makes the refund smaller).
        stats.halfopen_inplace = listed_marked.saturating_sub(removed_marked);
        if let (Some(before), Some(after)) = (before, read_budget(&self.budget)) {
            stats.refunded = budget_refund(before, after, stats.halfopen_inplace as u64);
            if stats.refunded > 0 {
                let mut mine = after.1;
                mine.settled = mine.settled.wrapping_add(stats.refunded);
                if let Err(e) = self.budget.set(1, mine, 0) {
                    warn!(error = %e, "ct_budget: cannot give back the in-place budget");
                    stats.refunded = 0;
                }
            }
        }
        stats
    }

    /// The in-place budget's count of half-open flows in `conntrack` itself.
    pub fn halfopen_inplace(&self) -> Option<i64> {
        read_budget(&self.budget).map(budget_count)
    }

    /// Removes the entries `gone` picks, reading the tables a chunk at a time (memory: the
    /// keys that go). Returns how many went.
    pub fn remove_where(&mut self, gone: impl Fn(&CtKey, &Ct) -> bool) -> usize {
        let mut doomed = Vec::new();
        {
            let mut b = self.conntrack.batches(4096);
            loop {
                match b.next_chunk() {
                    Ok(Some(c)) => doomed.extend(c.iter().filter(|(k, v)| gone(k, v)).map(|e| e.0)),
                    Ok(None) => break,
                    Err(e) => {
                        debug!(error = %e, "batched conntrack lookups refused; iterating");
                        doomed.extend(
                            self.conntrack
                                .entries()
                                .iter()
                                .filter(|(k, v)| gone(k, v))
                                .map(|e| e.0),
                        );
                        break;
                    }
                }
            }
        }
        doomed
            .iter()
            .filter(|k| self.conntrack.delete_existing(k))
            .count()
    }
}

/// Conntrack read handles of their own (see [`Datapath::ct_reader`]).
pub struct CtReader {
    conntrack: CtTables,
}

impl CtReader {
    /// Both tables, `chunk` entries per syscall.
    pub fn batches(&self, chunk: usize) -> CtBatches<'_> {
        self.conntrack.batches(chunk)
    }

    pub fn get(&self, key: &CtKey) -> Option<Ct> {
        self.conntrack.get(key).ok().flatten()
    }
}

/// The two conntrack tables (see `c/lb.bpf.c`): `conntrack`, a hash that never evicts, for
/// established TCP flows and every UDP and ICMP flow; `ct_new`, an LRU, for TCP flows until
/// their handshake completes (entries flagged [`CTF_NEW`]). A key is in one of them.
pub(crate) struct CtTables {
    main: HashMap<MapData, CtKey, Ct>,
    new: HashMap<MapData, CtKey, Ct>,
    /// The kernel reads and deletes an entry in one step (Linux 5.14 and later).
    take_works: bool,
}

impl CtTables {
    /// Handles of their own on the two maps, by id.
    fn open(main: u32, new: u32) -> Result<CtTables> {
        let open = |id: u32, name: &str| {
            aya::maps::MapData::from_id(id).map_err(|e| BpfError::Map {
                map: name.to_string(),
                source: e,
            })
        };
        Ok(CtTables {
            main: HashMap::try_from(aya::maps::Map::HashMap(open(main, "conntrack")?))
                .map_err(map_err("conntrack"))?,
            new: HashMap::try_from(aya::maps::Map::LruHashMap(open(new, "ct_new")?))
                .map_err(map_err("ct_new"))?,
            take_works: true,
        })
    }

    fn get(&self, key: &CtKey) -> Result<Option<Ct>> {
        for (m, name) in [(&self.main, "conntrack"), (&self.new, "ct_new")] {
            match m.get(key, 0) {
                Ok(v) => return Ok(Some(v)),
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(name)(e)),
            }
        }
        Ok(None)
    }

    fn insert(&mut self, key: &CtKey, val: &Ct) -> Result<()> {
        if val.flags & CTF_NEW != 0 {
            self.new.insert(key, val, 0).map_err(map_err("ct_new"))
        } else {
            self.main.insert(key, val, 0).map_err(map_err("conntrack"))
        }
    }

    fn delete(&mut self, key: &CtKey) -> Result<()> {
        ignore_missing(self.main.remove(key)).map_err(map_err("conntrack"))?;
        ignore_missing(self.new.remove(key)).map_err(map_err("ct_new"))
    }

    /// The entry under `key` and whether it is in `ct_new`, looked for first in the table
    /// `new_first` names.
    fn get_hinted(&self, key: &CtKey, new_first: bool) -> Result<Option<(Ct, bool)>> {
        let order = if new_first {
            [
                (&self.new, "ct_new", true),
                (&self.main, "conntrack", false),
            ]
        } else {
            [
                (&self.main, "conntrack", false),
                (&self.new, "ct_new", true),
            ]
        };
        for (m, name, new) in order {
            match m.get(key, 0) {
                Ok(v) => return Ok(Some((v, new))),
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(name)(e)),
            }
        }
        Ok(None)
    }

    /// Whether an entry under `key` was there to delete (in either table; a key is in one of
    /// them).
    fn delete_existing(&mut self, key: &CtKey) -> bool {
        self.main.remove(key).is_ok() || self.new.remove(key).is_ok()
    }

    fn table(&self, new: bool) -> &HashMap<MapData, CtKey, Ct> {
        if new { &self.new } else { &self.main }
    }

    /// Removes `key` from the table `new` names (not from the other one, where the key would
    /// be another flow's); whether it was there.
    fn remove_from(&mut self, key: &CtKey, new: bool) -> bool {
        if new {
            self.new.remove(key).is_ok()
        } else {
            self.main.remove(key).is_ok()
        }
    }

    /// Reads and removes `key` from the table `new` names, in one step. `Err`: the kernel
    /// cannot (older than 5.14); `take_works` is then cleared.
    fn take(&mut self, key: &CtKey, new: bool) -> std::result::Result<Option<Ct>, ()> {
        use aya::maps::IterableMap;
        match crate::batch::take::<CtKey, Ct>(self.table(new).map(), key) {
            Ok(v) => Ok(v),
            Err(e) => {
                debug!(error = %e, "conntrack: no lookup-and-delete; reading, then deleting");
                self.take_works = false;
                Err(())
            }
        }
    }

    /// Puts back an entry [`CtTables::take`] removed, unless the datapath has written a new
    /// one under its key since (that one is newer).
    fn put_back(&mut self, key: &CtKey, val: &Ct, new: bool) {
        const BPF_NOEXIST: u64 = 1;
        let _ = if new {
            self.new.insert(key, val, BPF_NOEXIST)
        } else {
            self.main.insert(key, val, BPF_NOEXIST)
        };
    }

    fn entries(&self) -> Vec<(CtKey, Ct)> {
        let mut all = ct_walk(&self.main);
        all.extend(ct_walk(&self.new));
        all
    }

    fn batches(&self, chunk: usize) -> CtBatches<'_> {
        use aya::maps::IterableMap;
        CtBatches {
            main: crate::batch::HashBatches::new(self.main.map(), chunk),
            new: crate::batch::HashBatches::new(self.new.map(), chunk),
            on_new: false,
        }
    }
}

/// Both conntrack tables a chunk at a time: `conntrack`, then `ct_new`.
pub struct CtBatches<'a> {
    main: crate::batch::HashBatches<'a, CtKey, Ct>,
    new: crate::batch::HashBatches<'a, CtKey, Ct>,
    on_new: bool,
}

impl CtBatches<'_> {
    /// The next chunk; `Ok(None)` at the end. An error means the kernel refused batching.
    pub fn next_chunk(&mut self) -> std::io::Result<Option<Vec<(CtKey, Ct)>>> {
        if !self.on_new {
            match self.main.next_chunk()? {
                Some(c) => return Ok(Some(c)),
                None => self.on_new = true,
            }
        }
        self.new.next_chunk()
    }
}

/// Conntrack sync's own map handles (see [`Datapath::sync_table`]).
pub struct SyncTable {
    /// Map ids: conntrack, services, ranges, backends, ep_conns.
    ids: [u32; 5],
    conntrack: HashMap<MapData, CtKey, Ct>,
    services: HashMap<MapData, SvcKey, Svc>,
    ranges: HashMap<MapData, RangeKey, Ranges>,
    backends: Array<MapData, Backends>,
    ep_conns: Array<MapData, u32>,
}

impl SyncTable {
    fn open(ids: [u32; 5]) -> Result<SyncTable> {
        let open = |id: u32, name: &str| {
            aya::maps::MapData::from_id(id).map_err(|e| BpfError::Map {
                map: name.to_string(),
                source: e,
            })
        };
        let [ct, svc, rng, be, lc] = ids;
        Ok(SyncTable {
            ids,
            conntrack: HashMap::try_from(aya::maps::Map::HashMap(open(ct, "conntrack")?))
                .map_err(map_err("conntrack"))?,
            services: HashMap::try_from(aya::maps::Map::HashMap(open(svc, "services")?))
                .map_err(map_err("services"))?,
            ranges: HashMap::try_from(aya::maps::Map::HashMap(open(rng, "ranges")?))
                .map_err(map_err("ranges"))?,
            backends: Array::try_from(aya::maps::Map::Array(open(be, "backends")?))
                .map_err(map_err("backends"))?,
            ep_conns: Array::try_from(aya::maps::Map::Array(open(lc, "ep_conns")?))
                .map_err(map_err("ep_conns"))?,
        })
    }

    /// Handles of their own on the same maps: a long walk on them holds no lock that guards
    /// this one.
    pub fn reopen(&self) -> Result<SyncTable> {
        SyncTable::open(self.ids)
    }

    /// This node's flow (original-direction entry `v`) stops counting for least-connections
    /// here (it was given to a peer).
    pub fn release_lc(&mut self, v: &Ct) {
        lc_release(&mut self.ep_conns, v);
    }

    pub fn get(&self, key: &CtKey) -> Result<Option<Ct>> {
        match self.conntrack.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err("conntrack")(e)),
        }
    }

    pub fn insert(&mut self, key: &CtKey, val: &Ct) -> Result<()> {
        self.conntrack
            .insert(key, val, 0)
            .map_err(map_err("conntrack"))
    }

    pub fn delete(&mut self, key: &CtKey) -> Result<()> {
        ignore_missing(self.conntrack.remove(key)).map_err(map_err("conntrack"))
    }

    /// Removes many entries with one batched delete (one by one when the kernel refuses
    /// batches); keys not in the table are skipped. Returns how many were removed.
    pub fn delete_many(&mut self, keys: &[CtKey]) -> usize {
        use aya::maps::IterableMap;
        match crate::batch::delete_all(self.conntrack.map(), keys) {
            Ok(n) => n,
            Err(_) => keys
                .iter()
                .filter(|k| self.conntrack.remove(k).is_ok())
                .count(),
        }
    }

    /// Every conntrack entry.
    pub fn entries(&self) -> Vec<(CtKey, Ct)> {
        ct_walk(&self.conntrack)
    }

    /// Hands the table to `f` a chunk of about `chunk` entries at a time (batched lookups;
    /// the whole table at once when the kernel refuses them); stops when `f` returns false.
    pub fn walk(&self, chunk: usize, mut f: impl FnMut(&[(CtKey, Ct)]) -> bool) {
        use aya::maps::IterableMap;
        let mut b = crate::batch::HashBatches::<CtKey, Ct>::new(self.conntrack.map(), chunk);
        loop {
            match b.next_chunk() {
                Ok(Some(c)) => {
                    if !f(&c) {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    debug!(error = %e, "batched conntrack lookups refused; iterating");
                    let all: Vec<(CtKey, Ct)> =
                        self.conntrack.iter().filter_map(|r| r.ok()).collect();
                    f(&all);
                    return;
                }
            }
        }
    }

    /// Inserts or replaces entries with batched updates through a shared handle (several
    /// threads may write at once); an error when the kernel refuses batches, with how many
    /// were written before it in the `Ok` of a retry by [`SyncTable::insert_many`].
    pub fn update_batch(&self, entries: &[(CtKey, Ct)]) -> std::io::Result<usize> {
        use aya::maps::IterableMap;
        crate::batch::update_all(self.conntrack.map(), &unclaimed(entries))
    }

    /// Inserts or replaces many entries with batched updates (one syscall per few thousand;
    /// one by one when the kernel refuses batches). Returns how many were written.
    pub fn insert_many(&mut self, entries: &[(CtKey, Ct)]) -> usize {
        use aya::maps::IterableMap;
        let entries = &*unclaimed(entries);
        match crate::batch::update_all(self.conntrack.map(), entries) {
            Ok(n) => n,
            Err(_) => entries
                .iter()
                .filter(|(k, v)| self.conntrack.insert(k, v, 0).is_ok())
                .count(),
        }
    }

    /// The service a packet to (addr, port host order, proto) belongs to, as the datapath
    /// finds it (exact port first, then port ranges).
    pub fn service(&self, addr: std::net::IpAddr, port: u16, proto: u8) -> Option<Svc> {
        let (w, family) = addr_words(addr);
        let port_key = if proto == PROTO_ICMP { 0 } else { port.to_be() };
        let key = SvcKey {
            addr: w,
            port: port_key,
            proto,
            family,
        };
        if let Ok(s) = self.services.get(&key, 0) {
            return Some(s);
        }
        let rk = RangeKey {
            addr: w,
            proto,
            family,
            pad: 0,
        };
        let r = self.ranges.get(&rk, 0).ok()?;
        r.r.iter()
            .find(|x| x.hi != 0 && port >= x.lo && port <= x.hi)
            .map(|x| x.svc)
    }

    /// The endpoint set in a backends slot.
    pub fn backends(&self, slot: u32) -> Option<Backends> {
        self.backends.get(&slot, 0).ok()
    }
}

/// Conntrack events (created, established, closed) from the datapath's ring buffer.
pub struct EventStream {
    rb: RingBuf<MapData>,
}

impl EventStream {
    /// The next event if one is ready; never blocks.
    pub fn try_next(&mut self) -> Option<CtEvent> {
        loop {
            let item = self.rb.next()?;
            if let Some(ev) = CtEvent::from_bytes(&item) {
                return Some(ev);
            }
        }
    }
}

impl AsRawFd for EventStream {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.rb.as_raw_fd()
    }
}

/// Every entry of the conntrack map: batched lookups, or aya's iterator (two syscalls per
/// entry) when the kernel refuses batches.
/// An interface's index (None when it does not exist).
fn ifindex_of(iface: &str) -> Option<u32> {
    let name = std::ffi::CString::new(iface).ok()?;
    // SAFETY: a NUL-terminated string that lives across the call.
    let i = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (i != 0).then_some(i)
}

/// An interface's MAC address from sysfs (None for interfaces without one).
pub fn mac_of(iface: &str) -> Option<[u8; 6]> {
    let s = std::fs::read_to_string(format!("/sys/class/net/{iface}/address")).ok()?;
    parse_mac(s.trim())
}

/// "aa:bb:cc:dd:ee:ff" -> bytes; the all-zero address counts as none.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in out.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    if parts.next().is_some() || out == [0; 6] {
        return None;
    }
    Some(out)
}

fn ct_walk(map: &HashMap<MapData, CtKey, Ct>) -> Vec<(CtKey, Ct)> {
    use aya::maps::IterableMap;
    match crate::batch::lookup_all::<CtKey, Ct>(map.map(), 4096) {
        Ok(v) => v,
        Err(e) => {
            debug!(error = %e, "batched conntrack lookups refused; iterating");
            map.iter().filter_map(|r| r.ok()).collect()
        }
    }
}

/// Zeroed per-CPU counters, one per possible CPU.
fn nr_cpus() -> Result<usize> {
    aya::util::nr_cpus().map_err(|(c, e)| BpfError::Io {
        context: c.to_string(),
        source: e,
    })
}

/// The `src_ranges` key of one allowed prefix of a service.
fn source_key(svc_id: u32, addr: std::net::IpAddr, prefix_len: u8) -> LpmKey<SrcKey> {
    LpmKey::new(
        SRC_ID_BITS + u32::from(prefix_len),
        SrcKey {
            svc_id_be: svc_id.to_be(),
            addr: addr_words(addr).0,
        },
    )
}

fn zero_stats() -> Result<PerCpuValues<Stats>> {
    let cpus = nr_cpus()?;
    PerCpuValues::try_from(vec![Stats::default(); cpus]).map_err(|e| BpfError::Io {
        context: "per-CPU values".into(),
        source: e,
    })
}

/// Whether `prog` is attached at TC ingress of `iface` (TCX). Unknown counts as yes.
fn attached_to(prog: &SchedClassifier, iface: &str) -> bool {
    let Ok(me) = prog.info() else {
        return true;
    };
    match SchedClassifier::query_tcx(iface, TcAttachType::Ingress) {
        Ok((_, progs)) => progs.iter().any(|p| p.id() == me.id()),
        Err(_) => true,
    }
}

/// A test-run handle on a loaded program (its own copy of the fd).
fn runner(prog: &SchedClassifier) -> Result<crate::TestRunner> {
    use std::os::fd::AsFd;
    let fd = prog.fd().map_err(|e| BpfError::Program {
        context: "program fd".into(),
        source: e,
    })?;
    let fd = fd.as_fd().try_clone_to_owned().map_err(|e| BpfError::Io {
        context: "dup the program fd".into(),
        source: e,
    })?;
    Ok(crate::TestRunner { fd })
}

/// The classifier `name` of the object (`PROGRAM`, or the benchmark's `FLOOR`).
fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier> {
    ebpf.program_mut(name)
        .ok_or_else(|| BpfError::Invalid(format!("the object has no program {name}")))?
        .try_into()
        .map_err(|e| BpfError::Program {
            context: format!("{name} is not a classifier"),
            source: e,
        })
}

fn ignore_missing(
    r: std::result::Result<(), aya::maps::MapError>,
) -> std::result::Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(ref e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// Monotonic time in nanoseconds, the clock `bpf_ktime_get_ns` uses.
/// Whether this kernel's `bpf_l4_csum_replace` takes `BPF_F_IPV6` (Linux 6.16 and later),
/// read once at load from the release (`/proc/sys/kernel/osrelease`, what `uname -r` says);
/// unknown counts as yes (the datapath then retries without the flag if refused).
fn csum_ipv6() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .and_then(|r| release_at_least(r.trim(), (6, 16)))
        .unwrap_or(true)
}

/// `release` (`6.18.0-1-amd64`, `6.1.0`) against (major, minor); `None` when unreadable.
fn release_at_least(release: &str, (major, minor): (u32, u32)) -> Option<bool> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    let a: u32 = it.next()?.parse().ok()?;
    let b: u32 = it.next()?.parse().ok()?;
    Some((a, b) >= (major, minor))
}

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(made: u64, settled: u64, refunded: u64) -> (Budget, Budget) {
        (
            Budget { made, settled },
            Budget {
                made: 0,
                settled: refunded,
            },
        )
    }

    /// Flows that went without the datapath knowing are given back; flows made during the
    /// pass, or listed there, are not.
    #[test]
    fn the_budget_gets_back_only_what_provably_went() {
        // 10 counted, 10 listed still there: nothing went.
        assert_eq!(budget_refund(budget(10, 0, 0), budget(10, 0, 0), 10), 0);
        // 10 counted, 4 listed still there, none made meanwhile: 6 went (removed by the
        // collector, a flush).
        assert_eq!(budget_refund(budget(10, 0, 0), budget(10, 0, 0), 4), 6);
        // Made during the pass (the walk may not have listed them): never refunded.
        assert_eq!(budget_refund(budget(10, 0, 0), budget(15, 0, 0), 10), 0);
        assert_eq!(budget_refund(budget(10, 0, 0), budget(15, 0, 0), 4), 6);
        // Listed, then established during the pass: the datapath settled them, and `seen`
        // counting them makes the refund smaller, never larger.
        assert_eq!(budget_refund(budget(10, 0, 0), budget(10, 3, 0), 10), 0);
        // Earlier refunds count: nothing is given back twice.
        assert_eq!(budget_refund(budget(10, 0, 6), budget(10, 0, 6), 4), 0);
        // Counters past the wrap of u64 still subtract right.
        let big = u64::MAX - 2;
        assert_eq!(
            budget_refund(
                budget(big, big - 10, 0),
                budget(big.wrapping_add(5), big - 10, 0),
                4
            ),
            6
        );
        // A count below what was listed (a flow the agent wrote with the mark) gives nothing.
        assert_eq!(budget_refund(budget(2, 2, 0), budget(2, 2, 0), 5), 0);
    }

    #[test]
    fn kernel_releases_compare_by_major_and_minor() {
        assert_eq!(release_at_least("6.18.0-1-amd64", (6, 16)), Some(true));
        assert_eq!(release_at_least("6.16", (6, 16)), Some(true));
        assert_eq!(
            release_at_least("6.1.0-27-cloud-amd64", (6, 16)),
            Some(false)
        );
        assert_eq!(release_at_least("5.19.17", (6, 16)), Some(false));
        assert_eq!(release_at_least("7.0.0", (6, 16)), Some(true));
        assert_eq!(release_at_least("", (6, 16)), None);
        assert_eq!(release_at_least("linux", (6, 16)), None);
        assert_eq!(release_at_least("6", (6, 16)), None);
    }

    #[test]
    fn other_layouts_are_the_sibling_version_directories() {
        let base = std::env::temp_dir().join(format!("flb-layouts-{}", std::process::id()));
        let ns = base.join("4026531840");
        for d in ["v1", "v2", "v3", "vx", "v", "other"] {
            std::fs::create_dir_all(ns.join(d)).unwrap_or_default();
        }
        let got = other_layouts(&ns.join("v2"));
        let _ = std::fs::remove_dir_all(&base);
        assert_eq!(got, vec![ns.join("v1"), ns.join("v3")]);
        assert!(other_layouts(Path::new("/")).is_empty());
    }
}
