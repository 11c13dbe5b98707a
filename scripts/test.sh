#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need into .venv
# (inside the repository, ignored by git), checks formatting and lints (template.yaml too),
# starts an AWS emulator (moto) on a free loopback port, runs every test on the embedded
# backends, runs the end-to-end suites again on DynamoDB, SQS and S3 in the emulator, and
# stops the emulator.
# Extra arguments go to `cargo test --workspace` in both passes (e.g. `scripts/test.sh --test submit`).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
stamp=.venv/.requirements-installed
if [ ! -x .venv/bin/python ] || ! cmp -s scripts/requirements-test.txt "$stamp"; then
  echo "==> installing test tools into .venv"
  "$python" -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r scripts/requirements-test.txt
  cp scripts/requirements-test.txt "$stamp"
fi
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
for _ in $(seq 1 100); do
  if .venv/bin/python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/moto-api/')" 2>/dev/null; then
    break
  fi
  sleep 0.2
done
# Dummy credentials for the emulator only; nothing here talks to AWS.
unset AWS_PROFILE AWS_SESSION_TOKEN AWS_DEFAULT_PROFILE
export AWS_ENDPOINT_URL="http://127.0.0.1:$port" AWS_REGION=us-east-1 \
  AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_EC2_METADATA_DISABLED=true

echo "==> cargo test (embedded backends; AWS adapter tests on the emulator)"
cargo test --workspace --locked "$@"

echo "==> cargo test (the end-to-end suites on DynamoDB, SQS and S3 in the emulator)"
if [ "$#" -gt 0 ]; then
  TASKLANE_TEST_BACKEND=aws cargo test --workspace --locked "$@"
else
  # --workspace keeps the feature set of the first pass: nothing is rebuilt.
  TASKLANE_TEST_BACKEND=aws cargo test --workspace --locked \
    --test lifecycle --test submit --test webhooks --test errors --test races --test faults --test soak
fi
