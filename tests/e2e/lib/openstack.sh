# A real mini OpenStack for ax's end-to-end tests, on 127.0.0.1 only (sourced by tests/e2e/nova.sh).
#
#   os_install   venv (nova, placement, keystone, openstackclient, psycopg2, gunicorn) and Debian's
#                rabbitmq-server, only what is missing
#   os_up        wipe the run state, start PostgreSQL, RabbitMQ, the image/network stand-in, Keystone,
#                Placement, nova-api, nova-conductor, nova-scheduler, nova-compute on compute1 and compute2
#                (fake.FakeDriverWithoutFakeNodes); map the hosts; create flavor ax.tiny
#   os_down      stop every process os_up started (by its saved PID: each runs in its own session, so
#                its PID is its process group; nothing else is signalled)
#   os_start_compute N / os_compute_pid N
#
# State: $AX_E2E_STATE (default /var/tmp/ax-e2e-nova): venv/ is kept between runs, run/ is per run.
# Ports (all 127.0.0.1): Keystone 25000, Placement 28778, nova-api 28774, image stand-in 29292, network
# stand-in 29696, PostgreSQL 25432, RabbitMQ 25672 (distribution 25673, own epmd 24369).

AX_E2E_STATE=${AX_E2E_STATE:-/var/tmp/ax-e2e-nova}
export AX_E2E_STATE
E2E_LIB="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV=$AX_E2E_STATE/venv
R=$AX_E2E_STATE/run
export AX_E2E_RUN=$R
KS_PORT=25000 PLACEMENT_PORT=28778 NOVA_PORT=28774 IMAGE_PORT=29292 NETWORK_PORT=29696
PG_PORT=25432 RABBIT_PORT=25672 RABBIT_DIST_PORT=25673 EPMD_PORT=24369
KS_URL=http://127.0.0.1:$KS_PORT/v3
NOVA_URL=http://127.0.0.1:$NOVA_PORT/v2.1
IMAGE_ID=a0e0e000-0000-4000-8000-00000000a0e0
PG_BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
OS_SERVICES="nova-api nova-compute1 nova-compute2 nova-scheduler nova-conductor placement keystone standin"

elog() { echo "[$(date +%T.%3N)] $*"; }

# start NAME CMD...: detached in its own session (PID = process group), output to run/logs/NAME.out.
# Started from a subshell, so it is not this shell's job: init reaps it, and killing it prints nothing.
start_bg() {
  local n=$1
  shift
  (
    setsid "$@" >"$R/logs/$n.out" 2>&1 </dev/null &
    echo $! >"$R/pids/$n"
  )
}

wait_http() {
  local url=$1 tries=${2:-240}
  for _ in $(seq "$tries"); do
    curl -s -o /dev/null "$url" && return 0
    sleep 0.5
  done
  elog "timeout waiting for $url"
  return 1
}

os_install() {
  if [ ! -x "$VENV/bin/nova-compute" ] || [ ! -x "$VENV/bin/gunicorn" ] || [ ! -x "$VENV/bin/openstack" ]; then
    elog "creating the OpenStack venv in $VENV (about 2 minutes)"
    mkdir -p "$AX_E2E_STATE"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q nova openstack-placement keystone python-openstackclient psycopg2-binary gunicorn
  fi
  if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
    elog "installing rabbitmq-server (Debian)"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends rabbitmq-server >/dev/null
  fi
  if [ -z "$PG_BIN" ] || [ ! -x "$PG_BIN/postgres" ]; then
    elog "installing postgresql (Debian)"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql >/dev/null
    PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  fi
  # The Debian package starts its own broker/cluster on install where systemd runs; we use our own.
}

