//! Network, mount and UTS namespaces for lab nodes ("pseudo containers").
//!
//! Each node is a named network namespace (`ip netns add`, under `/run/netns`) plus a persistent
//! mount and UTS namespace whose namespace files are bind-mounted under
//! `/run/ferrolab/ns/<netns>.{mnt,uts}`. Inside the mount namespace: a fresh sysfs (so
//! `/sys/class/net` shows the node's interfaces), a copy-on-write overlay on `/etc`, private
//! tmpfs on `/run/frr` and `/run/bird`, the node's own `/var/log`, and the topology's binds.
//!
//! This is the only module that calls `setns`, `unshare` or `mount`. Namespace setup runs in a
//! forked child before `exec` (single-threaded, so `setns(CLONE_NEWNS)` is allowed); the steps are
//! prepared in the parent so the child only makes system calls, and a failing step reports its
//! index and errno through a pipe so the parent can say exactly which step failed.

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::mount::{MntFlags, MsFlags};

use crate::LabError;

/// Root of ferrolab's runtime state (tmpfs, gone after a reboot like the namespaces it tracks).
pub const RUN_DIR: &str = "/run/ferrolab";
/// Where node mount/UTS namespace files are bind-mounted (a private mount).
pub const NS_DIR: &str = "/run/ferrolab/ns";
/// Where `ip netns` keeps network namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// Directories that get a private tmpfs in every node, with the user that owns them.
const PRIVATE_RUN_DIRS: [(&str, &str); 2] = [("/run/frr", "frr"), ("/run/bird", "bird")];

/// Paths of one node's namespaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeNs {
    pub netns: String,
}

impl NodeNs {
    pub fn new(netns: impl Into<String>) -> Self {
        NodeNs {
            netns: netns.into(),
        }
    }
    pub fn net_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.netns)
    }
    pub fn mnt_path(&self) -> PathBuf {
        Path::new(NS_DIR).join(format!("{}.mnt", self.netns))
    }
    pub fn uts_path(&self) -> PathBuf {
        Path::new(NS_DIR).join(format!("{}.uts", self.netns))
    }
    pub fn exists(&self) -> bool {
        self.net_path().exists()
    }
    /// The inode of the network namespace, as `/proc/<pid>/ns/net` shows it.
    pub fn net_inode(&self) -> Option<u64> {
        ns_inode(&self.net_path())
    }
    pub fn mnt_inode(&self) -> Option<u64> {
        ns_inode(&self.mnt_path())
    }
}

fn ns_inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    /// `NSFS_MAGIC` from linux/magic.h: a file that really pins a namespace.
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    let fs = nix::sys::statfs::statfs(path).ok()?;
    if fs.filesystem_type().0 as i64 != NSFS_MAGIC {
        return None; // e.g. the empty file left by a half-made namespace
    }
    std::fs::metadata(path).ok().map(|md| md.ino())
}

fn cstr(p: impl AsRef<std::ffi::OsStr>) -> Result<CString, LabError> {
    CString::new(p.as_ref().as_bytes())
        .map_err(|_| LabError::Invalid(format!("path {:?} contains a NUL byte", p.as_ref())))
}

/// Makes sure `/run/ferrolab/ns` exists and is a private mount, so that binding a mount
/// namespace file there can never propagate into another mount namespace.
pub fn ensure_ns_dir() -> Result<(), LabError> {
    std::fs::create_dir_all(NS_DIR).map_err(|e| LabError::io(format!("create {NS_DIR}"), e))?;
    if !is_mountpoint(Path::new(NS_DIR))? {
        nix::mount::mount(
            Some(NS_DIR),
            NS_DIR,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| LabError::sys(format!("bind-mount {NS_DIR} onto itself"), e))?;
    }
    nix::mount::mount(
        None::<&str>,
        NS_DIR,
        None::<&str>,
        MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| LabError::sys(format!("make {NS_DIR} a private mount"), e))?;
    Ok(())
}

/// Whether `path` is a mount point in this process's mount namespace.
pub fn is_mountpoint(path: &Path) -> Result<bool, LabError> {
    Ok(mount_points()?.iter().any(|m| m == path))
}

