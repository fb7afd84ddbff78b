#!/usr/bin/env bash
# Throwaway PostgreSQL clusters for paygate's tests, CI and demos: each in a directory of
# its own, on a free loopback port, with a `paygate` role (a random password, SCRAM) owning
# a `paygate` database. Nothing outside that directory is touched.
#
#   bash scripts/pg.sh run CMD...   # start a cluster, run CMD with PAYGATE_TEST_DATABASE
#                                   # set to its URL (and PAYGATE_TEST_DATABASE_CA to the
#                                   # CA of its TLS certificate), then stop and remove it
#                                   # whatever CMD's outcome; exits with CMD's status. CMD
#                                   # runs under `scripts/s3.sh run` too, so the tests also
#                                   # get a throwaway S3 service (PAYGATE_TEST_S3_*)
#   bash scripts/pg.sh start [DIR]  # start one in DIR (default: a new temporary directory)
#                                   # and print PG_DIR=, PAYGATE_TEST_DATABASE= and
#                                   # PAYGATE_TEST_DATABASE_CA= lines
#   bash scripts/pg.sh stop DIR     # stop it and remove DIR
#   bash scripts/pg.sh down DIR     # stop its server, keeping everything (a crash, an
#   bash scripts/pg.sh up DIR       # outage), and start it again on the same port
#   bash scripts/pg.sh standby PRIMARY [DIR]
#                                   # a streaming standby of the cluster in PRIMARY, made
#                                   # synchronous (the primary's synchronous_standby_names
#                                   # names it), in DIR (default: a new temporary
#                                   # directory); prints the same lines as start once the
#                                   # primary reports it in sync
#   bash scripts/pg.sh kill DIR     # SIGKILL the server's postmaster (a machine lost)
#   bash scripts/pg.sh promote DIR  # promote a standby to primary
#   bash scripts/pg.sh warm DIR     # write and recycle ~600 MB of WAL, so that the cluster
#                                   # runs on recycled WAL segments as a server that has
#                                   # run a while does (for benchmarks)
#
# Uses the newest PostgreSQL under /usr/lib/postgresql (Debian's postgresql-15; installed
# when missing and running as root), or $PG_BIN. As root the server runs as the
# `postgres` user, which PostgreSQL requires.
set -euo pipefail

pg_bin() {
  if [ -n "${PG_BIN:-}" ]; then echo "$PG_BIN"; return; fi
  local found
  found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$found" ] && [ "$(id -u)" = 0 ]; then
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >/dev/null
    found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  fi
  [ -n "$found" ] || { echo "pg.sh: PostgreSQL not found: apt-get install postgresql-15, or set PG_BIN" >&2; exit 1; }
  echo "$found"
}

