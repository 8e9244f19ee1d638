//! The agent's bulk conntrack writes, in parallel over CPUs.
//!
//! A snapshot's install is bounded by the kernel's map updates (~0.6 µs an entry), so a bulk
//! write is split into one contiguous share per CPU, each written by a thread pinned to that
//! CPU, and the shares are written in parallel. (The conntrack table is a plain hash that
//! never evicts; were it an LRU with per-CPU lists, the pinning would also give every CPU's
//! list its share instead of filling one.)

use std::thread;

use ferrolb_bpf::SyncTable;
use ferrolb_bpf::maps::{Ct, CtKey};

/// Entries in one write below which it stays on the caller's CPU (a live sync batch: moving
/// it would cost a wait on a busy CPU's run queue, which is sync lag).
pub const SPREAD_ABOVE: usize = 4096;

/// The CPUs the process may run on (its main thread's set: the calling thread may be pinned
/// already); empty when they cannot be read.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for the process's main
    // thread (pid); getpid has no preconditions.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::sched_getaffinity(
            libc::getpid(),
            std::mem::size_of::<libc::cpu_set_t>(),
            &mut set,
        )
    };
    if rc != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: i < CPU_SETSIZE.
        .filter(|i| unsafe { libc::CPU_ISSET(*i, &set) })
        .collect()
}

/// Pins the calling thread to `cpu`.
fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one CPU of the allowed set; applies to this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The contiguous shares of `len` entries (`pairs`: entries come in flow pairs that must stay
/// together and in order) for `n` writers: (start, end) each.
pub fn shares(len: usize, n: usize, pairs: bool) -> Vec<(usize, usize)> {
    let unit = if pairs { 2 } else { 1 };
    let units = len / unit;
    let n = n.clamp(1, units.max(1));
    (0..n)
        .map(|i| {
            let start = units * i / n * unit;
            let end = if i + 1 == n {
                len
            } else {
                units * (i + 1) / n * unit
            };
            (start, end)
        })
        .collect()
}

/// Writes `entries` (flow pairs when `pairs`), spread as the module says when there are at
/// least [`SPREAD_ABOVE`]; `rotate` varies which CPU takes the first share between calls.
/// Returns how many were written.
pub fn write(t: &mut SyncTable, entries: &[(CtKey, Ct)], pairs: bool, rotate: usize) -> usize {
    let cpus = allowed_cpus();
    if entries.len() < SPREAD_ABOVE || cpus.len() < 2 {
        return t.insert_many(entries);
    }
    let table: &SyncTable = t;
    let parts = shares(entries.len(), cpus.len(), pairs);
    let written: Vec<Option<usize>> = thread::scope(|s| {
        let handles: Vec<_> = parts
            .iter()
            .enumerate()
            .map(|(i, &(a, b))| {
                let cpu = cpus[(i + rotate) % cpus.len()];
                let part = &entries[a..b];
                s.spawn(move || {
                    pin(cpu);
                    table.update_batch(part).ok()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().ok().flatten())
            .collect()
    });
    // A share the kernel refused in batches goes one by one from here.
    let mut n = 0;
    for (w, &(a, b)) in written.iter().zip(&parts) {
        n += match w {
            Some(k) => *k,
            None => t.insert_many(&entries[a..b]),
        };
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_everything_and_keep_pairs_together() {
        for len in [0usize, 1, 2, 6, 10, 4096, 8194] {
            for n in 1..=5 {
                let s = shares(len, n, true);
                assert_eq!(s.first().map(|x| x.0), Some(0));
                assert_eq!(s.last().map(|x| x.1), Some(len));
                for w in s.windows(2) {
                    assert_eq!(w[0].1, w[1].0, "contiguous");
                }
                for (a, b) in &s {
                    assert!(a <= b);
                    assert_eq!(a % 2, 0, "a pair never splits ({len}, {n})");
                }
            }
        }
        let s = shares(9, 2, false);
        assert_eq!(s, vec![(0, 4), (4, 9)]);
    }
}
