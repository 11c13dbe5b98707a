#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need into .venv
# (inside the repository, ignored by git), checks formatting and lints, then runs every test.
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh --test submit`).
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
echo "==> cargo test"
cargo test --workspace --locked "$@"
