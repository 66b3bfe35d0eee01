//! A QEMU VM's definition and the command line ax builds from it.
//!
//! The API takes no free-form argument string: every option QEMU gets is built here from typed fields,
//! and every file is checked before QEMU starts, so a bad definition is refused with the field it names
//! rather than left to QEMU's stderr. Disk formats are detected by ax (the qcow2 magic), never probed
//! by QEMU. [`QemuDef::extra_args`] is the one escape hatch, documented, and settable only from the
//! agent's configuration.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A definition ax cannot run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DefError {
    /// Neither a kernel nor a boot image.
    #[error("a QEMU VM needs a boot source: `kernel` (with an optional `initrd` and `append`) or `image`")]
    NoBootSource,
    /// Both a kernel and a boot image.
    #[error("give either `kernel` or `image` as the boot source, not both")]
    TwoBootSources,
    /// `initrd`/`append` without `kernel`.
    #[error("`{0}` needs `kernel`")]
    NeedsKernel(&'static str),
    /// A file that is missing or not a regular file.
    #[error("{field}: {path}: {why}")]
    File {
        /// The field naming it.
        field: String,
        /// The path.
        path: String,
        /// Why it is unusable.
        why: String,
    },
    /// KVM asked for where there is none.
    #[error("accel = \"kvm\" but /dev/kvm {0}: use accel = \"tcg\" (or \"auto\")")]
    NoKvm(String),
    /// A bridge name the kernel cannot have.
    #[error("nic {index}: bridge name {name:?} is not a network interface name (1–15 characters, no '/', ':' or spaces)")]
    BadBridge {
        /// Which NIC.
        index: usize,
        /// The name.
        name: String,
    },
    /// A MAC address that is not one.
    #[error("nic {index}: mac {mac:?} is not a unicast MAC address (aa:bb:cc:dd:ee:ff)")]
    BadMac {
        /// Which NIC.
        index: usize,
        /// The value.
        mac: String,
    },
    /// A kernel command line QEMU would split.
    #[error("append: the kernel command line must not contain newlines or NUL")]
    BadAppend,
    /// Memory or vCPUs out of range.
    #[error("{0}")]
    Size(String),
}

/// The accelerator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM where `/dev/kvm` can be opened, else TCG.
    #[default]
    Auto,
    /// KVM; refused when `/dev/kvm` cannot be opened.
    Kvm,
    /// QEMU's emulator.
    Tcg,
}

impl<'de> Deserialize<'de> for Accel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            o => Err(format!(
                "accel {o:?}: expected \"kvm\", \"tcg\" or \"auto\""
            )),
        }
    }
}

/// A disk image's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// qcow2.
    Qcow2,
    /// Raw.
    Raw,
}

impl Format {
    /// The format of the image at `path`, from its first bytes (qcow2's magic `QFI\xfb`).
    pub fn detect(path: &Path) -> std::io::Result<Format> {
        use std::io::Read;
        let mut magic = [0u8; 4];
        let mut f = std::fs::File::open(path)?;
        let n = f.read(&mut magic)?;
        Ok(if n == 4 && magic == *b"QFI\xfb" {
            Format::Qcow2
        } else {
            Format::Raw
        })
    }

    /// QEMU's driver name.
    pub fn driver(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }
}

/// A disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// The image file (qcow2 or raw; detected).
    pub path: PathBuf,
}

/// A NIC: a tap device ax creates, attached to a bridge the operator names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    /// The bridge (it must exist on every host the VM may run on).
    pub bridge: String,
    /// The MAC address (default: derived from the VM's name and the NIC's index, `52:54:00:…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The emulated device (default virtio-net).
    #[serde(default, skip_serializing_if = "NicModel::is_default")]
    pub model: NicModel,
}

/// A NIC's emulated device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NicModel {
    /// `virtio-net-pci`.
    #[default]
    VirtioNet,
    /// `e1000` (Intel 82540EM): what guests without a virtio driver (and small test guests) use.
    E1000,
}

