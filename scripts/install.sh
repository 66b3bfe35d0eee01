#!/usr/bin/env bash
# Installs ax: the binaries (ax-agent, axctl), the systemd units and a sample configuration.
#
#   scripts/install.sh [--prefix /usr/local] [--destdir DIR] [--bin-dir DIR] [--no-build]
#
# --prefix   where binaries go ($prefix/bin) and what the units' ExecStart names (default /usr/local)
# --destdir  staging root prepended to every path (packaging, tests); default: the real root
# --bin-dir  take the binaries from DIR instead of building them (default: target/release after
#            `cargo build --release -p ax-agent`)
# --no-build do not run cargo (the binaries must already be in --bin-dir or target/release)
#
# Never overwrites an existing /etc/ax/agent.toml (writes agent.toml.sample next to it instead) and
# never creates the token: it prints the commands that do. Does not start anything.
set -euo pipefail
cd "$(dirname "$0")/.."

prefix=/usr/local
destdir=
bin_dir=
build=yes
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix=$2; shift 2 ;;
    --destdir) destdir=$2; shift 2 ;;
    --bin-dir) bin_dir=$2; shift 2 ;;
    --no-build) build=no; shift ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$prefix" in /*) ;; *) echo "install.sh: --prefix must be absolute" >&2; exit 2 ;; esac

if [ -z "$bin_dir" ]; then
  bin_dir="${CARGO_TARGET_DIR:-target}/release"
  if [ "$build" = yes ]; then
    cargo build --release -p ax-agent --bins
  fi
fi
for b in ax-agent axctl; do
  [ -x "$bin_dir/$b" ] || { echo "install.sh: $bin_dir/$b is missing (build it or pass --bin-dir)" >&2; exit 1; }
done

install -d "$destdir$prefix/bin" "$destdir/etc/systemd/system" "$destdir/etc/ax" "$destdir$prefix/share/doc/ax"
install -m 0755 "$bin_dir/ax-agent" "$bin_dir/axctl" "$destdir$prefix/bin/"
for unit in ax-agent.service ax-witness.service ax-ha-node.service; do
  sed "s#/usr/local/bin/ax-agent#$prefix/bin/ax-agent#g" "systemd/$unit" > "$destdir/etc/systemd/system/$unit"
  chmod 0644 "$destdir/etc/systemd/system/$unit"
done
if [ -e "$destdir/etc/ax/agent.toml" ]; then
  install -m 0644 systemd/agent.toml "$destdir/etc/ax/agent.toml.sample"
  echo "kept the existing /etc/ax/agent.toml (the new sample is agent.toml.sample)"
else
  install -m 0644 systemd/agent.toml "$destdir/etc/ax/agent.toml"
fi
if [ -e "$destdir/etc/ax/ha-node.toml" ]; then
  install -m 0644 systemd/ha-node.toml "$destdir/etc/ax/ha-node.toml.sample"
else
  install -m 0644 systemd/ha-node.toml "$destdir/etc/ax/ha-node.toml"
fi
install -m 0644 docs/daemon.md docs/ha-evacuation.md ax-agent/openapi.json "$destdir$prefix/share/doc/ax/"

cat <<MSG
installed ax-agent and axctl in $destdir$prefix/bin, the units in $destdir/etc/systemd/system,
the configuration in $destdir/etc/ax. Next, on each compute host:
  edit /etc/ax/agent.toml (host, addresses, peers, witness)
  head -c 32 /dev/urandom | base64 > /etc/ax/token && chmod 600 /etc/ax/token   # the same on every host
  ax-agent certs --out /etc/ax/pki host-a host-b witness                        # or your CA's files
  systemctl daemon-reload && systemctl enable --now ax-agent
and on the witness host (if [coordinator] does not name etcd), the first time of a new cluster:
  echo AX_WITNESS_OPTS=--init > /etc/ax/witness.env && systemctl enable --now ax-witness
  rm /etc/ax/witness.env   # later starts must never start from zero
for HA of Nova VMs: edit /etc/ax/ha-node.toml, then systemctl enable --now ax-ha-node
MSG
