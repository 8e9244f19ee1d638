//! Endpoint lookup tables, built in user space and written with the endpoint set in one map
//! update (the service then switches to the new slot atomically).
//!
//! - [`maglev`]: Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4). The
//!   permutation of each endpoint depends only on its identity (address and port), and
//!   endpoints are placed in a canonical order, so two nodes holding the same endpoint set
//!   build the same table whatever order or slots their endpoints have.
//! - [`round_robin`]: the active endpoints once each (selection walks it with a counter).
//! - [`weighted`]: a smooth weighted round-robin sequence (nginx's algorithm) whose length is
//!   the sum of the weights, so a counter walking it gives each endpoint exactly its share.

use crate::maps::{LUT_NONE, LUT_SIZE};

/// One endpoint as the table builders see it: its slot in the endpoint array, its identity
/// (address bytes and port) and its weight. Inactive endpoints are simply not passed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LutEndpoint {
    pub slot: u8,
    pub identity: Vec<u8>,
    pub weight: u16,
}

/// FNV-1a 64 with a seed mixed in first: stable across versions, platforms and nodes.
fn fnv1a(seed: u64, data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Final avalanche (splitmix64) so nearby identities get unrelated offsets.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// A Maglev table of `LUT_SIZE` entries (a prime). Empty input gives an empty table.
pub fn maglev(eps: &[LutEndpoint]) -> Vec<u8> {
    let m = LUT_SIZE as u64;
    let mut order: Vec<&LutEndpoint> = eps.iter().collect();
    order.sort_by(|a, b| a.identity.cmp(&b.identity));
    order.dedup_by(|a, b| a.identity == b.identity);
    if order.is_empty() {
        return Vec::new();
    }
    let perm: Vec<(u64, u64)> = order
        .iter()
        .map(|e| {
            let offset = fnv1a(0x5eed_0001, &e.identity) % m;
            let skip = fnv1a(0x5eed_0002, &e.identity) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; order.len()];
    let mut table = vec![LUT_NONE; LUT_SIZE];
    let mut filled = 0usize;
    'outer: loop {
        for (i, e) in order.iter().enumerate() {
            let (offset, skip) = perm[i];
            let mut c = (offset + next[i] * skip) % m;
            while table[c as usize] != LUT_NONE {
                next[i] += 1;
                c = (offset + next[i] * skip) % m;
            }
            table[c as usize] = e.slot;
            next[i] += 1;
            filled += 1;
            if filled == LUT_SIZE {
                break 'outer;
            }
        }
    }
    table
}

/// Each endpoint once, in slot order.
pub fn round_robin(eps: &[LutEndpoint]) -> Vec<u8> {
    let mut slots: Vec<u8> = eps.iter().map(|e| e.slot).collect();
    slots.sort_unstable();
    slots.dedup();
    slots
}

/// Smooth weighted round-robin sequence. Weight 0 endpoints get no share unless every weight
/// is 0 (then all are equal). Weights whose sum exceeds the table are scaled down (each
/// non-zero weight keeps at least one entry).
pub fn weighted(eps: &[LutEndpoint]) -> Vec<u8> {
    let mut ws: Vec<(u8, u64)> = eps.iter().map(|e| (e.slot, u64::from(e.weight))).collect();
    ws.sort_unstable();
    if ws.is_empty() {
        return Vec::new();
    }
    if ws.iter().all(|(_, w)| *w == 0) {
        ws.iter_mut().for_each(|(_, w)| *w = 1);
    }
    ws.retain(|(_, w)| *w > 0);
    let total: u64 = ws.iter().map(|(_, w)| w).sum();
    if total > LUT_SIZE as u64 {
        for (_, w) in ws.iter_mut() {
            *w = (*w * LUT_SIZE as u64 / total).max(1);
        }
    }
    let total: u64 = ws.iter().map(|(_, w)| w).sum::<u64>().min(LUT_SIZE as u64);
    let mut current = vec![0i64; ws.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (i, (_, w)) in ws.iter().enumerate() {
            current[i] += *w as i64;
        }
        let best = (0..ws.len())
            .max_by_key(|&i| (current[i], std::cmp::Reverse(i)))
            .unwrap_or(0);
        current[best] -= total as i64;
        out.push(ws[best].0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(slot: u8, last: u8, weight: u16) -> LutEndpoint {
        LutEndpoint {
            slot,
            identity: vec![10, 10, 10, last, 0x1f, 0x90],
            weight,
        }
    }

    fn share(table: &[u8], slot: u8) -> usize {
        table.iter().filter(|s| **s == slot).count()
    }

    #[test]
    fn maglev_fills_every_entry_evenly() {
        let eps: Vec<_> = (0..3).map(|i| ep(i, 11 + i, 1)).collect();
        let t = maglev(&eps);
        assert_eq!(t.len(), LUT_SIZE);
        assert!(t.iter().all(|s| *s < 3));
        for s in 0..3 {
            let n = share(&t, s);
            // Maglev balance: within a few percent of M/N.
            assert!((1300..=1433).contains(&n), "slot {s} has {n}");
        }
    }

    #[test]
    fn maglev_is_independent_of_slots_and_order() {
        let a = vec![ep(0, 11, 1), ep(1, 12, 1), ep(2, 13, 1)];
        let b = vec![ep(7, 13, 1), ep(3, 11, 1), ep(5, 12, 1)];
        let ta = maglev(&a);
        let tb = maglev(&b);
        let ident = |eps: &[LutEndpoint], s: u8| {
            eps.iter()
                .find(|e| e.slot == s)
                .map(|e| e.identity.clone())
                .unwrap()
        };
        for i in 0..LUT_SIZE {
            assert_eq!(ident(&a, ta[i]), ident(&b, tb[i]), "entry {i}");
        }
    }

    #[test]
    fn maglev_moves_little_when_an_endpoint_leaves() {
        let all: Vec<_> = (0..4).map(|i| ep(i, 11 + i, 1)).collect();
        let t4 = maglev(&all);
        let t3 = maglev(&all[..3]);
        let moved = t4
            .iter()
            .zip(&t3)
            .filter(|(a, b)| **a != 3 && a != b)
            .count();
        // Entries that did not belong to the removed endpoint mostly stay.
        assert!(moved < LUT_SIZE / 10, "{moved} entries moved");
    }

    #[test]
    fn maglev_output_is_stable_across_versions() {
        // A golden value: if this changes, nodes running different versions would pick
        // different backends for the same flow. Change it only with a layout bump.
        let t = maglev(&[ep(0, 11, 1), ep(1, 12, 1), ep(2, 13, 1)]);
        let sum: u64 = t
            .iter()
            .enumerate()
            .map(|(i, s)| (i as u64 + 1) * u64::from(*s))
            .sum();
        assert_eq!(&t[..12], &GOLDEN_HEAD);
        assert_eq!(sum, 8_431_082);
    }

    const GOLDEN_HEAD: [u8; 12] = [2, 0, 2, 2, 0, 1, 0, 1, 1, 0, 2, 0];

    #[test]
    fn weighted_gives_exact_shares() {
        let t = weighted(&[ep(0, 11, 3), ep(1, 12, 1), ep(2, 13, 0)]);
        assert_eq!(t.len(), 4);
        assert_eq!(share(&t, 0), 3);
        assert_eq!(share(&t, 1), 1);
        assert_eq!(share(&t, 2), 0);
        // Smooth: the heavy endpoint is not sent three in a row first.
        assert_eq!(t, vec![0, 0, 1, 0]);
    }

    #[test]
    fn weighted_scales_huge_weights() {
        let t = weighted(&[ep(0, 11, 60000), ep(1, 12, 30000)]);
        assert!(t.len() <= LUT_SIZE);
        let a = share(&t, 0) as f64;
        let b = share(&t, 1) as f64;
        assert!((a / b - 2.0).abs() < 0.01);
    }

    #[test]
    fn all_zero_weights_mean_equal() {
        let t = weighted(&[ep(0, 11, 0), ep(1, 12, 0)]);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn round_robin_lists_each_slot_once() {
        assert_eq!(round_robin(&[ep(2, 1, 5), ep(0, 2, 1)]), vec![0, 2]);
        assert!(maglev(&[]).is_empty());
    }
}
