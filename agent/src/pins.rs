//! Whether the pinned datapath will outlive the agent.
//!
//! A restarted agent adopts the flows of the datapath pinned in bpffs; that works only if the
//! bpffs mount outlives the agent. When the agent mounts bpffs itself inside a mount
//! namespace other than the host's (`ip netns exec`, a container run without
//! `-v /sys/fs/bpf:/sys/fs/bpf`), the mount, and every pin in it, goes with that namespace:
//! `kill -9` and a restart then reset every flow. The agent cannot know whether its mount
//! namespace will live on (a lab node's does), so it warns and says how to make it safe.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// What the agent knows about its bpffs mount. Namespaces and devices are `None` when they
/// could not be read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountFacts {
    /// The agent mounted bpffs itself (none was there).
    pub mounted_here: bool,
    /// This process is PID 1 of its PID namespace (a container's entry point).
    pub pid1: bool,
    /// Mount namespace inodes: this process's and PID 1's.
    pub own_ns: Option<u64>,
    pub pid1_ns: Option<u64>,
    /// Devices of `/sys/fs/bpf` as this process and as PID 1 see it (the same bpffs
    /// instance has the same device).
    pub own_dev: Option<u64>,
    pub pid1_dev: Option<u64>,
}

/// Why the pins may die with the agent, if they may. Pure.
pub fn pins_at_risk(f: &MountFacts) -> Option<&'static str> {
    let foreign_ns = matches!((f.own_ns, f.pid1_ns), (Some(a), Some(b)) if a != b);
    if f.mounted_here && f.pid1 {
        return Some(
            "the agent is its PID namespace's first process (a container entry point) and mounted bpffs itself",
        );
    }
    if f.mounted_here && foreign_ns {
        return Some(
            "the agent mounted bpffs itself in a mount namespace that is not PID 1's (ip netns exec, a container)",
        );
    }
    if f.mounted_here && f.pid1_ns.is_none() {
        return Some(
            "the agent mounted bpffs itself and cannot tell whether its mount namespace is PID 1's (/proc/1/ns/mnt unreadable: another user namespace)",
        );
    }
    if foreign_ns && matches!((f.own_dev, f.pid1_dev), (Some(a), Some(b)) if a != b) {
        return Some("/sys/fs/bpf here is a bpffs instance of its own, not PID 1's");
    }
    None
}

fn ns_inode(pid: &str) -> Option<u64> {
    std::fs::metadata(format!("/proc/{pid}/ns/mnt"))
        .ok()
        .map(|m| m.ino())
}

fn dev(p: &Path) -> Option<u64> {
    std::fs::metadata(p).ok().map(|m| m.dev())
}

/// Reads the facts (after `ensure_bpffs`, whose answer is `mounted_here`).
pub fn facts(mounted_here: bool) -> MountFacts {
    MountFacts {
        mounted_here,
        pid1: std::process::id() == 1,
        own_ns: ns_inode("self"),
        pid1_ns: ns_inode("1"),
        own_dev: dev(Path::new("/sys/fs/bpf")),
        pid1_dev: dev(Path::new("/proc/1/root/sys/fs/bpf")),
    }
}

/// Logs the warning when the pins may not outlive the agent.
pub fn check(mounted_here: bool, pin_dir: &Path) {
    // A --bpf-pin-dir elsewhere is the operator's choice of mount.
    if !pin_dir.starts_with("/sys/fs/bpf") {
        return;
    }
    if let Some(why) = pins_at_risk(&facts(mounted_here)) {
        tracing::warn!(
            pin_dir = %pin_dir.display(),
            why,
            "the pinned datapath may not outlive this agent: if this mount namespace ends with it, a restart drops every flow; bind-mount the host's bpffs (docker run -v /sys/fs/bpf:/sys/fs/bpf, a hostPath volume in Kubernetes; see docs/operations.md)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> MountFacts {
        MountFacts {
            mounted_here: false,
            pid1: false,
            own_ns: Some(1),
            pid1_ns: Some(1),
            own_dev: Some(40),
            pid1_dev: Some(40),
        }
    }

    #[test]
    fn the_hosts_bpffs_is_safe_mounted_by_us_or_not() {
        assert_eq!(pins_at_risk(&host()), None);
        let f = MountFacts {
            mounted_here: true,
            ..host()
        };
        assert_eq!(
            pins_at_risk(&f),
            None,
            "mounted in the host's namespace: lives on"
        );
    }

    #[test]
    fn a_bpffs_of_our_own_in_another_mount_namespace_is_at_risk() {
        // ip netns exec: a new mount namespace, a fresh sysfs, no bpffs: we mount one.
        let f = MountFacts {
            mounted_here: true,
            own_ns: Some(2),
            own_dev: Some(77),
            ..host()
        };
        assert!(pins_at_risk(&f).unwrap().contains("not PID 1's"));
        // Someone else mounted a private instance there before us.
        let f = MountFacts {
            mounted_here: false,
            ..f
        };
        assert!(pins_at_risk(&f).unwrap().contains("instance of its own"));
        // The host's bpffs bound in: same device.
        let f = MountFacts {
            own_dev: Some(40),
            ..f
        };
        assert_eq!(pins_at_risk(&f), None);
    }

    #[test]
    fn a_container_entry_point_that_mounts_bpffs_is_at_risk() {
        let f = MountFacts {
            mounted_here: true,
            pid1: true,
            ..host()
        };
        assert!(pins_at_risk(&f).unwrap().contains("container"));
        // Unknown namespaces (PID 1 in another user namespace) and nothing mounted by us:
        // no claim; mounted by us: it may be a private namespace.
        let f = MountFacts {
            own_ns: Some(2),
            pid1_ns: None,
            ..MountFacts::default()
        };
        assert_eq!(pins_at_risk(&f), None);
        let f = MountFacts {
            mounted_here: true,
            ..f
        };
        assert!(pins_at_risk(&f).unwrap().contains("cannot tell"));
    }
}
