#!/bin/bash
# End-to-end test of ax's HA path against a real Nova, all on 127.0.0.1:
#   Keystone, Placement, nova-api, nova-conductor, nova-scheduler, nova-compute on compute1 and compute2
#   (fake virt driver), RabbitMQ, PostgreSQL, an image/network stand-in  (tests/e2e/lib/openstack.sh)
#   and the HA engine for compute1 (`ax-agent ha-node`) and compute2 (inside its `ax-agent run` daemon,
#   `[ha] node_config`), heartbeating on loopback.
#
# Scenarios: the Rust client test against the real services; a VM crash restarted in place; a fence
# failure (no evacuation, an alert); a host failure (nova-compute1 and its ha-node SIGKILLed): fenced,
# forced down, HA VMs evacuated to compute2 and ACTIVE (a stopped one stays SHUTOFF), migration records
# `done`, FT and none VMs left alone; the host stays disabled until re-enabled; Nova tagging (an
# `ax-agent run` daemon with `[openstack] nova_tagging` sets the level of a native VM — a real KVM guest —
# from the `ax:level` that `openstack server set --property` puts on its Nova server, warns once about
# an invalid value, refuses an API level that contradicts the tag); and the benchmark (1 and 8 VMs: last
# heartbeat → evacuation accepted → ACTIVE elsewhere), printed as JSON lines.
#
# Installs what is missing (venv, rabbitmq-server), starts everything it needs, stops everything it
# started (trap EXIT), and ends with "N passed, M failed". Needs root (PostgreSQL runs as user postgres)
# and /dev/kvm for the tagging scenario (skipped, and said so, without it).
#   tests/e2e/nova.sh                 AX_E2E_STATE=/var/tmp/ax-e2e-nova (venv kept there between runs)
#   AX_E2E_BENCH=0 tests/e2e/nova.sh  skip the benchmark
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
. "$ROOT/tests/e2e/lib/openstack.sh"
cd "$ROOT"

PASSED=0 FAILED=0
check() { # check NAME CMD...: one scenario assertion
  local name=$1
  shift
  if "$@"; then
    PASSED=$((PASSED + 1))
    echo "ok: $name"
  else
    FAILED=$((FAILED + 1))
    echo "FAIL: $name"
  fi
}

bg_stop() { # bg_stop NAME: SIGTERM (then after 4 s SIGKILL) what start_bg NAME started, if it runs
  local f=$R/pids/$1 p
  [ -s "$f" ] || return 0
  p=$(cat "$f")
  kill -TERM -- "-$p" 2>/dev/null
  for _ in $(seq 40); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -KILL -- "-$p" 2>/dev/null
  rm -f "$f"
}
ha_stop() { bg_stop "ha-$1"; } # ha_stop HOST: the host's ha-node

