//! Roles per HA instance, wherever they come from: the cluster decides them under `--ka`
//! ([`crate::ha`]); otherwise they are set with `POST /config/cistate` (kube-loxilb's way) and
//! saved in `<config-path>/roles.json`, with or without BGP, and restored at start.
//!
//! Every change goes out on the [`RoleBus`]: BGP recomputes its routes and the L2 follower
//! its ARP answers from there, not through calls between handlers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::ha::{Ha, Role};
use crate::model::DEFAULT_INSTANCE;
use crate::store::{StoreError, write_atomic};

pub const ROLES_FILE: &str = "roles.json";

/// A change counter: subscribers wake on every role change and read the roles they need.
#[derive(Clone)]
pub struct RoleBus(Arc<watch::Sender<u64>>);

impl Default for RoleBus {
    fn default() -> Self {
        RoleBus(Arc::new(watch::channel(0).0))
    }
}

impl RoleBus {
    pub fn changed(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct RolesDoc {
    version: u32,
    roles: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RolesError {
    #[error(
        "roles on this node are decided by the cluster (--ka); use POST /config/ha/switchover (ferroctl ha switchover)"
    )]
    DecidedByCluster,
    #[error("saving roles: {0}")]
    Save(#[from] StoreError),
}

pub struct Roles {
    dir: PathBuf,
    /// Set over REST (not under `--ka`).
    set: Mutex<BTreeMap<String, Role>>,
    ha: Option<Arc<Ha>>,
    bus: RoleBus,
}

impl Roles {
    /// Loads `roles.json`; before this file existed, roles were kept in `bgp.json` (`roles`):
    /// those are taken over when `roles.json` is missing.
    pub fn load(dir: &Path, ha: Option<Arc<Ha>>, bus: RoleBus) -> anyhow::Result<Roles> {
        let path = dir.join(ROLES_FILE);
        let raw: BTreeMap<String, String> = match std::fs::read(&path) {
            Ok(b) => {
                serde_json::from_slice::<RolesDoc>(&b)
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "{}: not a ferrolb roles document ({e}); move it aside",
                            path.display()
                        )
                    })?
                    .roles
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => legacy_roles(dir),
            Err(e) => return Err(anyhow::anyhow!("{}: {e}", path.display())),
        };
        let mut set = BTreeMap::new();
        for (instance, r) in raw {
            match Role::parse(&r) {
                Some(role) => {
                    set.insert(instance, role);
                }
                None => warn!(instance, role = r, "saved role not understood; ignored"),
            }
        }
        Ok(Roles {
            dir: dir.to_path_buf(),
            set: Mutex::new(set),
            ha,
            bus,
        })
    }

