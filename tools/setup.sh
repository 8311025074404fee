#!/usr/bin/env bash
# One entry point for a fresh Debian 12 machine (idempotent; safe to run again):
#   tools/setup.sh up [v4serve up flags]   install dependencies, build, start the local cluster
#   tools/setup.sh test [ctest args]       install dependencies, build, run the whole test suite
#   tools/setup.sh deps | build            just those steps
#   tools/setup.sh golden                  also install the heavy Python tools (torch, transformers)
# Environment: V4SERVE_PRESET (default "default"), V4SERVE_JOBS (default: number of cores).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PRESET="${V4SERVE_PRESET:-default}"
JOBS="${V4SERVE_JOBS:-$(nproc)}"
VENV="$ROOT/.venv"

# Debian 12 packages known to build together (../shared/docs/TOOLCHAIN.md, docs/BUILD.md).
APT_PACKAGES=(
  build-essential cmake ninja-build ccache git pkg-config ca-certificates curl openssl procps
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler libabsl-dev
  librocksdb-dev prometheus-cpp-dev libgtest-dev libgmock-dev libbenchmark-dev
  nlohmann-json3-dev libboost1.81-dev python3 python3-venv python3-pip
)

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

install_deps() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
  install_python "$ROOT/tools/requirements-test.txt"
}

# The project's virtualenv; reinstalls only when the requirements file changed.
install_python() {
  local req="$1" stamp
  [ -d "$VENV" ] || { log "creating $VENV"; python3 -m venv "$VENV"; }
  stamp="$VENV/.$(basename "$req").sha256"
  if ! sha256sum --status -c "$stamp" 2>/dev/null; then
    log "installing Python packages from $(basename "$req")"
    "$VENV/bin/pip" install -q --disable-pip-version-check -r "$req"
    sha256sum "$req" > "$stamp"
  fi
}

build() {
  if [ ! -f "$ROOT/build/$PRESET/CMakeCache.txt" ]; then
    log "configuring (preset $PRESET)"
    (cd "$ROOT" && cmake --preset "$PRESET" >/dev/null)
  fi
  log "building (preset $PRESET, $JOBS jobs)"
  (cd "$ROOT" && cmake --build --preset "$PRESET" -j "$JOBS")
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  deps) install_deps ;;
  build) install_deps; build ;;
  up)
    install_deps; build
    exec "$ROOT/build/$PRESET/v4serve" up "$@"
    ;;
  test)
    install_deps; build
    log "running the test suite"
    cd "$ROOT" && exec ctest --preset "$PRESET" -j "$JOBS" "$@"
    ;;
  golden) install_deps; install_python "$ROOT/tools/golden/requirements.txt" ;;
  *)
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