impl NicModel {
    fn is_default(&self) -> bool {
        *self == NicModel::VirtioNet
    }
    /// QEMU's device name.
    pub fn device(self) -> &'static str {
        match self {
            NicModel::VirtioNet => "virtio-net-pci",
            NicModel::E1000 => "e1000",
        }
    }
}

/// A QEMU VM's definition (memory and vCPUs are the VM's own, shared with native VMs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QemuDef {
    /// A Linux kernel to boot directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// Its initramfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Its command line (ax adds `console=ttyS0` when it names no console).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append: Option<String>,
    /// A bootable disk image instead of a kernel (qcow2 or raw): the first disk, booted from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<PathBuf>,
    /// Further disks (virtio-blk, in order: `/dev/vda`… after the image).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<Disk>,
    /// NICs (virtio-net on a tap).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<Nic>,
    /// The QEMU binary (default `qemu-system-x86_64` on `PATH`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary: Option<String>,
    /// The accelerator.
    #[serde(default)]
    pub accel: Accel,
    /// Arguments appended verbatim: the escape hatch, from the agent's configuration only (`[qemu]
    /// extra_args`); the API refuses it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_args: Vec<String>,
    /// Started so that it may become FT under QEMU's COLO later ([`crate::colo`]): the `pc` machine
    /// instead of `q35` (QEMU 7.2's COLO secondary aborts at the first checkpoint of a q35 guest), each
    /// disk under a one-child `quorum` node (`disk<i>` → `disk<i>-base` → `disk<i>-file`; COLO adds the
    /// replication child to it at run time), taps without `vnet_hdr` (COLO's packet filters and
    /// compare read plain Ethernet frames). What cannot be added to a running QEMU; see
    /// `docs/qemu.md` for what it costs a VM that never becomes FT.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub colo: bool,
}

/// How the disks appear on a QEMU's command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DiskLayout {
    /// `disk<i>-file` → `disk<i>` (format), the device on `disk<i>`.
    Plain,
    /// `disk<i>-file` → `disk<i>-base` (format) → `disk<i>` (quorum), the device on `disk<i>`.
    Quorum,
    /// A COLO secondary: `disk<i>-file` → `disk<i>-base` (the base copy, exported over NBD) ←
    /// backing of `disk<i>-hidden` ← backing of `disk<i>-active` ← `disk<i>-rep` (replication,
    /// secondary) ← `disk<i>` (quorum); the overlays are files in the run directory
    /// ([`colo_overlay`]).
    ColoSecondary,
}

/// The path of a COLO secondary's overlay `kind` (`active` or `hidden`) of disk `node` in `files`.
pub fn colo_overlay(files: &RunFiles, node: &str, kind: &str) -> PathBuf {
    files.dir.join(format!("{node}-{kind}.qcow2"))
}

/// Where a running QEMU's files live (the VM worker's directory).
#[derive(Debug, Clone)]
pub struct RunFiles {
    /// The directory.
    pub dir: PathBuf,
}

impl RunFiles {
    /// The QMP socket.
    pub fn qmp(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    /// The serial console, appended to across boots.
    pub fn console(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// `PID STARTTIME` of the QEMU process.
    pub fn pid(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }
    /// QEMU's own stdout and stderr.
    pub fn log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }
}

/// How a QEMU is started beyond its definition (the default: a fresh boot, what
/// [`QemuDef::args`] builds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LaunchOptions {
    /// Start as the destination of a live migration: `-incoming defer -S` (QEMU waits, in run state
    /// `inmigrate`, for `migrate-incoming`; once the migration completes the guest stays `paused` until
    /// `cont`, which [`crate::migrate::finish_incoming`] sends — libvirt's order: the destination runs only
    /// after the source has confirmed the end). See [`crate::migrate`].
    pub incoming: bool,
}

