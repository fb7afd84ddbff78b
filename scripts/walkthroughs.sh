#!/usr/bin/env bash
# Replays every walkthrough of the documentation, in reading order (README.md, then
# docs/guide.md, then docs/operating.md), exactly as written, against a fresh server started
# the way the README says (`paygate serve` on its defaults, in an empty directory), and
# checks that each request answers the status written at the end of its line (`# → 201`).
# CI runs it; so can you:
#
#   bash scripts/walkthroughs.sh
#
# A walkthrough is a ```sh block right after a line `<!-- walkthrough -->`. The blocks run
# in one shell, from a scratch directory that looks like the repository root to them:
# `certs/` and `data/` are made by the server there, and `target/release/paygate` is this
# checkout's build. The server listens on 127.0.0.1:8443, as in the documentation, so that
# port must be free. Needs curl and oathtool (apt-get install oathtool).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
command -v oathtool >/dev/null || { echo "walkthroughs: needs oathtool (apt-get install oathtool)" >&2; exit 1; }
(cd "$root" && cargo build --quiet --bin paygate)

work=$(mktemp -d)
server=
cleanup() {
  if [ -n "$server" ] && kill -0 "$server" 2>/dev/null; then
    kill -TERM "$server"
    wait "$server" || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/target/release"
ln -s "$root/target/debug/paygate" "$work/target/release/paygate"

# The walkthroughs, and the status each request must answer, in order.
script="$work/walkthroughs.bash"
expected="$work/expected"
: > "$script"
: > "$expected"
for doc in README.md docs/guide.md docs/operating.md; do
  awk -v doc="$doc" '
    /^<!-- walkthrough -->$/ { armed = 1; next }
    armed && /^```sh$/ { inside = 1; armed = 0; printf "# --- %s:%d\n", doc, NR; next }
    inside && /^```$/ { inside = 0; next }
    inside { print }
    { armed = armed && /^```sh$/ }
  ' "$root/$doc" >> "$script"
done
grep -v '^[[:space:]]*#' "$script" | sed -nE 's/.*# → ([0-9]{3})[[:space:]]*$/\1/p' > "$expected"
blocks=$(grep -c '^# --- ' "$script")
[ "$blocks" -ge 4 ] || { echo "walkthroughs: found only $blocks blocks" >&2; exit 1; }

# Start the server as the README does, on its embedded defaults.
cd "$work"
env -u PAYGATE_LISTEN -u PAYGATE_DATA_DIR target/release/paygate serve > server.log 2>&1 &
server=$!
for _ in $(seq 1 300); do
  if [ -e certs/server.crt ] &&
     curl -sS --cacert certs/server.crt -o /dev/null https://127.0.0.1:8443/apiStatus 2>/dev/null; then
    break
  fi
  kill -0 "$server" 2>/dev/null || { cat server.log; echo "walkthroughs: the server did not start" >&2; exit 1; }
  sleep 0.2
done

# Every curl the walkthroughs run reports its status on the side, to a file.
statuses="$work/statuses"
: > "$statuses"
export STATUS_LOG=$statuses
{
  echo 'set -eo pipefail'
  echo 'curl() { command curl -w "%{stderr}HTTP %{http_code}\n" "$@" 2>>"$STATUS_LOG"; }'
  cat "$script"
} > run.bash
echo "== replaying $blocks walkthroughs ($(wc -l < "$expected") requests)"
if ! bash run.bash; then
  echo "walkthroughs: a command failed (above); server log:" >&2
  tail -n 20 server.log >&2
  exit 1
fi
grep '^HTTP ' "$statuses" | cut -d' ' -f2 > actual
if ! diff -u --label expected --label answered "$expected" actual; then
  echo "walkthroughs: the statuses above differ from those the documentation states" >&2
  exit 1
fi
echo "== every walkthrough ran as written: $(wc -l < actual) requests answered as documented"
