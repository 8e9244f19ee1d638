//! Persistence of the agent's state under `--config-path`: a snapshot plus a journal.
//!
//! - `state.json`: a snapshot (rules, VIPs this agent owns, the journal sequence it covers),
//!   replaced atomically (write a temporary file, fsync, rename, fsync the directory).
//! - `journal.jsonl`: one JSON line per change since the snapshot, appended and
//!   `fdatasync`ed before the API answers, so an acknowledged change survives a crash.
//!
//! Loading replays journal lines newer than the snapshot. A line cut short by a crash is not
//! valid JSON and is dropped (it was never acknowledged); a damaged snapshot is an error at
//! start: the agent refuses to start rather than come up empty and lose the rules. Every
//! [`COMPACT_EVERY`] changes the journal is folded into a new snapshot, so a change costs one
//! small append, not a rewrite of every rule.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::RuleKey;
use crate::rules::{Rule, RuleSet};

pub mod disk;
use disk::{DiskKey, DiskRule};

pub const STATE_FILE: &str = "state.json";
pub const JOURNAL_FILE: &str = "journal.jsonl";
/// Space held back on the state volume so that a full disk never blocks a delete or a start:
/// released to write the compacted snapshot, then taken again when there is room.
pub const RESERVE_FILE: &str = "reserve";
/// The reserve holds at least this, and twice the last snapshot's size (at most
/// [`RESERVE_MAX`]).
pub const RESERVE_MIN: u64 = 1 << 20;
pub const RESERVE_MAX: u64 = 64 << 20;

/// Journal entries after which the state is compacted into a new snapshot.
pub const COMPACT_EVERY: u64 = 4096;

/// `state.json` (see [`disk`] for the versions).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    version: u32,
    /// The last journal sequence number this snapshot includes.
    #[serde(default)]
    seq: u64,
    rules: Vec<DiskRule>,
    /// Addresses this agent put on `lo` (and may therefore remove).
    vips: BTreeSet<IpAddr>,
}

/// One change to the saved state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        rule: Box<Rule>,
    },
    Del {
        key: RuleKey,
    },
    /// VIPs this agent put on `lo` (`add`) or removed from it (`del`).
    Vips {
        add: Vec<IpAddr>,
        del: Vec<IpAddr>,
    },
}

/// A journal line's change, as on disk.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum DiskOp {
    Put { rule: Box<DiskRule> },
    Del { key: DiskKey },
    Vips { add: Vec<IpAddr>, del: Vec<IpAddr> },
}

impl From<&Op> for DiskOp {
    fn from(op: &Op) -> DiskOp {
        match op {
            Op::Put { rule } => DiskOp::Put {
                rule: Box::new(DiskRule::from(&**rule)),
            },
            Op::Del { key } => DiskOp::Del { key: key.into() },
            Op::Vips { add, del } => DiskOp::Vips {
                add: add.clone(),
                del: del.clone(),
            },
        }
    }
}

