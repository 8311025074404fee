#!/usr/bin/env bash
# Packs built binaries with their non-system shared libraries (gRPC, protobuf, Abseil, RocksDB, ...) into
# .gpu/ so they run on the GPU machine, which has CUDA, NCCL and glibc but none of our Debian libraries.
# CUDA runtime and NCCL are never packed: the GPU machine's own are used. Usage:
#   tools/gpu_bundle.sh [BUILD_DIR] [BINARY ...]   (default: build/default, v4serve and every gpu-labelled test)
# Then on the device: LD_LIBRARY_PATH=$PWD/.gpu/lib .gpu/<binary>
set -euo pipefail
cd "$(dirname "$0")/.."
build="${1:-build/default}"
shift || true
bins=("$@")
if [ ${#bins[@]} -eq 0 ]; then
  bins=("$build/v4serve")
  while read -r t; do bins+=("$(find "$build/tests" -name "$t" -type f -executable | head -1)"); done \
    < <(ctest --test-dir "$build" -L gpu -N | sed -n 's/^ *Test *#[0-9]*: //p')
fi
rm -rf .gpu && mkdir -p .gpu/lib
for b in "${bins[@]}"; do
  cp "$b" .gpu/
  ldd "$b" | awk '$3 ~ /^\// {print $3}' |
    grep -v -E 'lib(c|m|dl|rt|pthread|gcc_s|stdc\+\+|cudart|cuda|nccl|cublas|cublasLt)\.so|ld-linux' |
    xargs -r -I{} cp -L -n {} .gpu/lib/
done
strip .gpu/* .gpu/lib/* 2>/dev/null || true
exclude="$(git rev-parse --git-common-dir)/info/exclude"  # .git is a file in a worktree
grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >> "$exclude"
du -sh .gpu
