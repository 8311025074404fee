#!/usr/bin/env bash
# kill -9 the real `v4serve kvstore` during writes, N times (default 50), restart it on the same
# directory each time, and check that every restart opens and no corrupt block is ever served
# (tests/e2e/kvstore_kill_e2e_test.cc; docs/KV_STORE.md "Crash safety"). Prints the numbers.
#
#   tools/kvstore_kill_test.sh [iterations] [build dir]
set -euo pipefail
iterations="${1:-50}"
build="${2:-build/default}"
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
cmake --build "$build" --target v4serve e2e_kvstore_kill_test -j2 >/dev/null
V4SERVE_KILL_ITERATIONS="$iterations" V4SERVE_BINARY_DIR="$root/$build" \
  "$build/tests/e2e/e2e_kvstore_kill_test" 2>&1 | grep -v '^20[0-9][0-9]-.* info '
