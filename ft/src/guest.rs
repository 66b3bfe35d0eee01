//! Guest images: a program of the guest kit by name (`counter`), or any static ELF64 guest written to
//! `docs/guest-abi.md` by path (`./my-guest.elf`, `/var/lib/ax/vms/web/guest.elf`). The loader checks the
//! ELF itself (`statepoint::loader`) and names what is wrong with it.

use std::path::Path;

/// The largest guest ELF accepted (a guest must fit in its memory anyway).
pub const MAX_ELF_BYTES: u64 = 64 << 20;

/// Whether `spec` names a file (it contains a `/`) rather than a kit program.
pub fn is_path(spec: &str) -> bool {
    spec.contains('/')
}

/// The ELF bytes of `spec`: a kit program, or the file at that path.
pub fn image(spec: &str) -> Result<Vec<u8>, String> {
    if is_path(spec) {
        return read_elf(Path::new(spec));
    }
    ax_guests::by_name(spec).map(<[u8]>::to_vec).ok_or_else(|| {
        format!(
            "unknown guest {spec:?}: a kit program ({}) or a path to a static ELF guest (with a '/')",
            ax_guests::NAMES.join(", ")
        )
    })
}

/// Reads a guest ELF file, refusing what is not a regular file or is larger than [`MAX_ELF_BYTES`].
pub fn read_elf(path: &Path) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("guest ELF {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("guest ELF {}: not a regular file", path.display()));
    }
    if meta.len() > MAX_ELF_BYTES {
        return Err(format!(
            "guest ELF {}: {} bytes, more than the {MAX_ELF_BYTES} accepted",
            path.display(),
            meta.len()
        ));
    }
    std::fs::read(path).map_err(|e| format!("guest ELF {}: {e}", path.display()))
}

/// Checks that `elf` is a guest the loader accepts for a VM of `mem_mib` MiB, without running it: the
/// loader's own error when not.
pub fn validate(elf: &[u8], mem_mib: u64, vcpus: u8) -> Result<(), String> {
    let layout =
        statepoint::layout::Layout::new(mem_mib << 20, vcpus).map_err(|e| e.to_string())?;
    statepoint::loader::check(elf, &layout).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kit_names_paths_and_errors() {
        assert!(image("counter").is_ok());
        let e = image("nope").unwrap_err();
        assert!(
            e.contains("unknown guest \"nope\"") && e.contains("counter"),
            "{e}"
        );
        let e = image("/nonexistent/guest.elf").unwrap_err();
        assert!(e.contains("/nonexistent/guest.elf"), "{e}");
        let e = image("/tmp").unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        assert!(validate(b"not an elf", 64, 1).is_err());
        assert!(validate(ax_guests::by_name("counter").unwrap(), 64, 1).is_ok());
    }
}
