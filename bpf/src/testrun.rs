//! `BPF_PROG_TEST_RUN` on a program fd of its own. [`Datapath::test_run`](crate::Datapath)
//! borrows the datapath mutably (aya's API); a [`TestRunner`] is `Send + Sync`, so several
//! threads pinned to several CPUs can run the same program (and its maps) at once: the only
//! way to test what happens when two CPUs handle one flow.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// The `test` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct TestAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    pad: u32,
}

/// Runs the datapath program on packets without attaching it.
pub struct TestRunner {
    pub(crate) fd: OwnedFd,
}

/// A `struct __sk_buff` (192 bytes) saying the packet arrived on `ifindex`
/// (ingress_ifindex at 36, ifindex at 40).
fn on(ifindex: u32) -> [u8; 192] {
    let mut ctx = [0u8; 192];
    ctx[36..40].copy_from_slice(&ifindex.to_ne_bytes());
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

impl TestRunner {
    /// Runs the program once on `packet`: the TC verdict and the packet as the program left
    /// it (room for 256 more bytes).
    pub fn run(&self, packet: &[u8]) -> io::Result<(u32, Vec<u8>)> {
        let (rc, _, out) = self.exec(packet, None)?;
        Ok((rc, out))
    }

    /// Runs the program once on a fresh copy of `packet`, as if it had arrived on
    /// `ifindex`: the verdict and the kernel's measure of the run in nanoseconds.
    pub fn run_timed(&self, packet: &[u8], ifindex: u32) -> io::Result<(u32, u32)> {
        let (rc, ns, _) = self.exec(packet, Some(&on(ifindex)))?;
        Ok((rc, ns))
    }

    /// [`TestRunner::run_timed`] and the packet as the program left it.
    pub fn run_timed_out(&self, packet: &[u8], ifindex: u32) -> io::Result<(u32, u32, Vec<u8>)> {
        self.exec(packet, Some(&on(ifindex)))
    }

    /// [`TestRunner::run`] as if the packet had arrived on `ifindex`.
    pub fn run_on(&self, packet: &[u8], ifindex: u32) -> io::Result<(u32, Vec<u8>)> {
        let (rc, _, out) = self.exec(packet, Some(&on(ifindex)))?;
        Ok((rc, out))
    }

    /// One run: verdict, duration (ns), the packet as the program left it.
    fn exec(&self, packet: &[u8], ctx: Option<&[u8]>) -> io::Result<(u32, u32, Vec<u8>)> {
        let mut out = vec![0u8; packet.len() + 256];
        let mut attr = TestAttr {
            prog_fd: self.fd.as_raw_fd() as u32,
            data_size_in: packet.len() as u32,
            data_size_out: out.len() as u32,
            data_in: packet.as_ptr() as u64,
            data_out: out.as_mut_ptr() as u64,
            repeat: 1,
            ctx_size_in: ctx.map_or(0, |c| c.len() as u32),
            ctx_in: ctx.map_or(0, |c| c.as_ptr() as u64),
            ..Default::default()
        };
        self.call(&mut attr)?;
        out.truncate((attr.data_size_out as usize).min(out.len()));
        Ok((attr.retval, attr.duration, out))
    }

    fn call(&self, attr: &mut TestAttr) -> io::Result<()> {
        crate::batch::sys_bpf(BPF_PROG_TEST_RUN, attr)
    }
}
