#!/usr/bin/env bash
# Creates the golden-generation virtualenv at the repository root (.venv, gitignored) from PyPI.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
python3 -m venv "$root/.venv"
"$root/.venv/bin/pip" install -r "$root/tools/golden/requirements.txt"
