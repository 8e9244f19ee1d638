//! Batched map operations (`BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_UPDATE_BATCH`,
//! `BPF_MAP_DELETE_BATCH`), and
//! `BPF_MAP_LOOKUP_AND_DELETE_ELEM` on a hash map, which aya 0.14
//! does not offer. Walking a hash map with aya's iterator costs two syscalls per entry
//! (next key, lookup); a batch costs one syscall per few thousand entries, which is what lets
//! a node snapshot or install hundreds of thousands of flows per second.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use aya::maps::MapData;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

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

/// A hash map read a chunk at a time (one syscall per chunk), so that a caller can process
/// or stream a large table with memory bounded by the chunk. Plain-old-data types only.
pub struct HashBatches<'a, K, V> {
    map: &'a MapData,
    chunk: usize,
    // Hash maps use a bucket index (u32) as the batch token.
    token_in: [u8; 8],
    token_out: [u8; 8],
    first: bool,
    done: bool,
    _kv: std::marker::PhantomData<(K, V)>,
}

impl<'a, K: Copy + Default, V: Copy + Default> HashBatches<'a, K, V> {
    pub fn new(map: &'a MapData, chunk: usize) -> Self {
        HashBatches {
            map,
            chunk: chunk.max(64),
            token_in: [0; 8],
            token_out: [0; 8],
            first: true,
            done: false,
            _kv: std::marker::PhantomData,
        }
    }

    /// The next chunk; `Ok(None)` at the end. An error means the kernel refused batching.
    pub fn next_chunk(&mut self) -> io::Result<Option<Vec<(K, V)>>> {
        while !self.done {
            let mut keys = vec![K::default(); self.chunk];
            let mut vals = vec![V::default(); self.chunk];
            let mut attr = BatchAttr {
                in_batch: if self.first {
                    0
                } else {
                    self.token_in.as_ptr() as u64
                },
                out_batch: self.token_out.as_mut_ptr() as u64,
                keys: keys.as_mut_ptr() as u64,
                values: vals.as_mut_ptr() as u64,
                count: self.chunk as u32,
                map_fd: fd(self.map),
                ..Default::default()
            };
            let r = sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
            let n = (attr.count as usize).min(self.chunk);
            match r {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => self.done = true,
                // A bucket holds more entries than `chunk`: retry the same position with more
                // room.
                Err(e)
                    if e.raw_os_error() == Some(libc::ENOSPC) && n == 0 && self.chunk < 1 << 20 =>
                {
                    self.chunk *= 2;
                    continue;
                }
                Err(e) => return Err(e),
            }
            self.token_in = self.token_out;
            self.first = false;
            if n > 0 {
                keys.truncate(n);
                vals.truncate(n);
                return Ok(Some(keys.into_iter().zip(vals).collect()));
            }
        }
        Ok(None)
    }
}

/// Every (key, value) of a hash map, `chunk` entries per syscall. Plain-old-data types only
/// (the caller's `Pod` types). An error means the kernel refused batching (use the iterator).
pub fn lookup_all<K: Copy + Default, V: Copy + Default>(
    map: &MapData,
    chunk: usize,
) -> io::Result<Vec<(K, V)>> {
    let mut b = HashBatches::<K, V>::new(map, chunk);
    let mut out = Vec::new();
    while let Some(c) = b.next_chunk()? {
        out.extend(c);
    }
    Ok(out)
}

/// Sums over CPUs of the entries `indices` (sorted, ascending) of a per-CPU array whose value
/// is `W` u64 words, reading windows of at most 1024 entries per syscall. Returns one sum per
/// index, in order.
pub fn percpu_array_sums<const W: usize>(
    map: &MapData,
    indices: &[u32],
    ncpus: usize,
) -> io::Result<Vec<[u64; W]>> {
    const WINDOW: u32 = 1024;
    let mut out = Vec::with_capacity(indices.len());
    let mut i = 0;
    while i < indices.len() {
        let start = indices[i];
        let last = indices
            .iter()
            .skip(i)
            .take_while(|x| **x < start.saturating_add(WINDOW))
            .last()
            .copied()
            .unwrap_or(start);
        let count = last - start + 1;
        let mut keys = vec![0u32; count as usize];
        let mut vals = vec![0u64; count as usize * W * ncpus];
        // Array batches continue after the key given in `in_batch`.
        let prev = start.wrapping_sub(1);
        let mut token_out = 0u32;
        let mut attr = BatchAttr {
            in_batch: if start == 0 {
                0
            } else {
                &prev as *const u32 as u64
            },
            out_batch: &mut token_out as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: vals.as_mut_ptr() as u64,
            count,
            map_fd: fd(map),
            ..Default::default()
        };
        let r = sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = (attr.count as usize).min(count as usize);
        match r {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        while i < indices.len() && indices[i] <= last {
            let at = (indices[i] - start) as usize;
            let mut sum = [0u64; W];
            if at < n && keys[at] == indices[i] {
                for cpu in 0..ncpus {
                    let base = (at * ncpus + cpu) * W;
                    for (w, s) in sum.iter_mut().enumerate() {
                        *s += vals[base + w];
                    }
                }
            }
            out.push(sum);
            i += 1;
        }
    }
    Ok(out)
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

/// Removes `keys` in one syscall (one more per key that is missing); returns how many were
/// removed. A key that is
/// not in the map is skipped (the kernel stops a batch at the first missing key: the batch
/// goes on after it). Any other error is returned, with the keys before it removed.
pub fn delete_all<K: Copy>(map: &MapData, keys: &[K]) -> io::Result<usize> {
    let mut done = 0;
    let mut removed = 0;
    while done < keys.len() {
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            count: (keys.len() - done) as u32,
            map_fd: fd(map),
            ..Default::default()
        };
        let r = sys_bpf(BPF_MAP_DELETE_BATCH, &mut attr);
        // On an error, `count` is the index of the key that failed.
        let n = (attr.count as usize).min(keys.len() - done);
        done += n;
        removed += n;
        match r {
            Ok(()) if n == 0 => break,
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => done += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// The element member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Removes `key` from a hash map and returns the value it had, in one step
/// (`BPF_MAP_LOOKUP_AND_DELETE_ELEM`, hash maps since Linux 5.14): nobody can change the entry
/// between the read and the delete. `Ok(None)`: no such key. An error other than that means
/// the kernel refused (the caller reads and deletes in two steps). Plain-old-data types only.
pub fn take<K: Copy, V: Copy + Default>(map: &MapData, key: &K) -> io::Result<Option<V>> {
    let mut val = V::default();
    let mut attr = ElemAttr {
        map_fd: fd(map),
        key: key as *const K as u64,
        value: &mut val as *mut V as u64,
        ..Default::default()
    };
    match sys_bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr) {
        Ok(()) => Ok(Some(val)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}
