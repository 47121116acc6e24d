#!/usr/bin/env bash
# End-to-end smoke test of docker-compose.yml + Dockerfile.
#
# NOT RUN IN CI: it needs Docker with Compose v2, which CI does not have
# (tests/test_compose.py checks the files statically instead). Run it by hand:
#
#     scripts/compose-e2e.sh            # build, start, check, tear down
#     KEEP=1 scripts/compose-e2e.sh     # leave the stack running afterwards
#
# It uses its own compose project (nudgeflow-e2e) and the published ports of
# docker-compose.yml (127.0.0.1:9094, :8080, :6380), so stop a dev stack first.
#
# What it checks:
#   1. the images build and every service gets healthy (topics job exits 0);
#   2. a customer with a profile in Redis views one product 3 times and reads a
#      page for 130 s: `product_interest` and `engaged_reader` (TRIGGERS.md) must
#      reach triggers.decisions, and the dispatch API must know the trigger;
#   3. a malformed event ends on events.dlq;
#   4. an event sent to the collector (write key dev-write-key) reaches `events`.
set -euo pipefail

cd "$(dirname "$0")/.."
PROJECT=${PROJECT:-nudgeflow-e2e}
COMPOSE=(docker compose -p "$PROJECT" -f docker-compose.yml)
TIMEOUT_S=${TIMEOUT_S:-180}
USER_ID="e2e-$(date +%s)"

log() { printf '\n== %s\n' "$*"; }
fail() {
    printf '\nFAILED: %s\n' "$*" >&2
    "${COMPOSE[@]}" ps -a >&2 || true
    "${COMPOSE[@]}" logs --tail 60 flow dispatch-api collector topics >&2 || true
    exit 1
}
cleanup() {
    if [[ -n "${KEEP:-}" ]]; then
        log "KEEP is set: the stack stays up (${COMPOSE[*]} down -v to remove it)"
    else
        log "tearing down"
        "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

container() { "${COMPOSE[@]}" ps -a -q "$1"; }

wait_for() {  # wait_for SERVICE healthy|running|exited: until it is, or fail
    local service=$1 want=$2 deadline=$((SECONDS + TIMEOUT_S)) id state
    while ((SECONDS < deadline)); do
        id=$(container "$service")
        if [[ -n "$id" ]]; then
            case $want in
                healthy) state=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$id") ;;
                *) state=$(docker inspect -f '{{.State.Status}}' "$id") ;;
            esac
            if [[ $want == exited && $state == exited ]]; then
                code=$(docker inspect -f '{{.State.ExitCode}}' "$id")
                if [[ $code != 0 ]]; then
                    fail "$service exited with code $code"
                fi
            fi
            if [[ $state == "$want" ]]; then
                echo "$service: $want"
                return 0
            fi
        fi
        sleep 2
    done
    fail "$service did not become $want within ${TIMEOUT_S}s"
}

kafka() { "${COMPOSE[@]}" exec -T kafka "/opt/kafka/bin/$1" --bootstrap-server kafka:9092 "${@:2}"; }

consume_until() {  # consume_until TOPIC PATTERN...: all messages so far, once all PATTERNs match
    local topic=$1 deadline=$((SECONDS + TIMEOUT_S)) messages pattern missing
    shift
    while ((SECONDS < deadline)); do
        messages=$(kafka kafka-console-consumer.sh --topic "$topic" --from-beginning \
            --max-messages 1000 --timeout-ms 5000 2>/dev/null || true)
        missing=""
        for pattern in "$@"; do
            grep -q -- "$pattern" <<<"$messages" || missing="$missing $pattern"
        done
        if [[ -z $missing ]]; then
            printf '%s\n' "$messages"
            return 0
        fi
    done
    printf '%s\n' "$messages" >&2
    fail "$topic: nothing matched$missing within ${TIMEOUT_S}s"
}

log "building and starting (${COMPOSE[*]})"
"${COMPOSE[@]}" up -d --build

