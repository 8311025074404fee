#!/usr/bin/env bash
# The golden-generation tools run in the project's one virtualenv (.venv, gitignored), which also holds the
# test requirements (the openai SDK e2e test uses it): tools/setup.sh makes and updates it.
set -euo pipefail
exec "$(cd "$(dirname "$0")/../.." && pwd)/tools/setup.sh" golden
