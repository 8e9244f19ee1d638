//! The role decision under `--ka`, pure: what this node knows of itself and its peers in, a
//! decision out. [`super::Ha::evaluate`] gathers the facts (BFD, sync heartbeats, statuses)
//! and applies the decision.

use super::Role;

/// What this node knows of one peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerFacts {
    pub node_id: Option<u32>,
    /// BFD up (once it has been up), or sync heartbeats within the last second.
    pub alive: bool,
    /// Its status arrived since it was last declared dead (an older one may be stale).
    pub fresh: bool,
    /// The term of its MASTER role, per its last status.
    pub master_term: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Stay,
    /// Take MASTER, with a term above every term seen.
    Promote,
    /// Step down: `node` is MASTER with `term` and wins over us.
    Demote {
        node: u32,
        term: u64,
    },
}

/// - Not ready (joining): nothing.
/// - MASTER: step down when a live peer, heard since it was last dead, is MASTER with a higher
///   term, or the same term and a lower id (after a partition, the most recent promotion wins).
/// - Otherwise: when no live (and freshly heard) peer is MASTER, the lowest id among this node
///   and its live peers takes MASTER. A live MASTER is never preempted.
pub fn decide(me: u32, role: Role, term: u64, ready: bool, peers: &[PeerFacts]) -> Decision {
    if !ready {
        return Decision::Stay;
    }
    let mut masters = peers
        .iter()
        .filter(|p| p.alive && p.fresh)
        .filter_map(|p| Some((p.master_term?, p.node_id?)));
    if role == Role::Master {
        return match masters.find(|(t, id)| *t > term || (*t == term && *id < me)) {
            Some((term, node)) => Decision::Demote { node, term },
            None => Decision::Stay,
        };
    }
    if masters.next().is_some() {
        return Decision::Stay;
    }
    let lowest_live = peers
        .iter()
        .filter(|p| p.alive)
        .filter_map(|p| p.node_id)
        .min();
    if lowest_live.is_none_or(|id| me < id) {
        Decision::Promote
    } else {
        Decision::Stay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: u32, alive: bool, master_term: Option<u64>) -> PeerFacts {
        PeerFacts {
            node_id: Some(id),
            alive,
            fresh: true,
            master_term,
        }
    }

    #[test]
    fn cold_start_lowest_id_wins() {
        // Both joined, nobody MASTER yet.
        assert_eq!(
            decide(0, Role::Backup, 0, true, &[peer(1, true, None)]),
            Decision::Promote
        );
        assert_eq!(
            decide(1, Role::Backup, 0, true, &[peer(0, true, None)]),
            Decision::Stay
        );
        // Still joining: nothing, whatever the peers look like.
        assert_eq!(
            decide(0, Role::Backup, 0, false, &[peer(1, false, None)]),
            Decision::Stay
        );
        // Alone after the join timeout.
        assert_eq!(
            decide(1, Role::Backup, 0, true, &[peer(0, false, None)]),
            Decision::Promote
        );
        // A peer whose id is not known yet does not block.
        let unknown = PeerFacts {
            node_id: None,
            alive: true,
            fresh: false,
            master_term: None,
        };
        assert_eq!(
            decide(1, Role::Backup, 0, true, &[unknown]),
            Decision::Promote
        );
    }

    #[test]
    fn the_backup_takes_over_from_a_dead_master() {
        assert_eq!(
            decide(1, Role::Backup, 1, true, &[peer(0, false, Some(1))]),
            Decision::Promote
        );
        // Three nodes: the lowest live BACKUP takes it, the other waits.
        let peers = [peer(0, false, Some(3)), peer(2, true, None)];
        assert_eq!(decide(1, Role::Backup, 3, true, &peers), Decision::Promote);
        let peers = [peer(0, false, Some(3)), peer(1, true, None)];
        assert_eq!(decide(2, Role::Backup, 3, true, &peers), Decision::Stay);
    }

    #[test]
    fn a_returning_node_does_not_preempt() {
        // Node 0 restarted: node 1 is MASTER; 0 has the lower id but stays BACKUP.
        assert_eq!(
            decide(0, Role::Backup, 0, true, &[peer(1, true, Some(2))]),
            Decision::Stay
        );
        // The MASTER keeps its role when the lower id returns as BACKUP.
        assert_eq!(
            decide(1, Role::Master, 2, true, &[peer(0, true, None)]),
            Decision::Stay
        );
    }

    #[test]
    fn a_healed_partition_keeps_the_latest_promotion() {
        // Both MASTER after a partition: node 1 was promoted later (term 2).
        assert_eq!(
            decide(0, Role::Master, 1, true, &[peer(1, true, Some(2))]),
            Decision::Demote { node: 1, term: 2 }
        );
        assert_eq!(
            decide(1, Role::Master, 2, true, &[peer(0, true, Some(1))]),
            Decision::Stay
        );
        // Same term: the lower id keeps it.
        assert_eq!(
            decide(1, Role::Master, 5, true, &[peer(0, true, Some(5))]),
            Decision::Demote { node: 0, term: 5 }
        );
        assert_eq!(
            decide(0, Role::Master, 5, true, &[peer(1, true, Some(5))]),
            Decision::Stay
        );
    }

    #[test]
    fn stale_statuses_and_dead_peers_decide_nothing() {
        // A peer back from the dead whose last status said MASTER, not heard since: it is not a
        // MASTER to defer to (nor to step down for).
        let stale = PeerFacts {
            fresh: false,
            ..peer(1, true, Some(9))
        };
        assert_eq!(decide(0, Role::Master, 1, true, &[stale]), Decision::Stay);
        // A dead MASTER with a higher term does not make us step down.
        assert_eq!(
            decide(0, Role::Master, 1, true, &[peer(1, false, Some(9))]),
            Decision::Stay
        );
        // Sync cut while BFD is up: the peer stays alive and MASTER; nothing changes.
        assert_eq!(
            decide(1, Role::Backup, 1, true, &[peer(0, true, Some(1))]),
            Decision::Stay
        );
    }
}
