#!/usr/bin/env bash
# Builds the stock Linux test guest for QEMU: Debian's kernel and a busybox initramfs whose init script
# (guests/linux/init) counts, writes and checks a disk, serves the counter over TCP and crashes or powers
# off on demand. See guests/linux/README.md.
#
#   scripts/build-linux-guest.sh [OUTDIR]      (default: target/linux-guest under the repository root)
#
# Output: OUTDIR/vmlinuz, OUTDIR/initrd.gz, OUTDIR/manifest.txt (kernel package, modules) and
# OUTDIR/stamp. Prints the paths of vmlinuz and initrd.gz (one per line) on stdout; progress goes to stderr.
#
# Cached: if OUTDIR/stamp matches the sha256 of this script and of every file in guests/linux/, nothing is
# downloaded or rebuilt. Needs apt-get/apt-cache (a Debian or Ubuntu host with amd64 packages), dpkg, cpio,
# gzip, sha256sum; xz or zstd only if the kernel's modules are compressed. Runs as any user (no mknod, no
# root-owned files needed); `apt-get update` is tried only when a download fails.
#
# Environment: AX_GUEST_KERNEL_PKG overrides the kernel package (default: what linux-image-amd64 depends on,
# e.g. linux-image-6.1.0-57-amd64).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
script="$root/scripts/build-linux-guest.sh"
guest="$root/guests/linux"
out=${1:-$root/target/linux-guest}
mkdir -p "$out"
out=$(cd "$out" && pwd)

log() { echo "build-linux-guest: $*" >&2; }
die() { log "error: $*"; exit 1; }

