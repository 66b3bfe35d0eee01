#!/bin/bash
# The test fence agent of tests/e2e/nova.sh: "fences" HOST by SIGKILLing its nova-compute and its
# ax-agent ha-node (their PIDs are process groups saved under RUN/pids), and succeeds only when
# both are gone. If RUN/fence-fail exists it fails the way an unreachable BMC does.
#   fence-kill.sh RUN HOST
set -u
run=$1 host=$2
echo "$(date +%s.%N) fence $host" >>"$run/fence.log"
if [ -e "$run/fence-fail" ]; then
  echo "simulated fence failure: BMC of $host unreachable" >&2
  exit 1
fi
alive() { # a zombie (killed, not reaped yet by its parent) counts as dead
  [ -r "/proc/$1/stat" ] && ! sed 's/^.*) //' "/proc/$1/stat" | grep -q '^Z'
}
for name in "nova-$host" "ha-$host"; do
  [ -s "$run/pids/$name" ] || continue
  pid=$(cat "$run/pids/$name")
  kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  for _ in $(seq 100); do alive "$pid" || break; sleep 0.05; done
  if alive "$pid"; then
    echo "$name ($pid) survived SIGKILL" >&2
    exit 1
  fi
done
echo "$(date +%s.%N) fenced $host" >>"$run/fence.log"
exit 0
