#!/usr/bin/env bash
# Volume replication against a real Swift, started here from nothing on 127.0.0.1.
#
# 1. Installs what is missing: a venv with swift + python-swiftclient + keystonemiddleware from PyPI (kept
#    in $AX_SWIFT_VENV, default /var/tmp/ax-swift-venv, reused when present), keystone + gunicorn in the
#    OpenStack venv ($AX_E2E_STATE/venv), memcached from Debian.
# 2. Starts a Swift all-in-one under a fresh temp dir: memcached, account/container/object servers and a
#    proxy with tempauth + slo + dlo + bulk, a second proxy over the same servers with Keystone auth
#    (keystonemiddleware's authtoken + keystoneauth), and a Keystone (SQLite, the OpenStack venv of
#    tests/e2e/nova.sh) whose catalog names Swift's object-store endpoint. One-replica rings (`create 10 1
#    1`); storage on a loopback XFS when mkfs.xfs and loop mounts work, else a directory whose large xattrs
#    work (/dev/shm), else the temp dir. Free ports are picked at start.
# 3. Runs `cargo test --release -p evacuate --test swift` with AX_SWIFT_* set, the agent daemon's HA volume
#    replication tests (`ax-agent --test daemon real_swift`: TempAuth, and Keystone tokens with the
#    catalog's endpoint; they need /dev/kvm), a QEMU VM's replication and restore, and its takeover by
#    a survivor when its host fails (`ax-agent --test qemu real_swift`: QEMU's dirty bitmap, a Linux
#    guest, a real etcd), then the benchmark
#    `ax-bench swift` (ax replication vs `swift upload --use-slo --segment-size 4194304` of the same bytes).
# 4. Stops everything it started (trap on EXIT) and ends with `N passed, M failed`; exits non-zero on any
#    failure.
#
# Env: AX_SWIFT_VENV, AX_SWIFT_BENCH_MIB (image size for the benchmark, default 256), AX_SWIFT_BENCH_OUT
# (where the benchmark's JSON goes; default: the temp dir, removed at exit), CARGO_TARGET_DIR.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${AX_SWIFT_VENV:-/var/tmp/ax-swift-venv}
BENCH_MIB=${AX_SWIFT_BENCH_MIB:-256}
STATE=$(mktemp -d "${TMPDIR:-/tmp}/ax-swift.XXXXXX")
PIDS=()
MOUNTED=""
SHMDIR=""

log() { echo "swift.sh: $*" >&2; }

