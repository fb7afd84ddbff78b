#!/usr/bin/env bash
# Three paygate nodes on one PostgreSQL, walked through with curl: what one node does, the
# others honour at once. Every request and response is printed and every step checks the
# status it expects, so the walk is also an end-to-end test.
#
#   bash scripts/cluster-demo.sh
#
# Starts a throwaway PostgreSQL 15 (scripts/pg.sh), builds paygate, starts nodes A, B and C
# on free loopback ports, each with its own data directory (the sealing key copied from A,
# as an operator distributes it) and the same database, and removes everything at the end.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
(cd "$root" && cargo build --quiet)
paygate=$root/target/debug/paygate
workdir=$(mktemp -d)
pids=()
pg_dir=""
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -z "$pg_dir" ] || bash "$root/scripts/pg.sh" stop "$pg_dir"
  rm -rf "$workdir"
}
trap cleanup EXIT

pg_out=$(bash "$root/scripts/pg.sh" start)
pg_dir=$(sed -n 's/^PG_DIR=//p' <<<"$pg_out")
database=$(sed -n 's/^PAYGATE_TEST_DATABASE=//p' <<<"$pg_out")
cd "$workdir"
"$paygate" dev-cert >/dev/null
ca=$workdir/certs/server.crt

# node NAME: starts a node with data directory ./NAME; sets ${NAME}_url.
node() {
  local name=$1 addr=""
  if [ "$name" != a ]; then
    mkdir -m 700 -p "$name"
    install -m 600 a/totp.key "$name/totp.key"
  fi
  "$paygate" serve --workers 1 --listen 127.0.0.1:0 --data-dir "$name" --instance "$name" \
    --database "$database" --rate-limit 'GET /apiStatus 5/hour burst=5 key=ip' \
    2>"$name.log" &
  pids+=("$!")
  for _ in $(seq 1 100); do
    addr=$(sed -n 's/.*listening on https:\/\///p' "$name.log" | head -n1)
    [ -n "$addr" ] && break
    sleep 0.1
  done
  [ -n "$addr" ] || { cat "$name.log"; echo "node $name did not start" >&2; exit 1; }
  printf -v "${name}_url" 'https://%s' "$addr"
  echo "node $name: https://$addr (data directory $workdir/$name)"
}
node a
node b
node c

step=0
# call NODE EXPECTED_STATUS METHOD PATH [curl args...]: one exchange with node NODE,
# printed; checks the status; leaves the body in $body.
call() {
  local node=$1 expected=$2 method=$3 path=$4; shift 4
  local url_var="${node}_url" out
  step=$((step + 1))
  printf '\n\033[1m[%d] node %s: %s %s\033[0m %s\n' "$step" "$node" "$method" "$path" "$*"
  out=$(curl -sS --cacert "$ca" -X "$method" -D - "${!url_var}$path" "$@")
  printf '%s\n' "$out" | sed -n '1,30s/^/    /p'
  status=$(printf '%s\n' "$out" | awk 'NR == 1 {print $2}')
  body=$(printf '%s\n' "$out" | sed '1,/^\r$/d')
  if [ "$status" != "$expected" ]; then
    echo "FAILED: expected $expected, got $status" >&2
    exit 1
  fi
}
json=(-H 'Content-Type: application/json')
field() { sed -E "s/.*\"$1\":\"([^\"]+)\".*/\1/" <<<"$body"; }

echo; echo "== One user, three nodes: registered on A, logged in on B, an account made on C"
call a 201 POST /users "${json[@]}" -d '{"username":"alice","password":"correct horse battery"}'
call b 201 POST /sessions -u 'alice:correct horse battery'
alice=$(field token)
call c 201 POST /accounts -H "Authorization: Bearer $alice" "${json[@]}" -d '{"name":"Ops","currency":"EUR"}'
account=$(field id)
call a 200 GET "/accounts/$account" -H "Authorization: Bearer $alice"

echo; echo "== A grant given on A works on B; taken away on A, it is gone on C at once"
call a 201 POST /users "${json[@]}" -d '{"username":"bob","password":"staple battery horse"}'
call a 201 POST /sessions -u 'bob:staple battery horse'
bob=$(field token)
call a 201 POST "/accounts/$account/members" -H "Authorization: Bearer $alice" "${json[@]}" \
  -d '{"username":"bob","perms":"r"}'
call b 200 GET "/accounts/$account/payments" -H "Authorization: Bearer $bob"
call a 204 DELETE "/accounts/$account/members/bob" -H "Authorization: Bearer $alice"
call c 404 GET "/accounts/$account/payments" -H "Authorization: Bearer $bob"

echo; echo "== One Idempotency-Key sent to A and B at the same moment: one payment"
pay() {
  curl -sS --cacert "$ca" -X POST "$1/accounts/$account/payments" -H "Authorization: Bearer $alice" \
    -H 'Idempotency-Key: invoice-2026-001' "${json[@]}" \
    -d '{"payee":"ACME","amount_minor":1250,"currency":"EUR"}'
}
pay "$a_url" > pay-a.json & first=$!
pay "$b_url" > pay-b.json & second=$!
wait "$first" "$second"
echo "    A answered: $(cat pay-a.json)"
echo "    B answered: $(cat pay-b.json)"
cmp -s pay-a.json pay-b.json || { echo "FAILED: the two answers differ" >&2; exit 1; }
call c 200 GET "/accounts/$account/payments" -H "Authorization: Bearer $alice"
[ "$(grep -o '"id"' <<<"$body" | wc -l)" = 1 ] || { echo "FAILED: not exactly one payment" >&2; exit 1; }

echo; echo "== A rate limit shared by all nodes: GET /apiStatus, 5 per hour per address"
admitted=0
for n in 1 2 3 4 5 6 7 8 9; do
  node=$(printf 'a\nb\nc' | sed -n "$(( (n - 1) % 3 + 1 ))p")
  url_var="${node}_url"
  code=$(curl -sS --cacert "$ca" -o /dev/null -w '%{http_code}' "${!url_var}/apiStatus")
  echo "    node $node: $code"
  [ "$code" = 200 ] && admitted=$((admitted + 1))
done
[ "$admitted" -le 5 ] || { echo "FAILED: $admitted admitted, the limit is 5" >&2; exit 1; }
echo "    $admitted of 9 admitted across the three nodes"

echo; echo "== A new signing key, from the command line on A's machine, used by every node"
"$paygate" keys rotate --data-dir a --database "$database"
sleep 1.5
call c 201 POST /sessions -u 'alice:correct horse battery'
fresh=$(field token)
call b 200 GET "/accounts/$account" -H "Authorization: Bearer $fresh"
call a 200 GET "/accounts/$account" -H "Authorization: Bearer $alice"

echo; echo "== A logout on B: the token is refused by A and C at once"
call b 204 DELETE /sessions -H "Authorization: Bearer $alice"
call a 401 GET "/accounts/$account" -H "Authorization: Bearer $alice"
call c 401 GET "/accounts/$account" -H "Authorization: Bearer $alice"

echo; echo "== Each node keeps its own audit log, and each verifies"
for name in a b c; do
  kill -TERM "${pids[0]}" 2>/dev/null || true
  pids=("${pids[@]:1}")
done
wait 2>/dev/null || true
for name in a b c; do
  printf '    node %s: ' "$name"; "$paygate" audit verify "$name/audit"
done
echo; echo "cluster demo: every step as expected ($step requests)"