/// The tap device name of NIC `index` of the VM whose files are in `files` (≤ 15 characters, stable
/// across restarts; distinct for two agents on one host, as the source and the destination of a live
/// migration are while both QEMUs hold their taps).
pub fn tap_name(files: &RunFiles, index: usize) -> String {
    format!(
        "axt{:08x}n{index}",
        fnv(&files.dir.display().to_string()) as u32
    )
}

/// The default MAC of NIC `index` of `vm` (locally administered `52:54:00:…`, QEMU's prefix).
pub fn default_mac(vm: &str, index: usize) -> String {
    let h = fnv(&format!("{vm}#{index}"));
    format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        (h >> 16) as u8,
        (h >> 8) as u8,
        h as u8
    )
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

fn valid_mac(s: &str) -> bool {
    let parts: Vec<_> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && u8::from_str_radix(p, 16).is_ok())
        && u8::from_str_radix(parts[0], 16).is_ok_and(|b| b & 1 == 0)
}

fn check_file(field: &str, path: &Path) -> Result<(), DefError> {
    let err = |why: String| DefError::File {
        field: field.to_string(),
        path: path.display().to_string(),
        why,
    };
    if !path.is_absolute() {
        return Err(err("must be an absolute path".into()));
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => std::fs::File::open(path)
            .map(|_| ())
            .map_err(|e| err(e.to_string())),
        Ok(_) => Err(err("not a regular file".into())),
        Err(e) => Err(err(e.to_string())),
    }
}

/// Whether `/dev/kvm` can be opened read-write; why not otherwise.
pub fn kvm_usable() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(|_| ())
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => "does not exist".to_string(),
            _ => format!("cannot be opened ({e})"),
        })
}

