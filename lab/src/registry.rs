//! The record of labs that are up: one JSON file per lab under `/run/ferrolab/labs/`.
//!
//! A record is written *before* anything of the lab is created and removed only after
//! everything is gone, so `down` can always find what a crashed or half-failed `up` left behind.
//! Writes are atomic (temporary file + rename).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::LabError;
use crate::ns::RUN_DIR;

/// What `down`, `exec` and `inspect` need to find a lab again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabRecord {
    pub name: String,
    pub topology: PathBuf,
    pub lab_dir: PathBuf,
    /// (node, network namespace), in topology order.
    pub nodes: Vec<(String, String)>,
    pub created_unix_s: u64,
}

fn labs_dir() -> PathBuf {
    Path::new(RUN_DIR).join("labs")
}

fn record_path(name: &str) -> PathBuf {
    labs_dir().join(format!("{name}.json"))
}

pub fn save(rec: &LabRecord) -> Result<(), LabError> {
    let dir = labs_dir();
    std::fs::create_dir_all(&dir)
        .map_err(|e| LabError::io(format!("create {}", dir.display()), e))?;
    let path = record_path(&rec.name);
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(rec)
        .map_err(|e| LabError::Invalid(format!("cannot encode the lab record: {e}")))?;
    std::fs::write(&tmp, text).map_err(|e| LabError::io(format!("write {}", tmp.display()), e))?;
    std::fs::rename(&tmp, &path)
        .map_err(|e| LabError::io(format!("rename to {}", path.display()), e))
}

pub fn load(name: &str) -> Result<Option<LabRecord>, LabError> {
    let path = record_path(name);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| LabError::Invalid(format!("{}: corrupt lab record: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(LabError::io(format!("read {}", path.display()), e)),
    }
}

pub fn remove(name: &str) -> Result<(), LabError> {
    match std::fs::remove_file(record_path(name)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LabError::io(
            format!("remove {}", record_path(name).display()),
            e,
        )),
    }
}

/// Every recorded lab, sorted by name. Unreadable records are reported, not skipped silently.
pub fn list() -> Result<Vec<Result<LabRecord, LabError>>, LabError> {
    let dir = labs_dir();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(LabError::io(format!("read {}", dir.display()), e)),
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_suffix(".json").map(str::to_string)
        })
        .collect();
    names.sort();
    Ok(names
        .into_iter()
        .map(|n| load(&n).and_then(|r| r.ok_or_else(|| LabError::NotUp(n.clone()))))
        .collect())
}
