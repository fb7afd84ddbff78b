#!/usr/bin/env bash
# Load test: paygate against a bare hyper + rustls responder, in one run on one machine, so
# every figure is also a ratio of what this machine can do at all.
#
#   bash scripts/loadtest.sh                # 10 s per scenario
#   DURATION=30s CONNECTIONS=64 bash scripts/loadtest.sh
#   BASELINE=/tmp/paygate-before bash scripts/loadtest.sh
#                     # only an A/B of the JWT read: that binary against this build, 3 rounds
#   AB=create BASELINE=/tmp/paygate-before bash scripts/loadtest.sh
#                     # the same for payment creation
#   AB=audit bash scripts/loadtest.sh
#                     # only the JWT read with the audit stage on and off, $ROUNDS rounds
#   ROUNDS=7 ...      # alternating rounds of the audit on/off comparison (default 5)
#   AB=archive bash scripts/s3.sh run bash scripts/loadtest.sh
#                     # only the JWT read with the audit archive off and on (segments
#                     # sealed every 4 MiB and shipped to the SeaweedFS that s3.sh runs,
#                     # digests every 5 s), $ROUNDS alternating rounds
#   AB=flood bash scripts/loadtest.sh
#                     # only token reads, quiet and while another client floods Basic
#                     # requests with fresh usernames, $ROUNDS rounds
#   AB=postgres bash scripts/loadtest.sh
#                     # only the JWT read and payment creation on SQLite and on a local
#                     # PostgreSQL (scripts/pg.sh), beside the bare responder, $ROUNDS
#                     # rounds; PG_OPTIONS=sslmode=disable adds URL options, PG_POOL=N
#                     # sets --database-pool-size
#   AB=mixed bash scripts/loadtest.sh
#                     # only the JWT read alone and while 1 or 4 connections create
#                     # payments (on another account, on the read one, or on a second
#                     # server sharing nothing with the reads), $ROUNDS rounds;
#                     # WRITE_DELAY_MS=N paces each writer connection (N ms per payment)
#
# Builds release binaries, prepares a data directory (a user, an account, a payment, a JWT
# and an opaque session token),
# drives each scenario with wrk over TLS with keep-alive, and prints requests/s, p50/p99
# latency and the ratio to the bare responder; the table is also written to $OUT, and the
# raw figures to ${OUT%.md}.tsv and ${OUT%.md}-batches.tsv, from which
# `python3 scripts/plots.py` draws the figures of BENCHMARKS.md.
# Every server binds 127.0.0.1 only, and every run is bounded by $DURATION.
set -euo pipefail

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
THREADS=${THREADS:-1}
ROUNDS=${ROUNDS:-5}
root=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$root/target/loadtest/results.md}
mkdir -p "$(dirname "$OUT")"

if ! command -v wrk >/dev/null; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq wrk >/dev/null
  else echo "wrk is needed: apt-get install wrk" >&2; exit 1; fi
fi

(cd "$root" && cargo build --release --quiet --features audit-off --bin paygate --example bare_responder)
paygate=$root/target/release/paygate
bare=$root/target/release/examples/bare_responder
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

cd "$work"
# Every scenario runs from one address, and Basic scenarios hash at full speed on purpose:
# the per-address password-check budget (which would refuse them) is off unless a scenario
# turns it on. Through the environment, so a BASELINE binary without the option starts too.
export PAYGATE_PASSWORD_CHECK_LIMIT=none
# For the same reason, the per-address connection cap (32) must not refuse the 128
# connections of the 4x scenarios.
export PAYGATE_MAX_CONNECTIONS_PER_CLIENT=1024
"$paygate" dev-cert >/dev/null
ca=$work/certs/server.crt

# start NAME ARGS...: starts paygate with ARGS on a free port; sets $port and $pid.
# One worker process unless ARGS say --workers N; then it waits until all N listen.
start() {
  local name=$1; shift
  local workers=1 previous=""
  for arg in "$@"; do [ "$previous" = --workers ] && workers=$arg; previous=$arg; done
  local one=(--workers 1); [ "$workers" = 1 ] || one=()
  # DEFAULT_LIMITS=1: the server's own default password limits, not the test's "none".
  local env_args=(RUST_LOG=info)
  [ -n "${DEFAULT_LIMITS:-}" ] && env_args=(-u PAYGATE_PASSWORD_CHECK_LIMIT RUST_LOG=info)
  env "${env_args[@]}" "${binary:-$paygate}" serve --listen 127.0.0.1:0 --tls-cert certs/server.crt \
    --tls-key certs/server.key "${one[@]}" "$@" 2>"$work/$name.log" &
  pid=$!; pids+=("$pid")
  port=""
  for _ in $(seq 1 100); do
    port=$(sed -n 's/.*listening on https:\/\/127.0.0.1://p' "$work/$name.log" | head -n1)
    if [ -n "$port" ] && { [ "$workers" = 1 ] || grep -q "all $workers workers are listening" "$work/$name.log"; }; then
      break
    fi
    sleep 0.1
  done
  [ -n "$port" ] || { cat "$work/$name.log"; echo "$name did not start" >&2; exit 1; }
}

# Stops the server `start` started last (each holds an audit instance of the data dir).
stop_server() { kill -TERM "$pid"; wait "$pid" 2>/dev/null || true; }

