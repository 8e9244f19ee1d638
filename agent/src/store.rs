//! Atomic persistence of the agent's state under `--config-path`.
//!
//! The state is one JSON document written to `state.json.tmp`, flushed to disk, renamed over
//! `state.json` and the directory flushed: a crash or `kill -9` at any point leaves either the
//! old or the new document, never a mix. A document that cannot be read is an error at start
//! (the agent refuses to start rather than come up empty and lose the rules).

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::rules::{Rule, RuleSet};

pub const STATE_FILE: &str = "state.json";
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    pub rules: Vec<Rule>,
    /// Addresses this agent put on `lo` (and may therefore remove).
    pub vips: BTreeSet<IpAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a ferrolb state document ({reason}); move it aside to start empty")]
    Corrupt { path: PathBuf, reason: String },
}

pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(dir: &Path) -> Store {
        Store {
            dir: dir.to_path_buf(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// Reads the saved state; `Ok(None)` when there is none yet.
    pub fn load(&self) -> Result<Option<(RuleSet, BTreeSet<IpAddr>)>, StoreError> {
        let path = self.path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::Io { path, source: e }),
        };
        let st: State = serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if st.version != FORMAT_VERSION {
            return Err(StoreError::Corrupt {
                path,
                reason: format!(
                    "format version {} (this build reads {FORMAT_VERSION})",
                    st.version
                ),
            });
        }
        let mut rs = RuleSet::default();
        for r in st.rules {
            rs.rules.insert(r.key.clone(), r);
        }
        Ok(Some((rs, st.vips)))
    }

    /// Saves atomically (write, fsync, rename, fsync the directory).
    pub fn save(&self, rules: &RuleSet, vips: &BTreeSet<IpAddr>) -> Result<(), StoreError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |e| StoreError::Io { path, source: e }
        };
        fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let st = State {
            version: FORMAT_VERSION,
            rules: rules.rules.values().cloned().collect(),
            vips: vips.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&st).map_err(|e| StoreError::Corrupt {
            path: self.path(),
            reason: e.to_string(),
        })?;
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(&bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        let path = self.path();
        fs::rename(&tmp, &path).map_err(io(&path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::models::parse_rule;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferrolb-store-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn round_trip_and_no_partial_documents() {
        let dir = tmpdir("rt");
        let store = Store::new(&dir);
        assert!(store.load().unwrap().is_none());
        let mut rs = RuleSet::default();
        let spec = parse_rule(
            br#"{"serviceArguments":{"externalIP":"20.20.20.1","port":80,"name":"a"},"endpoints":[{"endpointIP":"10.0.0.1","targetPort":80,"weight":1}]}"#,
        )
        .unwrap();
        rs.apply(&rs.plan(spec, 8).unwrap());
        let vips: BTreeSet<IpAddr> = ["20.20.20.1".parse().unwrap()].into();
        store.save(&rs, &vips).unwrap();
        let (back, v) = store.load().unwrap().unwrap();
        assert_eq!(back, rs);
        assert_eq!(v, vips);
        // A leftover temporary file (a crash mid-write) does not affect what is loaded.
        fs::write(dir.join("state.json.tmp"), b"{\"version\":1,\"ru").unwrap();
        assert_eq!(store.load().unwrap().unwrap().0, rs);
        // A damaged document is refused with its path, never silently emptied.
        fs::write(store.path(), b"{\"version\":1,\"ru").unwrap();
        let e = store.load().unwrap_err().to_string();
        assert!(
            e.contains("state.json") && e.contains("move it aside"),
            "{e}"
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