rabbit_env() {
  export HOME=$R/rabbit/home RABBITMQ_NODENAME=axe2e@localhost RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT=$RABBIT_PORT RABBITMQ_DIST_PORT=$RABBIT_DIST_PORT ERL_EPMD_ADDRESS=127.0.0.1
  export ERL_EPMD_PORT=$EPMD_PORT RABBITMQ_MNESIA_BASE=$R/rabbit/mnesia RABBITMQ_LOG_BASE=$R/rabbit/log
  export RABBITMQ_CONFIG_FILE=$R/rabbit/rabbitmq RABBITMQ_ENABLED_PLUGINS_FILE=$R/rabbit/enabled_plugins
  export RABBITMQ_PID_FILE=$R/rabbit/beam.pid
  export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
}

dburl() { echo "postgresql+psycopg2://postgres@127.0.0.1:$PG_PORT/$1"; }

os_write_configs() {
  local auth
  auth="auth_url = $KS_URL
auth_type = password
project_domain_name = Default
user_domain_name = Default
project_name = service
region_name = RegionOne"
  cat >"$R/etc/keystone/keystone.conf" <<EOF
[DEFAULT]
log_file = $R/logs/keystone.log
[database]
connection = $(dburl keystone)
[token]
provider = fernet
[fernet_tokens]
key_repository = $R/keystone/fernet-keys
[fernet_receipts]
key_repository = $R/keystone/fernet-keys
[credential]
key_repository = $R/keystone/credential-keys
EOF
  cat >"$R/etc/placement/placement.conf" <<EOF
[DEFAULT]
log_file = $R/logs/placement.log
[placement_database]
connection = $(dburl placement)
[api]
auth_strategy = keystone
[keystone_authtoken]
www_authenticate_uri = $KS_URL
$auth
username = placement
password = placement
EOF
  cp "$VENV/etc/nova/api-paste.ini" "$R/etc/nova/"
  # Shared by every nova service; no [database] here: nova-compute must not have DB access.
  cat >"$R/etc/nova/nova.conf" <<EOF
[DEFAULT]
transport_url = rabbit://guest:guest@127.0.0.1:$RABBIT_PORT/
compute_driver = fake.FakeDriverWithoutFakeNodes
state_path = $R/nova
my_ip = 127.0.0.1
[wsgi]
api_paste_config = $R/etc/nova/api-paste.ini
[api]
auth_strategy = keystone
[conductor]
workers = 1
[scheduler]
workers = 1
discover_hosts_in_cells_interval = -1
[keystone_authtoken]
www_authenticate_uri = $KS_URL
$auth
username = nova
password = nova
[placement]
$auth
username = placement
password = placement
[neutron]
$auth
username = nova
password = nova
[glance]
region_name = RegionOne
[oslo_concurrency]
lock_path = $R/nova/lock
[oslo_messaging_notifications]
driver = noop
[quota]
instances = -1
cores = -1
ram = -1
EOF
  cat >"$R/etc/nova/nova-db.conf" <<EOF
[api_database]
connection = $(dburl nova_api)
[database]
connection = $(dburl nova_cell1)
EOF
  local n
  for n in 1 2; do
    cat >"$R/etc/nova/compute$n.conf" <<EOF
[DEFAULT]
host = compute$n
state_path = $R/nova/compute$n
instances_path = $R/nova/compute$n/instances
EOF
  done
  cat >"$R/admin.env" <<EOF
OS_AUTH_URL=$KS_URL
OS_USERNAME=admin
OS_PASSWORD=admin
OS_PROJECT_NAME=admin
OS_USER_DOMAIN_NAME=Default
OS_PROJECT_DOMAIN_NAME=Default
OS_IDENTITY_API_VERSION=3
OS_REGION_NAME=RegionOne
OS_INTERFACE=public
EOF
}

os_start_compute() {
  start_bg "nova-compute$1" "$VENV/bin/nova-compute" --config-file "$R/etc/nova/nova.conf" \
    --config-file "$R/etc/nova/compute$1.conf" --log-file "$R/logs/nova-compute$1.log"
}

os_compute_pid() { cat "$R/pids/nova-compute$1"; }