# prepare [DATA_DIR [ARGS...]]: the data every scenario reads — a user, an account, a payment and a
# JWT — in DATA_DIR (default ./data), made by $binary (default this build); sets $api,
# $account, $payment, $read_path, $jwt and leaves that server running.
prepare() {
  local dir_args=(); [ -n "${1:-}" ] && dir_args=(--data-dir "$1")
  [ $# -gt 0 ] && shift
  start setup --rate-limit none "${dir_args[@]}" "$@"
  api="https://127.0.0.1:$port"
  curl -sS --cacert "$ca" -X POST "$api/users" -H 'Content-Type: application/json' \
    -d "{\"username\":\"$user\",\"password\":\"$pass\"}" >/dev/null
  account=$(curl -sS --cacert "$ca" -u "$user:$pass" -X POST "$api/accounts" -H 'Content-Type: application/json' \
    -d '{"name":"Load","currency":"EUR"}' | sed -E 's/.*"id":"([^"]+)".*/\1/')
  payment=$(curl -sS --cacert "$ca" -u "$user:$pass" -X POST "$api/accounts/$account/payments" \
    -H 'Content-Type: application/json' -d '{"payee":"ACME","amount_minor":100,"currency":"EUR"}' \
    | sed -E 's/.*"id":"([^"]+)".*/\1/')
  read_path="/accounts/$account/payments/$payment"
  # Tokens outlive the server that issued them: JWT keys and sessions live in the data dir.
  jwt=$(curl -sS --cacert "$ca" -u "$user:$pass" -X POST "$api/sessions" | sed -E 's/.*"token":"([^"]+)".*/\1/')
}
user=loadtest; pass='load test passphrase'
if [ -n "${BASELINE:-}" ]; then
  # The baseline binary gets a data directory of its own, made by itself: a newer build may
  # have migrated a shared one past what the baseline can open.
  binary=$BASELINE prepare "$work/data-baseline"
  baseline_read_path=$read_path baseline_jwt=$jwt baseline_account=$account
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
fi
prepare
status_bytes=$(curl -sS --cacert "$ca" "$api/apiStatus" | wc -c)
read_bytes=$(curl -sS --cacert "$ca" -u "$user:$pass" "$api$read_path" | wc -c)
kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
start opaque-login --rate-limit none --token-format opaque
opaque=$(curl -sS --cacert "$ca" -u "$user:$pass" -X POST "https://127.0.0.1:$port/sessions" \
  | sed -E 's/.*"token":"([^"]+)".*/\1/')
kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
# The body of a 429 problem document, measured on a server that refuses everything.
start sizing --rate-limit 'GET /apiStatus 1/day burst=1 key=ip'
curl -sS --cacert "$ca" "https://127.0.0.1:$port/apiStatus" >/dev/null
refusal_bytes=$(curl -sS --cacert "$ca" "https://127.0.0.1:$port/apiStatus" | wc -c)
kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
basic="Authorization: Basic $(printf '%s' "$user:$pass" | base64 -w0)"

# busy_ticks: CPU ticks all CPUs spent on anything but idling (user, nice, system, irq,
# softirq; not iowait, not steal): what the whole machine, load generator included, used.
busy_ticks() { awk '$1=="cpu" {print $2 + $3 + $4 + $7 + $8}' /proc/stat; }

# measure NAME URL [HEADER]: runs wrk (with the Lua script $SCRIPT, if set) and records
# "name rps p50_ms p99_ms non2xx cpu_us", cpu_us being the machine's busy CPU time per
# request (every process and interrupt, wrk's own share included).
results=()
to_ms() { awk '{v=$1; if (v ~ /us$/) {sub(/us$/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms$/,"",v)} else if (v ~ /s$/) {sub(/s$/,"",v); v*=1000}; printf "%.2f", v}'; }
measure() {
  local name=$1 url=$2 header=${3:-}
  local args=(-t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency)
  [ -n "$header" ] && args+=(-H "$header")
  [ -n "${SCRIPT:-}" ] && args+=(-s "$SCRIPT")
  local busy_before; busy_before=$(busy_ticks)
  local report; report=$(wrk "${args[@]}" "$url")
  local busy; busy=$(($(busy_ticks) - busy_before))
  local rps p50 p99 non2xx cpu_us
  rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$report")
  p50=$(awk '$1=="50%" {print $2}' <<<"$report" | to_ms)
  p99=$(awk '$1=="99%" {print $2}' <<<"$report" | to_ms)
  non2xx=$(awk '/Non-2xx or 3xx responses/ {print $5}' <<<"$report")
  cpu_us=$(awk -v b="$busy" -v hz="$(getconf CLK_TCK)" -v n="$(awk '/requests in/ {print $1}' <<<"$report")" \
    'BEGIN {printf "%.1f", b / hz * 1e6 / n}')
  results+=("$name $rps $p50 $p99 ${non2xx:-0} $cpu_us")
  printf '%-28s %10s req/s  p50 %7s ms  p99 %7s ms  non-2xx %s  machine CPU %s us/req\n' "$name" "$rps" "$p50" "$p99" "${non2xx:-0}" "$cpu_us" >&2
}

# thread_ticks PID: "thread-name ticks" for each thread name of PID (utime + stime).
thread_ticks() {
  for task in /proc/"$1"/task/*; do
    echo "$(cat "$task/comm") $(awk '{print $14 + $15}' "$task/stat")"
  done | awk '{t[$1] += $2} END {for (n in t) print n, t[n]}' | sort
}
# measure_threads NAME URL HEADER: measure, and record how much of one core each of the
# server's threads used meanwhile (main runtime, audit writer, ...) in $thread_shares.
thread_shares=()
measure_threads() {
  local before after start end
  before=$(thread_ticks "$pid"); start=$(date +%s%N)
  measure "$@"
  end=$(date +%s%N); after=$(thread_ticks "$pid")
  thread_shares+=("$1: $(join <(echo "$before") <(echo "$after") | awk -v hz="$(getconf CLK_TCK)" \
    -v wall="$((end - start))" '{d = $3 - $2; if (d > 0) printf "%s %.0f %%, ", $1, d / hz * 1e11 / wall}' | sed 's/, $//')")
}

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
peak_kib() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }

# Payment creation: each request a new Idempotency-Key, each payment a synchronous=FULL
# commit together with its idempotency record.
# create_script FILE ACCOUNT JWT: the wrk script that creates payments on ACCOUNT.
create_script() {
  cat >"$1" <<LUA
local n = 0
local run = tostring(os.time()) .. "-" .. tostring(math.random(1000000))
request = function()
  n = n + 1
  return wrk.format("POST", "/accounts/$2/payments", {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer $3",
    ["Idempotency-Key"] = "load-" .. run .. "-" .. n,
  }, '{"payee":"ACME","amount_minor":100,"currency":"EUR","reference":"load test"}')
end
LUA
  # WRITE_DELAY_MS: each writer connection waits this long before each payment, to set a
  # write mix (AB=mixed); unset, writers go as fast as they can.
  if [ -n "${WRITE_DELAY_MS:-}" ] && [ "${4:-}" = paced ]; then
    printf 'delay = function() return %s end\n' "$WRITE_DELAY_MS" >> "$1"
  fi
}
create_script "$work/create.lua" "$account" "$jwt"
[ -n "${BASELINE:-}" ] && create_script "$work/create-baseline.lua" "$baseline_account" "$baseline_jwt"

# Helpers over $results.
rps_of() { awk -v n="$1" '$1==n {print $2}' <<<"$(printf '%s\n' "${results[@]}")"; }
field_of() { awk -v n="$1" -v f="$2" '$1==n {print $f}' <<<"$(printf '%s\n' "${results[@]}")"; }
ratio() { awk -v a="$(rps_of "$1")" -v b="$(rps_of "$2")" 'BEGIN {printf "%.2f", a/b}'; }
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }

# audit_rounds [4x]: the JWT read with the audit stage on and off (--audit off, which exists
# only for this), in $ROUNDS rounds with a fresh server each, so that this machine's drift
# (the same build swings by a quarter between minutes) hits both sides alike: the two
# measurements a ratio compares run back to back, and the order alternates (on first in
# odd rounds, off first in even ones), so a drift within a round does not always favour
# the same side. With `4x`, each round then compares the two at four times the
# connections, in the same way.
audit_rounds() {
  local order connections suffix
  for round in $(seq 1 "$ROUNDS"); do
    order="on off"; [ $((round % 2)) = 0 ] && order="off on"
    for connections in "$CONNECTIONS" ${1:+$((CONNECTIONS * 4))}; do
      suffix=""; [ "$connections" = "$CONNECTIONS" ] || suffix=-4x
      for side in $order; do
        extra=(); [ "$side" = off ] && extra=(--audit off)
        start "audit-$side$suffix-$round" --rate-limit '* / 1000000/s burst=1000000 key=user' "${extra[@]}"
        if [ -z "$suffix" ]; then
          measure_threads "jwt-read-audit-$side-$round" "https://127.0.0.1:$port$read_path" "Authorization: Bearer $jwt"
          [ "$round" = 1 ] && [ "$side" = off ] && [ "${1:-}" = 4x ] && measure apiStatus-audit-off "https://127.0.0.1:$port/apiStatus"
        else
          CONNECTIONS=$connections measure "jwt-read-audit-$side-4x-$round" "https://127.0.0.1:$port$read_path" "Authorization: Bearer $jwt"
        fi
        stop_server
      done
    done
  done
}

# audit_summary SUFFIX: the per-round ratios and their median, the latency added, and what
# the stage costs in machine CPU per request (medians over the rounds).
audit_summary() {
  local ratios=() p50s=() p99s=() cpu_on=() cpu_off=()
  for round in $(seq 1 "$ROUNDS"); do
    local on="jwt-read-audit-on$1-$round" off="jwt-read-audit-off$1-$round"
    ratios+=("$(ratio "$on" "$off")")
    p50s+=("$(awk -v a="$(field_of "$on" 3)" -v b="$(field_of "$off" 3)" 'BEGIN {printf "%+.2f", a-b}')")
    p99s+=("$(awk -v a="$(field_of "$on" 4)" -v b="$(field_of "$off" 4)" 'BEGIN {printf "%+.2f", a-b}')")
    cpu_on+=("$(field_of "$on" 6)"); cpu_off+=("$(field_of "$off" 6)")
  done
  local on off; on=$(median "${cpu_on[@]}"); off=$(median "${cpu_off[@]}")
  echo "$(printf '%s, ' "${ratios[@]}" | sed 's/, $//') (median **$(median "${ratios[@]}")**); latency added: p50 $(median "${p50s[@]}") ms, p99 $(median "${p99s[@]}") ms; machine CPU per request $on µs on, $off µs off (the stage: $(awk -v a="$on" -v b="$off" 'BEGIN {printf "%+.1f", a-b}') µs; two saturated cores allow at most $(awk -v a="$on" -v b="$off" 'BEGIN {printf "%.2f", b/a}'))"
}

if [ "${AB:-}" = audit ]; then
  audit_rounds
  {
    echo "# A/B: the JWT read with the audit stage on and off, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency, keep-alive over TLS; $ROUNDS alternating rounds."
    echo
    echo "| round | audit on req/s (p50 / p99 ms) | audit off req/s (p50 / p99 ms) | on / off | machine CPU µs/request on / off |"
    echo "|---|---|---|---|---|"
    for round in $(seq 1 "$ROUNDS"); do
      on="jwt-read-audit-on-$round" off="jwt-read-audit-off-$round"
      echo "| $round | $(rps_of "$on") ($(field_of "$on" 3) / $(field_of "$on" 4)) | $(rps_of "$off") ($(field_of "$off" 3) / $(field_of "$off" 4)) | $(ratio "$on" "$off") | $(field_of "$on" 6) / $(field_of "$off" 6) |"
    done
    echo
    echo "Audit on / off: $(audit_summary "")"
    echo
    echo "Share of one core per server thread:"
    echo
    for line in "${thread_shares[@]}"; do echo "- $line"; done
  } | tee "${OUT%.md}-audit.md"
  exit 0
fi

# The JWT read with the audit archive off and on: on, each worker seals a segment every
# 4 MiB of records (about every 0.3 s at this read's rate) and ships it to SeaweedFS with
# a signed digest every 5 s, as the run goes. Each side has its own copy of the data
# directory, so on rounds ship their own segments only. Besides the machine's CPU per
# request, the paygate process's and SeaweedFS's own are recorded: on this machine the
# S3 service shares the two cores with paygate and wrk, which a deployment does not.
# proc_ticks PID: CPU ticks of a process, all its threads (utime + stime).
proc_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
if [ "${AB:-}" = archive ]; then
  : "${PAYGATE_TEST_S3_ENDPOINT:?run it under scripts/s3.sh: AB=archive bash scripts/s3.sh run bash scripts/loadtest.sh}"
  printf 'AWS_ACCESS_KEY_ID=%s\nAWS_SECRET_ACCESS_KEY=%s\n' "$PAYGATE_TEST_S3_ACCESS_KEY" \
    "$PAYGATE_TEST_S3_SECRET_KEY" >"$work/s3.credentials"
  chmod 600 "$work/s3.credentials"
  curl -sS -o /dev/null -X PUT --aws-sigv4 aws:amz:us-east-1:s3 \
    --user "$PAYGATE_TEST_S3_ACCESS_KEY:$PAYGATE_TEST_S3_SECRET_KEY" \
    -H 'x-amz-bucket-object-lock-enabled: true' "$PAYGATE_TEST_S3_ENDPOINT/paygate-loadtest"
  weed_pid=$(cat "${PAYGATE_TEST_S3_DIR:?}/pid")
  archive=(--audit-archive s3://paygate-loadtest/audit --audit-archive-endpoint "$PAYGATE_TEST_S3_ENDPOINT"
    --audit-archive-credentials "$work/s3.credentials" --audit-archive-node loadtest
    --audit-archive-retention 1 --audit-digest-interval 5)
  cp -a data data-on; cp -a data data-off
  declare -A process_cpu
  for round in $(seq 1 "$ROUNDS"); do
    order="on off"; [ $((round % 2)) = 0 ] && order="off on"
    for side in $order; do
      extra=(); [ "$side" = on ] && extra=("${archive[@]}")
      start "archive-$side-$round" --data-dir "data-$side" \
        --rate-limit '* / 1000000/s burst=1000000 key=user' --audit-rotate-bytes 4194304 "${extra[@]}"
      name="jwt-read-archive-$side-$round"
      paygate_before=$(proc_ticks "$pid"); weed_before=$(proc_ticks "$weed_pid")
      measure "$name" "https://127.0.0.1:$port$read_path" "Authorization: Bearer $jwt"
      paygate_ticks=$(($(proc_ticks "$pid") - paygate_before)); weed_ticks=$(($(proc_ticks "$weed_pid") - weed_before))
      requests=$(awk -v r="$(rps_of "$name")" -v d="${DURATION%s}" 'BEGIN {print r * d}')
      process_cpu[$name]=$(awk -v p="$paygate_ticks" -v w="$weed_ticks" -v n="$requests" -v hz="$(getconf CLK_TCK)" \
        'BEGIN {printf "%.1f / %.1f", p / hz * 1e6 / n, w / hz * 1e6 / n}')
      stop_server
    done
  done
  shipped=$(cat "$work"/archive-on-*.log | grep -c "audit archive: stored" || true)
  digests=$(cat "$work"/archive-on-*.log | grep -c "audit archive: signed digest" || true)
  {
    echo "# A/B: the JWT read with the audit archive off and on, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency, keep-alive over TLS; $ROUNDS alternating rounds; segments sealed every 4 MiB; $shipped segments and $digests digests shipped during the on rounds."
    echo
    echo "| round | archive on req/s (p50 / p99 ms) | archive off req/s (p50 / p99 ms) | on / off | machine CPU µs/request on / off | paygate / SeaweedFS CPU µs/request, on | paygate CPU µs/request, off |"
    echo "|---|---|---|---|---|---|---|"
    ratios=()
    for round in $(seq 1 "$ROUNDS"); do
      on="jwt-read-archive-on-$round" off="jwt-read-archive-off-$round"
      ratios+=("$(ratio "$on" "$off")")
      echo "| $round | $(rps_of "$on") ($(field_of "$on" 3) / $(field_of "$on" 4)) | $(rps_of "$off") ($(field_of "$off" 3) / $(field_of "$off" 4)) | $(ratio "$on" "$off") | $(field_of "$on" 6) / $(field_of "$off" 6) | ${process_cpu[$on]} | ${process_cpu[$off]%% /*} |"
    done
    echo
    echo "Archive on / off: median **$(median "${ratios[@]}")**"
  } | tee "${OUT%.md}-archive.md"
  exit 0
fi

# Token reads while another client floods Basic requests, each with a username never seen
# before (a fresh guess budget every time): $ROUNDS rounds of the reads on a quiet server
# and under the flood, on one server with the default password limits.
flood_rounds() {
  # The Basic headers are encoded once, up front (5,000 usernames, used in turn), so that
  # the flooding wrk spends its CPU on sending, not on base64 in Lua.
  cat > "$work/flood.lua" <<'LUA'
local b = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'
local function base64(data)
  return ((data:gsub('.', function(x)
    local r, byte = '', x:byte()
    for i = 8, 1, -1 do r = r .. (byte % 2 ^ i - byte % 2 ^ (i - 1) > 0 and '1' or '0') end
    return r
  end) .. '0000'):gsub('%d%d%d?%d?%d?%d?', function(x)
    if #x < 6 then return '' end
    local c = 0
    for i = 1, 6 do c = c + (x:sub(i, i) == '1' and 2 ^ (6 - i) or 0) end
    return b:sub(c + 1, c + 1)
  end) .. ({ '', '==', '=' })[#data % 3 + 1])
end
local requests = {}
local n = 0
init = function(args)
  local salt = math.random(1, 1000000000)
  for i = 1, 5000 do
    local header = "Basic " .. base64(string.format("flood%d-%d:not-a-password", salt, i))
    requests[i] = wrk.format("GET", "/apiStatus", { ["Authorization"] = header })
  end
end
request = function()
  n = n % #requests + 1
  return requests[n]
end
LUA
  for round in $(seq 1 "$ROUNDS"); do
    DEFAULT_LIMITS=1 start "flood-$round" --rate-limit '* / 1000000/s burst=1000000 key=user'
    measure "jwt-read-quiet-$round" "https://127.0.0.1:$port$read_path" "Authorization: Bearer $jwt"
    wrk -t1 -c8 -d"$(( ${DURATION%s} + 2 ))s" -s "$work/flood.lua" "https://127.0.0.1:$port/" > "$work/flood-$round.txt" &
    local flooder=$!
    sleep 1
    measure "jwt-read-flooded-$round" "https://127.0.0.1:$port$read_path" "Authorization: Bearer $jwt"
    wait "$flooder" || true
    flood_answers+=("$(awk '/requests in/ {print $1}' "$work/flood-$round.txt") $(awk '/Non-2xx or 3xx responses/ {print $5}' "$work/flood-$round.txt")")
    stop_server
  done
}

if [ "${AB:-}" = flood ]; then
  flood_answers=()
  flood_rounds
  {
    echo "# Token reads quiet and under a flood of Basic requests with fresh usernames, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency for the JWT reads; the flood: wrk -t1 -c8, a new username per request, default --password-check-limit and --password-queue. $ROUNDS rounds."
    echo
    echo "| round | quiet req/s (p50 / p99 ms) | flooded req/s (p50 / p99 ms) | flooded / quiet | flood requests (refused) |"
    echo "|---|---|---|---|---|"
    for round in $(seq 1 "$ROUNDS"); do
      q="jwt-read-quiet-$round" f="jwt-read-flooded-$round"
      read -r sent refused <<<"${flood_answers[$((round - 1))]}"
      echo "| $round | $(rps_of "$q") ($(field_of "$q" 3) / $(field_of "$q" 4)) | $(rps_of "$f") ($(field_of "$f" 3) / $(field_of "$f" 4)) | $(ratio "$f" "$q") | $sent (${refused:-0}) |"
    done
  } | tee "${OUT%.md}-flood.md"
  exit 0
fi

# cache_counts: "hits fetches" of the running server's cache, from its /metrics.
cache_counts() {
  curl -sS --cacert "$ca" "https://127.0.0.1:$port/metrics" |
    awk '/^paygate_cache_lookups_total/ && /result="hit"/ {h += $NF}
         /^paygate_cache_lookups_total/ && /result="fetched"/ {f += $NF}
         END {printf "%d %d\n", h, f}'
}
# measure_mixed NAME [WRITERS ACCOUNT]: the JWT read, alone or while WRITERS connections
# create payments on ACCOUNT; records the writers' rate and the cache hit rate meanwhile.
mixed_notes=()
measure_mixed() {
  local name=$1 writers=${2:-} target=${3:-}
  local before after writer_pid=""
  before=$(cache_counts)
  if [ -n "$writers" ]; then
    # A target of "apart" means the second server's account, with its own token.
    local writer_port=$port writer_jwt=$jwt
    [ "$target" = apart ] && target=$apart_account writer_port=$apart_port writer_jwt=$apart_jwt
    create_script "$work/mixed-$name.lua" "$target" "$writer_jwt" paced
    wrk -t1 -c"$writers" -d"$(( ${DURATION%s} + 2 ))s" -s "$work/mixed-$name.lua" \
      "https://127.0.0.1:$writer_port/" > "$work/mixed-$name.txt" &
    writer_pid=$!
    sleep 1
  fi
  measure "$name" "https://127.0.0.1:$port$read_path" "Authorization: Bearer $jwt"
  after=$(cache_counts)
  local writes="-"
  if [ -n "$writer_pid" ]; then
    wait "$writer_pid" || true
    writes=$(awk '/^Requests\/sec/ {printf "%.0f", $2}' "$work/mixed-$name.txt")
  fi
  mixed_notes+=("$name $writes $(awk -v b="$before" -v a="$after" 'BEGIN {split(b, x, " "); split(a, y, " "); h = y[1] - x[1]; f = y[2] - x[2]; if (h + f) printf "%.4f", h / (h + f); else printf "-"}')")
}

if [ "${AB:-}" = mixed ]; then
  # With BASELINE, each round runs that binary too, on its own data directory, first.
  sides="current"; [ -n "${BASELINE:-}" ] && sides="baseline current"
  for side in $sides; do
    binary=$paygate side_args=()
    [ "$side" = baseline ] && binary=$BASELINE side_args=(--data-dir "$work/data-baseline")
    # A second account of the same user, for writes that touch nothing the reads use.
    start "mixed-setup-$side" --rate-limit none "${side_args[@]}"
    other=$(curl -sS --cacert "$ca" -u "$user:$pass" -X POST "https://127.0.0.1:$port/accounts" \
      -H 'Content-Type: application/json' -d '{"name":"Other","currency":"EUR"}' | sed -E 's/.*"id":"([^"]+)".*/\1/')
    stop_server
    printf -v "other_$side" '%s' "$other"
  done
  # The control: a second server (this build, a data directory of its own) that the
  # "apart" writers write to. Those writes take the machine's CPU as the others do but
  # share nothing with the reads, not even a process: what the reads lose to them is what
  # writes cost on this machine whatever the cache does.
  binary=$paygate
  start mixed-apart --rate-limit '* / 1000000/s burst=1000000 key=user' --data-dir "$work/data-apart"
  apart_port=$port
  curl -sS --cacert "$ca" -X POST "https://127.0.0.1:$apart_port/users" -H 'Content-Type: application/json' \
    -d "{\"username\":\"$user\",\"password\":\"$pass\"}" >/dev/null
  apart_account=$(curl -sS --cacert "$ca" -u "$user:$pass" -X POST "https://127.0.0.1:$apart_port/accounts" \
    -H 'Content-Type: application/json' -d '{"name":"Apart","currency":"EUR"}' | sed -E 's/.*"id":"([^"]+)".*/\1/')
  apart_jwt=$(curl -sS --cacert "$ca" -u "$user:$pass" -X POST "https://127.0.0.1:$apart_port/sessions" \
    | sed -E 's/.*"token":"([^"]+)".*/\1/')
  binary=""
  current_read=$read_path current_jwt=$jwt current_account=$account
  for round in $(seq 1 "$ROUNDS"); do
    for side in $sides; do
      binary=$paygate side_args=() prefix=""
      read_path=$current_read jwt=$current_jwt account=$current_account other=$other_current
      if [ "$side" = baseline ]; then
        binary=$BASELINE side_args=(--data-dir "$work/data-baseline") prefix="baseline-"
        read_path=$baseline_read_path jwt=$baseline_jwt account=$baseline_account other=$other_baseline
      fi
      start "mixed-$side-$round" --rate-limit '* / 1000000/s burst=1000000 key=user' "${side_args[@]}"
      measure_mixed "${prefix}reads-alone-$round"
      measure_mixed "${prefix}reads-1-writer-other-$round" 1 "$other"
      measure_mixed "${prefix}reads-4-writers-other-$round" 4 "$other"
      measure_mixed "${prefix}reads-1-writer-same-$round" 1 "$account"
      measure_mixed "${prefix}reads-1-writer-apart-$round" 1 apart
      stop_server
    done
  done
  binary=""
  {
    echo "# The JWT read alone and under payment writes, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency for the reads of one payment; writers: wrk -t1 -cN creating payments (a fresh Idempotency-Key each${WRITE_DELAY_MS:+, $WRITE_DELAY_MS ms apart per connection}) on another account of the same user, on the read payment's own account, or (apart) on a second server with its own data directory. $ROUNDS rounds, one server each."
    echo
    echo "| round | scenario | reads/s (p50 / p99 ms) | vs reads alone | p99 vs alone | payments/s written | cache hit rate |"
    echo "|---|---|---|---|---|---|---|"
    for round in $(seq 1 "$ROUNDS"); do
      for side in $sides; do
        prefix=""; [ "$side" = baseline ] && prefix="baseline-"
        alone="${prefix}reads-alone-$round"
        for scenario in alone 1-writer-other 4-writers-other 1-writer-same 1-writer-apart; do
          n="${prefix}reads-$scenario-$round"
          read -r _ writes hit <<<"$(printf '%s\n' "${mixed_notes[@]}" | grep "^$n ")"
          echo "| $round | ${prefix}$scenario | $(rps_of "$n") ($(field_of "$n" 3) / $(field_of "$n" 4)) | $(ratio "$n" "$alone") | $(awk -v a="$(field_of "$n" 4)" -v b="$(field_of "$alone" 4)" 'BEGIN {printf "%.2f", a/b}') | $writes | $hit |"
        done
      done
    done
  } | tee "${OUT%.md}-mixed.md"
  exit 0
fi

# The JWT read and payment creation on the two storage backends, beside the bare
# responder, in $ROUNDS rounds: SQLite in the data directory, and a PostgreSQL 15 that
# scripts/pg.sh starts on this machine (TLS on loopback, synchronous_commit=on).
if [ "${AB:-}" = postgres ]; then
  pg_out=$(bash "$root/scripts/pg.sh" start)
  pg_dir=$(sed -n 's/^PG_DIR=//p' <<<"$pg_out")
  pg_url=$(sed -n 's/^PAYGATE_TEST_DATABASE=//p' <<<"$pg_out")
  trap 'cleanup; bash "$root/scripts/pg.sh" stop "$pg_dir"' EXIT
  # On recycled WAL segments, as a server that has run a while: a new cluster zero-fills
  # each segment as it first needs it, and the commit that crosses into it waits.
  bash "$root/scripts/pg.sh" warm "$pg_dir"
  sqlite_read=$read_path sqlite_jwt=$jwt
  prepare "$work/data-pg" --database "$pg_url${PG_OPTIONS:+?$PG_OPTIONS}"
  stop_server
  pg_read=$read_path pg_jwt=$jwt
  create_script "$work/create-pg.lua" "$account" "$jwt"
  "$bare" 127.0.0.1:0 certs/server.crt certs/server.key "$read_bytes" 2>"$work/bare-pg.log" &
  pids+=("$!"); sleep 0.5
  bport=$(sed -n 's/.*listening on https:\/\/127.0.0.1://p' "$work/bare-pg.log")
  limits=(--rate-limit '* / 1000000/s burst=1000000 key=user')
  for round in $(seq 1 "$ROUNDS"); do
    order="sqlite postgres"; [ $((round % 2)) = 0 ] && order="postgres sqlite"
    measure "bare-read-$round" "https://127.0.0.1:$bport/"
    for side in $order; do
      if [ "$side" = sqlite ]; then
        start "pg-ab-sqlite-$round" "${limits[@]}"
        measure "jwt-read-sqlite-$round" "https://127.0.0.1:$port$sqlite_read" "Authorization: Bearer $sqlite_jwt"
        SCRIPT=$work/create.lua measure "create-sqlite-$round" "https://127.0.0.1:$port/"
      else
        start "pg-ab-postgres-$round" "${limits[@]}" --data-dir "$work/data-pg" \
          --database "$pg_url${PG_OPTIONS:+?$PG_OPTIONS}" ${PG_POOL:+--database-pool-size "$PG_POOL"}
        measure "jwt-read-postgres-$round" "https://127.0.0.1:$port$pg_read" "Authorization: Bearer $pg_jwt"
        SCRIPT=$work/create-pg.lua measure "create-postgres-$round" "https://127.0.0.1:$port/"
      fi
      stop_server
    done
  done
  {
    echo "# SQLite and PostgreSQL side by side, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency, keep-alive over TLS; one worker process; $ROUNDS rounds, the order of the backends alternating. PostgreSQL 15 on this machine (scripts/pg.sh: TLS on loopback, synchronous_commit=on, fsync=on; WAL segments recycled by pg.sh warm)${PG_OPTIONS:+, URL options $PG_OPTIONS}${PG_POOL:+, pool $PG_POOL}."
    echo
    echo "| round | bare read req/s | JWT read SQLite (p50 / p99 ms) | JWT read PostgreSQL (p50 / p99 ms) | PG / SQLite | payments/s SQLite (p99 ms) | payments/s PostgreSQL (p99 ms) |"
    echo "|---|---|---|---|---|---|---|"
    reads=() creates=()
    for round in $(seq 1 "$ROUNDS"); do
      sq="jwt-read-sqlite-$round" pg="jwt-read-postgres-$round"
      reads+=("$(ratio "$pg" "$sq")")
      echo "| $round | $(rps_of "bare-read-$round") | $(rps_of "$sq") ($(field_of "$sq" 3) / $(field_of "$sq" 4)) | $(rps_of "$pg") ($(field_of "$pg" 3) / $(field_of "$pg" 4)) | $(ratio "$pg" "$sq") | $(rps_of "create-sqlite-$round") ($(field_of "create-sqlite-$round" 4)) | $(rps_of "create-postgres-$round") ($(field_of "create-postgres-$round" 4)) |"
    done
    echo
    echo "Median JWT read PostgreSQL / SQLite: **$(median "${reads[@]}")**; median payments/s: SQLite $(median $(for r in $(seq 1 "$ROUNDS"); do rps_of "create-sqlite-$r"; done)), PostgreSQL $(median $(for r in $(seq 1 "$ROUNDS"); do rps_of "create-postgres-$r"; done)); non-2xx answers: $(printf '%s\n' "${results[@]}" | awk '{n += $5} END {print n + 0}')."
  } | tee "${OUT%.md}-postgres.md"
  exit 0
fi

if [ -n "${BASELINE:-}" ]; then
  # A/B: the same scenario with the baseline binary and this build, alternating, so that
  # the machine's drift hits both alike.
  for round in 1 2 3; do
    for side in baseline current; do
      binary=$paygate side_args=() side_read=$read_path side_jwt=$jwt
      if [ "$side" = baseline ]; then
        binary=$BASELINE side_args=(--data-dir "$work/data-baseline")
        side_read=$baseline_read_path side_jwt=$baseline_jwt
      fi
      start "ab-$side-$round" --rate-limit '* / 1000000/s burst=1000000 key=user' "${side_args[@]}"
      if [ "${AB:-jwt-read}" = create ]; then
        script=$work/create.lua; [ "$side" = baseline ] && script=$work/create-baseline.lua
        SCRIPT=$script measure "$AB-$side-$round" "https://127.0.0.1:$port/"
      else
        measure "jwt-read-$side-$round" "https://127.0.0.1:$port$side_read" "Authorization: Bearer $side_jwt"
      fi
      stop_server
      binary=""
    done
  done
  {
    echo "# A/B: ${AB:-jwt-read}, $BASELINE (baseline) against this build, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "| round | baseline req/s (p50 / p99 ms) | current req/s (p50 / p99 ms) | current / baseline |"
    echo "|---|---|---|---|"
    for round in 1 2 3; do
      read -r _ b_rps b_p50 b_p99 _ <<<"$(printf '%s\n' "${results[@]}" | grep "^${AB:-jwt-read}-baseline-$round ")"
      read -r _ c_rps c_p50 c_p99 _ <<<"$(printf '%s\n' "${results[@]}" | grep "^${AB:-jwt-read}-current-$round ")"
      echo "| $round | $b_rps ($b_p50 / $b_p99) | $c_rps ($c_p50 / $c_p99) | $(awk -v a="$c_rps" -v b="$b_rps" 'BEGIN {printf "%.2f", a/b}') |"
    done
  } | tee "${OUT%.md}-ab.md"
  exit 0
fi

echo "== bare responder" >&2
"$bare" 127.0.0.1:0 certs/server.crt certs/server.key "$status_bytes" 2>"$work/bare-small.log" &
pid=$!; pids+=("$pid"); sleep 0.5
bport=$(sed -n 's/.*listening on https:\/\/127.0.0.1://p' "$work/bare-small.log")
measure bare-small "https://127.0.0.1:$bport/"
"$bare" 127.0.0.1:0 certs/server.crt certs/server.key "$read_bytes" 2>"$work/bare-read.log" &
pid=$!; pids+=("$pid"); sleep 0.5
bport=$(sed -n 's/.*listening on https:\/\/127.0.0.1://p' "$work/bare-read.log")
measure bare-read "https://127.0.0.1:$bport/"
"$bare" 127.0.0.1:0 certs/server.crt certs/server.key "$refusal_bytes" 2>"$work/bare-refusal.log" &
pid=$!; pids+=("$pid"); sleep 0.5
bport=$(sed -n 's/.*listening on https:\/\/127.0.0.1://p' "$work/bare-refusal.log")
measure bare-refusal "https://127.0.0.1:$bport/"

echo "== paygate, limiter on, nothing rejected" >&2
start on --rate-limit '* / 1000000/s burst=1000000 key=user'
measure apiStatus "https://127.0.0.1:$port/apiStatus"
measure_threads jwt-read-limiter-on "https://127.0.0.1:$port$read_path" "Authorization: Bearer $jwt"
# Durable-before-proceeding is latency-bound at low concurrency (Little's law): the same
# read with four times the connections shows what group commit does with more to batch.
CONNECTIONS=$((CONNECTIONS * 4)) measure jwt-read-4x-connections "https://127.0.0.1:$port$read_path" "Authorization: Bearer $jwt"
measure opaque-read-limiter-on "https://127.0.0.1:$port$read_path" "Authorization: Bearer $opaque"
measure basic-read-limiter-on "https://127.0.0.1:$port$read_path" "$basic"
# At rest after the run: queued Basic requests finish within a second of wrk's end.
sleep 2; rss_on=$(rss_kib "$pid"); peak_on=$(peak_kib "$pid")
SCRIPT=$work/create.lua measure create-payment "https://127.0.0.1:$port/"
stop_server

echo "== paygate, limiter on, audit log on and off in turn (--audit off: only to measure the audit's cost)" >&2
audit_rounds 4x

echo "== paygate, limiter off" >&2
start off --rate-limit none --guess-limit none
measure apiStatus-limiter-off "https://127.0.0.1:$port/apiStatus"
measure jwt-read-limiter-off "https://127.0.0.1:$port$read_path" "Authorization: Bearer $jwt"
measure opaque-read-limiter-off "https://127.0.0.1:$port$read_path" "Authorization: Bearer $opaque"
measure basic-read-limiter-off "https://127.0.0.1:$port$read_path" "$basic"
stop_server

echo "== paygate, a flood the limiter rejects" >&2
start flood --rate-limit 'GET /apiStatus 1/day burst=1 key=ip'
measure flood-rejected "https://127.0.0.1:$port/apiStatus"
sleep 2; rss_flood=$(rss_kib "$pid")
stop_server

echo "== scaling: the JWT read (limiter and audit on) with 1, 2 and 4 worker processes" >&2
# Each worker runs a current-thread runtime (the default); the same with two runtime
# threads per worker, for the comparison that chose that default.
for n in 1 2 4; do
  start "workers-$n" --workers "$n" --rate-limit '* / 1000000/s burst=1000000 key=user'
  measure "jwt-read-workers-$n" "https://127.0.0.1:$port$read_path" "Authorization: Bearer $jwt"
  stop_server
done
for n in 1 2; do
  start "workers-$n-multithread" --workers "$n" --worker-threads 2 --rate-limit '* / 1000000/s burst=1000000 key=user'
  measure "jwt-read-workers-$n-multithread" "https://127.0.0.1:$port$read_path" "Authorization: Bearer $jwt"
  stop_server
done

echo "== audit group commit: the JWT read at 4, 16, 64 and 256 connections" >&2
# What each commit carries as concurrency grows: the server logs its records and commits
# when it stops ("audit log closed: R records in C commits").
batches=()
for c in 4 16 64 256; do
  start "batch-$c" --rate-limit '* / 1000000/s burst=1000000 key=user'
  CONNECTIONS=$c measure "jwt-read-c$c" "https://127.0.0.1:$port$read_path" "Authorization: Bearer $jwt"
  stop_server
  batches+=("$c $(rps_of "jwt-read-c$c") $(sed -nE 's/.*audit log closed: ([0-9]+) records in ([0-9]+) commits.*/\1 \2/p' "$work/batch-$c.log")")
done

mkdir -p "$(dirname "$OUT")"
# The raw figures, for scripts/plots.py: every scenario with the bare responder it is
# compared with, and the group-commit sweep.
{
  printf 'scenario\trps\tp50_ms\tp99_ms\tnon2xx\tcpu_us\tbare\n'
  for line in "${results[@]}"; do
    read -r name rps p50 p99 non2xx cpu_us <<<"$line"
    case $name in
      bare-*) ref=$name ;;
      *read*|create*) ref=bare-read ;;
      *refus*|flood*) ref=bare-refusal ;;
      *) ref=bare-small ;;
    esac
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$rps" "$p50" "$p99" "$non2xx" "$cpu_us" "$ref"
  done
} > "${OUT%.md}.tsv"
{
  printf 'connections\trps\trecords\tcommits\tseconds\n'
  for line in "${batches[@]}"; do
    read -r c rps records commits <<<"$line"
    printf '%s\t%s\t%s\t%s\t%s\n' "$c" "$rps" "${records:-0}" "${commits:-0}" "${DURATION%s}"
  done
} > "${OUT%.md}-batches.tsv"
{
  echo "# paygate load test, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs"
  echo
  echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency, keep-alive over TLS; load generator on the same machine."
  echo
  echo "Bodies: apiStatus $status_bytes B, payment read $read_bytes B, 429 problem $refusal_bytes B; each scenario is compared with the bare responder serving a body of the same size."
  echo
  echo "| scenario | requests/s | p50 ms | p99 ms | non-2xx | vs bare (same body size) | machine CPU µs/request |"
  echo "|---|---|---|---|---|---|---|"
  small=$(awk '$1=="bare-small" {print $2}' <<<"$(printf '%s\n' "${results[@]}")")
  big=$(awk '$1=="bare-read" {print $2}' <<<"$(printf '%s\n' "${results[@]}")")
  refusal=$(awk '$1=="bare-refusal" {print $2}' <<<"$(printf '%s\n' "${results[@]}")")
  for line in "${results[@]}"; do
    read -r name rps p50 p99 non2xx cpu_us <<<"$line"
    case $name in
      *read*|create*) ref=$big ;;
      *refus*|flood*) ref=$refusal ;;
      *) ref=$small ;;
    esac
    ratio=$(awk -v a="$rps" -v b="$ref" 'BEGIN {printf "%.2f", a/b}')
    echo "| $name | $rps | $p50 | $p99 | $non2xx | $ratio | $cpu_us |"
  done
  echo
  echo "Limiter on / off: JWT read $(ratio jwt-read-limiter-on jwt-read-limiter-off), opaque read $(ratio opaque-read-limiter-on opaque-read-limiter-off), Basic read $(ratio basic-read-limiter-on basic-read-limiter-off), apiStatus $(ratio apiStatus apiStatus-limiter-off)"
  echo "Audit on / off (limiter on), JWT read in $ROUNDS alternating rounds: $CONNECTIONS connections $(audit_summary ""); $((CONNECTIONS * 4)) connections $(audit_summary -4x). apiStatus $(ratio apiStatus apiStatus-audit-off)"
  echo "CPU of one core per server thread during the JWT read: $(printf "%s; " "${thread_shares[@]}" | sed "s/; $//")"
  echo "Tokens against Basic (limiter on): JWT $(ratio jwt-read-limiter-on basic-read-limiter-on)x, opaque $(ratio opaque-read-limiter-on basic-read-limiter-on)x"
  echo "Workers (JWT read, per worker in brackets): 1 → $(rps_of jwt-read-workers-1) req/s, 2 → $(rps_of jwt-read-workers-2) ($(awk -v a="$(rps_of jwt-read-workers-2)" 'BEGIN {printf "%.0f", a/2}')), 4 → $(rps_of jwt-read-workers-4) ($(awk -v a="$(rps_of jwt-read-workers-4)" 'BEGIN {printf "%.0f", a/4}')); 2 and 4 against 1: $(ratio jwt-read-workers-2 jwt-read-workers-1), $(ratio jwt-read-workers-4 jwt-read-workers-1); one runtime thread per worker against two: 1 worker $(ratio jwt-read-workers-1 jwt-read-workers-1-multithread), 2 workers $(ratio jwt-read-workers-2 jwt-read-workers-2-multithread)"
  echo "Audit group commit (JWT read; connections: req/s, records per commit): $(for line in "${batches[@]}"; do read -r c rps records commits <<<"$line"; printf '%s: %s, %s; ' "$c" "$rps" "$(awk -v r="${records:-0}" -v n="${commits:-1}" 'BEGIN {printf "%.1f", r/(n>0?n:1)}')"; done | sed 's/; $//')"
  echo "Resident memory 2 s after the run: limiter-on server $((rss_on / 1024)) MiB (peak during the run $((peak_on / 1024)) MiB), flood server $((rss_flood / 1024)) MiB"
} | tee "$OUT"
