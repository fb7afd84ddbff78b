#!/usr/bin/env bash
# A guided tour of paygate with curl: every request and response is printed, and every step
# checks the status it expects, so the tour doubles as an end-to-end test (CI runs it).
#
#   bash scripts/demo.sh                 # builds paygate, starts it in a temporary directory
#   PAYGATE_URL=https://127.0.0.1:8443 PAYGATE_CA=certs/server.crt bash scripts/demo.sh
#                                        # tours a server that is already running (started
#                                        # with --step-up-amount 100000, and no POST /users
#                                        # from this address in the last hour)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/temp-server.sh
. "$root/scripts/temp-server.sh"

if [ -z "${PAYGATE_URL:-}" ]; then
  (cd "$root" && cargo build --quiet)
  start_server "$root/target/debug/paygate" --step-up-amount 100000
  PAYGATE_URL="https://$addr"
  PAYGATE_CA="$workdir/certs/server.crt"
fi
PAYGATE_CA=${PAYGATE_CA:-certs/server.crt}
run="demo$$"  # unique names, so the tour can run against a server that has seen it before

step=0
# call EXPECTED_STATUS METHOD PATH [curl args...]: prints the exchange, checks the status,
# leaves the whole response in $out and its body in $body.
call() {
  local expected=$1 method=$2 path=$3; shift 3
  step=$((step + 1))
  printf '\n\033[1m[%d] %s %s\033[0m %s\n' "$step" "$method" "$path" "$*"
  out=$(curl -sS --cacert "$PAYGATE_CA" -X "$method" -D - "$PAYGATE_URL$path" "$@")
  # sed reads everything (a `head` would close the pipe early and fail under pipefail).
  printf '%s\n' "$out" | sed -n '1,40s/^/    /p'
  local lines
  lines=$(printf '%s\n' "$out" | wc -l)
  if [ "$lines" -gt 40 ]; then printf '    … (%d more lines)\n' $((lines - 40)); fi
  status=$(printf '%s\n' "$out" | awk 'NR == 1 {print $2}')  # awk reads it all: no SIGPIPE
  body=$(printf '%s\n' "$out" | sed '1,/^\r$/d')
  if [ "$status" != "$expected" ]; then
    echo "FAILED: expected $expected, got $status" >&2
    exit 1
  fi
}
json=(-H 'Content-Type: application/json')
field() { sed -E "s/.*\"$1\":\"([^\"]+)\".*/\1/" <<<"$body"; }
# totp SECRET [STEPS]: the RFC 6238 code (HMAC-SHA1, 6 digits, 30 s) for now plus STEPS
# steps, as an authenticator app would show it; base32, od and openssl only.
totp() {
  local key counter mac offset
  key=$(printf '%s' "$1" | base32 -d | od -An -v -tx1 | tr -d ' \n')
  counter=$(printf '%016x' $(( $(date +%s) / 30 + ${2:-0} )))
  mac=$(printf '%b' "$(sed 's/../\\x&/g' <<<"$counter")" \
    | openssl dgst -sha1 -mac HMAC -macopt "hexkey:$key" | awk '{print $NF}')
  offset=$(( 16#${mac:39:1} ))
  printf '%06d' $(( (16#${mac:offset*2:8} & 0x7fffffff) % 1000000 ))
}

call 200 GET /apiStatus
# The API describes itself (OpenAPI 3.1), for import into API tools.
call 200 GET /openapi.yaml
call 201 POST /users "${json[@]}" -d "{\"username\":\"alice-$run\",\"password\":\"correct horse battery\"}"
call 409 POST /users "${json[@]}" -d "{\"username\":\"alice-$run\",\"password\":\"correct horse battery\"}"
call 422 POST /users "${json[@]}" -d "{\"username\":\"bob-$run\",\"password\":\"password1\"}"
call 201 POST /users "${json[@]}" -d "{\"username\":\"bob-$run\",\"password\":\"bob's long passphrase\"}"
alice=(-u "alice-$run:correct horse battery")
bob=(-u "bob-$run:bob's long passphrase")
call 401 GET /accounts -u "alice-$run:wrong password"
call 201 POST /accounts "${alice[@]}" "${json[@]}" -d '{"name":"Operating","currency":"EUR"}'
account=$(field id)
call 200 GET /accounts "${alice[@]}"
call 404 GET "/accounts/$account/payments" "${bob[@]}"
call 201 POST "/accounts/$account/payments" "${alice[@]}" "${json[@]}" -H "Idempotency-Key: $run-1" \
  -d '{"payee":"ACME-Ltd","amount_minor":1250,"currency":"EUR","reference":"Invoice 42"}'
payment=$(field id)
call 201 POST "/accounts/$account/payments" "${alice[@]}" "${json[@]}" -H "Idempotency-Key: $run-1" \
  -d '{"payee":"ACME-Ltd","amount_minor":1250,"currency":"EUR","reference":"Invoice 42"}'
grep -qi '^idempotency-replayed: true' <<<"$out" || { echo "FAILED: the retry was not a replay" >&2; exit 1; }
call 422 POST "/accounts/$account/payments" "${alice[@]}" "${json[@]}" -H "Idempotency-Key: $run-1" \
  -d '{"payee":"ACME-Ltd","amount_minor":9999,"currency":"EUR","reference":"Invoice 42"}'
call 200 GET "/accounts/$account/payments?limit=10" "${alice[@]}"
call 201 POST "/accounts/$account/members" "${alice[@]}" "${json[@]}" -d "{\"username\":\"bob-$run\",\"perms\":\"r\"}"
call 200 GET "/accounts/$account/payments/$payment" "${bob[@]}"
call 403 DELETE "/accounts/$account/payments/$payment" "${bob[@]}"
call 200 DELETE "/accounts/$account/payments/$payment" "${alice[@]}"
call 409 DELETE "/accounts/$account/payments/$payment" "${alice[@]}"
# Share the payment as a read-only link: anyone holding it reads that payment, nothing else.
call 201 POST "/accounts/$account/payments/$payment/capabilities" "${alice[@]}" "${json[@]}" \
  -d '{"perms":"r","expires_in":3600}'
link=$(field url)
capability_id=$(field id)
call 200 GET "$link"
call 403 GET "/accounts/$account/payments" -H "Authorization: Bearer $(sed -E 's/.*access_token=//' <<<"$link")"
call 204 DELETE "/capabilities/$capability_id" "${alice[@]}"
call 401 GET "$link"
# Bob leaves the account: removed, he no longer sees it (404). Alice, its last manager,
# cannot remove herself (409).
call 204 DELETE "/accounts/$account/members/bob-$run" "${alice[@]}"
call 404 GET "/accounts/$account/payments/$payment" "${bob[@]}"
call 409 DELETE "/accounts/$account/members/alice-$run" "${alice[@]}"
call 415 POST /accounts "${alice[@]}" -d '{"name":"x","currency":"EUR"}'
call 405 DELETE /apiStatus

# Log in once, then use the token instead of the password.
call 201 POST /sessions "${alice[@]}"
token=$(field token)
bearer=(-H "Authorization: Bearer $token")
call 200 GET /accounts "${bearer[@]}"
call 200 GET /users/me "${bearer[@]}"
call 401 GET /accounts -H "Authorization: Bearer ${token}x"
# Turn on TOTP: enrol, confirm with a code (from a step that will not end mid-tour).
call 200 POST /users/me/totp "${bearer[@]}"
secret=$(field secret)
while [ $(( 30 - $(date +%s) % 30 )) -lt 6 ]; do sleep 1; done
call 204 POST /users/me/totp/confirm "${bearer[@]}" "${json[@]}" -d "{\"code\":\"$(totp "$secret" -1)\"}"
# From now on the password alone no longer logs in; a code does, once.
call 401 POST /sessions "${alice[@]}"
code=$(totp "$secret")
call 201 POST /sessions "${alice[@]}" -H "X-TOTP: $code"
grep -q '"amr":\["pwd","otp"\]' <<<"$body" || { echo "FAILED: no otp in amr" >&2; exit 1; }
strong=(-H "Authorization: Bearer $(field token)")
call 401 POST /sessions "${alice[@]}" -H "X-TOTP: $code"
# Step-up: a payment above 1000.00 (the server's --step-up-amount) needs a token whose login
# used the second factor; the earlier token (password only) is refused.
large='{"payee":"Landlord","amount_minor":250000,"currency":"EUR","reference":"Rent"}'
call 403 POST "/accounts/$account/payments" "${bearer[@]}" "${json[@]}" -d "$large"
call 201 POST "/accounts/$account/payments" "${strong[@]}" "${json[@]}" -d "$large"
# Rate limiting: registrations are limited per address (5 at once, then 10 an hour). Use up
# what is left quietly, then the next one is refused with the time to wait.
for i in $(seq 1 6); do
  quiet=$(curl -sS --cacert "$PAYGATE_CA" -o /dev/null -w '%{http_code}' -X POST "$PAYGATE_URL/users" \
    "${json[@]}" -d "{\"username\":\"filler$i-$run\",\"password\":\"a filler passphrase\"}")
  [ "$quiet" = 429 ] && break
done
call 429 POST /users "${json[@]}" -d "{\"username\":\"carol-$run\",\"password\":\"carol's passphrase\"}"
for header in retry-after ratelimit-policy ratelimit; do
  grep -qi "^$header: " <<<"$out" || { echo "FAILED: the 429 has no $header header" >&2; exit 1; }
done
# Log out: the token stops working at once.
call 204 DELETE /sessions "${bearer[@]}"
call 401 GET /accounts "${bearer[@]}"

# The audit log holds every step above; stop the server (it flushes the log) and verify
# every chain. (Only when this script started the server: it needs the data directory.)
if [ -n "$server_pid" ]; then
  stop_server
  step=$((step + 1))
  printf '\n\033[1m[%d] paygate audit verify\033[0m\n' "$step"
  verified=$(cd "$workdir" && "$root/target/debug/paygate" audit verify 2>&1) || {
    printf '%s\n' "$verified"; echo "FAILED: audit verify" >&2; exit 1; }
  printf '    %s\n' "$verified"
fi

printf '\n\033[1mtour complete: %d steps behaved as described\033[0m\n' "$step"