os_up() {
  local t0 nova_conf gunicorn
  t0=$(date +%s.%N)
  if [ -d "$R/pids" ] && [ -n "$(ls -A "$R/pids" 2>/dev/null)" ]; then
    elog "leftover services of an earlier run: stopping them"
    os_down
  fi
  rm -rf "$R"
  mkdir -p "$R"/{logs,pids,etc/keystone,etc/placement,etc/nova,keystone/fernet-keys,keystone/credential-keys} \
    "$R"/nova/{lock,compute1,compute2} "$R"/rabbit/{mnesia,log,home} "$R/pgsock"
  export PATH=$VENV/bin:/usr/lib/rabbitmq/bin:$PATH PYTHONWARNINGS=ignore
  os_write_configs

  # PostgreSQL, as user postgres, on our own port and socket directory.
  mkdir -p "$R/pgdata"
  chown postgres: "$R/pgdata" "$R/pgsock"
  setpriv --reuid=postgres --regid=postgres --init-groups "$PG_BIN/initdb" -D "$R/pgdata" -A trust -U postgres \
    >"$R/logs/initdb.log" 2>&1
  start_bg postgres setpriv --reuid=postgres --regid=postgres --init-groups "$PG_BIN/postgres" -D "$R/pgdata" \
    -c listen_addresses=127.0.0.1 -p $PG_PORT -k "$R/pgsock" -c fsync=off -c synchronous_commit=off \
    -c full_page_writes=off -c max_connections=300

  # RabbitMQ with its own epmd (so that its PID is ours to stop).
  printf 'listeners.tcp.1 = 127.0.0.1:%s\nloopback_users = none\n' $RABBIT_PORT >"$R/rabbit/rabbitmq.conf"
  echo '[].' >"$R/rabbit/enabled_plugins"
  (
    rabbit_env
    start_bg epmd epmd -address 127.0.0.1 -port $EPMD_PORT
    sleep 0.3
    start_bg rabbitmq /usr/lib/rabbitmq/bin/rabbitmq-server
  )
  start_bg standin "$VENV/bin/python" -u "$E2E_LIB/image_network_standin.py" $IMAGE_PORT $NETWORK_PORT

  for _ in $(seq 120); do "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p $PG_PORT && break; sleep 0.25; done
  local db
  for db in keystone placement nova_api nova_cell0 nova_cell1; do
    "$PG_BIN/psql" -q -h 127.0.0.1 -p $PG_PORT -U postgres -c "CREATE DATABASE $db" >/dev/null
  done

  local K="--config-file $R/etc/keystone/keystone.conf"
  keystone-manage $K db_sync >>"$R/logs/manage.log" 2>&1
  keystone-manage $K fernet_setup --keystone-user root --keystone-group root >>"$R/logs/manage.log" 2>&1
  keystone-manage $K credential_setup --keystone-user root --keystone-group root >>"$R/logs/manage.log" 2>&1
  keystone-manage $K bootstrap --bootstrap-password admin --bootstrap-region-id RegionOne \
    --bootstrap-admin-url $KS_URL --bootstrap-internal-url $KS_URL --bootstrap-public-url $KS_URL \
    >>"$R/logs/manage.log" 2>&1
  gunicorn="$VENV/bin/gunicorn --chdir $E2E_LIB/wsgi --workers 1 --threads 4 --no-control-socket"
  start_bg keystone $gunicorn --bind 127.0.0.1:$KS_PORT --access-logfile "$R/logs/keystone-access.log" \
    keystone_app:application
  nova_conf="--config-file $R/etc/nova/nova.conf --config-file $R/etc/nova/nova-db.conf"
  placement-manage --config-file "$R/etc/placement/placement.conf" db sync >>"$R/logs/manage.log" 2>&1
  nova-manage $nova_conf api_db sync >>"$R/logs/manage.log" 2>&1
  nova-manage $nova_conf cell_v2 map_cell0 --database_connection "$(dburl nova_cell0)" >>"$R/logs/manage.log" 2>&1
  nova-manage $nova_conf cell_v2 create_cell --name cell1 >>"$R/logs/manage.log" 2>&1
  nova-manage $nova_conf db sync >>"$R/logs/manage.log" 2>&1
  wait_http "$KS_URL"
  "$VENV/bin/python" "$E2E_LIB/keystone_setup.py" "$KS_URL" "$NOVA_URL" "http://127.0.0.1:$PLACEMENT_PORT" \
    "http://127.0.0.1:$IMAGE_PORT" "http://127.0.0.1:$NETWORK_PORT" >>"$R/logs/manage.log" 2>&1
  start_bg placement $gunicorn --bind 127.0.0.1:$PLACEMENT_PORT --access-logfile "$R/logs/placement-access.log" \
    placement_app:application

  (rabbit_env && timeout 120 rabbitmqctl -q await_startup)
  start_bg nova-conductor "$VENV/bin/nova-conductor" $nova_conf --log-file "$R/logs/nova-conductor.log"
  start_bg nova-scheduler "$VENV/bin/nova-scheduler" $nova_conf --log-file "$R/logs/nova-scheduler.log"
  os_start_compute 1
  os_start_compute 2
  OS_NOVA_CONFIG_FILES="api-paste.ini;nova.conf;nova-db.conf" start_bg nova-api $gunicorn \
    --bind 127.0.0.1:$NOVA_PORT --access-logfile "$R/logs/nova-api-access.log" nova_api_app:application
  wait_http "http://127.0.0.1:$PLACEMENT_PORT/"
  wait_http "$NOVA_URL"

  set -a
  . "$R/admin.env"
  set +a
  local up=0
  for _ in $(seq 180); do
    up=$(openstack compute service list --service nova-compute -f value -c State 2>/dev/null | grep -c '^up$' || true)
    [ "$up" = 2 ] && break
    sleep 1
  done
  [ "$up" = 2 ] || { elog "nova-compute services did not come up"; return 1; }
  nova-manage $nova_conf cell_v2 discover_hosts >>"$R/logs/manage.log" 2>&1
  openstack flavor create --vcpus 1 --ram 512 --disk 1 ax.tiny >/dev/null
  elog "OpenStack up in $(printf '%.0f' "$(echo "$(date +%s.%N) - $t0" | bc)") s"
}

