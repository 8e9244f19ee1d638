//! Batched map operations (`BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_UPDATE_BATCH`), which aya 0.14
//! does not offer. Walking a hash map with aya's iterator costs two syscalls per entry
//! (next key, lookup); a batch costs one syscall per few thousand entries, which is what lets
//! a node snapshot or install hundreds of thousands of flows per second.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use aya::maps::MapData;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// The `bpf(2)` syscall with `attr` as its `union bpf_attr` prefix.
pub(crate) fn sys_bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<()> {
    // SAFETY: the callers pass a `#[repr(C)]` bpf_attr prefix valid for `cmd`, whose pointers
    // refer to buffers they keep alive and sized as the attr says.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut A, std::mem::size_of::<A>()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn fd(map: &MapData) -> u32 {
    map.fd().as_fd().as_raw_fd() as u32
}

/// Every (key, value) of a hash map, `chunk` entries per syscall. Plain-old-data types only
/// (the caller's `Pod` types). An error means the kernel refused batching (use the iterator).
pub fn lookup_all<K: Copy + Default, V: Copy + Default>(
    map: &MapData,
    chunk: usize,
) -> io::Result<Vec<(K, V)>> {
    let mut chunk = chunk.max(64);
    let mut out = Vec::new();
    // Hash maps use a bucket index (u32) as the batch token.
    let mut token_in = [0u8; 8];
    let mut token_out = [0u8; 8];
    let mut first = true;
    loop {
        let mut keys = vec![K::default(); chunk];
        let mut vals = vec![V::default(); chunk];
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token_in.as_ptr() as u64 },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: vals.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd(map),
            ..Default::default()
        };
        let r = sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = (attr.count as usize).min(chunk);
        out.extend(keys[..n].iter().copied().zip(vals[..n].iter().copied()));
        match r {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            // A bucket holds more entries than `chunk`: retry the same position with more room.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && n == 0 && chunk < 1 << 20 => {
                chunk *= 2;
                continue;
            }
            Err(e) => return Err(e),
        }
        token_in = token_out;
        first = false;
    }
}

/// Inserts or replaces `entries` in one syscall per `chunk`; returns how many were written
/// before any error.
pub fn update_all<K: Copy, V: Copy>(map: &MapData, entries: &[(K, V)]) -> io::Result<usize> {
    let keys: Vec<K> = entries.iter().map(|e| e.0).collect();
    let vals: Vec<V> = entries.iter().map(|e| e.1).collect();
    let mut done = 0;
    while done < keys.len() {
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            values: vals[done..].as_ptr() as u64,
            count: (keys.len() - done) as u32,
            map_fd: fd(map),
            ..Default::default()
        };
        let r = sys_bpf(BPF_MAP_UPDATE_BATCH, &mut attr);
        done += attr.count as usize;
        r?;
        if attr.count == 0 {
            break;
        }
    }
    Ok(done)
}