impl TryFrom<DiskOp> for Op {
    type Error = String;
    fn try_from(op: DiskOp) -> Result<Op, String> {
        Ok(match op {
            DiskOp::Put { rule } => Op::Put {
                rule: Box::new(Rule::try_from(*rule)?),
            },
            DiskOp::Del { key } => Op::Del {
                key: key.try_into()?,
            },
            DiskOp::Vips { add, del } => Op::Vips { add, del },
        })
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    seq: u64,
    #[serde(flatten)]
    op: DiskOp,
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

impl StoreError {
    /// The volume (or the quota) is full: nothing is wrong with the request or the state.
    pub fn is_no_space(&self) -> bool {
        matches!(self, StoreError::Io { source, .. }
            if matches!(source.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)))
    }
}

/// Replaces `dir/name` with `bytes` atomically: a temporary file is written and flushed, then
/// renamed over the old one, and the directory is flushed. A crash leaves the old or the new.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = dir.join(format!("{name}.tmp"));
    // Owner-only: the documents can hold secrets (BGP and BFD keys).
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    drop(f);
    let path = dir.join(name);
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// [`write_atomic`] for a change that makes the document smaller (a delete): when the volume
/// is full, the reserve (see [`RESERVE_FILE`]) is released and the write tried once more.
pub fn write_atomic_shrinking(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
    match write_atomic(dir, name, bytes) {
        Err(e) if e.is_no_space() => {
            let _ = fs::remove_file(dir.join(format!("{name}.tmp")));
            if fs::remove_file(dir.join(RESERVE_FILE)).is_err() {
                return Err(e);
            }
            tracing::warn!(dir = %dir.display(), "state volume full: reserve released to save {name}");
            write_atomic(dir, name, bytes)
        }
        r => r,
    }
}

/// Writes a small document (`bgp.json`, `bfd.json`) atomically from the blocking pool, for the
/// async controllers; `shrinking` (a delete) may use the reserve.
pub async fn save_document(
    dir: PathBuf,
    name: &'static str,
    bytes: Vec<u8>,
    shrinking: bool,
) -> Result<(), StoreError> {
    let path = dir.join(name);
    tokio::task::spawn_blocking(move || {
        if shrinking {
            write_atomic_shrinking(&dir, name, &bytes)
        } else {
            write_atomic(&dir, name, &bytes)
        }
    })
    .await
    .unwrap_or_else(|e| {
        Err(StoreError::Io {
            path,
            source: std::io::Error::other(e.to_string()),
        })
    })
}

/// The answer to a failed save of a document: 507 when the volume is full, else 500; the
/// message names the path.
pub fn save_status(e: &StoreError) -> axum::http::StatusCode {
    if e.is_no_space() {
        axum::http::StatusCode::INSUFFICIENT_STORAGE
    } else {
        axum::http::StatusCode::INTERNAL_SERVER_ERROR
    }
}

pub struct Store {
    dir: PathBuf,
    seq: u64,
    since_snapshot: u64,
    journal: Option<File>,
    /// Size of the last snapshot written or read (sizes the reserve).
    snapshot_len: u64,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + use<> {
    let path = path.to_path_buf();
    move |e| StoreError::Io { path, source: e }
}

impl Store {
    pub fn new(dir: &Path) -> Store {
        Store {
            dir: dir.to_path_buf(),
            seq: 0,
            since_snapshot: 0,
            journal: None,
            snapshot_len: 0,
        }
    }

    pub fn reserve_path(&self) -> PathBuf {
        self.dir.join(RESERVE_FILE)
    }

    /// The reserve this state needs: twice the snapshot, within [RESERVE_MIN, RESERVE_MAX].
    fn reserve_wanted(&self) -> u64 {
        (self.snapshot_len.saturating_mul(2)).clamp(RESERVE_MIN, RESERVE_MAX)
    }

    /// Takes the reserve (allocated blocks, not a sparse file) when it is missing or too
    /// small. Failing for want of space is not an error: the reserve is retried later.
    pub fn ensure_reserve(&self) -> bool {
        let path = self.reserve_path();
        let want = self.reserve_wanted();
        if fs::metadata(&path).is_ok_and(|m| m.len() >= want) {
            return true;
        }
        let taken = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .and_then(|f| {
                nix::fcntl::posix_fallocate(&f, 0, want as i64)
                    .map_err(std::io::Error::from)
                    .and_then(|()| f.sync_all())
            });
        match taken {
            Ok(()) => true,
            Err(e) => {
                let _ = fs::remove_file(&path);
                tracing::warn!(path = %path.display(), bytes = want, error = %e, "cannot hold back the state volume's reserve");
                false
            }
        }
    }

    /// Gives the reserve back to the volume; true when there was one.
    fn release_reserve(&self) -> bool {
        let path = self.reserve_path();
        let had = fs::remove_file(&path).is_ok();
        if had {
            tracing::warn!(path = %path.display(), "state volume full: reserve released to save the state");
        }
        had
    }

