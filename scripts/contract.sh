#!/usr/bin/env bash
# Contract test: runs Schemathesis against a real paygate server with openapi.yaml, with its
# default checks (no 5xx; status codes, headers, content types and bodies as described;
# valid data accepted, invalid data rejected; unsupported methods answered 405), signed in as
# a seeded user with a seeded account, payment and capability. CI runs it (.ci/run); it
# ends with `paygate audit verify` over the log of everything the fuzzer sent.
#
#   bash scripts/contract.sh                   # about three minutes
#   MAX_TIME=60 bash scripts/contract.sh       # shorter fuzzing budget (seconds)
#
# Schemathesis comes from PyPI into target/contract-venv (pinned below). The server is the
# debug build, one worker, in a temporary data directory; its rate limits are raised so that
# the fuzzer reaches the operations (a 429 is still described and checked).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
schemathesis_version=4.32.5
venv="$root/target/contract-venv"
max_time=${MAX_TIME:-120}

if [ ! -x "$venv/bin/st" ] || ! "$venv/bin/st" --version 2>/dev/null | grep -q "$schemathesis_version"; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$schemathesis_version"
fi

# shellcheck source=scripts/temp-server.sh
. "$root/scripts/temp-server.sh"
(cd "$root" && cargo build --quiet)
paygate="$root/target/debug/paygate"
start_server "$paygate" --workers 1 \
  --rate-limit '* / 1000/s burst=1000 key=ip' --guess-limit '1000/min burst=1000' \
  --password-check-limit '1000/min burst=1000'
url="https://$addr"

# Seed: the user the run signs in as, a second user to grant to, an account, a payment and a
# capability for it.
api() {
  curl -sS --fail-with-body --cacert "$workdir/certs/server.crt" -H 'Content-Type: application/json' "$@"
}
field() { sed -E "s/.*\"$1\":\"([^\"]+)\".*/\1/"; }
user=contract-alice
password='contract passphrase 1'
api -X POST "$url/users" -d "{\"username\":\"$user\",\"password\":\"$password\"}" >/dev/null
api -X POST "$url/users" -d '{"username":"contract-bob","password":"contract passphrase 2"}' >/dev/null
token=$(api -X POST -u "$user:$password" "$url/sessions" | field token)
account=$(api -X POST -H "Authorization: Bearer $token" "$url/accounts" \
  -d '{"name":"Contract","currency":"EUR"}' | field id)
payment=$(api -X POST -H "Authorization: Bearer $token" "$url/accounts/$account/payments" \
  -d '{"payee":"ACME","amount_minor":100,"currency":"EUR"}' | field id)
capability=$(api -X POST -H "Authorization: Bearer $token" \
  "$url/accounts/$account/payments/$payment/capabilities" -d '{"perms":"rd","expires_in":86400}' | field token)

# Staff, for the two operations that need a role: an auditor reads the audit log, an admin
# disables users (the fuzzer's made-up names, never the users above).
printf '%s\n' 'contract auditor passphrase' \
  | "$paygate" user add contract-auditor --role auditor --data-dir "$workdir/data" >/dev/null
printf '%s\n' 'contract admin passphrase' \
  | "$paygate" user add contract-admin --role admin --data-dir "$workdir/data" >/dev/null
export CONTRACT_USER=$user CONTRACT_PASSWORD=$password CONTRACT_TOKEN=$token \
  CONTRACT_CAPABILITY=$capability CONTRACT_ACCOUNT=$account CONTRACT_PAYMENT=$payment
config="$root/scripts/contract.toml"
st=("$venv/bin/st" --config-file "$config" run "$root/openapi.yaml" --url "$url" --tls-verify false
  --seed 1 --no-color ${ST_ARGS:-})

# Two operations end what the others sign in with, so they run after them, each alone:
# disabling users (the admin could hit a seeded user's name) and logging out.
echo "== schemathesis: every operation but two (${max_time} s of fuzzing)"
"${st[@]}" --max-time "$max_time" --exclude-operation-id disableUser --exclude-operation-id logout
for operation in disableUser logout; do
  echo "== schemathesis: $operation"
  "${st[@]}" --include-operation-id "$operation" --phases examples,coverage,fuzzing
done

echo "== paygate audit verify (the server's log of the run)"
stop_server
"$paygate" audit verify --data-dir "$workdir/data"
