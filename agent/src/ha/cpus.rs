//! Spreading the agent's conntrack writes over CPUs.
//!
//! The conntrack map is an LRU hash with per-CPU LRU lists (`BPF_F_NO_COMMON_LRU`): every
//! insert or update takes its element from the *current* CPU's share (max_entries / CPUs) and
//! evicts from that share when it is full. Flows the datapath creates are spread by the NIC's
//! RSS, but a userspace thread writing hundreds of thousands of synced (or adopted) flows from
//! one CPU would fill that CPU's share and evict live entries while the others stay empty. So
//! bulk writers move themselves to the next CPU before every batch of at most [`CHUNK`]
//! writes.

/// Writes per batch (one `BPF_MAP_UPDATE_BATCH` call) between two moves.
pub const CHUNK: usize = 512;

/// Flows in one write below which a writer stays on its CPU (a live sync batch).
pub const SPREAD_ABOVE: usize = 4 * CHUNK;

/// Moves the current thread over the CPUs it may run on; restores its affinity when dropped.
pub struct Spread {
    orig: libc::cpu_set_t,
    cpus: Vec<usize>,
    next: usize,
}

impl Spread {
    /// Starts at the `start`-th allowed CPU (callers rotate it, so small batches spread
    /// too). `None` when the affinity cannot be read (the writes then stay where they are).
    pub fn new(start: usize) -> Option<Spread> {
        // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for this thread.
        let mut orig: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let rc = unsafe {
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut orig)
        };
        if rc != 0 {
            return None;
        }
        let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
            // SAFETY: i < CPU_SETSIZE.
            .filter(|i| unsafe { libc::CPU_ISSET(*i, &orig) })
            .collect();
        if cpus.len() < 2 {
            return None;
        }
        Some(Spread {
            orig,
            cpus,
            next: start,
        })
    }

    /// Moves to the next CPU now.
    pub fn next(&mut self) {
        self.pin();
    }

    fn pin(&mut self) {
        let cpu = self.cpus[self.next % self.cpus.len()];
        self.next += 1;
        // SAFETY: a zeroed cpu_set_t with one CPU of our own set; applies to this thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
}

impl Drop for Spread {
    fn drop(&mut self) {
        // SAFETY: restores the affinity read in `new` on the same thread.
        unsafe {
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.orig);
        }
    }
}