impl QemuDef {
    /// Checks the definition's shape (no file system access): what the API checks on create.
    pub fn check_shape(&self) -> Result<(), DefError> {
        match (&self.kernel, &self.image) {
            (None, None) => return Err(DefError::NoBootSource),
            (Some(_), Some(_)) => return Err(DefError::TwoBootSources),
            _ => {}
        }
        if self.kernel.is_none() {
            if self.initrd.is_some() {
                return Err(DefError::NeedsKernel("initrd"));
            }
            if self.append.is_some() {
                return Err(DefError::NeedsKernel("append"));
            }
        }
        if self
            .append
            .as_deref()
            .is_some_and(|a| a.contains(['\n', '\0']))
        {
            return Err(DefError::BadAppend);
        }
        for (index, nic) in self.nics.iter().enumerate() {
            if !valid_ifname(&nic.bridge) {
                return Err(DefError::BadBridge {
                    index,
                    name: nic.bridge.clone(),
                });
            }
            if let Some(mac) = &nic.mac {
                if !valid_mac(mac) {
                    return Err(DefError::BadMac {
                        index,
                        mac: mac.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Checks everything [`QemuDef::check_shape`] does, plus the files and the accelerator on this
    /// host: what a host checks before it starts the VM.
    pub fn check_host(&self) -> Result<(), DefError> {
        self.check_shape()?;
        for (field, path) in [
            ("kernel", &self.kernel),
            ("initrd", &self.initrd),
            ("image", &self.image),
        ] {
            if let Some(p) = path {
                check_file(field, p)?;
            }
        }
        for (i, d) in self.disks.iter().enumerate() {
            check_file(&format!("disks[{i}]"), &d.path)?;
        }
        if self.accel == Accel::Kvm {
            kvm_usable().map_err(DefError::NoKvm)?;
        }
        Ok(())
    }

    /// The accelerator this host uses for the VM.
    pub fn accel_here(&self) -> &'static str {
        match self.accel {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
            Accel::Auto if kvm_usable().is_ok() => "kvm",
            Accel::Auto => "tcg",
        }
    }

    /// The binary.
    pub fn binary(&self) -> &str {
        self.binary.as_deref().unwrap_or("qemu-system-x86_64")
    }

    /// Every disk in order (the boot image first), with its QEMU node name (`disk0`, `disk1`, …).
    pub fn all_disks(&self) -> Vec<(String, PathBuf)> {
        self.image
            .iter()
            .cloned()
            .chain(self.disks.iter().map(|d| d.path.clone()))
            .enumerate()
            .map(|(i, p)| (format!("disk{i}"), p))
            .collect()
    }

    /// QEMU's arguments for `vm` with `mem_mib` MiB and `vcpus` vCPUs, its files in `files`
    /// (checks the host first).
    pub fn args(
        &self,
        vm: &str,
        mem_mib: u64,
        vcpus: u8,
        files: &RunFiles,
    ) -> Result<Vec<String>, DefError> {
        self.args_with(vm, mem_mib, vcpus, files, &LaunchOptions::default())
    }

    /// [`QemuDef::args`] with [`LaunchOptions`] (`incoming`: `-incoming defer -S` is added before
    /// [`QemuDef::extra_args`]).
    pub fn args_with(
        &self,
        vm: &str,
        mem_mib: u64,
        vcpus: u8,
        files: &RunFiles,
        opts: &LaunchOptions,
    ) -> Result<Vec<String>, DefError> {
        let layout = if self.colo {
            DiskLayout::Quorum
        } else {
            DiskLayout::Plain
        };
        let incoming = if opts.incoming {
            vec![
                "-incoming".to_string(),
                "defer".to_string(),
                "-S".to_string(),
            ]
        } else {
            Vec::new()
        };
        self.build_args(vm, mem_mib, vcpus, files, layout, &incoming)
    }

    /// The command line with the disks laid out as `layout`, `tail` added before
    /// [`QemuDef::extra_args`].
    pub(crate) fn build_args(
        &self,
        vm: &str,
        mem_mib: u64,
        vcpus: u8,
        files: &RunFiles,
        layout: DiskLayout,
        tail: &[String],
    ) -> Result<Vec<String>, DefError> {
        self.check_host()?;
        if !(16..=1 << 20).contains(&mem_mib) {
            return Err(DefError::Size(format!(
                "mem_mib {mem_mib}: a QEMU VM needs 16 MiB to 1 TiB"
            )));
        }
        if vcpus == 0 {
            return Err(DefError::Size("vcpus must be at least 1".into()));
        }
        let s = |x: &str| x.to_string();
        let mut a = vec![
            s("-name"),
            format!("guest={vm},debug-threads=on"),
            s("-machine"),
            s(if self.colo { "pc" } else { "q35" }),
            s("-accel"),
            s(self.accel_here()),
            s("-m"),
            mem_mib.to_string(),
            s("-smp"),
            vcpus.to_string(),
            s("-nodefaults"),
            s("-no-user-config"),
            s("-display"),
            s("none"),
            // The VM stays (stopped) after the guest shuts down or panics, so that its end can be read
            // from `query-status` even when nobody listened for the event; ax then quits it.
            s("-no-shutdown"),
            s("-action"),
            s("panic=pause"),
            s("-qmp"),
            format!("unix:{},server=on,wait=off", files.qmp().display()),
            s("-chardev"),
            format!(
                "file,id=console0,path={},append=on",
                files.console().display()
            ),
            s("-serial"),
            s("chardev:console0"),
            s("-device"),
            s("pvpanic"),
        ];
        if let Some(k) = &self.kernel {
            a.extend([s("-kernel"), k.display().to_string()]);
            if let Some(i) = &self.initrd {
                a.extend([s("-initrd"), i.display().to_string()]);
            }
            let mut append = self.append.clone().unwrap_or_default();
            if !append.split_whitespace().any(|w| w.starts_with("console=")) {
                append = format!("console=ttyS0 {append}").trim_end().to_string();
            }
            a.extend([s("-append"), append]);
        }
        for (i, (node, path)) in self.all_disks().into_iter().enumerate() {
            let format = Format::detect(&path).map_err(|e| DefError::File {
                field: if self.image.is_some() && i == 0 {
                    "image".into()
                } else {
                    format!("disks[{}]", i - usize::from(self.image.is_some()))
                },
                path: path.display().to_string(),
                why: e.to_string(),
            })?;
            a.extend([
                s("-blockdev"),
                format!(
                    "driver=file,filename={},node-name={node}-file,cache.direct=off",
                    qemu_escape(&path.display().to_string())
                ),
                s("-blockdev"),
            ]);
            match layout {
                DiskLayout::Plain => a.push(format!(
                    "driver={},file={node}-file,node-name={node}",
                    format.driver()
                )),
                DiskLayout::Quorum => a.extend([
                    format!(
                        "driver={},file={node}-file,node-name={node}-base",
                        format.driver()
                    ),
                    s("-blockdev"),
                    format!("driver=quorum,node-name={node},read-pattern=fifo,vote-threshold=1,children.0={node}-base"),
                ]),
                DiskLayout::ColoSecondary => {
                    let overlay = |kind: &str| {
                        qemu_escape(&colo_overlay(files, &node, kind).display().to_string())
                    };
                    a.extend([
                        format!(
                            "driver={},file={node}-file,node-name={node}-base",
                            format.driver()
                        ),
                        s("-blockdev"),
                        format!(
                            "driver=qcow2,node-name={node}-hidden,file.driver=file,file.filename={},backing={node}-base",
                            overlay("hidden")
                        ),
                        s("-blockdev"),
                        format!(
                            "driver=qcow2,node-name={node}-active,file.driver=file,file.filename={},backing={node}-hidden",
                            overlay("active")
                        ),
                        s("-blockdev"),
                        format!("driver=replication,node-name={node}-rep,mode=secondary,top-id={node},file={node}-active"),
                        s("-blockdev"),
                        format!("driver=quorum,node-name={node},read-pattern=fifo,vote-threshold=1,children.0={node}-rep"),
                    ]);
                }
            }
            a.extend([
                s("-device"),
                format!(
                    "virtio-blk-pci,drive={node},id={node}-dev{}",
                    if i == 0 && self.image.is_some() {
                        ",bootindex=0"
                    } else {
                        ""
                    }
                ),
            ]);
        }
        for (i, nic) in self.nics.iter().enumerate() {
            let mac = nic.mac.clone().unwrap_or_else(|| default_mac(vm, i));
            a.extend([
                s("-netdev"),
                format!(
                    "tap,id=net{i},ifname={},script=no,downscript=no{}",
                    tap_name(files, i),
                    if self.colo {
                        ",vhost=off,vnet_hdr=off"
                    } else {
                        ""
                    }
                ),
                s("-device"),
                format!(
                    "{},netdev=net{i},mac={mac},id=net{i}-dev",
                    nic.model.device()
                ),
            ]);
        }
        a.extend(tail.iter().cloned());
        a.extend(self.extra_args.iter().cloned());
        Ok(a)
    }
}

/// Escapes a value for QEMU's `key=value,…` option syntax (a comma is written twice).
fn qemu_escape(v: &str) -> String {
    v.replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel_def(dir: &Path) -> QemuDef {
        let k = dir.join("vmlinuz");
        std::fs::write(&k, b"kernel").unwrap();
        QemuDef {
            kernel: Some(k),
            accel: Accel::Tcg,
            ..QemuDef::default()
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ax-qemu-def-{name}-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&d);
        d
    }

    #[test]
    fn shape_errors_name_the_field() {
        assert_eq!(
            QemuDef::default().check_shape(),
            Err(DefError::NoBootSource)
        );
        let d = QemuDef {
            image: Some("/a".into()),
            append: Some("x".into()),
            ..QemuDef::default()
        };
        assert_eq!(d.check_shape(), Err(DefError::NeedsKernel("append")));
        let d = QemuDef {
            kernel: Some("/k".into()),
            nics: vec![Nic {
                bridge: "br0".into(),
                mac: Some("01:00:00:00:00:01".into()),
                model: NicModel::default(),
            }],
            ..QemuDef::default()
        };
        assert!(matches!(
            d.check_shape(),
            Err(DefError::BadMac { index: 0, .. })
        ));
        let d = QemuDef {
            kernel: Some("/k".into()),
            nics: vec![Nic {
                bridge: "a-very-long-bridge-name".into(),
                mac: None,
                model: NicModel::default(),
            }],
            ..QemuDef::default()
        };
        assert!(d.check_shape().unwrap_err().to_string().contains("nic 0"));
    }

    #[test]
    fn missing_files_are_named() {
        let d = QemuDef {
            kernel: Some("/nonexistent/vmlinuz".into()),
            ..QemuDef::default()
        };
        let e = d.check_host().unwrap_err().to_string();
        assert!(e.starts_with("kernel: /nonexistent/vmlinuz:"), "{e}");
        let d = QemuDef {
            kernel: Some("relative".into()),
            ..QemuDef::default()
        };
        assert!(d.check_host().unwrap_err().to_string().contains("absolute"));
    }

    #[test]
    fn command_line_is_built_from_the_definition() {
        let dir = tmp("cmd");
        let mut d = kernel_def(&dir);
        let disk = dir.join("d.qcow2");
        std::fs::write(&disk, b"QFI\xfb\0\0\0\x03").unwrap();
        let raw = dir.join("d,1.raw");
        std::fs::write(&raw, [0u8; 512]).unwrap();
        d.disks = vec![Disk { path: disk }, Disk { path: raw }];
        d.append = Some("quiet".into());
        d.nics = vec![Nic {
            bridge: "br0".into(),
            mac: None,
            model: NicModel::default(),
        }];
        let files = RunFiles { dir: dir.clone() };
        let a = d.args("vm1", 256, 2, &files).unwrap();
        let joined = a.join(" ");
        assert!(joined.contains("-accel tcg -m 256 -smp 2"), "{joined}");
        assert!(joined.contains("-append console=ttyS0 quiet"), "{joined}");
        assert!(joined.contains("driver=qcow2,file=disk0-file,node-name=disk0"));
        assert!(joined.contains("driver=raw,file=disk1-file,node-name=disk1"));
        assert!(joined.contains("d,,1.raw"), "{joined}");
        assert!(joined.contains(&format!("ifname={}", tap_name(&files, 0))));
        let long = RunFiles {
            dir: "/var/lib/ax/vms/a-long-vm-name-indeed".into(),
        };
        assert!(tap_name(&long, 3).len() <= 15);
        assert_ne!(tap_name(&long, 0), tap_name(&files, 0));
        assert!(!joined.contains("-incoming"));
        let inc = d
            .args_with("vm1", 256, 2, &files, &LaunchOptions { incoming: true })
            .unwrap();
        assert!(inc.join(" ").ends_with("-incoming defer -S"), "{inc:?}");
        assert!(valid_mac(&default_mac("vm1", 0)));
        // A VM that may become FT: pc, quorum over each disk, taps without vnet_hdr; the rest alike.
        let mut c = d.clone();
        c.colo = true;
        let colo = c.args("vm1", 256, 2, &files).unwrap().join(" ");
        assert!(colo.contains("-machine pc "), "{colo}");
        assert!(colo.contains("driver=qcow2,file=disk0-file,node-name=disk0-base"));
        assert!(colo.contains("driver=quorum,node-name=disk0,read-pattern=fifo,vote-threshold=1,children.0=disk0-base"));
        assert!(colo.contains("vhost=off,vnet_hdr=off"), "{colo}");
        assert!(joined.contains("-machine q35 "));
        assert!(!joined.contains("quorum") && !joined.contains("vnet_hdr"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
