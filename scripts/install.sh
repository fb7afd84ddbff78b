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
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
bin=${PAYGATE_BIN:-$root/target/release/paygate}

if [ -z "$DESTDIR" ] && [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (or set DESTDIR to stage the files)" >&2
  exit 1
fi
if [ ! -x "$bin" ]; then
  if [ -n "${PAYGATE_BIN:-}" ]; then
    echo "install.sh: PAYGATE_BIN=$bin is not an executable" >&2
    exit 1
  fi
  echo "== building $bin"
  (cd "$root" && cargo build --release --locked)
fi

staged() { printf '%s%s' "$DESTDIR" "$1"; }

if [ -z "$DESTDIR" ] && ! getent passwd paygate >/dev/null; then
  echo "== creating the system user paygate"
  useradd --system --user-group --home-dir /var/lib/paygate --no-create-home \
    --shell /usr/sbin/nologin --comment "paygate payments API" paygate
fi

echo "== installing $(staged "$PREFIX/bin/paygate")"
# `install` writes a new file and renames it into place: running workers keep the old
# binary until they are restarted.
install -D -m 0755 "$bin" "$(staged "$PREFIX/bin/paygate")"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for unit in paygate@.service paygate.target; do
  sed "s#/usr/local/#$PREFIX/#g" "$root/etc/systemd/$unit" > "$scratch/$unit"
  install -D -m 0644 "$scratch/$unit" "$(staged "/etc/systemd/system/$unit")"
done
install -D -m 0644 "$root/README.md" "$(staged "$PREFIX/share/doc/paygate/README.md")"

install -d -m 0750 "$(staged /etc/paygate)" "$(staged /etc/paygate/tls)"
env_file=$(staged /etc/paygate/paygate.env)
if [ -e "$env_file" ]; then
  echo "== keeping $env_file (the new example is in $root/etc/paygate.env)"
else
  install -m 0640 "$root/etc/paygate.env" "$env_file"
  echo "== wrote $env_file: review it"
fi
if [ -z "$DESTDIR" ]; then
  chown root:paygate /etc/paygate /etc/paygate/tls /etc/paygate/paygate.env
fi

if [ ! -e "$(staged /etc/paygate/tls/server.crt)" ]; then
  cat <<MSG
== no certificate yet: put the PEM certificate chain and key in /etc/paygate/tls/
   (server.crt, server.key; group paygate, mode 0640). For a trial only:
     $PREFIX/bin/paygate dev-cert --tls-cert /etc/paygate/tls/server.crt --tls-key /etc/paygate/tls/server.key
     chgrp paygate /etc/paygate/tls/server.*; chmod 0640 /etc/paygate/tls/server.*
MSG
fi

if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi
cat <<MSG
== installed. Start one worker per CPU ($(nproc) here) and the target that groups them:
     systemctl enable --now paygate@{1..$(nproc)}.service paygate.target
   Administration runs as the service user, on its data directory:
     sudo -u paygate $PREFIX/bin/paygate user add alice --role admin --data-dir /var/lib/paygate
MSG
