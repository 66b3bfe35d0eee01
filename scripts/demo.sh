#!/usr/bin/env bash
# The ax demo: ax-agent daemons on host-a and host-b plus a witness in network namespaces, a counter VM
# created and set to FT through the API (axctl), live stats, every process of host-a SIGKILLed, the
# failover to host-b, and the observer's output sequence checked: unbroken. The last line is
# `demo: ok` and the exit status 0 only then. Needs root (network namespaces), iproute2 and /dev/kvm.
# `--coordinator etcd` starts a 3-member etcd on the lab's witness host (etcd on PATH: Debian's
# etcd-server) and gives both agents `[coordinator] etcd = [...]` instead of the witness; the
# arguments go to ax-demo (tests/src/bin/ax-demo.rs), which does it.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
echo "demo: building the binaries (cargo build --release; a first build takes several minutes)" >&2
# cargo's own progress goes to stderr; the demo's lines go to stdout.
cargo build --release -p ax-agent --bins -p ax-tests --bin ax-demo >&2
if [ "$(id -u)" != 0 ]; then
  echo "demo: FAILED: needs root for network namespaces (try: sudo -E scripts/demo.sh)"
  exit 1
fi
exec env AX_BIN_DIR="$target/release" "$target/release/ax-demo" "$@"
