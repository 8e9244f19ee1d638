//! Kernel forwarding on the interfaces the datapath attaches to.
//!
//! The datapath forwards a rewritten packet itself only when the FIB gives it a forwarding
//! answer, and the FIB answers "forwarding disabled" for a packet that arrived on an
//! interface whose `net.ipv4.conf.<if>.forwarding` (`net.ipv6.conf.<if>.forwarding`) is 0,
//! the default of a new host or network namespace. The packet then goes to the stack, which
//! drops it: every connection would time out. So on each interface it attaches to, the agent
//! turns forwarding on (and logs it), unless `--no-forwarding-sysctl` says the host's sysctls
//! are managed elsewhere; then it warns. The datapath counts what still falls back
//! (`ferrolb_datapath_fallbacks_total{reason}`).

use std::path::PathBuf;

use tracing::{info, warn};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn dir(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }
}

/// What to do about one interface and family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Forwarding is on, or the family is absent on the interface (IPv6 disabled).
    Nothing,
    TurnOn,
    /// Forwarding is off and the agent may not change it.
    Warn,
}

/// `current`: the interface's setting (None when the family has no settings there).
pub fn decide(current: Option<bool>, manage: bool) -> Step {
    match (current, manage) {
        (None, _) | (Some(true), _) => Step::Nothing,
        (Some(false), true) => Step::TurnOn,
        (Some(false), false) => Step::Warn,
    }
}

/// The sysctl file of `iface` (None for a name that is not a plain interface name).
pub fn sysctl_path(family: Family, iface: &str) -> Option<PathBuf> {
    let plain = !iface.is_empty()
        && iface.len() < 16
        && iface != "."
        && iface != ".."
        && !iface.contains('/')
        && !iface.contains('\0');
    plain.then(|| {
        PathBuf::from(format!(
            "/proc/sys/net/{}/conf/{iface}/forwarding",
            family.dir()
        ))
    })
}

/// Reads a sysctl's value: anything but `0` is on.
pub fn parse(value: &str) -> Option<bool> {
    match value.trim() {
        "" => None,
        v => Some(v != "0"),
    }
}

/// Makes sure the kernel forwards what arrives on `iface` (both families), or warns when
/// `manage` is false. Blocking (small `/proc` reads and writes): call it where the datapath
/// attaches (off the async workers).
pub fn ensure(iface: &str, manage: bool) {
    for family in [Family::V4, Family::V6] {
        let Some(path) = sysctl_path(family, iface) else {
            return;
        };
        let current = std::fs::read_to_string(&path).ok().and_then(|v| parse(&v));
        let sysctl = format!("net.{}.conf.{iface}.forwarding", family.dir());
        match decide(current, manage) {
            Step::Nothing => {}
            Step::TurnOn => match std::fs::write(&path, "1") {
                Ok(()) => {
                    info!(%sysctl, "forwarding turned on (was 0): the datapath forwards what arrives here")
                }
                Err(e) => warn!(
                    %sysctl,
                    error = %e,
                    "cannot turn forwarding on: rewritten packets arriving here go to the stack, which drops them"
                ),
            },
            Step::Warn => warn!(
                %sysctl,
                "forwarding is off and --no-forwarding-sysctl is set: rewritten packets arriving here go to the stack, which drops them (counted as ferrolb_datapath_fallbacks_total{{reason=\"forwarding_disabled\"}})"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarding_is_turned_on_only_where_it_is_off_and_allowed() {
        assert_eq!(decide(Some(false), true), Step::TurnOn);
        assert_eq!(decide(Some(false), false), Step::Warn);
        assert_eq!(decide(Some(true), true), Step::Nothing);
        assert_eq!(decide(Some(true), false), Step::Nothing);
        assert_eq!(decide(None, true), Step::Nothing, "IPv6 disabled there");
    }

    #[test]
    fn sysctl_values_and_paths() {
        assert_eq!(parse("0\n"), Some(false));
        assert_eq!(parse("1\n"), Some(true));
        assert_eq!(parse("2"), Some(true));
        assert_eq!(parse(""), None);
        assert_eq!(
            sysctl_path(Family::V4, "eth1").unwrap(),
            PathBuf::from("/proc/sys/net/ipv4/conf/eth1/forwarding")
        );
        assert_eq!(
            sysctl_path(Family::V6, "eth1").unwrap(),
            PathBuf::from("/proc/sys/net/ipv6/conf/eth1/forwarding")
        );
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "all/../../x",
            "waytoolonginterfacename",
        ] {
            assert!(sysctl_path(Family::V4, bad).is_none(), "{bad}");
        }
    }
}
