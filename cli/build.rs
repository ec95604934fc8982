//! Builds the demo guest workload (cli/guest/) into a flat binary with the system C compiler
//! (gcc or cc, plus binutils' linker) — the same tools Rust already needs to link on Linux.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let dir =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default()).join("guest");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default()).join("guest.bin");
    for f in ["guest.c", "entry.S", "mailbox.h", "guest.ld"] {
        println!("cargo:rerun-if-changed=guest/{f}");
    }
    println!("cargo:rerun-if-env-changed=FERRY_GUEST_CC");
    let cc = std::env::var("FERRY_GUEST_CC").unwrap_or_else(|_| "gcc".to_owned());
    let status = Command::new(&cc)
        .args([
            "-O2",
            "-ffreestanding",
            "-fno-builtin",
            "-fno-tree-loop-distribute-patterns",
            "-fno-pic",
            "-fno-pie",
            "-no-pie",
            "-mno-red-zone",
            "-fno-stack-protector",
            "-fcf-protection=none",
            "-fno-asynchronous-unwind-tables",
            "-nostdlib",
            "-static",
            "-Wall",
            "-Wextra",
            "-Wl,--build-id=none",
            "-Wl,--oformat=binary",
        ])
        .arg("-T")
        .arg(dir.join("guest.ld"))
        .arg(dir.join("entry.S"))
        .arg(dir.join("guest.c"))
        .arg("-o")
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => {
            eprintln!(
                "building the demo guest with `{cc}` failed ({s}); see the compiler output above"
            );
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("could not run `{cc}` to build the demo guest: {e} (install gcc, or set FERRY_GUEST_CC)");
            std::process::exit(1);
        }
    }
}