log "waiting for health"
wait_for kafka healthy
wait_for redis healthy
wait_for topics exited
wait_for dispatch-api healthy
wait_for collector healthy
wait_for flow running

log "a profile for $USER_ID (email opt-in, so quiet hours do not defer anything)"
"${COMPOSE[@]}" exec -T redis redis-cli HSET "profile:$USER_ID" \
    segment regular name "E2E Customer" email e2e@example.com timezone UTC opt_in email >/dev/null

log "producing events"
now_ms=$("${COMPOSE[@]}" exec -T dispatch-api python -c 'import time; print(int(time.time() * 1000))')
now_ms=${now_ms//[^0-9]/}
base_ms=$((now_ms - 300000))  # a few minutes ago: live traffic, nothing in the future
product='"page_type":"product","product_id":"sku-e2e","url":"https://shop.example.com/p/sku-e2e"'
{
    for i in 1 2 3; do
        printf '%s|{"event_id":"%s-view-%s","user_id":"%s","type":"page_view","ts":%s,%s}\n' \
            "$USER_ID" "$USER_ID" "$i" "$USER_ID" "$((base_ms + i * 20000))" "$product"
    done
    printf '%s|{"event_id":"%s-leave","user_id":"%s","type":"page_leave","ts":%s,"page_type":"content","url":"https://shop.example.com/journal/e2e","dwell_ms":130000}\n' \
        "$USER_ID" "$USER_ID" "$USER_ID" "$((base_ms + 200000))"
    # Not an event: add_to_cart without product_id -> events.dlq.
    printf '%s|{"event_id":"%s-bad","user_id":"%s","type":"add_to_cart","ts":%s}\n' \
        "$USER_ID" "$USER_ID" "$USER_ID" "$((base_ms + 201000))"
} | "${COMPOSE[@]}" exec -T kafka /opt/kafka/bin/kafka-console-producer.sh \
    --bootstrap-server kafka:9092 --topic events \
    --property parse.key=true --property key.separator='|'

log "waiting for the decisions"
decisions=$(consume_until triggers.decisions '"product_interest"' '"engaged_reader"')
decisions=$(grep -- "$USER_ID" <<<"$decisions" || true)
echo "$decisions"

log "asking the dispatch API about them"
ids=$(grep -o '"trigger_id": *"[^"]*"' <<<"$decisions" | sed 's/.*"\([^"]*\)"$/\1/' | sort -u)
[[ -n "$ids" ]] || fail "the decisions carry no trigger_id"
for id in $ids; do
    # The decision says whether it was dispatched; a dispatched one must be known (200).
    if grep "$id" <<<"$decisions" | grep -q '"dispatched"'; then
        "${COMPOSE[@]}" exec -T dispatch-api python -c '
import sys, urllib.request
url = "http://127.0.0.1:8080/api/trigger/status/" + sys.argv[1]
print(urllib.request.urlopen(url, timeout=5).read().decode())
' "$id" || fail "the dispatch API does not know trigger $id"
    else
        echo "$id: not dispatched (see its decision above)"
    fi
done
"${COMPOSE[@]}" logs --tail 20 dispatch-api

log "the malformed event is dead-lettered"
dead=$(consume_until events.dlq "$USER_ID-bad")
grep -- "$USER_ID-bad" <<<"$dead"

log "an event through the collector"
"${COMPOSE[@]}" exec -T collector python -c '
import base64, json, sys, urllib.request
event = {"event_id": sys.argv[1] + "-collected", "user_id": sys.argv[1], "type": "page_view",
         "ts": int(sys.argv[2])}
key = base64.b64encode(b"dev-write-key:").decode()
request = urllib.request.Request(
    "http://127.0.0.1:8088/v1/events", data=json.dumps(event).encode(),
    headers={"Content-Type": "application/json", "Authorization": "Basic " + key})
print(urllib.request.urlopen(request, timeout=10).read().decode())
' "$USER_ID" "$((base_ms + 202000))" || fail "the collector did not take the event"
consume_until events "$USER_ID-collected" | grep -- "$USER_ID-collected"

log "OK"
