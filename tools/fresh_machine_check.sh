#!/usr/bin/env bash
# Proves the README's two commands on a fresh Debian 12: makes a minimal bookworm root with debootstrap,
# clones this repository's HEAD into it, and runs `tools/setup.sh test` and then `tools/setup.sh up`
# (checking /healthz) inside it. Needs root and debootstrap. Usage:
#   tools/fresh_machine_check.sh [ROOT_DIR]      (default /var/tmp/v4serve-fresh-root)
# Set KEEP_ROOT=1 to reuse an existing root (skips debootstrap, keeps what an earlier run installed).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT_DIR="${1:-/var/tmp/v4serve-fresh-root}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if [ "${KEEP_ROOT:-0}" != 1 ] || [ ! -x "$ROOT_DIR/bin/bash" ]; then
  rm -rf "$ROOT_DIR"
  debootstrap --variant=minbase bookworm "$ROOT_DIR" "$MIRROR"
fi
cleanup() { umount -l "$ROOT_DIR/proc" "$ROOT_DIR/dev" "$ROOT_DIR/sys" 2>/dev/null || true; }
trap cleanup EXIT
mount -t proc proc "$ROOT_DIR/proc"
mount --rbind /dev "$ROOT_DIR/dev"
mount --rbind /sys "$ROOT_DIR/sys"
cp /etc/resolv.conf "$ROOT_DIR/etc/resolv.conf"
# debootstrap's minbase root has no /etc/hosts, which every installed or containerised Debian has (the
# installer or the container runtime writes it); without it "localhost" does not resolve.
[ -f "$ROOT_DIR/etc/hosts" ] || printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' > "$ROOT_DIR/etc/hosts"
# Hosts whose TLS traffic is intercepted need their CA bundle for pip inside the root.
cp /etc/ssl/certs/ca-certificates.crt "$ROOT_DIR/host-ca.crt"

rm -rf "$ROOT_DIR/root/v4serve"
git clone -q "$REPO" "$ROOT_DIR/root/v4serve"
chroot "$ROOT_DIR" /usr/bin/env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  PIP_CERT=/host-ca.crt /bin/bash -c '
  set -euo pipefail
  cd /root/v4serve
  echo "=== README command (2): tools/setup.sh test"
  tools/setup.sh test
  echo "=== README command (1): tools/setup.sh up"
  (tools/setup.sh up --http_port=18080 --grpc_port=0 --ready_file=/tmp/up.json > /tmp/up.log 2>&1 &)
  for i in $(seq 1 600); do [ -f /tmp/up.json ] && break; sleep 0.5; done
  cat /tmp/up.log
  echo "=== curl /healthz"
  curl -sS -w " (HTTP %{http_code})\n" http://127.0.0.1:18080/healthz
  curl -sS -w " (HTTP %{http_code})\n" http://127.0.0.1:18080/readyz
  kill -TERM "$(python3 -c "import json;print(json.load(open(\"/tmp/up.json\"))[\"pid\"])")"
  for i in $(seq 1 100); do [ -f /tmp/up.json ] || break; sleep 0.2; done
  echo "=== up stopped"
'