    /// Saves after a change that frees space (a delete): when the journal cannot grow, the
    /// reserve is released and the state compacted into a new snapshot instead (smaller than
    /// snapshot + journal). A full volume therefore never blocks a delete.
    pub fn record_shrinking(
        &mut self,
        ops: Vec<Op>,
        rules: &RuleSet,
        vips: &BTreeSet<IpAddr>,
    ) -> Result<(), StoreError> {
        let n = ops.len() as u64;
        match self.record(ops, rules, vips) {
            Err(e) if e.is_no_space() => {
                self.release_reserve();
                self.seq += n;
                let r = self.snapshot(rules, vips);
                if r.is_err() {
                    self.seq -= n;
                }
                r
            }
            r => r,
        }
    }

    /// The compaction at start. On a full volume the reserve is released for it; if it still
    /// cannot be written, the start goes on from the state as loaded (the journal stays valid)
    /// and the error is returned for the log.
    pub fn snapshot_at_start(
        &mut self,
        rules: &RuleSet,
        vips: &BTreeSet<IpAddr>,
    ) -> Result<(), StoreError> {
        match self.snapshot(rules, vips) {
            Err(e) if e.is_no_space() && self.release_reserve() => self.snapshot(rules, vips),
            r => r,
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    pub fn journal_path(&self) -> PathBuf {
        self.dir.join(JOURNAL_FILE)
    }

    /// Reads the snapshot and replays the journal; `Ok(None)` when nothing was saved yet.
    pub fn load(&mut self) -> Result<Option<(RuleSet, BTreeSet<IpAddr>)>, StoreError> {
        let path = self.path();
        let snapshot = match fs::read(&path) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(StoreError::Io { path, source: e }),
        };
        let mut st = State {
            version: disk::VERSION,
            seq: 0,
            rules: Vec::new(),
            vips: BTreeSet::new(),
        };
        if let Some(bytes) = snapshot {
            self.snapshot_len = bytes.len() as u64;
            // The version first, so that a newer format is named as such (not as damage).
            #[derive(Deserialize)]
            struct Version {
                version: u32,
            }
            let v: Version = serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            if !disk::READS.contains(&v.version) {
                return Err(StoreError::Corrupt {
                    path,
                    reason: format!(
                        "format version {} (this build reads {:?})",
                        v.version,
                        disk::READS
                    ),
                });
            }
            st = serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            if st.version != disk::VERSION {
                tracing::info!(path = %path.display(), from = st.version, to = disk::VERSION, "state format migrated (written at the next compaction)");
            }
        }
        let mut rules = RuleSet::default();
        for (i, r) in st.rules.into_iter().enumerate() {
            let r = Rule::try_from(r).map_err(|reason| StoreError::Corrupt {
                path: path.clone(),
                reason: format!("rule {}: {reason}", i + 1),
            })?;
            rules.rules.insert(r.key.clone(), r);
        }
        let mut vips = st.vips;
        self.seq = st.seq;
        let jpath = self.journal_path();
        let journal = match fs::read(&jpath) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(StoreError::Io {
                    path: jpath,
                    source: e,
                });
            }
        };
        let found_any = !journal.is_empty() || path.exists();
        // Only complete lines (ending in a newline) count. A tail without one was cut short
        // by a crash mid-append: never acknowledged, so it is cut off here, before the next
        // append could glue a new line onto it.
        let complete = journal
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |i| i + 1);
        if complete < journal.len() {
            tracing::warn!(
                path = %jpath.display(),
                bytes = journal.len() - complete,
                "journal ends in a torn line (crash mid-append): dropped"
            );
            let f = OpenOptions::new()
                .write(true)
                .open(&jpath)
                .map_err(io_err(&jpath))?;
            f.set_len(complete as u64).map_err(io_err(&jpath))?;
            f.sync_data().map_err(io_err(&jpath))?;
        }
        for (n, line) in journal[..complete].split(|b| *b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            // A complete line that does not parse is damage, not a crash: refuse rather
            // than silently skip a change (the rules after it would be replayed without it).
            let corrupt = |reason: String| StoreError::Corrupt {
                path: jpath.clone(),
                reason: format!("line {}: {reason}", n + 1),
            };
            let e = serde_json::from_slice::<Entry>(line).map_err(|e| corrupt(e.to_string()))?;
            if e.seq <= self.seq {
                continue;
            }
            self.seq = e.seq;
            self.since_snapshot += 1;
            match Op::try_from(e.op).map_err(corrupt)? {
                Op::Put { rule } => {
                    rules.rules.insert(rule.key.clone(), *rule);
                }
                Op::Del { key } => {
                    rules.rules.remove(&key);
                }
                Op::Vips { add, del } => {
                    vips.extend(add);
                    for d in del {
                        vips.remove(&d);
                    }
                }
            }
        }
        if !found_any {
            return Ok(None);
        }
        Ok(Some((rules, vips)))
    }