    fn set_roles(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Role>> {
        self.set.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn bus(&self) -> &RoleBus {
        &self.bus
    }

    /// Whether the cluster decides roles (`--ka`).
    pub fn by_cluster(&self) -> bool {
        self.ha.as_ref().is_some_and(|h| h.cfg.ka)
    }

    /// Hands the saved roles to HA (cluster mode without `--ka`). Blocking: becoming MASTER
    /// adopts the synced flows (a walk of the table).
    pub fn restore(&self) {
        if self.by_cluster() {
            return;
        }
        let roles = self.set_roles().clone();
        if let Some(ha) = &self.ha {
            for (i, r) in &roles {
                ha.set_external(i, *r);
            }
        }
        if !roles.is_empty() {
            info!(?roles, "roles restored");
        }
        self.bus.changed();
    }

    /// `POST /config/cistate`. Blocking (see [`Roles::restore`]): run it off the async workers.
    pub fn set(&self, instance: &str, role: Role) -> Result<(), RolesError> {
        if self.by_cluster() {
            return Err(RolesError::DecidedByCluster);
        }
        let doc = {
            let mut set = self.set_roles();
            let old = set.insert(instance.to_string(), role);
            let doc = RolesDoc {
                version: 1,
                roles: set
                    .iter()
                    .map(|(i, r)| (i.clone(), r.name().to_string()))
                    .collect(),
            };
            let bytes = serde_json::to_vec_pretty(&doc).unwrap_or_default();
            if let Err(e) = write_atomic(&self.dir, ROLES_FILE, &bytes) {
                // Not saved: not applied either.
                match old {
                    Some(o) => set.insert(instance.to_string(), o),
                    None => set.remove(instance),
                };
                return Err(e.into());
            }
            doc
        };
        if let Some(ha) = &self.ha {
            ha.set_external(instance, role);
        }
        info!(
            instance,
            role = role.name(),
            roles = doc.roles.len(),
            "role set over REST"
        );
        self.bus.changed();
        Ok(())
    }

    /// The node source addresses (`--node-snat`) BGP advertises from this node, with their
    /// backup distance (0: this node's own).
    pub fn snat_routes(&self) -> Vec<(std::net::IpAddr, u8)> {
        self.ha
            .as_ref()
            .map(|h| h.snat_routes())
            .unwrap_or_default()
    }

    /// The role BGP advertises for `instance`.
    pub fn advertised(&self, instance: &str) -> Role {
        match &self.ha {
            Some(ha) if ha.cfg.ka => ha.advertised_role(instance),
            Some(ha) => ha.role(instance),
            None => self
                .set_roles()
                .get(instance)
                .copied()
                .unwrap_or(Role::NotDefined),
        }
    }

    /// Roles of `instances`, the default instance and every instance set over REST.
    pub fn list(&self, instances: &BTreeSet<String>) -> BTreeMap<String, Role> {
        let mut all = instances.clone();
        all.insert(DEFAULT_INSTANCE.to_string());
        all.extend(self.set_roles().keys().cloned());
        all.into_iter()
            .map(|i| {
                let r = match &self.ha {
                    Some(ha) => ha.role(&i),
                    None => self
                        .set_roles()
                        .get(&i)
                        .copied()
                        .unwrap_or(Role::NotDefined),
                };
                (i, r)
            })
            .collect()
    }
}

/// Roles an older agent saved inside `bgp.json`.
fn legacy_roles(dir: &Path) -> BTreeMap<String, String> {
    #[derive(Deserialize)]
    struct Legacy {
        #[serde(default)]
        roles: BTreeMap<String, String>,
    }
    std::fs::read(dir.join("bgp.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Legacy>(&b).ok())
        .map(|l| l.roles)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_set_without_bgp_or_cluster_are_saved_and_restored() {
        let dir = std::env::temp_dir().join(format!("ferrolb-roles-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let bus = RoleBus::default();
        let mut rx = bus.subscribe();
        let r = Roles::load(&dir, None, bus.clone()).unwrap();
        assert_eq!(r.advertised(DEFAULT_INSTANCE), Role::NotDefined);
        r.set("inst1", Role::Backup).unwrap();
        assert!(rx.has_changed().unwrap(), "the change went out on the bus");
        rx.mark_unchanged();
        let again = Roles::load(&dir, None, RoleBus::default()).unwrap();
        assert_eq!(again.advertised("inst1"), Role::Backup);
        let l = again.list(&BTreeSet::new());
        assert_eq!(l.get(DEFAULT_INSTANCE), Some(&Role::NotDefined));
        assert_eq!(l.get("inst1"), Some(&Role::Backup));
        // Roles an older agent kept in bgp.json are taken over once.
        let old = dir.join("old");
        std::fs::create_dir_all(&old).unwrap();
        std::fs::write(
            old.join("bgp.json"),
            r#"{"local_as":null,"router_id":null,"neighbors":{},"roles":{"llb-inst0":"MASTER"}}"#,
        )
        .unwrap();
        let migrated = Roles::load(&old, None, RoleBus::default()).unwrap();
        assert_eq!(migrated.advertised(DEFAULT_INSTANCE), Role::Master);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
