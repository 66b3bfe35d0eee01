"""Reads the JSON-lines event files of `ax-agent ha-node` for tests/e2e/nova.sh.

  events.py wait FILE EVENT HOST MIN_RECOVERY TIMEOUT_S   print the first matching event, exit 1 on timeout
  events.py list FILE HOST MIN_RECOVERY                   print the matching events, one JSON per line
"""
import json
import sys
import time


def load(path):
    out = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass
    except FileNotFoundError:
        pass
    return out


def matching(path, host, min_recovery):
    return [e for e in load(path) if e.get("host") == host and e.get("recovery", 0) >= min_recovery]


cmd = sys.argv[1]
if cmd == "wait":
    path, event, host, min_rec, timeout = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), float(sys.argv[6])
    end = time.time() + timeout
    while True:
        for e in matching(path, host, min_rec):
            if e.get("event") == event:
                print(json.dumps(e, separators=(",", ":")))
                sys.exit(0)
        if time.time() > end:
            sys.exit(1)
        time.sleep(0.1)
elif cmd == "list":
    for e in matching(sys.argv[2], sys.argv[3], int(sys.argv[4])):
        print(json.dumps(e, separators=(",", ":")))
else:
    sys.exit("unknown command " + cmd)
