//! Builds the guest programs in `programs/` (a separate, `no_std` cargo project with its own profile, target
//! settings and link flags) with a nested `cargo build --release`, and copies the ELF executables into
//! `OUT_DIR`, where `src/lib.rs` includes them.
//!
//! The nested build gets its own target directory under `OUT_DIR`, so it never waits for the lock of the outer
//! build's target directory, and an environment cleaned of the outer build's settings (target directory,
//! target triple, rustflags, profile overrides, clippy's compiler wrapper) that would otherwise change or
//! break it. What it keeps: `CARGO_HOME`, the jobserver (`CARGO_MAKEFLAGS`, so the two builds share the job
//! limit), network/registry/terminal settings and the toolchain choice (`RUSTC`, `RUSTUP_TOOLCHAIN`).
//!
//! It also assembles the QEMU test guests in `qemu/` (multiboot ELF32 kernels, GNU assembler source) with
//! `as --32` and links them with `ld -m elf_i386` (GNU binutils), into `OUT_DIR/<name>.elf`.

use std::env;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The guest programs (binary names in `programs/Cargo.toml`).
const PROGRAMS: &[&str] = &["counter", "dirtier", "disk-writer", "smp-counter"];
/// The target the guests are built for (also set in `programs/.cargo/config.toml`).
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Inherited `CARGO_*` variables the nested build keeps (all others are removed).
const KEEP_CARGO_VARS: &[&str] = &["CARGO_HOME", "CARGO_MAKEFLAGS", "CARGO_LOG"];
/// Prefixes of inherited `CARGO_*` variables the nested build keeps.
const KEEP_CARGO_PREFIXES: &[&str] = &[
    "CARGO_NET_",
    "CARGO_HTTP_",
    "CARGO_REGISTRIES_",
    "CARGO_REGISTRY_",
    "CARGO_TERM_",
];
/// Other inherited variables that would change the nested build.
const REMOVE_VARS: &[&str] = &[
    "RUSTFLAGS",
    "RUSTDOCFLAGS",
    // `cargo clippy` runs workspace crates through clippy-driver; the guests are not a workspace member.
    "RUSTC_WORKSPACE_WRAPPER",
    "CLIPPY_ARGS",
    "CLIPPY_CONF_DIR",
];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let programs = manifest_dir.join("programs");
    let target_dir = out_dir.join("programs-target");

    for path in [
        "src",
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        "link.ld",
        ".cargo/config.toml",
    ] {
        println!("cargo:rerun-if-changed={}", programs.join(path).display());
    }

    let mut command = Command::new(&cargo);
    command
        .current_dir(&programs) // so that cargo reads `programs/.cargo/config.toml`
        .arg("build")
        .arg("--release")
        .arg("--locked")
        .arg("--bins")
        .arg("--manifest-path")
        .arg(programs.join("Cargo.toml"))
        .arg("--target")
        .arg(GUEST_TARGET)
        .arg("--target-dir")
        .arg(&target_dir)
        // Build-script stdout is read by cargo for `cargo:` directives: send the nested output to stderr,
        // which cargo shows when the build fails.
        .stdout(Stdio::from(std::io::stderr()))
        .stderr(Stdio::inherit());
    for (name, _) in env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        let cargo_var = name.starts_with("CARGO_")
            && !KEEP_CARGO_VARS.contains(&name)
            && !KEEP_CARGO_PREFIXES
                .iter()
                .any(|prefix| name.starts_with(prefix));
        if cargo_var || name.starts_with("__CARGO") || REMOVE_VARS.contains(&name) {
            command.env_remove(name);
        }
    }

    let status = command.status().unwrap_or_else(|error| {
        fail(&format!(
            "could not run `{}` to build the guest programs: {error}",
            Path::new(&cargo).display()
        ))
    });
    if !status.success() {
        fail(&format!(
            "building the guest programs failed ({status}): `cargo build --release` in {} (its output is above)",
            programs.display()
        ));
    }

    build_qemu_guests(&manifest_dir, &out_dir);

    let built = target_dir.join(GUEST_TARGET).join("release");
    for program in PROGRAMS {
        let from = built.join(program);
        let to = out_dir.join(format!("{program}.elf"));
        if let Err(error) = fs::copy(&from, &to) {
            fail(&format!(
                "could not copy guest program {} to {}: {error}",
                from.display(),
                to.display()
            ));
        }
    }
}

/// The QEMU test guests (`qemu/<name>.s`, each linked with `qemu/rt.s`).
const QEMU_GUESTS: &[&str] = &["qcounter", "qudp", "qdirtier"];

/// Assembles and links the QEMU test guests into `out_dir`.
fn build_qemu_guests(manifest_dir: &Path, out_dir: &Path) {
    let src = manifest_dir.join("qemu");
    for file in ["rt.s", "link.ld"] {
        println!("cargo:rerun-if-changed={}", src.join(file).display());
    }
    let rt = out_dir.join("qemu-rt.o");
    assemble(&src.join("rt.s"), &rt);
    for guest in QEMU_GUESTS {
        let source = src.join(format!("{guest}.s"));
        println!("cargo:rerun-if-changed={}", source.display());
        let object = out_dir.join(format!("{guest}.o"));
        assemble(&source, &object);
        let image = out_dir.join(format!("{guest}.elf"));
        let mut ld = Command::new("ld");
        ld.args([
            "-m",
            "elf_i386",
            "--build-id=none",
            "--no-warn-rwx-segments",
        ])
        .args(["-z", "max-page-size=4096", "-T"])
        .arg(src.join("link.ld"))
        .arg("-o")
        .arg(&image)
        .arg(&rt)
        .arg(&object);
        run(ld, &format!("linking {}", image.display()));
    }
}

fn assemble(source: &Path, object: &Path) {
    let mut r#as = Command::new("as");
    r#as.arg("--32").arg("-o").arg(object).arg(source);
    run(r#as, &format!("assembling {}", source.display()));
}

/// Runs a binutils command, failing the build with its name and what it was doing.
fn run(mut command: Command, what: &str) {
    command.stdout(Stdio::from(std::io::stderr()));
    match command.status() {
        Ok(status) if status.success() => {}
        Ok(status) => fail(&format!("{what} failed ({status}); its output is above")),
        Err(error) => fail(&format!(
            "{what}: could not run `{}` ({error}); the QEMU test guests need GNU binutils (`as`, `ld`)",
            command.get_program().to_string_lossy()
        )),
    }
}

fn fail(message: &str) -> ! {
    eprintln!("error: ax-guests: {message}");
    std::process::exit(1);
}