cleanup() {
    local rc=$?
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [ -n "$MOUNTED" ]; then umount "$MOUNTED" 2>/dev/null || umount -l "$MOUNTED" 2>/dev/null || true; fi
    if [ -n "$SHMDIR" ]; then rm -rf "$SHMDIR"; fi
    if [ "$rc" -ne 0 ] && [ -d "$STATE/log" ]; then
        log "failed (exit $rc); last lines of the service logs:"
        for f in "$STATE"/log/*.log; do echo "== $f" >&2; tail -n 15 "$f" >&2 || true; done
    fi
    rm -rf "$STATE"
    exit "$rc"
}
trap cleanup EXIT

# --- 1. install what is missing -------------------------------------------------------------------
if [ ! -x "$VENV/bin/swift-proxy-server" ] || [ ! -x "$VENV/bin/swift" ]; then
    log "creating venv $VENV (swift, python-swiftclient from PyPI)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q 'swift==2.38.3' 'python-swiftclient==4.11.0'
fi
if ! "$VENV/bin/python3" -c 'import keystonemiddleware' 2>/dev/null; then
    log "installing keystonemiddleware into $VENV (Swift's Keystone auth)"
    "$VENV/bin/pip" install -q keystonemiddleware
fi
# Keystone comes from the OpenStack venv tests/e2e/nova.sh uses (created here with keystone only if missing;
# nova.sh adds the rest).
KVENV=${AX_E2E_STATE:-/var/tmp/ax-e2e-nova}/venv
if [ ! -x "$KVENV/bin/keystone-manage" ] || [ ! -x "$KVENV/bin/gunicorn" ]; then
    log "creating $KVENV with keystone and gunicorn from PyPI"
    mkdir -p "$(dirname "$KVENV")"
    python3 -m venv "$KVENV"
    "$KVENV/bin/pip" install -q keystone gunicorn
fi
if ! command -v memcached >/dev/null; then
    log "installing memcached"
    apt-get install -y memcached >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y memcached >/dev/null; }
fi
PY="$VENV/bin/python3"

# --- 2. storage, ports, configuration ---------------------------------------------------------------
mkdir -p "$STATE/etc" "$STATE/log" "$STATE/run"
DEVROOT=""
if command -v mkfs.xfs >/dev/null; then
    truncate -s 2G "$STATE/xfs.img"
    mkdir -p "$STATE/xfs"
    if mkfs.xfs -q "$STATE/xfs.img" && mount -o loop "$STATE/xfs.img" "$STATE/xfs" 2>/dev/null; then
        MOUNTED="$STATE/xfs"
        DEVROOT="$STATE/xfs/devices"
        log "storage: loopback XFS"
    fi
fi
xattrs_ok() { # a 64 KiB user xattr, as XFS allows
    "$PY" -c 'import os,sys; f=os.path.join(sys.argv[1],".xattr-probe"); open(f,"w").close(); os.setxattr(f,"user.probe",b"x"*65000); os.unlink(f)' "$1" 2>/dev/null
}
if [ -z "$DEVROOT" ] && [ -d /dev/shm ]; then
    SHMDIR=$(mktemp -d /dev/shm/ax-swift.XXXXXX)
    if xattrs_ok "$SHMDIR"; then
        DEVROOT="$SHMDIR/devices"
        log "storage: $SHMDIR (tmpfs, large xattrs work)"
    else
        rm -rf "$SHMDIR"; SHMDIR=""
    fi
fi
if [ -z "$DEVROOT" ]; then
    DEVROOT="$STATE/devices"
    log "storage: $DEVROOT (small xattrs only: Swift splits its metadata into 254-byte xattrs)"
fi
mkdir -p "$DEVROOT/sdb1"

read -r PPORT APORT CPORT OPORT MPORT KPORT KSPPORT < <("$PY" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(7)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)
ETC="$STATE/etc"
cat > "$ETC/swift.conf" <<EOF
[swift-hash]
swift_hash_path_prefix = ax-test-prefix
swift_hash_path_suffix = ax-test-suffix

[storage-policy:0]
name = one
default = yes
EOF

common_conf() { # $1 = port, $2 = server name
    cat <<EOF
[DEFAULT]
bind_ip = 127.0.0.1
bind_port = $1
workers = 0
devices = $DEVROOT
mount_check = false
swift_dir = $ETC
log_name = $2
log_udp_host = 127.0.0.1
log_udp_port = 9
EOF
}
for s in account container object; do
    port_var="${s:0:1}"; port_var="${port_var^^}PORT"
    {
        common_conf "${!port_var}" "$s-server"
        printf '\n[pipeline:main]\npipeline = %s-server\n\n[app:%s-server]\nuse = egg:swift#%s\n' "$s" "$s" "$s"
        [ "$s" = object ] && printf '\n[object-replicator]\n[object-updater]\n[object-auditor]\n'
        [ "$s" = container ] && printf '\n[container-replicator]\n[container-updater]\n[container-auditor]\n'
        [ "$s" = account ] && printf '\n[account-replicator]\n[account-auditor]\n[account-reaper]\n'
    } > "$ETC/$s-server.conf"
    "$VENV/bin/swift-ring-builder" "$ETC/$s.builder" create 10 1 1 >/dev/null
    "$VENV/bin/swift-ring-builder" "$ETC/$s.builder" add "r1z1-127.0.0.1:${!port_var}/sdb1" 1 >/dev/null
    "$VENV/bin/swift-ring-builder" "$ETC/$s.builder" rebalance >/dev/null || true
    [ -f "$ETC/$s.ring.gz" ] || { log "ring $s was not written"; exit 1; }
done
# Two proxies over the same servers: TempAuth (the tests and the benchmark; unchanged by Keystone) and
# Keystone (keystonemiddleware's authtoken + keystoneauth: accounts AUTH_<project id>).
proxy_conf() { # $1 = port, $2 = auth filters in the pipeline, $3 = their sections
    common_conf "$1" proxy-server
    cat <<EOF

[pipeline:main]
pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats bulk $2 copy slo dlo proxy-logging proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true
allow_account_management = true
$3

[filter:cache]
use = egg:swift#memcache
memcache_servers = 127.0.0.1:$MPORT
[filter:catch_errors]
use = egg:swift#catch_errors
[filter:gatekeeper]
use = egg:swift#gatekeeper
[filter:healthcheck]
use = egg:swift#healthcheck
[filter:proxy-logging]
use = egg:swift#proxy_logging
[filter:listing_formats]
use = egg:swift#listing_formats
[filter:bulk]
use = egg:swift#bulk
[filter:copy]
use = egg:swift#copy
[filter:slo]
use = egg:swift#slo
[filter:dlo]
use = egg:swift#dlo
EOF
}
proxy_conf "$PPORT" tempauth "
[filter:tempauth]
use = egg:swift#tempauth
user_test_tester = testing .admin" > "$ETC/proxy-server.conf"
proxy_conf "$KSPPORT" "authtoken keystoneauth" "
[filter:authtoken]
paste.filter_factory = keystonemiddleware.auth_token:filter_factory
www_authenticate_uri = http://127.0.0.1:$KPORT/v3
auth_url = http://127.0.0.1:$KPORT/v3
auth_type = password
project_domain_name = Default
user_domain_name = Default
project_name = admin
username = admin
password = admin
delay_auth_decision = True
cache = swift.cache

[filter:keystoneauth]
use = egg:swift#keystoneauth
operator_roles = admin, member" > "$ETC/proxy-keystone.conf"

# Swift reads swift.conf from /etc/swift only; this launcher points it at ours before a server starts.
cat > "$STATE/run.py" <<'EOF'
import importlib, os, sys
import swift.common.utils as utils
utils.SWIFT_CONF_FILE = os.environ["AX_SWIFT_CONF"]
from swift.common import constraints, storage_policy
storage_policy.reload_storage_policies()
constraints.reload_constraints()
module, func = sys.argv[1].split(":")
sys.argv = [sys.argv[1]] + sys.argv[2:]
sys.exit(getattr(importlib.import_module(module), func)())
EOF

# --- 3. start ---------------------------------------------------------------------------------------
# Keystone (SQLite: only tokens and the catalog are asked for, one at a time), with Swift in its catalog.
KS=$STATE/keystone
KS_URL=http://127.0.0.1:$KPORT/v3
mkdir -p "$KS/etc/keystone" "$KS/fernet" "$KS/credential"
cat > "$KS/etc/keystone/keystone.conf" <<EOF
[DEFAULT]
log_file = $STATE/log/keystone.log
[database]
connection = sqlite:///$KS/keystone.db
[token]
provider = fernet
[fernet_tokens]
key_repository = $KS/fernet
[fernet_receipts]
key_repository = $KS/fernet
[credential]
key_repository = $KS/credential
EOF
km() { "$KVENV/bin/keystone-manage" --config-file "$KS/etc/keystone/keystone.conf" "$@" >> "$STATE/log/keystone-manage.log" 2>&1; }
km db_sync
km fernet_setup --keystone-user root --keystone-group root
km credential_setup --keystone-user root --keystone-group root
km bootstrap --bootstrap-password admin --bootstrap-region-id RegionOne --bootstrap-admin-url "$KS_URL" \
    --bootstrap-internal-url "$KS_URL" --bootstrap-public-url "$KS_URL"
AX_E2E_RUN=$KS "$KVENV/bin/gunicorn" --chdir "$ROOT/tests/e2e/lib/wsgi" --workers 1 --threads 4 \
    --no-control-socket --bind "127.0.0.1:$KPORT" keystone_app:application > "$STATE/log/keystone.out" 2>&1 &
PIDS+=($!)
memcached -l 127.0.0.1 -p "$MPORT" -U 0 -m 64 -u root > "$STATE/log/memcached.log" 2>&1 &
PIDS+=($!)
for s in account container object; do
    module="swift.$s.server"; [ "$s" = object ] && module="swift.obj.server"
    AX_SWIFT_CONF="$ETC/swift.conf" "$PY" "$STATE/run.py" "$module:main" "$ETC/$s-server.conf" -v \
        > "$STATE/log/$s.log" 2>&1 &
    PIDS+=($!)
done
for proxy in proxy-server proxy-keystone; do
    AX_SWIFT_CONF="$ETC/swift.conf" "$PY" "$STATE/run.py" "swift.proxy.server:main" "$ETC/$proxy.conf" -v \
        > "$STATE/log/$proxy.log" 2>&1 &
    PIDS+=($!)
done

AUTH_URL="http://127.0.0.1:$PPORT/auth/v1.0"
ready=""
for _ in $(seq 1 150); do
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null || { log "a service exited at start"; exit 1; }; done
    if curl -fsS -o /dev/null -H 'X-Auth-User: test:tester' -H 'X-Auth-Key: testing' "$AUTH_URL" 2>/dev/null; then
        ready=1; break
    fi
    sleep 0.2
done
[ -n "$ready" ] || { log "Swift did not come up"; exit 1; }
for _ in $(seq 1 150); do curl -fsS -o /dev/null "http://127.0.0.1:$KSPPORT/healthcheck" 2>/dev/null && break; sleep 0.2; done
"$PY" - "$KS_URL" "http://127.0.0.1:$KSPPORT/v1/AUTH_%(project_id)s" <<'EOF' || { log "Keystone: cannot register Swift"; exit 1; }
import json, sys, time, urllib.request
ks, url = sys.argv[1], sys.argv[2]
def call(method, path, body, token=None):
    req = urllib.request.Request(ks + path, data=json.dumps(body).encode(), method=method,
                                 headers={"Content-Type": "application/json", **({"X-Auth-Token": token} if token else {})})
    return urllib.request.urlopen(req, timeout=30)
auth = {"auth": {"identity": {"methods": ["password"], "password": {"user": {"name": "admin",
        "domain": {"name": "Default"}, "password": "admin"}}}, "scope": {"project": {"name": "admin",
        "domain": {"name": "Default"}}}}}
for _ in range(240):
    try:
        token = call("POST", "/auth/tokens", auth).headers["X-Subject-Token"]
        break
    except Exception:
        time.sleep(0.5)
else:
    sys.exit("Keystone did not come up")
svc = json.load(call("POST", "/services", {"service": {"type": "object-store", "name": "swift"}}, token))
call("POST", "/endpoints", {"endpoint": {"service_id": svc["service"]["id"], "interface": "public",
                                         "region_id": "RegionOne", "url": url}}, token)
EOF
log "Keystone up: $KS_URL (Swift's object-store endpoint in its catalog; user admin, project admin)"
log "Swift up: proxy 127.0.0.1:$PPORT (TempAuth) and 127.0.0.1:$KSPPORT (Keystone), account $APORT, container $CPORT, object $OPORT, memcached $MPORT"

# --- 4. scenarios -----------------------------------------------------------------------------------
passed=0
failed=0
export AX_SWIFT_AUTH_URL="$AUTH_URL" AX_SWIFT_USER="test:tester" AX_SWIFT_KEY="testing"
export AX_SWIFT_KEYSTONE_URL="$KS_URL" AX_SWIFT_KEYSTONE_USER=admin AX_SWIFT_KEYSTONE_PASSWORD=admin AX_SWIFT_KEYSTONE_PROJECT=admin
cd "$ROOT"
set +e
cargo test --release -p evacuate --test swift -- --test-threads=2 --nocapture 2>&1 | tee "$STATE/test.out"
test_rc=${PIPESTATUS[0]}
set -e
line=$(grep -E '^test result:' "$STATE/test.out" | tail -n 1 || true)
if [[ "$line" =~ ([0-9]+)\ passed\;\ ([0-9]+)\ failed ]]; then
    passed=$((passed + BASH_REMATCH[1]))
    failed=$((failed + BASH_REMATCH[2]))
fi
if [ "$test_rc" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=$((failed + 1)); fi
if grep -q '^SKIPPED' "$STATE/test.out"; then log "a scenario was skipped although Swift is up"; failed=$((failed + 1)); fi
# The agent daemon's HA volume replication (a disk-writer VM on real KVM, its disk versions in this Swift).
set +e
cargo test --release -p ax-agent --test daemon real_swift -- --nocapture 2>&1 \
    | tee "$STATE/daemon.out"
daemon_rc=${PIPESTATUS[0]}
set -e
if [ "$daemon_rc" -eq 0 ] && grep -q '^test result: ok. 2 passed' "$STATE/daemon.out"; then
    if grep -q '^SKIPPED.*dev/kvm' "$STATE/daemon.out"; then
        echo "SKIPPED: the daemon's volume replication test needs /dev/kvm"
    elif grep -q '^SKIPPED' "$STATE/daemon.out"; then
        log "the daemon's volume replication test was skipped although Swift is up"
        failed=$((failed + 1))
    else
        passed=$((passed + 3))
    fi
else
    log "the daemon's volume replication tests failed (exit $daemon_rc)"
    failed=$((failed + 1))
fi

# A QEMU VM's volume replication (changed-block tracking through QEMU's dirty bitmap, a Linux guest), its
# restore on a second agent, and its takeover by a survivor when its host fails (etcd decides).
set +e
cargo test --release -p ax-agent --test qemu real_swift -- --nocapture 2>&1 | tee "$STATE/qemu.out"
qemu_rc=${PIPESTATUS[0]}
set -e
if [ "$qemu_rc" -eq 0 ] && grep -q '^test result: ok. 3 passed' "$STATE/qemu.out"; then
    if grep -q '^SKIPPED.*qemu-system-x86_64 not installed' "$STATE/qemu.out"; then
        echo "SKIPPED: the QEMU volume replication test needs qemu-system-x86_64"
    elif grep -q '^SKIPPED' "$STATE/qemu.out"; then
        log "a QEMU volume replication test was skipped although Swift is up"
        failed=$((failed + 1))
    else
        passed=$((passed + 3))
    fi
else
    log "the QEMU volume replication tests failed (exit $qemu_rc)"
    failed=$((failed + 1))
fi

# --- 5. benchmark: ax replication vs python-swiftclient, same bytes, same run --------------------------
set +e
cargo run --release -q -p ax-bench -- swift --auth-url "$AUTH_URL" --user test:tester --key testing \
    --swift-cli "$VENV/bin/swift" --mib "$BENCH_MIB" --out-dir "${AX_SWIFT_BENCH_OUT:-$STATE/results}" 2>&1 \
    | tee "$STATE/bench.out"
bench_rc=${PIPESTATUS[0]}
set -e
if [ "$bench_rc" -eq 0 ] && tail -n 1 "$STATE/bench.out" | grep -q '"ratio_vs_swiftclient"'; then
    passed=$((passed + 1))
    ratio=$(tail -n 1 "$STATE/bench.out" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["ratio_vs_swiftclient"])')
    log "ax replication / swiftclient upload throughput ratio: $ratio"
else
    log "benchmark failed (exit $bench_rc)"
    failed=$((failed + 1))
fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