/// Every mount point of this process's mount namespace (from `/proc/self/mountinfo`).
pub fn mount_points() -> Result<Vec<PathBuf>, LabError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| LabError::io("read /proc/self/mountinfo", e))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .collect())
}

/// Undoes mountinfo's octal escapes (`\040` for a space) byte-wise, so that no input can panic.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push(
                    d.iter()
                        .fold(0u8, |acc, c| acc.wrapping_mul(8).wrapping_add(c - b'0')),
                );
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn mountinfo_unescape() {
        assert_eq!(super::unescape_mountinfo("/a\\040b/é\\"), "/a b/é\\");
        assert_eq!(super::unescape_mountinfo("\\0"), "\\0");
    }
}

/// Runs a host command (only `ip`, `nft`, ... on namespaces the lab owns) and fails with its
/// stderr when it does not succeed.
pub fn run(what: &str, cmd: &mut Command) -> Result<String, LabError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| LabError::io(format!("{what}: cannot run {:?}", cmd.get_program()), e))?;
    if !out.status.success() {
        return Err(LabError::Command {
            what: what.to_string(),
            status: out.status.code().unwrap_or(-1),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One system call that the setup child makes, prepared in the parent.
#[derive(Clone)]
enum Step {
    Mount {
        source: Option<CString>,
        target: CString,
        fstype: Option<CString>,
        flags: libc::c_ulong,
        data: Option<CString>,
    },
    /// `mkdir`, tolerating EEXIST.
    Mkdir {
        path: CString,
        mode: libc::mode_t,
    },
    /// Create an empty file if missing.
    Touch {
        path: CString,
    },
    Chown {
        path: CString,
        uid: libc::uid_t,
        gid: libc::gid_t,
    },
    Umount {
        target: CString,
    },
    Hostname {
        name: CString,
    },
}

/// Everything that makes one node's mount namespace.
#[derive(Debug, Clone)]
pub struct MountPlan {
    pub hostname: String,
    /// The node's directory in the lab directory (holds `etc.upper`, `etc.work`, `log`).
    pub node_dir: PathBuf,
    pub binds: Vec<ResolvedBind>,
}

/// A bind with an absolute, existing source.
#[derive(Debug, Clone)]
pub struct ResolvedBind {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
    pub source_is_dir: bool,
    /// The target does not exist yet and is created in the node (under `/etc`, whose overlay
    /// keeps it private, or under the node's own `/var/log`).
    pub create_target: bool,
    /// For error messages: `binds[i]` of node X.
    pub key: String,
}

impl MountPlan {
    pub fn etc_upper(&self) -> PathBuf {
        self.node_dir.join("etc.upper")
    }
    pub fn etc_work(&self) -> PathBuf {
        self.node_dir.join("etc.work")
    }
    pub fn log_dir(&self) -> PathBuf {
        self.node_dir.join("log")
    }
}

fn user_ids(name: &str) -> Option<(libc::uid_t, libc::gid_t)> {
    nix::unistd::User::from_name(name)
        .ok()
        .flatten()
        .map(|u| (u.uid.as_raw(), u.gid.as_raw()))
}

fn push_mkdir_all(steps: &mut Vec<(Step, String)>, path: &Path) -> Result<(), LabError> {
    let mut acc = PathBuf::from("/");
    for comp in path.components().skip(1) {
        acc.push(comp);
        steps.push((
            Step::Mkdir {
                path: cstr(&acc)?,
                mode: 0o755,
            },
            format!("mkdir {}", acc.display()),
        ));
    }
    Ok(())
}

fn build_steps(plan: &MountPlan) -> Result<Vec<(Step, String)>, LabError> {
    let mut steps: Vec<(Step, String)> = Vec::new();
    let m = |source: Option<&str>,
             target: &Path,
             fstype: Option<&str>,
             flags: libc::c_ulong,
             data: Option<String>|
     -> Result<Step, LabError> {
        Ok(Step::Mount {
            source: source.map(cstr).transpose()?,
            target: cstr(target)?,
            fstype: fstype.map(cstr).transpose()?,
            flags,
            data: data.map(cstr).transpose()?,
        })
    };
    // Host mounts made later still show up in the node; nothing the node mounts leaks out.
    steps.push((
        m(
            None,
            Path::new("/"),
            None,
            libc::MS_REC | libc::MS_SLAVE,
            None,
        )?,
        "make / a recursive slave mount".into(),
    ));
    // Drop the copies of other nodes' namespace files: a mount namespace must not pin another.
    steps.push((
        Step::Umount {
            target: cstr(NS_DIR)?,
        },
        format!("detach {NS_DIR}"),
    ));
    steps.push((
        Step::Hostname {
            name: cstr(&plan.hostname)?,
        },
        format!("set hostname {}", plan.hostname),
    ));
    steps.push((
        m(
            Some("sysfs"),
            Path::new("/sys"),
            Some("sysfs"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            None,
        )?,
        "mount a sysfs of the node's network namespace on /sys".into(),
    ));
    let (upper, work) = (plan.etc_upper(), plan.etc_work());
    for p in [&upper, &work] {
        let s = p.display().to_string();
        if s.contains([',', ':', '\\']) {
            return Err(LabError::Invalid(format!(
                "lab directory path {s} contains ',', ':' or '\\', which overlayfs options cannot carry"
            )));
        }
    }
    steps.push((
        m(
            Some("overlay"),
            Path::new("/etc"),
            Some("overlay"),
            0,
            Some(format!(
                "lowerdir=/etc,upperdir={},workdir={}",
                upper.display(),
                work.display()
            )),
        )?,
        "mount a copy-on-write overlay on /etc".into(),
    ));
    for (dir, user) in PRIVATE_RUN_DIRS {
        if !Path::new(dir).is_dir() {
            continue; // made by the parent when the daemon is installed; absent otherwise
        }
        steps.push((
            m(
                Some("tmpfs"),
                Path::new(dir),
                Some("tmpfs"),
                libc::MS_NOSUID | libc::MS_NODEV,
                Some("mode=0755".into()),
            )?,
            format!("mount a private tmpfs on {dir}"),
        ));
        if let Some((uid, gid)) = user_ids(user) {
            steps.push((
                Step::Chown {
                    path: cstr(dir)?,
                    uid,
                    gid,
                },
                format!("chown {dir} to {user}"),
            ));
        }
    }
    steps.push((
        Step::Mount {
            source: Some(cstr(plan.log_dir())?),
            target: cstr("/var/log")?,
            fstype: None,
            flags: libc::MS_BIND,
            data: None,
        },
        format!("bind {} on /var/log", plan.log_dir().display()),
    ));
    for b in &plan.binds {
        if b.create_target {
            if let Some(parent) = b.target.parent() {
                push_mkdir_all(&mut steps, parent)?;
            }
            let (step, what) = if b.source_is_dir {
                (
                    Step::Mkdir {
                        path: cstr(&b.target)?,
                        mode: 0o755,
                    },
                    "directory",
                )
            } else {
                (
                    Step::Touch {
                        path: cstr(&b.target)?,
                    },
                    "file",
                )
            };
            steps.push((
                step,
                format!("{}: create {what} {}", b.key, b.target.display()),
            ));
        }
        steps.push((
            Step::Mount {
                source: Some(cstr(&b.source)?),
                target: cstr(&b.target)?,
                fstype: None,
                flags: libc::MS_BIND | libc::MS_REC,
                data: None,
            },
            format!(
                "{}: bind {} on {}",
                b.key,
                b.source.display(),
                b.target.display()
            ),
        ));
        if b.read_only {
            steps.push((
                m(
                    None,
                    &b.target,
                    None,
                    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                    None,
                )?,
                format!("{}: make {} read-only", b.key, b.target.display()),
            ));
        }
    }
    Ok(steps)
}

/// Runs one step. Called in the forked child: system calls only, no allocation.
fn run_step(step: &Step) -> Result<(), i32> {
    fn opt(p: &Option<CString>) -> *const libc::c_char {
        p.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())
    }
    fn errno() -> i32 {
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    }
    // SAFETY: every pointer is a valid NUL-terminated string owned by `step` (or null where the
    // system call allows it); the calls have no memory-safety preconditions beyond that.
    let rc = unsafe {
        match step {
            Step::Mount {
                source,
                target,
                fstype,
                flags,
                data,
            } => libc::mount(
                opt(source),
                target.as_ptr(),
                opt(fstype),
                *flags,
                opt(data).cast(),
            ),
            Step::Mkdir { path, mode } => {
                let rc = libc::mkdir(path.as_ptr(), *mode);
                if rc != 0 && errno() == libc::EEXIST {
                    0
                } else {
                    rc
                }
            }
            Step::Touch { path } => {
                let fd = libc::open(
                    path.as_ptr(),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_CLOEXEC,
                    0o644,
                );
                if fd >= 0 {
                    libc::close(fd);
                    0
                } else {
                    -1
                }
            }
            Step::Chown { path, uid, gid } => libc::chown(path.as_ptr(), *uid, *gid),
            Step::Umount { target } => libc::umount2(target.as_ptr(), libc::MNT_DETACH),
            Step::Hostname { name } => libc::sethostname(name.as_ptr(), name.as_bytes().len()),
        }
    };
    if rc == 0 { Ok(()) } else { Err(errno()) }
}

/// Creates the node's mount and UTS namespaces (its network namespace must exist) and pins them
/// on their namespace files.
pub fn create_node_namespaces(ns: &NodeNs, plan: &MountPlan) -> Result<(), LabError> {
    let steps = build_steps(plan)?;
    let netns = File::open(ns.net_path())
        .map_err(|e| LabError::io(format!("open {}", ns.net_path().display()), e))?;
    let net_fd = netns.as_raw_fd();
    let (report_r, report_w): (OwnedFd, OwnedFd) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| LabError::sys("create a pipe", e))?;
    let report_fd = report_w.as_raw_fd();
    let only_steps: Vec<Step> = steps.iter().map(|(s, _)| s.clone()).collect();

    let mut cmd = Command::new("cat");
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // Runs in the forked child before exec: system calls only (setns, unshare, mount, ...) on
    // data prepared before the fork; it does not allocate.
    let setup = move || {
        let fail = |index: u32, err: i32| -> std::io::Error {
            let mut buf = [0u8; 8];
            buf[..4].copy_from_slice(&index.to_le_bytes());
            buf[4..].copy_from_slice(&err.to_le_bytes());
            // SAFETY: writing 8 bytes from a stack buffer to a pipe we own.
            unsafe { libc::write(report_fd, buf.as_ptr().cast(), buf.len()) };
            std::io::Error::from_raw_os_error(err)
        };
        let errno = || {
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        };
        // SAFETY: plain system calls on a valid fd.
        if unsafe { libc::setns(net_fd, libc::CLONE_NEWNET) } != 0 {
            return Err(fail(u32::MAX - 1, errno()));
        }
        // SAFETY: as above.
        if unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWUTS) } != 0 {
            return Err(fail(u32::MAX, errno()));
        }
        for (i, step) in only_steps.iter().enumerate() {
            if let Err(e) = run_step(step) {
                return Err(fail(i as u32, e));
            }
        }
        Ok(())
    };
    // SAFETY: `setup` is async-signal-safe (see above).
    unsafe {
        cmd.pre_exec(setup);
    }
    let spawned = cmd.spawn();
    drop(report_w);
    let mut report = Vec::new();
    let _ = File::from(report_r).read_to_end(&mut report);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let what = if report.len() >= 8 {
                let idx = u32::from_le_bytes([report[0], report[1], report[2], report[3]]);
                match idx {
                    u32::MAX => "unshare the mount and UTS namespaces".to_string(),
                    i if i == u32::MAX - 1 => "enter the network namespace".to_string(),
                    i => steps
                        .get(i as usize)
                        .map(|(_, d)| d.clone())
                        .unwrap_or_else(|| format!("step {i}")),
                }
            } else {
                "start the namespace holder (cat)".to_string()
            };
            return Err(LabError::io(format!("node {}: {what}", plan.hostname), e));
        }
    };
    let pin = |kind: &str, file: &Path| -> Result<(), LabError> {
        File::create(file).map_err(|e| LabError::io(format!("create {}", file.display()), e))?;
        let src = format!("/proc/{}/ns/{kind}", child.id());
        nix::mount::mount(
            Some(src.as_str()),
            file,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| {
            LabError::sys(
                format!("node {}: pin {src} on {}", plan.hostname, file.display()),
                e,
            )
        })
    };
    let result = pin("mnt", &ns.mnt_path()).and_then(|_| pin("uts", &ns.uts_path()));
    drop(child.stdin.take());
    let _ = child.wait();
    result
}

