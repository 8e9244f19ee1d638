//! Builds the C datapath (`c/lb.bpf.c`) into `$OUT_DIR/lb.bpf.o` with clang (`$CLANG`, default
//! `clang-19`). One object, embedded into the crate with `include_bytes_aligned!`.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang-19".to_string());
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-changed=c/lb.bpf.c");
    println!("cargo:rerun-if-changed=c/ferrolb.h");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("lb.bpf.o");
    // The flags, one per line, shared with the benchmarks that build variants.
    println!("cargo:rerun-if-changed=c/clang-flags");
    let status = Command::new(&clang)
        .args(include_str!("c/clang-flags").lines())
        .args(["-Ic", "-c", "c/lb.bpf.c", "-o"])
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{clang} failed to build c/lb.bpf.c ({s})"),
        Err(e) => panic!(
            "cannot run {clang} ({e}): install it with `apt-get install clang-19 libbpf-dev` \
             (scripts/deps.sh does) or point CLANG at a clang that targets BPF"
        ),
    }
}
