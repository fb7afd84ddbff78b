# Sourced by demo.sh and contract.sh: a paygate server in a temporary directory (its own
# data directory and development certificate), stopped and removed when the script exits.
#
#   start_server BINARY [SERVE ARGS...]   # `serve --listen 127.0.0.1:0` in $workdir; sets $addr
#   stop_server                           # SIGTERM and wait (the audit log is flushed)
# The certificate to trust is $workdir/certs/server.crt.

workdir=$(mktemp -d)
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill -TERM "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$workdir"
}
trap cleanup EXIT

start_server() {
  local binary=$1; shift
  (cd "$workdir" && exec "$binary" serve --listen 127.0.0.1:0 "$@" 2>server.log) &
  server_pid=$!
  addr=""
  for _ in $(seq 1 100); do
    addr=$(sed -n 's/.*listening on https:\/\///p' "$workdir/server.log" | head -n1)
    [ -n "$addr" ] && break
    sleep 0.1
  done
  [ -n "$addr" ] || { cat "$workdir/server.log"; echo "server did not start" >&2; exit 1; }
}

stop_server() {
  kill -TERM "$server_pid"
  wait "$server_pid" || true
  server_pid=""
}
