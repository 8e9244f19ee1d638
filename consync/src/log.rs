//! The change log a node serves: its own flows' upserts and deletes, numbered.
//!
//! The log keeps the most recent `capacity` changes. A subscriber that fell further behind,
//! or that asks for an epoch the log no longer has (the node restarted, or lost ring-buffer
//! events and called [`ChangeLog::resync`]), gets a fresh snapshot instead.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::flow::{Change, Numbered};

/// Where a subscriber can continue from.
#[derive(Debug, PartialEq, Eq)]
pub enum Resume {
    /// Changes from this sequence number on are still in the log.
    From(u64),
    /// The subscriber must start over with a snapshot.
    Snapshot,
}

struct Inner {
    epoch: u64,
    next_seq: u64,
    changes: VecDeque<Numbered>,
}

pub struct ChangeLog {
    inner: Mutex<Inner>,
    capacity: usize,
    notify: tokio::sync::watch::Sender<(u64, u64)>,
}

/// A new epoch: unique per log generation (time-based, never 0).
fn new_epoch(previous: u64) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    t.max(previous + 1).max(1)
}

impl ChangeLog {
    pub fn new(capacity: usize) -> ChangeLog {
        let epoch = new_epoch(0);
        let (notify, _) = tokio::sync::watch::channel((epoch, 1));
        ChangeLog {
            inner: Mutex::new(Inner {
                epoch,
                next_seq: 1,
                changes: VecDeque::with_capacity(capacity.min(1 << 16)),
            }),
            capacity: capacity.max(1),
            notify,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// (epoch, next sequence number).
    pub fn position(&self) -> (u64, u64) {
        let g = self.lock();
        (g.epoch, g.next_seq)
    }

    /// Appends changes (their `seq` is assigned here) and wakes the streams.
    pub fn publish(&self, changes: impl IntoIterator<Item = Change>) -> u64 {
        let mut g = self.lock();
        let mut n = 0;
        for c in changes {
            let seq = g.next_seq;
            g.next_seq += 1;
            if g.changes.len() == self.capacity {
                g.changes.pop_front();
            }
            g.changes.push_back(Numbered { seq, change: c });
            n += 1;
        }
        let pos = (g.epoch, g.next_seq);
        drop(g);
        if n > 0 {
            self.notify.send_replace(pos);
        }
        n
    }

    /// Starts a new epoch: every subscriber gets a fresh snapshot. Called when changes may
    /// have been lost before they reached the log (ring-buffer overflow).
    pub fn resync(&self) {
        let mut g = self.lock();
        g.epoch = new_epoch(g.epoch);
        g.changes.clear();
        let pos = (g.epoch, g.next_seq);
        drop(g);
        self.notify.send_replace(pos);
    }

    /// Whether a subscriber at (epoch, next_seq) can continue from the log.
    pub fn resume(&self, epoch: u64, next_seq: u64) -> Resume {
        let g = self.lock();
        if epoch != g.epoch || next_seq > g.next_seq {
            return Resume::Snapshot;
        }
        let first = g.changes.front().map_or(g.next_seq, |c| c.seq);
        if next_seq < first {
            return Resume::Snapshot;
        }
        Resume::From(next_seq)
    }

    /// Up to `max` changes from `from` on, in `epoch`; `None` when the subscriber must start
    /// over (new epoch, or the changes it needs were dropped).
    pub fn read(&self, epoch: u64, from: u64, max: usize) -> Option<Vec<Numbered>> {
        let g = self.lock();
        if epoch != g.epoch {
            return None;
        }
        let first = g.changes.front().map_or(g.next_seq, |c| c.seq);
        if from < first {
            return None;
        }
        let skip = (from - first) as usize;
        Some(g.changes.iter().skip(skip).take(max).cloned().collect())
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<(u64, u64)> {
        self.notify.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn del(port: u16) -> Change {
        Change::Delete(crate::flow::FlowKey {
            protocol: crate::flow::PROTO_TCP,
            client: std::net::IpAddr::from([10, 0, 0, 1]),
            client_port: port,
            vip: std::net::IpAddr::from([10, 0, 0, 2]),
            vip_port: 80,
        })
    }

    #[test]
    fn numbers_reads_and_drops_the_oldest() {
        let log = ChangeLog::new(4);
        let (epoch, next) = log.position();
        assert_eq!(next, 1);
        log.publish((0..3).map(del));
        assert_eq!(log.position().1, 4);
        let got = log.read(epoch, 2, 10).expect("in log");
        assert_eq!(got.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(log.resume(epoch, 1), Resume::From(1));
        log.publish((3..6).map(del)); // seq 4..6; capacity 4 keeps 3..6
        assert_eq!(log.resume(epoch, 2), Resume::Snapshot);
        assert!(log.read(epoch, 2, 10).is_none());
        assert_eq!(log.resume(epoch, 3), Resume::From(3));
        assert_eq!(log.read(epoch, 7, 10).expect("caught up"), vec![]);
        assert_eq!(log.resume(epoch, 8), Resume::Snapshot, "ahead of the log");
        assert_eq!(log.resume(epoch + 1, 3), Resume::Snapshot, "other epoch");
    }

    #[test]
    fn resync_starts_a_new_epoch() {
        let log = ChangeLog::new(8);
        let (e1, _) = log.position();
        log.publish([del(1)]);
        let rx = log.subscribe();
        log.resync();
        let (e2, next) = log.position();
        assert_ne!(e1, e2);
        assert_eq!(next, 2, "sequence numbers keep growing");
        assert!(rx.has_changed().unwrap_or(false));
        assert!(log.read(e1, 1, 10).is_none());
        assert_eq!(log.resume(e2, 2), Resume::From(2));
    }
}
