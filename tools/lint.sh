#!/usr/bin/env bash
# clang-format (check) and clang-tidy over every C++ file of ours. Needs build/default/compile_commands.json
# (tools/setup.sh build). Usage: tools/lint.sh [--fix]
set -euo pipefail
cd "$(dirname "$0")/.."
files=$(git ls-files '*.cc' '*.h' | grep -v '^build/')
if [ "${1:-}" = "--fix" ]; then
  clang-format -i $files
else
  clang-format --dry-run -Werror $files
fi
[ -f build/default/compile_commands.json ] || { echo "run tools/setup.sh build first" >&2; exit 2; }
sources=$(git ls-files '*.cc' | grep -v '^build/')
printf '%s\n' $sources | xargs -P "$(nproc)" -n 4 clang-tidy -p build/default --quiet 2>&1 \
  | grep -v "warnings generated" || true
printf '%s\n' $sources | xargs -P "$(nproc)" -n 4 clang-tidy -p build/default --quiet >/dev/null 2>&1