# The stamp: this script and every guest file (path relative to guests/linux, content hash).
stamp() {
  sha256sum "$script" | sed "s|  .*|  scripts/build-linux-guest.sh|"
  (cd "$guest" && find . -type f | LC_ALL=C sort | xargs sha256sum)
}
want_stamp=$(stamp)
if [ -f "$out/stamp" ] && [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.gz" ] &&
  [ "$(cat "$out/stamp")" = "$want_stamp" ]; then
  log "up to date ($out)"
  echo "$out/vmlinuz"
  echo "$out/initrd.gz"
  exit 0
fi

for tool in apt-get apt-cache dpkg cpio gzip sha256sum find; do
  command -v "$tool" >/dev/null || die "$tool not found (a Debian host is needed)"
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/ax-linux-guest.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
# apt-get download as root drops to _apt, which must be able to write the download directory.
chmod 755 "$tmp"
mkdir "$tmp/deb"
if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then chown _apt "$tmp/deb"; fi

# --- packages -------------------------------------------------------------------------------------------
kpkg=${AX_GUEST_KERNEL_PKG:-}
resolve_kernel() {
  apt-cache depends linux-image-amd64 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | grep -v -e '-unsigned' -e '-dbg' | head -n1
}
if [ -z "$kpkg" ]; then
  kpkg=$(resolve_kernel || true)
fi
download() { (cd "$tmp/deb" && apt-get download -q "$@" >&2); }
if [ -z "$kpkg" ] || ! download "$kpkg" busybox-static; then
  log "download failed; running apt-get update"
  apt-get update -q >&2 || die "apt-get update failed"
  [ -n "${AX_GUEST_KERNEL_PKG:-}" ] || kpkg=$(resolve_kernel || true)
  [ -n "$kpkg" ] || die "cannot resolve the kernel package that linux-image-amd64 depends on"
  download "$kpkg" busybox-static || die "apt-get download $kpkg busybox-static failed"
fi
kdeb=$(ls "$tmp"/deb/"${kpkg}"_*.deb)
bdeb=$(ls "$tmp"/deb/busybox-static_*.deb)
log "kernel package: $(basename "$kdeb")"
log "busybox package: $(basename "$bdeb")"
mkdir "$tmp/k" "$tmp/b"
dpkg -x "$kdeb" "$tmp/k"
dpkg -x "$bdeb" "$tmp/b"

vmlinuz=$(find "$tmp/k/boot" -name "vmlinuz-*" | head -n1)
config=$(find "$tmp/k/boot" -name "config-*" | head -n1)
if [ -z "$vmlinuz" ] || [ -z "$config" ]; then die "no /boot/vmlinuz-* or /boot/config-* in $kpkg"; fi
kver=${vmlinuz##*/vmlinuz-}
moddir="$tmp/k/lib/modules/$kver"
[ -d "$moddir" ] || die "no lib/modules/$kver in $kpkg"
[ -x "$tmp/b/bin/busybox" ] || die "no bin/busybox in busybox-static"

# --- modules --------------------------------------------------------------------------------------------
# guests/linux/modules: "name CONFIG_SYMBOL" per line. =y: built in, nothing to do; =m: the module and its
# dependencies go into the initramfs; unset: an error (the guest could not work).
declare -A modpath=() # module name (with _) -> path relative to $moddir
while IFS= read -r f; do
  n=${f##*/}
  n=${n%%.ko*}
  modpath[${n//-/_}]=$f
done < <(cd "$moddir" && find kernel -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz')

# Dependencies: modules.dep when the package has one (it usually does not: depmod runs at install time),
# else the module's own `depends=` .modinfo entry.
moddeps() { # name -> space-separated dependency names
  local n=$1 f=${modpath[$1]} line
  if [ -f "$moddir/modules.dep" ]; then
    line=$(grep -m1 "^$f:" "$moddir/modules.dep" || true)
    for d in ${line#*:}; do
      d=${d##*/}
      d=${d%%.ko*}
      echo -n "${d//-/_} "
    done
    return
  fi
  decompress "$f" "$tmp/dep.ko"
  line=$(tr '\0' '\n' <"$tmp/dep.ko" | grep -a -m1 '^depends=' || true)
  line=${line#depends=}
  echo "${line//,/ }" | tr '-' '_'
}
decompress() { # path relative to $moddir, destination
  case "$1" in
  *.ko) cp "$moddir/$1" "$2" ;;
  *.ko.xz) xz -dc "$moddir/$1" >"$2" ;;
  *.ko.zst) zstd -qdc "$moddir/$1" >"$2" ;;
  *.ko.gz) gzip -dc "$moddir/$1" >"$2" ;;
  esac
}

declare -A seen=()
order=()
visit() { # depth first: dependencies before the module
  local n=$1 d
  [ -n "${seen[$n]:-}" ] && return
  seen[$n]=1
  if grep -q "/${n}\.ko\$\|/${n//_/-}\.ko\$" "$moddir/modules.builtin" 2>/dev/null; then
    return # built in
  fi
  [ -n "${modpath[$n]:-}" ] || die "module $n not found in $kpkg"
  for d in $(moddeps "$n"); do visit "$d"; done
  order+=("$n")
}

manifest="$tmp/manifest.txt"
{
  echo "kernel-package $(basename "$kdeb")"
  echo "kernel-version $kver"
  echo "busybox-package $(basename "$bdeb")"
} >"$manifest"
while read -r name sym _; do
  case "$name" in '' | '#'*) continue ;; esac
  val=$(sed -n "s/^$sym=\(.*\)/\1/p" "$config")
  case "$val" in
  y) echo "builtin $name $sym=y" >>"$manifest" ;;
  m) visit "${name//-/_}" ;;
  *) die "$sym is not set in $(basename "$config") (wanted for $name)" ;;
  esac
done <"$guest/modules"

# --- initramfs ------------------------------------------------------------------------------------------
ird="$tmp/initramfs"
mkdir -p "$ird"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,run,tmp,etc,lib/modules}
cp "$tmp/b/bin/busybox" "$ird/bin/busybox"
cp "$guest/init" "$ird/init"
for f in "$guest"/bin/*; do cp "$f" "$ird/bin/"; done
chmod 755 "$ird/init" "$ird"/bin/*
: >"$ird/lib/modules/order"
for n in "${order[@]}"; do
  f=${modpath[$n]}
  base=${f##*/}
  base=${base%%.ko*}.ko
  decompress "$f" "$ird/lib/modules/$base"
  echo "$base" >>"$ird/lib/modules/order"
  echo "module $base $(stat -c %s "$ird/lib/modules/$base")" >>"$manifest"
done
echo "$kver" >"$ird/etc/ax-kernel"
(cd "$ird" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -9n) >"$tmp/initrd.gz"

# --- install --------------------------------------------------------------------------------------------
rm -f "$out/stamp"
cp "$vmlinuz" "$out/vmlinuz.tmp" && mv "$out/vmlinuz.tmp" "$out/vmlinuz"
cp "$tmp/initrd.gz" "$out/initrd.gz.tmp" && mv "$out/initrd.gz.tmp" "$out/initrd.gz"
echo "initrd-bytes $(stat -c %s "$out/initrd.gz")" >>"$manifest"
cp "$manifest" "$out/manifest.txt"
echo "$want_stamp" >"$out/stamp"
log "kernel $kver; modules: ${order[*]}; initrd $(stat -c %s "$out/initrd.gz") bytes"
echo "$out/vmlinuz"
echo "$out/initrd.gz"
