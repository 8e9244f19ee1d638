//! Shared by the BPF_PROG_TEST_RUN test files: verdicts, TCP flags, the Internet checksum, and
//! a private network namespace per test thread.
#![allow(dead_code)] // each test file uses its own part

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

pub use ferrolb_tests::inet_csum as csum;

/// Moves this test's thread into a new, empty network namespace (false: the test must skip,
/// `require` said why; under CI it fails instead).
pub fn in_private_netns(test: &str) -> bool {
    if !ferrolb_tests::require(test, &[]) {
        return false;
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
    true
}