os_down() {
  [ -d "$R/pids" ] || return 0
  local s p pids=()
  alive() { kill -0 "$1" 2>/dev/null; }
  for s in $OS_SERVICES $(cd "$R/pids" && ls | grep -vxE 'rabbitmq|postgres|epmd|'"${OS_SERVICES// /|}"); do
    [ -s "$R/pids/$s" ] || continue
    p=$(cat "$R/pids/$s")
    alive "$p" && { kill -TERM -- "-$p" 2>/dev/null || kill -TERM "$p"; pids+=("$p"); }
  done
  if [ -s "$R/pids/rabbitmq" ] && alive "$(cat "$R/pids/rabbitmq")"; then
    (rabbit_env && timeout 30 /usr/lib/rabbitmq/bin/rabbitmqctl -q stop >/dev/null 2>&1) || true
    pids+=("$(cat "$R/pids/rabbitmq")")
  fi
  if [ -s "$R/pids/postgres" ] && alive "$(cat "$R/pids/postgres")"; then
    p=$(cat "$R/pids/postgres")
    # setpriv execs postgres: the PID is the postmaster's. SIGINT = fast shutdown.
    kill -INT "$p" 2>/dev/null
    pids+=("$p")
  fi
  for _ in $(seq 60); do
    local left=0
    for p in "${pids[@]}"; do alive "$p" && left=1; done
    [ $left = 0 ] && break
    sleep 0.25
  done
  for p in "${pids[@]}"; do alive "$p" && { kill -KILL -- "-$p" 2>/dev/null || kill -KILL "$p" 2>/dev/null; }; done
  if [ -s "$R/pids/epmd" ] && alive "$(cat "$R/pids/epmd")"; then kill "$(cat "$R/pids/epmd")"; fi
  rm -f "$R"/pids/*
}