/// Open namespace files of a node, ready to be entered by child processes.
#[derive(Debug)]
pub struct NsFds {
    net: File,
    mnt: File,
    uts: File,
}

impl NsFds {
    pub fn open(ns: &NodeNs) -> Result<NsFds, LabError> {
        let open = |p: PathBuf| {
            File::open(&p)
                .map_err(|e| LabError::io(format!("open {} (is the lab up?)", p.display()), e))
        };
        if ns.mnt_inode().is_none() {
            return Err(LabError::Invalid(format!(
                "{} is not a pinned mount namespace (is the lab up?)",
                ns.mnt_path().display()
            )));
        }
        Ok(NsFds {
            net: open(ns.net_path())?,
            mnt: open(ns.mnt_path())?,
            uts: open(ns.uts_path())?,
        })
    }

    /// Makes `cmd` run inside the node: its network, UTS and mount namespaces, cwd `cwd` there,
    /// and in a session of its own when `detach` is set (daemons survive the caller).
    pub fn enter(&self, cmd: &mut Command, cwd: &Path, detach: bool) -> Result<(), LabError> {
        let (net, mnt, uts) = (
            self.net.as_raw_fd(),
            self.mnt.as_raw_fd(),
            self.uts.as_raw_fd(),
        );
        let cwd = cstr(cwd)?;
        // Runs in the forked child before exec: system calls only, on fds kept open by `self`
        // (which outlives the spawn) and a prepared C string.
        let enter = move || {
            let check = |rc: libc::c_int| {
                if rc == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            };
            // SAFETY: plain system calls on valid fds / a valid C string.
            unsafe {
                check(libc::setns(net, libc::CLONE_NEWNET))?;
                check(libc::setns(uts, libc::CLONE_NEWUTS))?;
                check(libc::setns(mnt, libc::CLONE_NEWNS))?;
                check(libc::chdir(cwd.as_ptr()))?;
                if detach && libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        };
        // SAFETY: `enter` is async-signal-safe (see above).
        unsafe {
            cmd.pre_exec(enter);
        }
        Ok(())
    }
}

/// Unpins and removes a node's namespaces. Safe to call on a half-made or absent node.
pub fn destroy_node_namespaces(ns: &NodeNs) -> Vec<String> {
    let mut problems = Vec::new();
    for file in [ns.mnt_path(), ns.uts_path()] {
        if file.exists() {
            if let Err(e) = nix::mount::umount2(&file, MntFlags::MNT_DETACH)
                && e != nix::errno::Errno::EINVAL
            {
                problems.push(format!("umount {}: {e}", file.display()));
            }
            if let Err(e) = std::fs::remove_file(&file) {
                problems.push(format!("remove {}: {e}", file.display()));
            }
        }
    }
    if ns.exists()
        && let Err(e) = run(
            &format!("delete network namespace {}", ns.netns),
            Command::new("ip").args(["netns", "del", &ns.netns]),
        )
    {
        problems.push(e.to_string());
    }
    problems
}

/// A process seen in /proc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    pub pid: i32,
    pub comm: String,
    pub cmdline: String,
}

/// Processes whose network namespace or mount namespace is one of the given inodes.
pub fn processes_in(net_inode: Option<u64>, mnt_inode: Option<u64>) -> Vec<ProcInfo> {
    let me = std::process::id() as i32;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let link_inode = |pid: i32, kind: &str| -> Option<u64> {
        let l = std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).ok()?;
        let s = l.to_string_lossy();
        s.strip_prefix(&format!("{kind}:["))?
            .strip_suffix(']')?
            .parse()
            .ok()
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let hit = (net_inode.is_some() && link_inode(pid, "net") == net_inode)
            || (mnt_inode.is_some() && link_inode(pid, "mnt") == mnt_inode);
        if !hit {
            continue;
        }
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap_or_default()
            .trim()
            .to_string();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| {
                b.split(|c| *c == 0)
                    .filter(|s| !s.is_empty())
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        out.push(ProcInfo { pid, comm, cmdline });
    }
    out.sort_by_key(|p| p.pid);
    out
}
