#!/usr/bin/env bash
# QEMU VMs under ax, against real QEMU: builds the Linux test guest from Debian packages
# (scripts/build-linux-guest.sh), then runs
#   - `cargo test --release -p ax-qemu`: QMP, command lines, the NBD client against qemu-nbd, changed-block
#     tracking against a running QEMU (bitmaps, fleecing, fold-back);
#   - `cargo test --release -p ax-agent --test qemu`: a real agent with QEMU VMs running the Linux guest
#     (console, re-attach after the agent and the worker are killed, HA restarts after QEMU dies and after
#     a guest panic, poweroff as an exit, refusals). The Swift scenario runs in tests/e2e/swift.sh.
# Ends with `N passed, M failed`; exits non-zero on any failure or skip (QEMU missing is a skip: install
# it with .ci/run or `apt-get install qemu-system-x86 qemu-utils`).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
log() { echo "qemu.sh: $*" >&2; }

if ! command -v qemu-system-x86_64 >/dev/null; then
    echo "SKIPPED: qemu-system-x86_64 not installed"
    echo "0 passed, 1 failed"
    exit 1
fi
log "$(qemu-system-x86_64 --version | head -n 1)"
log "building the Linux test guest"
scripts/build-linux-guest.sh >&2

out=$(mktemp)
trap 'rm -f "$out"' EXIT
passed=0
failed=0
run() {
    set +e
    cargo test --release "$@" 2>&1 | tee -a "$out"
    local rc=${PIPESTATUS[0]}
    set -e
    [ "$rc" -eq 0 ] || { log "cargo test $* failed (exit $rc)"; failed=$((failed + 1)); }
}
run -p ax-qemu
run -p ax-agent --test qemu -- --skip real_swift
passed=$(grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed' "$out" | awk '{s+=$4} END {print s+0}')
failed=$((failed + $(grep -Eo '[0-9]+ failed;' "$out" | awk '{s+=$1} END {print s+0}')))
if grep -q '^SKIPPED' "$out"; then
    log "a QEMU test was skipped:"
    grep '^SKIPPED' "$out" >&2
    failed=$((failed + 1))
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
