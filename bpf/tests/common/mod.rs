//! Shared by the BPF_PROG_TEST_RUN test files: verdicts, the Internet checksum, and a private
//! network namespace per test thread.

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;

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
