#!/usr/bin/env bash
# The Postman collection, run by newman against a fresh paygate server with its default
# settings (the rate limits included: the collection ends in a 429), trusting the server's
# development certificate (--ssl-extra-ca-certs, never --insecure). A failing assertion
# fails the script. Then the collection Postman generates from openapi.yaml
# (openapi-to-postmanv2, as Postman's import does) is checked to carry real example values,
# not `<integer>`/`<string>` placeholders. CI runs it (.ci/run).
#
#   bash scripts/newman.sh
#
# newman and openapi-to-postmanv2 come from the npm registry into target/node-tools (pinned
# below), with the machine's Node.js. The server is the debug build, one worker, in a
# temporary data directory.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
newman_version=6.2.2
openapi_to_postman_version=6.3.3
tools="${NODE_TOOLS:-$root/target/node-tools}"

installed() { [ "$(node -p "require('$tools/node_modules/$1/package.json').version" 2>/dev/null)" = "$2" ]; }
if ! installed newman "$newman_version" || ! installed openapi-to-postmanv2 "$openapi_to_postman_version"; then
  mkdir -p "$tools"
  npm install --prefix "$tools" --no-audit --no-fund --loglevel=error \
    "newman@$newman_version" "openapi-to-postmanv2@$openapi_to_postman_version" >/dev/null
fi

# shellcheck source=scripts/temp-server.sh
. "$root/scripts/temp-server.sh"
(cd "$root" && cargo build --quiet)
start_server "$root/target/debug/paygate" --workers 1

echo "== newman run postman/paygate.postman_collection.json against https://$addr"
"$tools/node_modules/.bin/newman" run "$root/postman/paygate.postman_collection.json" \
  --environment "$root/postman/local.postman_environment.json" \
  --env-var "baseUrl=https://$addr" \
  --ssl-extra-ca-certs "$workdir/certs/server.crt" \
  --color off --no-insecure-file-read

echo "== openapi2postmanv2 -s openapi.yaml (Example parameter generation): real values, no placeholder"
# Postman's import with "Parameter generation: Example". The converter's schema mode writes
# placeholders whatever the description holds; example mode takes openapi.yaml's examples
# and must find one for every value. `<credentials>` and `<token>` are the security
# schemes' own placeholders, which Postman's Authorization tab fills.
"$tools/node_modules/.bin/openapi2postmanv2" -s "$root/openapi.yaml" -o "$workdir/generated.json" \
  -O parametersResolution=Example >/dev/null
placeholders=$(grep -oE '<[A-Za-z][A-Za-z,-]*>' "$workdir/generated.json" \
  | grep -vxE '<(credentials|token)>' | sort | uniq -c || true)
if [ -n "$placeholders" ]; then
  echo "FAILED: the collection generated from openapi.yaml has placeholders instead of examples:" >&2
  echo "$placeholders" >&2
  exit 1
fi
node -e '
  const c = require(process.argv[1]);
  const requests = (items) => items.flatMap((i) => (i.item ? requests(i.item) : [i.request]));
  const all = requests(c.item);
  const key = all.flatMap((r) => r.header || []).find((h) => h.key === "Idempotency-Key");
  if (!key || key.value !== "order-1001") { console.error("FAILED: Idempotency-Key is", key); process.exit(1); }
  console.log(`generated collection: ${all.length} requests, every value from an example`);
' "$workdir/generated.json"
