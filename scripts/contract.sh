#!/usr/bin/env bash
# Contract test: runs schemathesis (scripts/requirements-test.txt, installed into .venv by
# scripts/test.sh) with every check against a local server built beforehand, using
# openapi.yaml, and fails when it finds a disagreement between the server and the document.
#
#   scripts/contract.sh [path/to/tasklane]      (default target/debug/tasklane)
#
# The server gets a free loopback port, a fresh data directory, a fixed development key, no
# rate limit, a high open-task cap, instant demo models and a 1 s wait cap (sync submits and
# `Prefer: wait` return quickly). Everything stays on 127.0.0.1 (it passes in a network
# namespace that has only loopback): schemathesis reads the document from disk; 4.x has no
# telemetry and no upload (3.x's `--report` to a service is gone), and no report is written;
# the only remote fetches it can make are remote `$ref`s and `externalValue` examples, which
# openapi.yaml must not have (checked below); no proxy is passed on; and
# scripts/schemathesis_hooks.py points every generated callback_url at a closed loopback port
# (the server would otherwise deliver webhooks to the public hosts schemathesis makes up).
# CONTRACT_EXAMPLES (default 150) and CONTRACT_SEED (default 20260101) change the run.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${1:-target/debug/tasklane}
venv=${CONTRACT_VENV:-$PWD/.venv}
examples=${CONTRACT_EXAMPLES:-150}
seed=${CONTRACT_SEED:-20260101}
key=tl_contract-test-key-0000000000000000000000000000

if [ ! -x "$bin" ]; then
  echo "contract.sh: no tasklane binary at $bin (build it first: cargo build --locked -p tasklane-local --bin tasklane)" >&2
  exit 2
fi
if [ ! -x "$venv/bin/schemathesis" ]; then
  echo "contract.sh: $venv/bin/schemathesis is missing (pip install -r scripts/requirements-test.txt)" >&2
  exit 2
fi
venv=$(cd "$venv" && pwd)
if grep -nE 'externalValue|\$ref: *["'"'"']?[a-zA-Z][a-zA-Z0-9+.-]*:' openapi.yaml >&2; then
  echo "contract.sh: openapi.yaml refers to something remote (above); schemathesis would fetch it" >&2
  exit 2
fi

# Nothing may leave loopback: no proxy for anything started here.
unset http_proxy https_proxy all_proxy HTTP_PROXY HTTPS_PROXY ALL_PROXY
export no_proxy='127.0.0.1,localhost' NO_PROXY='127.0.0.1,localhost'

tmp=$(mktemp -d "${TMPDIR:-/tmp}/tasklane-contract.XXXXXX")
server_pid=
st_pid=
cleanup() {
  if [ -n "$st_pid" ]; then
    kill "$st_pid" 2>/dev/null || true
    wait "$st_pid" 2>/dev/null || true
  fi
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port=$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"
log="$tmp/server.log"

TASKLANE_ADDR="127.0.0.1:$port" \
  TASKLANE_DATA_DIR="$tmp/data" \
  TASKLANE_DEV_KEY="$key" \
  TASKLANE_DEV_CREDITS=1000000000 \
  TASKLANE_RATE_LIMIT=0 \
  TASKLANE_MAX_OPEN_TASKS=1000000 \
  TASKLANE_DEMO_TIME_SCALE=0 \
  TASKLANE_SYNC_WAIT_CAP=1 \
  TASKLANE_SHUTDOWN_GRACE=2 \
  NO_COLOR=1 \
  "$bin" > "$log" 2>&1 &
server_pid=$!

# Ready once GET /v1/models answers 200 with the key; fail with the server's log otherwise.
ready=
why="did not answer within 30 s"
deadline=$((SECONDS + 30))
while [ "$SECONDS" -lt "$deadline" ]; do
  if ! kill -0 "$server_pid" 2>/dev/null; then
    code=0
    wait "$server_pid" || code=$?
    server_pid=
    why="exited (status $code) before answering"
    break
  fi
  if "$venv/bin/python" - "$base/v1/models" "$key" <<'EOF' 2>/dev/null; then
import sys, urllib.request
req = urllib.request.Request(sys.argv[1], headers={"Authorization": "Bearer " + sys.argv[2]})
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
sys.exit(0 if opener.open(req, timeout=2).status == 200 else 1)
EOF
    ready=1
    break
  fi
  sleep 0.2
done
if [ -z "$ready" ]; then
  echo "contract.sh: the server ($bin) at $base $why; its log:" >&2
  cat "$log" >&2
  exit 1
fi

echo "==> schemathesis against $base ($examples examples per operation, seed $seed)"
# Run from the temporary directory: schemathesis keeps a cache (.schemathesis/) and Hypothesis
# a database in the working directory, and a schemathesis.toml there would change the run.
repo=$PWD
status=0
(
  cd "$tmp"
  SCHEMATHESIS_HOOKS="$repo/scripts/schemathesis_hooks.py" \
    HYPOTHESIS_STORAGE_DIRECTORY="$tmp/hypothesis" \
    exec "$venv/bin/schemathesis" run "$repo/openapi.yaml" \
    --url "$base" \
    --header "Authorization: Bearer $key" \
    --checks all \
    --seed "$seed" \
    --max-examples "$examples" \
    --generation-database none \
    --request-timeout 10 \
    --no-color
) &
# In the background and waited for, so that a signal to this script stops the run at once.
st_pid=$!
wait "$st_pid" || status=$?
st_pid=
if [ "$status" -ne 0 ]; then
  echo "contract.sh: schemathesis failed (exit $status); the last lines of the server's log:" >&2
  tail -n 50 "$log" >&2
fi
exit "$status"