    /// Appends changes to the journal and flushes them to disk; compacts when due.
    pub fn record(
        &mut self,
        ops: Vec<Op>,
        rules: &RuleSet,
        vips: &BTreeSet<IpAddr>,
    ) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        if self.since_snapshot + ops.len() as u64 >= COMPACT_EVERY {
            self.seq += ops.len() as u64;
            return self.snapshot(rules, vips);
        }
        let jpath = self.journal_path();
        if self.journal.is_none() {
            fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&jpath)
                .map_err(io_err(&jpath))?;
            self.journal = Some(f);
        }
        let mut buf = Vec::new();
        let n_ops = ops.len() as u64;
        for (i, op) in ops.iter().enumerate() {
            let e = Entry {
                seq: self.seq + 1 + i as u64,
                op: op.into(),
            };
            serde_json::to_writer(&mut buf, &e).map_err(|err| StoreError::Corrupt {
                path: jpath.clone(),
                reason: err.to_string(),
            })?;
            buf.push(b'\n');
        }
        let f = self.journal.as_mut().ok_or_else(|| StoreError::Corrupt {
            path: jpath.clone(),
            reason: "journal not open".into(),
        })?;
        let before = f.metadata().map_err(io_err(&jpath))?.len();
        let written = f.write_all(&buf).and_then(|()| f.sync_data());
        if let Err(e) = written {
            // A partial append (disk full, I/O error) must not stay: the next append would
            // glue onto it. Cut the file back; the sequence numbers stay unused. The caller
            // reports the error and the change is not acknowledged.
            let _ = f.set_len(before).and_then(|()| f.sync_data());
            self.journal = None;
            return Err(StoreError::Io {
                path: jpath,
                source: e,
            });
        }
        self.seq += n_ops;
        self.since_snapshot += 1;
        Ok(())
    }

    /// Writes a full snapshot atomically and empties the journal.
    pub fn snapshot(&mut self, rules: &RuleSet, vips: &BTreeSet<IpAddr>) -> Result<(), StoreError> {
        fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        let st = State {
            version: disk::VERSION,
            seq: self.seq,
            rules: rules.rules.values().map(DiskRule::from).collect(),
            vips: vips.clone(),
        };
        let bytes = serde_json::to_vec(&st).map_err(|e| StoreError::Corrupt {
            path: self.path(),
            reason: e.to_string(),
        })?;
        if let Err(e) = write_atomic(&self.dir, STATE_FILE, &bytes) {
            let _ = fs::remove_file(self.dir.join(format!("{STATE_FILE}.tmp")));
            return Err(e);
        }
        self.snapshot_len = bytes.len() as u64;
        // The snapshot covers every journaled change: start a new journal. A crash before
        // this point leaves entries with seq <= snapshot seq, which loading skips.
        let jpath = self.journal_path();
        let f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&jpath)
            .map_err(io_err(&jpath))?;
        f.sync_all().map_err(io_err(&jpath))?;
        self.journal = None;
        self.since_snapshot = 0;
        self.ensure_reserve();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::models::parse_rule;
    use crate::rules::Change;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferrolb-store-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn add(rs: &mut RuleSet, port: u16) -> Rule {
        let spec = parse_rule(
            format!(
                r#"{{"serviceArguments":{{"externalIP":"20.20.20.1","port":{port}}},"endpoints":[{{"endpointIP":"10.0.0.1","targetPort":80,"weight":1}}]}}"#
            )
            .as_bytes(),
        )
        .unwrap();
        let c = rs.plan(spec, 1 << 16).unwrap();
        rs.apply(&c);
        match c {
            Change::Create(r) => *r,
            Change::Modify { new, .. } => *new,
        }
    }

    /// Files written by agents before format v2 (loxilb's numbers, flat probe fields) load,
    /// and the next snapshot writes them as v2.
    #[test]
    fn format_v1_files_are_migrated() {
        use crate::model::{NatMode, Selection};
        let dir = tmpdir("v1");
        fs::create_dir_all(&dir).unwrap();
        let svc = |sel: u8, mode: u8, name: &str| {
            format!(
                r#"{{"sel":{sel},"mode":{mode},"bgp":true,"monitor":true,"inactive_timeout_s":0,"managed":false,"probe_type":"tcp","probe_port":8080,"probe_req":"","probe_resp":"","probe_timeout":5,"probe_retries":2,"security":0,"name":"{name}","private_ip":"","proxy_protocol_v2":false,"egress":false,"snat":false}}"#
            )
        };
        let rule = |port: u16, sel: u8, mode: u8, id: u32| {
            format!(
                r#"{{"key":{{"external_ip":"20.20.20.1","port":{port},"port_max":0,"protocol":"tcp","block":0,"host":""}},"service":{},"endpoints":[{{"ip":"10.0.0.1","target_port":80,"weight":1,"slot":0,"snat":"10.0.0.254"}}],"id":{id},"flip":1}}"#,
                svc(sel, mode, &format!("svc{port}:llb-inst0"))
            )
        };
        fs::write(
            dir.join(STATE_FILE),
            format!(
                r#"{{"version":1,"seq":1,"rules":[{}],"vips":["20.20.20.1"]}}"#,
                rule(80, 3, 2, 0)
            ),
        )
        .unwrap();
        fs::write(
            dir.join(JOURNAL_FILE),
            format!(
                "{{\"seq\":2,\"op\":\"put\",\"rule\":{}}}\n",
                rule(81, 1, 1, 1)
            ),
        )
        .unwrap();
        let mut store = Store::new(&dir);
        let (rs, vips) = store.load().unwrap().unwrap();
        assert_eq!(rs.len(), 2);
        let by_port = |p: u16| rs.rules.values().find(|r| r.key.port == p).unwrap().clone();
        let (a, b) = (by_port(80), by_port(81));
        assert_eq!(
            (a.service.selection, a.service.nat),
            (Selection::Persist, NatMode::FullNat)
        );
        assert_eq!(
            (b.service.selection, b.service.nat),
            (Selection::Hash, NatMode::OneArm)
        );
        assert_eq!(
            (a.service.probe.kind.as_str(), a.service.probe.port),
            ("tcp", 8080)
        );
        assert_eq!(
            (a.service.probe.interval_s, a.service.probe.retries),
            (5, 2)
        );
        assert_eq!(b.endpoints[0].snat, Some("10.0.0.254".parse().unwrap()));
        assert_eq!((b.id, b.flip), (1, 1));
        store.snapshot(&rs, &vips).unwrap();
        let text = fs::read_to_string(dir.join(STATE_FILE)).unwrap();
        assert!(text.contains(r#""version":2"#), "{text}");
        assert!(
            text.contains(r#""selection":"persist""#) && text.contains(r#""nat":"onearm""#),
            "{text}"
        );
        assert!(!text.contains(r#""sel""#), "{text}");
        let (again, _) = Store::new(&dir).load().unwrap().unwrap();
        assert_eq!(again, rs);
        // A newer format is refused by name, not taken for damage or emptied.
        fs::write(dir.join(STATE_FILE), r#"{"version":9,"rules":"?"}"#).unwrap();
        let e = Store::new(&dir).load().unwrap_err().to_string();
        assert!(e.contains("format version 9"), "{e}");
        let _ = fs::remove_dir_all(&dir);
    }

    /// Allowed sources are saved and come back; a damaged one in the file is an error that
    /// names it, not a rule open to everyone.
    #[test]
    fn allowed_sources_survive_a_restart() {
        let dir = tmpdir("sources");
        let mut store = Store::new(&dir);
        assert!(store.load().unwrap().is_none());
        let spec = parse_rule(
            br#"{"serviceArguments":{"externalIP":"20.20.20.1","port":80},
                "endpoints":[{"endpointIP":"10.0.0.1","targetPort":80,"weight":1}],
                "allowedSources":[{"prefix":"192.0.2.0/24"},{"prefix":"2001:db8::/32"}]}"#,
        )
        .unwrap();
        let mut rs = RuleSet::default();
        let c = rs.plan(spec, 16).unwrap();
        rs.apply(&c);
        let vips: BTreeSet<IpAddr> = ["20.20.20.1".parse().unwrap()].into();
        store
            .record(
                vec![Op::Put {
                    rule: Box::new(c.rule().clone()),
                }],
                &rs,
                &vips,
            )
            .unwrap();
        let (from_journal, _) = Store::new(&dir).load().unwrap().unwrap();
        assert_eq!(from_journal, rs);
        store.snapshot(&rs, &vips).unwrap();
        let text = fs::read_to_string(dir.join(STATE_FILE)).unwrap();
        assert!(
            text.contains(r#""allowed_sources":["192.0.2.0/24","2001:db8::/32"]"#),
            "{text}"
        );
        let (again, _) = Store::new(&dir).load().unwrap().unwrap();
        assert_eq!(again, rs);
        fs::write(
            dir.join(STATE_FILE),
            text.replace("192.0.2.0/24", "192.0.2.0/40"),
        )
        .unwrap();
        let _ = fs::remove_file(dir.join(JOURNAL_FILE));
        let e = format!("{:#}", Store::new(&dir).load().unwrap_err());
        assert!(e.contains("'192.0.2.0/40' is not a CIDR"), "{e}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn journal_replay_compaction_and_torn_lines() {
        let dir = tmpdir("journal");
        let mut store = Store::new(&dir);
        assert!(store.load().unwrap().is_none());
        let mut rs = RuleSet::default();
        let vips: BTreeSet<IpAddr> = ["20.20.20.1".parse().unwrap()].into();
        let r1 = add(&mut rs, 80);
        store
            .record(
                vec![
                    Op::Put {
                        rule: Box::new(r1.clone()),
                    },
                    Op::Vips {
                        add: vips.iter().copied().collect(),
                        del: vec![],
                    },
                ],
                &rs,
                &vips,
            )
            .unwrap();
        let r2 = add(&mut rs, 81);
        store
            .record(vec![Op::Put { rule: Box::new(r2) }], &rs, &vips)
            .unwrap();
        rs.rules.remove(&r1.key);
        store
            .record(
                vec![Op::Del {
                    key: r1.key.clone(),
                }],
                &rs,
                &vips,
            )
            .unwrap();

        let mut again = Store::new(&dir);
        let (back, v) = again.load().unwrap().unwrap();
        assert_eq!(back, rs);
        assert_eq!(v, vips);

        // A crash in the middle of an append leaves a torn last line: it is ignored.
        let mut j = OpenOptions::new()
            .append(true)
            .open(dir.join(JOURNAL_FILE))
            .unwrap();
        j.write_all(b"{\"seq\":99,\"op\":\"del\",\"key\":{\"exte")
            .unwrap();
        let (back, _) = Store::new(&dir).load().unwrap().unwrap();
        assert_eq!(back, rs);
        // ... and cut off, so the next append starts on a line of its own.
        let mut after_crash = Store::new(&dir);
        after_crash.load().unwrap();
        let r_next = add(&mut rs, 85);
        after_crash
            .record(
                vec![Op::Put {
                    rule: Box::new(r_next),
                }],
                &rs,
                &vips,
            )
            .unwrap();
        assert_eq!(Store::new(&dir).load().unwrap().unwrap().0, rs);
        again = Store::new(&dir);
        again.load().unwrap();

        // A damaged complete line in the middle is refused with its line number, not skipped.
        let good = fs::read(dir.join(JOURNAL_FILE)).unwrap();
        let mut bad = b"{\"seq\":1,\"op\":\"nonsense\"}\n".to_vec();
        bad.extend_from_slice(&good);
        fs::write(dir.join(JOURNAL_FILE), &bad).unwrap();
        let e = Store::new(&dir).load().unwrap_err().to_string();
        assert!(e.contains("journal.jsonl") && e.contains("line 1"), "{e}");
        fs::write(dir.join(JOURNAL_FILE), &good).unwrap();

        // Compaction folds the journal into the snapshot; loading gives the same state.
        again.snapshot(&rs, &vips).unwrap();
        assert_eq!(fs::metadata(dir.join(JOURNAL_FILE)).unwrap().len(), 0);
        let (back, _) = Store::new(&dir).load().unwrap().unwrap();
        assert_eq!(back, rs);
        // Changes after the snapshot are journaled and replayed on top of it.
        let r3 = add(&mut rs, 82);
        again
            .record(vec![Op::Put { rule: Box::new(r3) }], &rs, &vips)
            .unwrap();
        assert_eq!(Store::new(&dir).load().unwrap().unwrap().0, rs);

        // A leftover temporary snapshot (crash mid-compaction) does not matter.
        fs::write(dir.join("state.json.tmp"), b"{\"version\":1,\"ru").unwrap();
        assert_eq!(Store::new(&dir).load().unwrap().unwrap().0, rs);
        // A damaged snapshot is refused with its path, never silently emptied.
        fs::write(dir.join(STATE_FILE), b"{\"version\":1,\"ru").unwrap();
        let e = Store::new(&dir).load().unwrap_err().to_string();
        assert!(
            e.contains("state.json") && e.contains("move it aside"),
            "{e}"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    /// A full disk: the append fails, the error reaches the caller, nothing of it stays in
    /// the journal, and the sequence goes on from where it was once the disk has room.
    #[test]
    fn a_failed_append_leaves_nothing_behind() {
        let dir = tmpdir("full");
        let mut store = Store::new(&dir);
        let mut rs = RuleSet::default();
        let vips = BTreeSet::new();
        let r1 = add(&mut rs, 80);
        store
            .record(vec![Op::Put { rule: Box::new(r1) }], &rs, &vips)
            .unwrap();
        let saved = fs::read(dir.join(JOURNAL_FILE)).unwrap();
        // Writes to /dev/full fail with ENOSPC.
        fs::remove_file(dir.join(JOURNAL_FILE)).unwrap();
        std::os::unix::fs::symlink("/dev/full", dir.join(JOURNAL_FILE)).unwrap();
        store.journal = None;
        let mut failed = rs.clone();
        let r2 = add(&mut failed, 81);
        let seq = store.seq;
        let e = store
            .record(vec![Op::Put { rule: Box::new(r2) }], &failed, &vips)
            .unwrap_err();
        assert!(e.to_string().contains("journal.jsonl"), "{e}");
        assert_eq!(store.seq, seq, "the failed change used no sequence number");
        // Room again: the next change follows on.
        fs::remove_file(dir.join(JOURNAL_FILE)).unwrap();
        fs::write(dir.join(JOURNAL_FILE), &saved).unwrap();
        let r3 = add(&mut rs, 82);
        store
            .record(vec![Op::Put { rule: Box::new(r3) }], &rs, &vips)
            .unwrap();
        let mut back = Store::new(&dir);
        assert_eq!(back.load().unwrap().unwrap().0, rs);
        assert_eq!(back.seq, seq + 1);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn compaction_happens_on_its_own() {
        let dir = tmpdir("compact");
        let mut store = Store::new(&dir);
        let mut rs = RuleSet::default();
        let vips = BTreeSet::new();
        for p in 0..(COMPACT_EVERY as u16 + 10) {
            let r = add(&mut rs, 1000 + p);
            store
                .record(vec![Op::Put { rule: Box::new(r) }], &rs, &vips)
                .unwrap();
        }
        assert!(dir.join(STATE_FILE).exists());
        let lines = fs::read_to_string(dir.join(JOURNAL_FILE))
            .unwrap()
            .lines()
            .count();
        assert!(lines < 20, "{lines} journal lines after compaction");
        assert_eq!(Store::new(&dir).load().unwrap().unwrap().0, rs);
        let _ = fs::remove_dir_all(&dir);
    }
}