tags_stop() { # stop the tagging scenario's daemon (SIGTERM: it drains), its VM workers and its witness
  local f p
  [ -n "${TAGS:-}" ] || return 0
  bg_stop tags-agent
  for f in "$TAGS"/storage/vms/*/worker.pid; do
    [ -s "$f" ] || continue
    p=$(cut -d' ' -f1 "$f")
    grep -qa vm-worker "/proc/$p/cmdline" 2>/dev/null && kill -KILL "$p"
  done
  bg_stop tags-witness
}

cleanup() {
  local rc=$?
  ha_stop compute1
  ha_stop compute2
  bg_stop ha-witness
  tags_stop
  os_down
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "$(id -u)" = 0 ] || { echo "SKIPPED: tests/e2e/nova.sh: needs root (PostgreSQL as user postgres, apt)"; echo "0 passed, 0 failed"; exit 0; }

# ---------- build, install, start ----------
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
AX_AGENT=${AX_AGENT_BIN:-}
if [ -z "$AX_AGENT" ]; then
  elog "building ax-agent and axctl"
  cargo build --release -q -p ax-agent --bins || exit 1
  AX_AGENT=$CARGO_TARGET_DIR/release/ax-agent
fi
AXCTL=$(dirname "$AX_AGENT")/axctl
[ -x "$AXCTL" ] || { echo "no axctl next to $AX_AGENT"; exit 1; }
os_install || exit 1
os_up || { echo "services did not come up; logs in $R/logs"; exit 1; }
set -a
. "$R/admin.env"
set +a
export PYTHONWARNINGS=ignore

TOKEN=$(openstack token issue -f value -c id)
FLAVOR=$(openstack flavor show ax.tiny -f value -c id)
{ cat "$R/admin.env"; echo "AX_E2E_FLAVOR=$FLAVOR"; echo "AX_E2E_IMAGE=$IMAGE_ID"; } >"$R/test.env"

api() { # api METHOD PATH [BODY]: compute API at microversion 2.74
  curl -sf -X "$1" -H "X-Auth-Token: $TOKEN" -H "Content-Type: application/json" \
    -H "OpenStack-API-Version: compute 2.74" "$NOVA_URL$2" ${3:+-d "$3"}
}
py() { python3 -c "import json,sys; d=json.load(sys.stdin); $1"; }
server_state() { api GET "/servers/$1" | py "s=d['server']; print(s['status'], s['OS-EXT-SRV-ATTR:host'], s['OS-EXT-STS:task_state'])"; }
boot() { # boot NAME LEVEL(ha|ft|-): prints the id
  local meta='{}'
  [ "$2" != - ] && meta="{\"ax:level\": \"$2\"}"
  api POST /servers "{\"server\": {\"name\": \"$1\", \"imageRef\": \"$IMAGE_ID\", \"flavorRef\": \"$FLAVOR\",
    \"networks\": \"none\", \"host\": \"compute1\", \"metadata\": $meta}}" | py "print(d['server']['id'])"
}
wait_state() { # wait_state ID "STATUS HOST None" [TRIES of 0.2 s]
  for _ in $(seq "${3:-600}"); do
    [ "$(server_state "$1")" = "$2" ] && return 0
    sleep 0.2
  done
  echo "  $1: $(server_state "$1"), wanted $2"
  return 1
}
migration_status() { # migration_status ID SOURCE: the newest evacuation record's status
  api GET "/os-migrations?migration_type=evacuation&instance_uuid=$1" |
    py "m=[x for x in d['migrations'] if x['source_compute']=='$2']; print(max(m, key=lambda x: x['id'])['status'] if m else 'none')"
}
service_field() { # service_field HOST FIELD
  curl -sf -H "X-Auth-Token: $TOKEN" -H "OpenStack-API-Version: compute 2.53" \
    "$NOVA_URL/os-services?binary=nova-compute&host=$1" | py "print(d['services'][0]['$2'])"
}
ctl() { # ctl HOST COMMAND...: one line to the host's ha-node control socket, prints the answer
  python3 - "$R/ha/$1.sock" "$*" <<'EOF'
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(600)
s.connect(sys.argv[1])
s.sendall((sys.argv[2].split(" ", 1)[1] + "\n").encode())
print(s.makefile().readline().strip())
EOF
}
ev() { python3 "$E2E_LIB/events.py" "$@"; }

# ---------- ha-node for compute1 and compute2 ----------
mkdir -p "$R/ha"
ha_config() { # ha_config HOST PEER LOCAL_PORT PEER_PORT
  cat >"$R/ha/$1.toml" <<EOF
host = "$1"
control = "$R/ha/$1.sock"
state = "$R/ha/$1.state.json"
[heartbeat]
interval_ms = 200
timeout_ms = 1000
[[peers]]
name = "$2"
local = "127.0.0.1:$3"
addr = "127.0.0.1:$4"
[fence]
command = ["bash", "$E2E_LIB/fence-kill.sh", "$R", "{host}"]
timeout_secs = 20
attempts = 1
[recovery]
policy = "auto"
max_parallel = 8
evacuate_timeout_secs = 240
[nova]
poll_interval_ms = 300
EOF
}
ha_config compute1 compute2 27101 27102
ha_config compute2 compute1 27102 27101
# compute1 runs the HA engine as `ax-agent ha-node`; compute2 inside its agent daemon (`ax-agent run` with
# `[ha] node_config`): both deployments are exercised, and compute2's recoveries are read through its API.
free_port() { # free_port tcp|udp: a port nothing listens on now
  python3 -c "import socket, sys; s = socket.socket(type=socket.SOCK_DGRAM if sys.argv[1] == 'udp' else socket.SOCK_STREAM); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])" "$1"
}
HA_API_PORT=$(free_port tcp) HA_WITNESS_PORT=$(free_port tcp)
"$AX_AGENT" certs --out "$R/ha/pki" compute2 witness >/dev/null
(umask 077 && head -c 32 /dev/urandom | base64 >"$R/ha/token")
cat >"$R/ha/compute2-agent.toml" <<EOF
host = "compute2"
storage_dir = "$R/ha/compute2-agent"
pki_dir = "$R/ha/pki"
token_file = "$R/ha/token"
witness = "127.0.0.1:$HA_WITNESS_PORT"
[api]
listen = "127.0.0.1:$HA_API_PORT"
[ports]
link = 26500
heartbeat = 26510
output = 26520
slots = 4
local_witness = 26530
[ha]
restart_limit = 3
restart_window_s = 600
node_config = "$R/ha/compute2.toml"
events_file = "$R/ha/compute2.events"
EOF
axc2() { "$AXCTL" --url "http://127.0.0.1:$HA_API_PORT" --token-file "$R/ha/token" "$@"; }
ha_start() {
  rm -f "$R/ha/$1.sock"
  if [ "$1" = compute2 ]; then
    [ -s "$R/pids/ha-witness" ] || start_bg ha-witness "$AX_AGENT" witness --listen "127.0.0.1:$HA_WITNESS_PORT" \
      --state "$R/ha/witness.json" --pki "$R/ha/pki" --init
    RUST_LOG=info start_bg "ha-$1" "$AX_AGENT" run --config "$R/ha/compute2-agent.toml"
  else
    start_bg "ha-$1" "$AX_AGENT" ha-node --config "$R/ha/$1.toml" --events "$R/ha/$1.events"
  fi
  for _ in $(seq 100); do [ -S "$R/ha/$1.sock" ] && break; sleep 0.1; done
  [ -S "$R/ha/$1.sock" ] || { echo "  ha-node $1 did not start:"; tail -5 "$R/logs/ha-$1.out"; return 1; }
  sleep 1 # a few heartbeats: the peers hear each other
}
next_recovery() { # the first recovery id compute2's engine has not used yet
  ev list "$R/ha/compute2.events" compute1 0 | py_lines
}
py_lines() { python3 -c "import json,sys; print(1 + max([json.loads(l).get('recovery', 0) for l in sys.stdin] or [0]))"; }
wait_completed() { # wait_completed IDS...: compute1's evacuation records turn `completed` (nova-compute1 restarted)
  local id ok
  for _ in $(seq 300); do
    ok=1
    for id in "$@"; do [ "$(migration_status "$id" compute1)" = completed ] || ok=0; done
    [ $ok = 1 ] && return 0
    sleep 0.5
  done
  return 1
}
reenable_compute1() { axc2 host enable compute1; }
restore_compute1() { # start nova-compute1 again, wait for its evacuations to be `completed`, re-enable it
  os_start_compute 1
  wait_completed "$@" && reenable_compute1
}

# ---------- 1. the Rust clients against the real services ----------
elog "scenario 1: Keystone and Nova clients (cargo test --test nova_real)"
check "keystone + nova clients against real services" \
  env AX_E2E_NOVA_ENV="$R/test.env" cargo test --release -q -p evacuate --test nova_real

# ---------- boot: 2 HA, 1 HA stopped, 1 FT, 1 none, all on compute1 ----------
elog "booting VMs on compute1"
HA1=$(boot vm-ha1 ha) HA2=$(boot vm-ha2 ha) HAOFF=$(boot vm-ha-stopped ha) FT=$(boot vm-ft ft) NONE=$(boot vm-none -)
for id in $HA1 $HA2 $HAOFF $FT $NONE; do wait_state "$id" "ACTIVE compute1 None" || exit 1; done
api POST "/servers/$HAOFF/action" '{"os-stop": null}' >/dev/null
wait_state "$HAOFF" "SHUTOFF compute1 None" || exit 1
ha_start compute1 || exit 1
ha_start compute2 || exit 1

# ---------- 2. VM crash: restart in place ----------
elog "scenario 2: VM crash reported to compute1's ha-node -> restart in place"
answer=$(ctl compute1 crashed "$HA1")
check "crash: agent answers, VM stays on compute1" grep -q '"host":"compute1"' <<<"$answer"
check "crash: VM ACTIVE on compute1 again" wait_state "$HA1" "ACTIVE compute1 None" 50
actions=$(api GET "/servers/$HA1/os-instance-actions" | py "print(' '.join(sorted(a['action'] for a in d['instanceActions'])))")
check "crash: Nova recorded stop and start ($actions)" grep -q "create start stop" <<<"$actions"
check "crash: event vm_restarted" grep -q "\"event\":\"vm_restarted\",\"vm\":\"$HA1\"" "$R/ha/compute1.events"

# ---------- 3. fence failure: no evacuation, an alert ----------
elog "scenario 3: compute1's agent dies, fencing fails -> alert, nothing evacuated"
REC=$(next_recovery)
touch "$R/fence-fail"
kill -KILL -- "-$(cat "$R/pids/ha-compute1")"
alert=$(ev wait "$R/ha/compute2.events" alert compute1 "$REC" 30)
check "fence failure: alert raised" grep -q "not fenced" <<<"$alert"
sleep 2
check "fence failure: no evacuation requested" \
  bash -c "! python3 '$E2E_LIB/events.py' list '$R/ha/compute2.events' compute1 $REC | grep -q -e evacuation_accepted -e forced_down"
check "fence failure: compute1 not forced down" test "$(service_field compute1 forced_down)" = False
check "fence failure: HA VM still on compute1" wait_state "$HA2" "ACTIVE compute1 None" 5
rm -f "$R/fence-fail"
ha_start compute1
check "fence failure: closed when compute1's agent is back" ev wait "$R/ha/compute2.events" host_back compute1 "$REC" 20 >/dev/null

# ---------- 4. host failure: fence, force down, evacuate ----------
elog "scenario 4: nova-compute1 and its agent SIGKILLed -> fence, force down, evacuate HA VMs"
REC=$(next_recovery)
kill -KILL -- "-$(os_compute_pid 1)" "-$(cat "$R/pids/ha-compute1")"
T_KILL=$(date +%s.%N)
done_ev=$(ev wait "$R/ha/compute2.events" recovery_finished compute1 "$REC" 300)
check "host failure: recovery finished, 3 recovered, 0 failed, 2 skipped" \
  grep -q '"recovered":3,"failed":0,"skipped":2' <<<"$done_ev"
steps=$(ev list "$R/ha/compute2.events" compute1 "$REC" | python3 -c "
import json, sys
e = [json.loads(l) for l in sys.stdin]
first = lambda k: min([x['at_ms'] for x in e if x['event'] == k] or [0])
print('ordered' if 0 < first('fenced') <= first('forced_down') <= first('evacuation_accepted') else 'unordered', len(e))")
check "host failure: fenced, then forced down, then evacuations ($steps)" grep -q '^ordered' <<<"$steps"
check "host failure: fence agent ran" grep -q "fenced compute1" "$R/fence.log"
for id in $HA1 $HA2; do
  check "host failure: HA VM $id ACTIVE on compute2" wait_state "$id" "ACTIVE compute2 None" 50
  check "host failure: HA VM $id migration record done" test "$(migration_status "$id" compute1)" = done
done
check "host failure: stopped HA VM evacuated and still SHUTOFF" wait_state "$HAOFF" "SHUTOFF compute2 None" 50
check "host failure: FT VM left on compute1" test "$(server_state "$FT" | cut -d' ' -f2)" = compute1
check "host failure: none VM left on compute1" test "$(server_state "$NONE" | cut -d' ' -f2)" = compute1
check "host failure: no migration for the FT and none VMs" \
  test "$(migration_status "$FT" compute1)$(migration_status "$NONE" compute1)" = nonenone
check "host failure: compute1 forced down and disabled" \
  test "$(service_field compute1 forced_down) $(service_field compute1 status)" = "True disabled"
check "host failure: event says compute1 stays disabled" \
  ev wait "$R/ha/compute2.events" host_left_disabled compute1 "$REC" 1 >/dev/null
shown=$(axc2 recovery show compute1 --json | python3 -c "
import json, sys
r = [x for x in json.load(sys.stdin) if x['id'] == $REC]
r = r[0] if r else {}
vms = r.get('vms', [])
ok = (r.get('outcome') == 'recovered' and len(vms) == 3
      and 0 < r['last_heartbeat_ms'] <= r['declared_ms'] <= r['fenced_ms'] <= r['forced_down_ms']
      and all(r['forced_down_ms'] <= v['accepted_ms'] <= v['recovered_ms'] for v in vms))
print('steps' if ok else 'missing', json.dumps(r)[:300])")
check "host failure: axctl recovery show: fenced, forced down, accepted, active, with times" grep -q '^steps' <<<"$shown"
check "host failure: compute2's agent counts the evacuations in /metrics" \
  bash -c "curl -sf http://127.0.0.1:$HA_API_PORT/metrics | grep -qF 'ax_evacuations_total{outcome=\"recovered\"} 3'"
axc2 recovery list | sed 's/^/   /'
axc2 recovery show "$REC" | sed 's/^/   /'
python3 - "$T_KILL" <<EOF
import json, sys
e = [json.loads(l) for l in open("$R/ha/compute2.events") if l.startswith("{")]
e = [x for x in e if x.get("host") == "compute1" and x.get("recovery", 0) >= $REC]
kill = float(sys.argv[1]) * 1000
for x in e:
    print("   %+8.0f ms  %s %s" % (x["at_ms"] - kill, x["event"], x.get("name", "")))
EOF

# ---------- 5. the host comes back: disabled until re-enabled ----------
elog "scenario 5: nova-compute1 restarted; operator re-enables compute1 through the agent"
os_start_compute 1
check "recovered host: evacuation records turn completed" wait_completed "$HA1" "$HA2" "$HAOFF"
check "recovered host: still disabled and forced down" \
  test "$(service_field compute1 status) $(service_field compute1 forced_down)" = "disabled True"
check "recovered host: re-enabled by the operator call" reenable_compute1
check "recovered host: up, enabled, not forced down" \
  test "$(service_field compute1 status) $(service_field compute1 forced_down)" = "enabled False"
check "recovered host: event host_reenabled" grep -q '"host":"compute1","event":"host_reenabled"' "$R/ha/compute2.events"

elog "scenario 5b: compute2's agent (with its HA engine) SIGKILLed and restarted: it remembers its recoveries"
kill -KILL -- "-$(cat "$R/pids/ha-compute2")"
ha_start compute2
kept=$(axc2 recovery show "$REC" --json |
  python3 -c "import json, sys; r = json.load(sys.stdin); print(r[0]['outcome'], len(r[0]['vms']))")
check "restart: recovery $REC remembered ($kept)" test "$kept" = "recovered 3"
for id in $HA1 $HA2 $HAOFF $FT $NONE; do api DELETE "/servers/$id" >/dev/null; done

# ---------- 6. Nova tagging: ax:level on a Nova server sets the level of the native VM standing for it ----------
if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
  elog "scenario 6: ax-agent run with nova_tagging; openstack server set --property ax:level=... sets the VM's level"
  TAGS=$R/tags
  mkdir -p "$TAGS"
  WITNESS_PORT=$(free_port tcp) API_PORT=$(free_port tcp)
  "$AX_AGENT" certs --out "$TAGS/pki" tags-host witness >/dev/null
  (umask 077 && head -c 32 /dev/urandom | base64 >"$TAGS/token" && echo "$OS_PASSWORD" >"$TAGS/os-password")
  # The credentials of this script's Keystone (admin.env); the tags are read every second.
  cat >"$TAGS/agent.toml" <<EOF
host = "tags-host"
storage_dir = "$TAGS/storage"
pki_dir = "$TAGS/pki"
token_file = "$TAGS/token"
witness = "127.0.0.1:$WITNESS_PORT"
[api]
listen = "127.0.0.1:$API_PORT"
[ports]
link = 26400
heartbeat = 26410
output = 26420
slots = 4
local_witness = 26430
[openstack]
auth_url = "$OS_AUTH_URL"
username = "$OS_USERNAME"
password_file = "$TAGS/os-password"
project = "$OS_PROJECT_NAME"
region = "$OS_REGION_NAME"
nova_tagging = true
tag_poll_s = 1
EOF
  start_bg tags-witness "$AX_AGENT" witness --listen "127.0.0.1:$WITNESS_PORT" --state "$TAGS/witness.json" --pki "$TAGS/pki" --init
  RUST_LOG=info start_bg tags-agent "$AX_AGENT" run --config "$TAGS/agent.toml"
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$API_PORT/readyz" >/dev/null && break; sleep 0.1; done
  axc() { "$AXCTL" --url "http://127.0.0.1:$API_PORT" --token-file "$TAGS/token" "$@"; }
  vm_field() { axc --json vm show tagged | py "print(d$1)" 2>/dev/null; }
  settled() { test "$(vm_field "['level'], d['desired_level'], d['transition'] is None")" = "$1 $1 True"; }
  wait_level() { # wait_level LEVEL: the VM settles at LEVEL (bounded: 30 s)
    for _ in $(seq 300); do settled "$1" && return 0; sleep 0.1; done
    echo "  tagged: $(axc --json vm show tagged | head -c 600)"
    return 1
  }
  two_more_reads() { # until the agent has read the server twice more (bounded: 10 s)
    local r
    r=$(vm_field "['nova_tag']['read_ms']")
    for _ in $(seq 100); do [ "$(vm_field "['nova_tag']['read_ms'] >= $r + 2000")" = True ] && return 0; sleep 0.1; done
    return 1
  }
  events_with() { axc --json events --vm tagged --limit 1000 | grep -cF -- "$1"; }
  tag() { openstack server set --property "ax:level=$1" "$TAGGED"; }

  TAGGED=$(boot vm-tagged -)
  wait_state "$TAGGED" "ACTIVE compute1 None" || exit 1
  check "tagging: daemon up with nova_tagging" curl -sf "http://127.0.0.1:$API_PORT/readyz" -o /dev/null
  axc vm create tagged --guest counter --memory-mib 64 --nova-server "$TAGGED" >/dev/null
  for _ in $(seq 100); do [ "$(vm_field "['state']")" = running ] && break; sleep 0.1; done
  check "tagging: native VM running, standing for Nova server $TAGGED" \
    test "$(vm_field "['state'], d['nova_server']")" = "running $TAGGED"
  for _ in $(seq 100); do [ "$(vm_field "['nova_tag']['read_ms'] is not None")" = True ] && break; sleep 0.1; done
  check "tagging: server read, no ax:level, level none" \
    test "$(vm_field "['nova_tag']['value'], d['nova_tag']['error'], d['level']")" = "None None none"

  T0=$(date +%s.%N)
  tag ha
  T1=$(date +%s.%N)
  check "tagging: ax:level=ha -> level ha" wait_level ha
  T2=$(date +%s.%N)
  TAG_HA_S=$(echo "$T2 - $T0" | bc) TAG_HA_AFTER_CLI_S=$(echo "$T2 - $T1" | bc)
  check "tagging: the event names the origin" \
    test "$(events_with "level set from Nova metadata ax:level=ha of server $TAGGED")" = 1
  check "tagging: the VM kept running through none -> ha" test "$(vm_field "['state']")" = running

  T0=$(date +%s.%N)
  tag none
  check "tagging: ax:level=none -> level none" wait_level none
  TAG_NONE_S=$(echo "$(date +%s.%N) - $T0" | bc)

  tag gold
  for _ in $(seq 300); do [ "$(events_with 'ax:level=\"gold\"')" -ge 1 ] && break; sleep 0.1; done
  two_more_reads
  check "tagging: ax:level=gold -> one warning event, however many reads" \
    test "$(axc --json events --vm tagged --limit 1000 | grep -F 'ax:level=\"gold\"' | grep -c '"detail":"warning: ')" = 1
  check "tagging: ax:level=gold -> level unchanged (none)" settled none

  tag ha
  wait_level ha
  refused=$(axc vm set-level tagged none 2>&1)
  rc=$?
  echo "  axctl vm set-level tagged none -> exit $rc: $refused"
  check "tagging: a set-level contradicting the tag is refused (conflict, exit 4)" test "$rc" = 4
  check "tagging: the refusal names the tag" grep -qF "ax:level=ha on Nova server $TAGGED" <<<"$refused"
  check "tagging: the level stays ha" settled ha

  # Tag write -> level change, without the openstack CLI's own seconds: the metadata written straight
  # through the compute API, 6 times (none/ha alternately, ending at ha). Reported, not asserted.
  LAT=()
  for l in none ha none ha none ha; do
    t0=$(date +%s.%N)
    api POST "/servers/$TAGGED/metadata" "{\"metadata\": {\"ax:level\": \"$l\"}}" >/dev/null
    for _ in $(seq 600); do settled "$l" && break; sleep 0.05; done
    LAT+=("$(echo "$(date +%s.%N) - $t0" | bc)")
  done
  check "tagging: 6 tag writes through the compute API, each followed" settled ha

  openstack server unset --property ax:level "$TAGGED"
  for _ in $(seq 100); do [ "$(vm_field "['nova_tag']['value']")" = None ] && break; sleep 0.1; done
  check "tagging: tag removed -> the API decides again" axc vm set-level tagged none --wait
  two_more_reads
  check "tagging: no tag -> the level the API set stays" settled none

  line=$(python3 -c "import json, statistics, sys; a = [round(float(x), 2) for x in sys.argv[4:]]
print(json.dumps({'bench': 'nova_tagging', 'tag_poll_s': 1,
  'openstack_server_set': {'ha_after_start_s': round(float(sys.argv[1]), 2),
    'ha_after_return_s': round(float(sys.argv[2]), 2), 'none_after_start_s': round(float(sys.argv[3]), 2)},
  'api_write_to_level_s': {'runs': a, 'min': min(a), 'median': statistics.median(a), 'max': max(a)}}))" \
    "$TAG_HA_S" "$TAG_HA_AFTER_CLI_S" "$TAG_NONE_S" "${LAT[@]}")
  echo "  $line"
  axc vm delete tagged >/dev/null
  tags_stop
  api DELETE "/servers/$TAGGED" >/dev/null
else
  echo "SKIPPED: scenario 6 (Nova tagging): needs /dev/kvm (a native VM runs)"
fi

# ---------- 7. benchmark: 1 and 8 VMs ----------
if [ "${AX_E2E_BENCH:-1}" = 1 ]; then
  BENCH=()
  for n in 1 8; do
    elog "benchmark: $n HA VM(s) on compute1, host killed"
    ids=()
    for i in $(seq "$n"); do ids+=("$(boot "bench$n-$i" ha)"); done
    for id in "${ids[@]}"; do wait_state "$id" "ACTIVE compute1 None" || exit 1; done
    ha_start compute1 || exit 1
    REC=$(next_recovery)
    kill -KILL -- "-$(os_compute_pid 1)" "-$(cat "$R/pids/ha-compute1")"
    T_KILL=$(date +%s.%N)
    done_ev=$(ev wait "$R/ha/compute2.events" recovery_finished compute1 "$REC" 300)
    check "benchmark $n VM(s): all recovered" grep -q "\"recovered\":$n,\"failed\":0" <<<"$done_ev"
    line=$(ev list "$R/ha/compute2.events" compute1 "$REC" | python3 -c "
import json, sys
e = [json.loads(l) for l in sys.stdin]
t = lambda k, f=min: f([x['at_ms'] for x in e if x['event'] == k])
hb = [x['last_heartbeat_ms'] for x in e if x['event'] == 'host_dead'][0]
s = lambda ms: round((ms - hb) / 1000.0, 2)
print(json.dumps({'vms': $n, 'kill_to_last_heartbeat_s': round((hb - $T_KILL * 1000) / 1000.0, 2),
  'declared_dead_s': s(t('host_dead')), 'fenced_s': s(t('fenced')), 'forced_down_s': s(t('forced_down')),
  'first_accepted_s': s(t('evacuation_accepted')), 'all_accepted_s': s(t('evacuation_accepted', max)),
  'all_active_s': s(t('vm_recovered', max))}))")
    echo "  $line"
    BENCH+=("$line")
    check "benchmark $n VM(s): evacuation accepted <= 10 s after the last heartbeat" \
      python3 -c "import json,sys; sys.exit(0 if json.loads(sys.argv[1])['all_accepted_s'] <= 10 else 1)" "$line"
    restore_compute1 "${ids[@]}" || exit 1
    for id in "${ids[@]}"; do api DELETE "/servers/$id" >/dev/null; done
  done
  python3 - "${BENCH[@]}" <<'EOF'
import json, sys
runs = [json.loads(a) for a in sys.argv[1:]]
print(json.dumps({"bench": "ha_evacuation", "target_accepted_s": 10,
  "masakari_default": {"wait_after_service_disable_s": 180,
                       "note": "masakari-engine waits wait_period_after_service_update=180 s after disabling the service before it evacuates (detection time not included)"},
  "runs": runs}))
EOF
fi

echo "$PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