# as_owner CMD...: runs CMD as the user that owns the cluster.
as_owner() {
  # From /, which the owner can always enter (the caller's directory may be private);
  # every path given is absolute.
  if [ "$(id -u)" = 0 ]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

# shellcheck source=scripts/ports.sh
. "$(dirname "$0")/ports.sh"

start() {
  local dir=${1:-} bin port password
  bin=$(pg_bin)
  [ -n "$dir" ] || dir=$(mktemp -d /tmp/paygate-pg.XXXXXX)
  mkdir -p "$dir"
  dir=$(realpath "$dir")
  [ "$(id -u)" = 0 ] && chown postgres: "$dir"
  chmod 700 "$dir"
  password=$(head -c 18 /dev/urandom | base64 | tr '+/' '-_')
  printf '%s\n' "$password" > "$dir/password"
  [ "$(id -u)" = 0 ] && chown postgres: "$dir/password"
  as_owner "$bin/initdb" -D "$dir/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
    --pwfile="$dir/password" -E UTF8 --no-locale >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; exit 1; }
  # TLS as production runs it: a CA of its own, and a server certificate for 127.0.0.1
  # only (so that connecting by another name fails sslmode=verify-full).
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=paygate test CA" -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=127.0.0.1" \
    -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
  openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -days 2 \
    -extfile <(printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n') \
    -out "$dir/server.crt" 2>/dev/null
  chmod 600 "$dir/server.key" "$dir/ca.key"
  [ "$(id -u)" = 0 ] && chown postgres: "$dir"/server.* "$dir"/ca.*
  port=$(free_ports 1)
  echo "-c port=$port -c listen_addresses=127.0.0.1 -c unix_socket_directories=$dir -c max_connections=200 -c synchronous_commit=on -c fsync=on -c ssl=on -c ssl_cert_file=$dir/server.crt -c ssl_key_file=$dir/server.key" > "$dir/options"
  up "$dir"
  # CREATEDB: tests give each case a database of its own.
  as_owner "$bin/psql" -q -h "$dir" -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 \
    -v password="$password" >/dev/null <<'SQL'
CREATE ROLE paygate LOGIN CREATEDB PASSWORD :'password';
CREATE DATABASE paygate OWNER paygate;
SQL
  echo "$port" > "$dir/port"
  echo "PG_DIR=$dir"
  echo "PAYGATE_TEST_DATABASE=postgres://paygate:$password@127.0.0.1:$port/paygate"
  echo "PAYGATE_TEST_DATABASE_CA=$dir/ca.crt"
}

# standby PRIMARY [DIR]: a synchronous streaming standby of PRIMARY's cluster.
standby() {
  local primary dir=${2:-} bin port primary_port
  primary=$(realpath "$1")
  bin=$(pg_bin)
  [ -f "$primary/port" ] || { echo "pg.sh: no cluster in $primary" >&2; exit 1; }
  primary_port=$(cat "$primary/port")
  [ -n "$dir" ] || dir=$(mktemp -d /tmp/paygate-pg.XXXXXX)
  mkdir -p "$dir"
  dir=$(realpath "$dir")
  cp "$primary"/password "$primary"/ca.crt "$primary"/ca.key "$primary"/server.crt \
    "$primary"/server.key "$dir"/
  [ "$(id -u)" = 0 ] && chown -R postgres: "$dir"
  chmod 700 "$dir"
  # -R: the standby follows the primary (standby.signal and primary_conninfo), under the
  # name synchronous_standby_names gives below.
  as_owner "$bin/pg_basebackup" -D "$dir/data" -R -X stream -c fast \
    -d "host=$primary port=$primary_port user=postgres application_name=paygate_standby" \
    >"$dir/basebackup.log" 2>&1 || { cat "$dir/basebackup.log" >&2; exit 1; }
  port=$(free_ports 1)
  sed "s/-c port=[0-9]*/-c port=$port/; s|$primary|$dir|g" "$primary/options" > "$dir/options"
  [ "$(id -u)" = 0 ] && chown postgres: "$dir/options"
  up "$dir"
  echo "$port" > "$dir/port"
  as_owner "$bin/psql" -q -h "$primary" -p "$primary_port" -U postgres -d postgres \
    -v ON_ERROR_STOP=1 >/dev/null <<'SQL'
ALTER SYSTEM SET synchronous_standby_names = 'paygate_standby';
SELECT pg_reload_conf();
SQL
  local state="" i
  for i in $(seq 1 300); do
    state=$(as_owner "$bin/psql" -At -h "$primary" -p "$primary_port" -U postgres -d postgres \
      -c "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'paygate_standby'")
    [ "$state" = sync ] && break
    sleep 0.1
  done
  [ "$state" = sync ] || { echo "pg.sh: the standby in $dir is not in sync (${state:-absent})" >&2; exit 1; }
  echo "PG_DIR=$dir"
  echo "PAYGATE_TEST_DATABASE=postgres://paygate:$(cat "$dir/password")@127.0.0.1:$port/paygate"
  echo "PAYGATE_TEST_DATABASE_CA=$dir/ca.crt"
}

# kill DIR: what losing the machine looks like to the database's clients.
kill_server() {
  local dir=$1 pid
  pid=$(head -n 1 "$dir/data/postmaster.pid")
  kill -KILL "$pid"
}

promote() {
  local dir=$1 bin
  bin=$(pg_bin)
  as_owner "$bin/pg_ctl" -D "$dir/data" -w -t 60 promote >/dev/null
}

# warm DIR: makes the cluster's WAL what it is on a server that has run a while. A new
# cluster creates each 16 MB WAL segment when it first needs it, zero-filled and synced
# (60-70 ms on the test machine), and the commit that crosses into it waits that long; a
# running server recycles the segments of past checkpoints instead. Writes ~600 MB of WAL
# and checkpoints twice, so that what follows runs on recycled segments.
warm() {
  local dir=$1 bin port
  bin=$(pg_bin)
  port=$(cat "$dir/port")
  as_owner "$bin/psql" -q -h "$dir" -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 \
    -c "CREATE TABLE paygate_warm AS SELECT g, repeat('x', 300) AS pad FROM generate_series(1, 1500000) g" \
    -c "DROP TABLE paygate_warm" -c "CHECKPOINT" -c "CHECKPOINT" >/dev/null
}

# up DIR / down DIR: start or stop the server of an existing cluster (same port, same data).
up() {
  local dir=$1 bin
  bin=$(pg_bin)
  as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 -o "$(cat "$dir/options")" \
    start >/dev/null || { cat "$dir/server.log" >&2; exit 1; }
}

down() {
  local dir=$1 bin
  bin=$(pg_bin)
  as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
}

stop() {
  local dir=$1 bin
  [ -d "$dir/data" ] || { echo "pg.sh: no cluster in $dir" >&2; exit 1; }
  bin=$(pg_bin)
  as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$dir"
}

case "${1:-}" in
  start) shift; start "${1:-}" ;;
  stop) shift; stop "${1:?pg.sh stop DIR}" ;;
  up) shift; up "${1:?pg.sh up DIR}" ;;
  down) shift; down "${1:?pg.sh down DIR}" ;;
  standby) shift; standby "${1:?pg.sh standby PRIMARY [DIR]}" "${2:-}" ;;
  kill) shift; kill_server "${1:?pg.sh kill DIR}" ;;
  promote) shift; promote "${1:?pg.sh promote DIR}" ;;
  warm) shift; warm "${1:?pg.sh warm DIR}" ;;
  run)
    shift
    [ $# -gt 0 ] || { echo "usage: pg.sh run CMD..." >&2; exit 2; }
    # The test suite's other real server: tests/prometheus.rs scrapes paygate with Debian's
    # Prometheus, installed here like PostgreSQL when missing and running as root.
    if ! command -v prometheus >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
    fi
    out=$(start)
    dir=$(sed -n 's/^PG_DIR=//p' <<<"$out")
    trap 'stop "$dir"' EXIT
    export PAYGATE_TEST_DATABASE PAYGATE_TEST_DATABASE_CA
    PAYGATE_TEST_DATABASE=$(sed -n 's/^PAYGATE_TEST_DATABASE=//p' <<<"$out")
    PAYGATE_TEST_DATABASE_CA=$(sed -n 's/^PAYGATE_TEST_DATABASE_CA=//p' <<<"$out")
    status=0
    # And a throwaway S3 service (SeaweedFS) for the audit archive's tests.
    bash "$(dirname "$0")/s3.sh" run "$@" || status=$?
    exit "$status"
    ;;
  *) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0" >&2; exit 2 ;;
esac
