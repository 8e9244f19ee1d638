//! Shared by the BPF_PROG_TEST_RUN test files: verdicts, the Internet checksum, and a private
//! network namespace per test thread.

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;

/// The Internet checksum of `data`, starting from the partial sum `init` (a pseudo header).
pub fn csum(data: &[u8], init: u32) -> u16 {
    let mut s = init;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        s += u32::from(w);
    }
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// Moves this test's thread into a new, empty network namespace (false: the test must skip,
/// `require` said why; under CI it fails instead).
pub fn in_private_netns(test: &str) -> bool {
    if !ferrolb_tests::require(test, &[]) {
        return false;
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
    true
}
