#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine:
#   1. installs what the tests need into .venv (inside the repository, ignored by git) and
#      fetches the crates;
#   2. then, inside a network namespace that has only loopback when it can (root and
#      `unshare`), so no test can reach anything beyond this machine: checks formatting and
#      lints (template.yaml too), starts an AWS emulator (moto) on a free loopback port behind a
#      proxy that gives its DynamoDB the real service's transaction conflicts, runs
#      every test on the embedded backends, runs the end-to-end suites again on DynamoDB, SQS
#      and S3 in the emulator, checks the HTTP contract with schemathesis, and stops the emulator.
#
# Extra arguments go to `cargo test --workspace` (e.g. `scripts/test.sh --test submit`, or a
# test name filter after `--`). The AWS pass then runs only the named suites that run on AWS
# (lifecycle submit webhooks errors races faults soak, and the upstream_* suites), and the contract check only runs
# in the full suite.
set -euo pipefail
cd "$(dirname "$0")/.."

# The suites that run a second time on DynamoDB, SQS and S3 in the emulator.
aws_suites=(lifecycle submit webhooks errors races faults soak upstream_cog upstream_replicate upstream_fal upstream_veo)

if [ -z "${TASKLANE_TEST_ISOLATED:-}" ]; then
  python=${PYTHON:-python3}
  stamp=.venv/.requirements-installed
  if [ ! -x .venv/bin/python ] || ! cmp -s scripts/requirements-test.txt "$stamp"; then
    echo "==> installing test tools into .venv"
    "$python" -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check -r scripts/requirements-test.txt
    cp scripts/requirements-test.txt "$stamp"
  fi
  echo "==> fetching crates"
  cargo fetch --locked

  # Everything below needs nothing from the network: run it where there is none.
  if [ "$(id -u)" = 0 ] && command -v unshare > /dev/null && command -v ip > /dev/null \
    && unshare -n true 2> /dev/null; then
    echo "==> isolated: builds and suites run in a network namespace with only loopback (unshare -n)"
    exec unshare -n env TASKLANE_TEST_ISOLATED=1 bash -c 'ip link set lo up && exec "$0" "$@"' "$0" "$@"
  fi
  echo "==> NOT isolated (needs root, unshare and ip): builds and suites run with this machine's network"
  export TASKLANE_TEST_ISOLATED=0
fi
# The crates were fetched above: nothing below downloads.
export CARGO_NET_OFFLINE=true
export TASKLANE_TEST_PYTHON="$PWD/.venv/bin/python"

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> template.yaml (cfn-lint, sam validate --lint)"
# Offline: neither needs AWS credentials. A profile named in the environment but missing here
# would make sam fail, so none is passed on.
.venv/bin/cfn-lint template.yaml
env -u AWS_PROFILE -u AWS_DEFAULT_PROFILE SAM_CLI_TELEMETRY=0 \
  .venv/bin/sam validate --lint -t template.yaml --region us-east-1

echo "==> starting the AWS emulator (moto)"
port=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
.venv/bin/moto_server -H 127.0.0.1 -p "$port" > .venv/moto.log 2>&1 &
moto_pid=$!
trap 'kill "$moto_pid" 2>/dev/null || true; wait "$moto_pid" 2>/dev/null || true' EXIT
ready=
for _ in $(seq 1 150); do
  if ! kill -0 "$moto_pid" 2> /dev/null; then
    break
  fi
  if .venv/bin/python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/moto-api/', timeout=2)" 2> /dev/null; then
    ready=1
    break
  fi
  sleep 0.2
done
if [ -z "$ready" ]; then
  echo "the AWS emulator did not start on 127.0.0.1:$port; its log (.venv/moto.log):" >&2
  cat .venv/moto.log >&2
  exit 1
fi

# moto runs a transaction's actions one by one on a thread per request, so concurrent
# transactions on one item are neither atomic nor refused; DynamoDB isolates them and cancels
# overlapping ones with TransactionConflict. The suites talk to moto through a proxy that does
# what DynamoDB does (crates/testkit/src/dynamo_proxy.rs), built with the tests.
echo "==> building the tests"
cargo test --workspace --locked --no-run
echo "==> starting the DynamoDB transaction proxy in front of the emulator"
target_dir=$(cargo metadata --format-version 1 --no-deps --locked | .venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
"$target_dir/debug/tasklane-dynamo-proxy" --upstream "http://127.0.0.1:$port" > .venv/proxy.out 2> .venv/proxy.log &
proxy_pid=$!
trap 'kill "$proxy_pid" "$moto_pid" 2>/dev/null || true; wait "$proxy_pid" "$moto_pid" 2>/dev/null || true' EXIT
endpoint=
for _ in $(seq 1 100); do
  endpoint=$(head -n 1 .venv/proxy.out 2> /dev/null || true)
  if [ -n "$endpoint" ] || ! kill -0 "$proxy_pid" 2> /dev/null; then break; fi
  sleep 0.1
done
if [ -z "$endpoint" ]; then
  echo "the DynamoDB transaction proxy did not start; its log (.venv/proxy.log):" >&2
  cat .venv/proxy.log >&2
  exit 1
fi

# Dummy credentials for the emulator only; nothing here talks to AWS.
unset AWS_PROFILE AWS_SESSION_TOKEN AWS_DEFAULT_PROFILE
export AWS_ENDPOINT_URL="$endpoint" AWS_REGION=us-east-1 \
  AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_EC2_METADATA_DISABLED=true

echo "==> cargo test (embedded backends; AWS adapter tests on the emulator)"
cargo test --workspace --locked "$@"
full=$(( $# == 0 ))

# The AWS pass: the suites above that run on AWS, with the same other arguments.
named=() rest=() aws=()
while [ "$#" -gt 0 ]; do
  case "$1" in
    --test) named+=("${2:-}"); shift 2 || shift ;;
    --test=*) named+=("${1#--test=}"); shift ;;
    *) rest+=("$1"); shift ;;
  esac
done
if [ "${#named[@]}" -eq 0 ]; then
  named=("${aws_suites[@]}")
fi
for t in "${named[@]}"; do
  for a in "${aws_suites[@]}"; do
    if [ "$t" = "$a" ]; then aws+=(--test "$t"); fi
  done
done
if [ "${#aws[@]}" -eq 0 ]; then
  echo "==> no AWS pass: none of the named suites runs on AWS (${aws_suites[*]})"
else
  echo "==> cargo test (${aws[*]} on DynamoDB, SQS and S3 in the emulator)"
  # --workspace keeps the feature set of the first pass: nothing is rebuilt.
  TASKLANE_TEST_BACKEND=aws cargo test --workspace --locked "${aws[@]}" ${rest[@]+"${rest[@]}"}
fi

if [ "$full" = 1 ]; then
  echo "==> the HTTP contract (schemathesis against the local server with openapi.yaml)"
  cargo build --locked -p tasklane-local --bin tasklane
  scripts/contract.sh target/debug/tasklane
fi
