#!/usr/bin/env bash
# Installs paygate for systemd: the binary, the worker template unit and target, an example
# environment file, the `paygate` system user and /etc/paygate/tls. Run as root from the
# repository:
#
#   sudo bash scripts/install.sh            # builds target/release/paygate if needed
#   sudo systemctl enable --now paygate@{1..4}.service paygate.target
#
# Safe to run again to upgrade: the binary and units are replaced, /etc/paygate/paygate.env
# and certificates are never overwritten. Roll workers onto a new binary one at a time:
#   for i in 1 2 3 4; do systemctl restart paygate@$i; sleep 1; done
#
# Variables: PAYGATE_BIN (binary to install; default target/release/paygate, built if
# missing), PREFIX (default /usr/local), DESTDIR (stage into a directory instead of /:
# no user is created, nothing is chown'd, systemctl is not called — for packaging).
#
# Options: --help prints this; --dry-run prints what would be done and changes nothing.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

usage() {
  cat <<'USAGE'
Usage: sudo bash scripts/install.sh [--dry-run]
       bash scripts/install.sh --help

Installs paygate for systemd: the binary into $PREFIX/bin, the paygate@.service template
and paygate.target into /etc/systemd/system, an example /etc/paygate/paygate.env (never
overwritten), the system user `paygate` and /etc/paygate/tls.

  --dry-run   print every step, change nothing (no root needed)
  --help      print this and exit

Environment: PAYGATE_BIN (binary to install; default target/release/paygate, built if
missing), PREFIX (default /usr/local), DESTDIR (stage into a directory instead of /: no
user is created, nothing is chown'd, systemctl is not called).
USAGE
}

dry_run=false
for arg in "$@"; do
  case "$arg" in
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=true ;;
    *) echo "install.sh: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
bin=${PAYGATE_BIN:-$root/target/release/paygate}

# run CMD...: runs it, or with --dry-run prints it.
run() {
  if $dry_run; then
    printf 'would run:'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

if ! $dry_run && [ -z "$DESTDIR" ] && [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (or set DESTDIR to stage the files)" >&2
  exit 1
fi
if [ ! -x "$bin" ]; then
  if [ -n "${PAYGATE_BIN:-}" ]; then
    echo "install.sh: PAYGATE_BIN=$bin is not an executable" >&2
    exit 1
  fi
  echo "== building $bin"
  run bash -c "cd '$root' && cargo build --release --locked"
fi

staged() { printf '%s%s' "$DESTDIR" "$1"; }

if [ -z "$DESTDIR" ] && ! getent passwd paygate >/dev/null; then
  echo "== creating the system user paygate"
  run useradd --system --user-group --home-dir /var/lib/paygate --no-create-home \
    --shell /usr/sbin/nologin --comment "paygate payments API" paygate
fi

echo "== installing $(staged "$PREFIX/bin/paygate")"
# `install` writes a new file and renames it into place: running workers keep the old
# binary until they are restarted.
run install -D -m 0755 "$bin" "$(staged "$PREFIX/bin/paygate")"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for unit in paygate@.service paygate.target; do
  sed "s#/usr/local/#$PREFIX/#g" "$root/etc/systemd/$unit" > "$scratch/$unit"
  run install -D -m 0644 "$scratch/$unit" "$(staged "/etc/systemd/system/$unit")"
done
run install -D -m 0644 "$root/README.md" "$(staged "$PREFIX/share/doc/paygate/README.md")"
for doc in "$root"/docs/*.md; do
  run install -D -m 0644 "$doc" "$(staged "$PREFIX/share/doc/paygate/docs/$(basename "$doc")")"
done

run install -d -m 0750 "$(staged /etc/paygate)" "$(staged /etc/paygate/tls)"
env_file=$(staged /etc/paygate/paygate.env)
if [ -e "$env_file" ]; then
  echo "== keeping $env_file (the new example is in $root/etc/paygate.env)"
else
  run install -m 0640 "$root/etc/paygate.env" "$env_file"
  $dry_run || echo "== wrote $env_file: review it"
fi
if [ -z "$DESTDIR" ]; then
  run chown root:paygate /etc/paygate /etc/paygate/tls /etc/paygate/paygate.env
fi

if [ ! -e "$(staged /etc/paygate/tls/server.crt)" ]; then
  cat <<MSG
== no certificate yet: put the PEM certificate chain and key in /etc/paygate/tls/
   (server.crt, server.key). The key must be readable by the paygate user alone (paygate
   refuses a key that group or others can read):
     chown paygate:paygate /etc/paygate/tls/server.key; chmod 0600 /etc/paygate/tls/server.key
   For a trial only:
     $PREFIX/bin/paygate dev-cert --tls-cert /etc/paygate/tls/server.crt --tls-key /etc/paygate/tls/server.key
     chown paygate:paygate /etc/paygate/tls/server.*
MSG
fi

if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
  run systemctl daemon-reload
fi
if $dry_run; then
  echo "== dry run: nothing was changed"
  exit 0
fi
cat <<MSG
== installed. Start one worker per CPU ($(nproc) here) and the target that groups them:
     systemctl enable --now paygate@{1..$(nproc)}.service paygate.target
   Administration runs as the service user, on its data directory:
     sudo -u paygate $PREFIX/bin/paygate user add alice --role admin --data-dir /var/lib/paygate
MSG
