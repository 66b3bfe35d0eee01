//! Link flags for the guest binaries: no C runtime start files and no libc, so the entry point is the
//! runtime's `_start` (see `axrt::entry!`) and the image is fully static; and the linker script `link.ld`,
//! which puts the image at 4 MiB whichever linker rustc uses.
fn main() {
    let script = std::path::Path::new(
        &std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    )
    .join("link.ld");
    println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", script.display());
    println!("cargo:rerun-if-changed=link.ld");
    println!("cargo:rustc-link-arg-bins=-nostartfiles");
    println!("cargo:rustc-link-arg-bins=-nostdlib");
    println!("cargo:rustc-link-arg-bins=-static");
    println!("cargo:rustc-link-arg-bins=-no-pie");
    // No .note.gnu.build-id: the image is a pure function of the source, and there is one PT_NOTE less.
    println!("cargo:rustc-link-arg-bins=-Wl,--build-id=none");
    println!("cargo:rerun-if-changed=build.rs");
}
