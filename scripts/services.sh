#!/usr/bin/env bash
# Local Kafka (KRaft, single node) + Redis for nudgeflow's integration tests.
#
#   scripts/services.sh up       start both (idempotent; reuses anything already answering)
#   scripts/services.sh down     stop what this script started (by pid file)
#   scripts/services.sh status   up/down for each; exit 0 only if both are up
#   scripts/services.sh kafka-up | kafka-down
#                                Kafka alone (a test's private broker that it restarts)
#
# Everything lives under <repo>/.services/ (SERVICES_DIR to put it elsewhere;
# KAFKA_LIBS to use jars fetched before). Ports: KAFKA_PORT (9092),
# KAFKA_CONTROLLER_PORT (9093), REDIS_PORT (6379).
#
# `up` prints progress on stderr; its stdout is exactly two lines, so both
#   eval "$(scripts/services.sh up | tail -2)"
#   eval "$(scripts/services.sh up)"
# set KAFKA_BOOTSTRAP and REDIS_URL.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SVC="${SERVICES_DIR:-$ROOT/.services}"
KAFKA_DIR="$SVC/kafka"
KAFKA_LIBS="${KAFKA_LIBS:-$KAFKA_DIR/libs}"
KAFKA_DATA="$KAFKA_DIR/data"
KAFKA_PROPS="$KAFKA_DIR/server.properties"
KAFKA_LOG4J="$KAFKA_DIR/log4j.properties"
KAFKA_LOG="$KAFKA_DIR/kafka.log"
KAFKA_PID="$KAFKA_DIR/kafka.pid"
REDIS_DIR="$SVC/redis"
REDIS_LOG="$REDIS_DIR/redis.log"
REDIS_PID="$REDIS_DIR/redis.pid"

KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"
REDIS_PORT="${REDIS_PORT:-6379}"
HOST=127.0.0.1
WAIT_S="${SERVICES_WAIT_S:-90}"

export DEBIAN_FRONTEND=noninteractive

log() { printf '[services] %s\n' "$*" >&2; }
die() { printf '[services] ERROR: %s\n' "$*" >&2; exit 1; }

python_bin() {
  if [[ -x "$ROOT/.venv/bin/python" ]]; then
    echo "$ROOT/.venv/bin/python"
  else
    echo python3
  fi
}

# ---------------------------------------------------------------- apt -----

as_root() {
  if [[ "$(id -u)" -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo -n "$@"
  else
    die "need root (or passwordless sudo) to run: $*"
  fi
}

APT_UPDATED=0
apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install manually: $*"
  log "installing via apt: $*"
  if [[ "$APT_UPDATED" -eq 0 ]]; then
    as_root apt-get update -qq >/dev/null
    APT_UPDATED=1
  fi
  # Keep the package's init script from starting a system-wide daemon (with
  # persistence) on the default port: invoke-rc.d honours policy-rc.d exit 101.
  local policy=/usr/sbin/policy-rc.d added_policy=0
  if [[ ! -e "$policy" ]]; then
    as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod +x $policy" && added_policy=1
  fi
  local rc=0
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@" \
    >/dev/null || rc=$?
  if [[ "$added_policy" -eq 1 ]]; then
    as_root rm -f "$policy"
  fi
  [[ "$rc" -eq 0 ]] || die "apt-get install $* failed (rc=$rc)"
}

# ------------------------------------------------------------ helpers -----

# pid_alive PIDFILE PATTERN: the pid file names a live process whose command
# line contains PATTERN (guards against recycled pids).
pid_alive() {
  local pidfile="$1" pattern="$2" pid
  [[ -s "$pidfile" ]] || return 1
  pid="$(tr -dc '0-9' <"$pidfile")"
  [[ -n "$pid" ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  if [[ -r "/proc/$pid/cmdline" ]]; then
    local cmdline
    cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
    [[ "$cmdline" == *"$pattern"* ]] || return 1
  fi
  echo "$pid"
}

stop_pid() { # stop_pid NAME PIDFILE PATTERN
  local name="$1" pidfile="$2" pattern="$3" pid i
  if ! pid="$(pid_alive "$pidfile" "$pattern")"; then
    log "$name: not running (no live pid file)"
    rm -f "$pidfile"
    return 0
  fi
  log "$name: stopping pid $pid"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 300; i++)); do # up to 30 s
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "$name: still alive after 30 s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

# ---------------------------------------------------------------- redis ---

redis_answers() {
  [[ "$(redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null || true)" == "PONG" ]]
}

redis_up() {
  if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    apt_install redis-server redis-tools
  fi
  mkdir -p "$REDIS_DIR"
  if redis_answers; then
    log "redis: reusing server already answering on $HOST:$REDIS_PORT"
    return 0
  fi
  if ! pid_alive "$REDIS_PID" redis-server >/dev/null; then
    rm -f "$REDIS_PID"
    log "redis: starting on $HOST:$REDIS_PORT"
    redis-server --bind "$HOST" --port "$REDIS_PORT" --daemonize yes \
      --pidfile "$REDIS_PID" --logfile "$REDIS_LOG" --dir "$REDIS_DIR" \
      --save '' --appendonly no >/dev/null
  fi
  local start=$SECONDS
  until redis_answers; do
    if ((SECONDS - start >= WAIT_S)); then
      log "redis: last lines of $REDIS_LOG:"
      tail -n 30 "$REDIS_LOG" >&2 2>/dev/null || true
      die "redis did not answer PING on $HOST:$REDIS_PORT within ${WAIT_S}s"
    fi
    sleep 0.2
  done
  log "redis: up after $((SECONDS - start))s"
}

# ---------------------------------------------------------------- kafka ---

KAFKA_CHECK_PY='
import sys
from confluent_kafka.admin import AdminClient
admin = AdminClient({"bootstrap.servers": sys.argv[1], "socket.timeout.ms": 2000, "log_level": 0})
admin.list_topics(timeout=float(sys.argv[2]))
'

kafka_answers() {
  local py
  py="$(python_bin)"
  if "$py" -c 'import confluent_kafka' >/dev/null 2>&1; then
    "$py" -c "$KAFKA_CHECK_PY" "$HOST:$KAFKA_PORT" 3 >/dev/null 2>&1
  elif [[ -d "$KAFKA_LIBS" ]]; then
    # Fallback without confluent_kafka: a real ApiVersions round trip via the JVM.
    timeout 20 java -cp "$KAFKA_LIBS/*" kafka.admin.BrokerApiVersionsCommand \
      --bootstrap-server "$HOST:$KAFKA_PORT" >/dev/null 2>&1
  else
    (exec 3<>"/dev/tcp/$HOST/$KAFKA_PORT") 2>/dev/null
  fi
}

kafka_fetch_jars() {
  if compgen -G "$KAFKA_LIBS/kafka_2.13-*.jar" >/dev/null; then
    return 0
  fi
  command -v java >/dev/null 2>&1 || apt_install openjdk-17-jre-headless
  command -v mvn >/dev/null 2>&1 || apt_install maven
  local tmp="$KAFKA_DIR/libs.tmp" start=$SECONDS
  rm -rf "$tmp"
  mkdir -p "$tmp"
  log "kafka: fetching jars with maven (one time, ~40 s)"
  if ! mvn -q -B -f "$ROOT/scripts/kafka/pom.xml" dependency:copy-dependencies \
    -DoutputDirectory="$tmp" >"$KAFKA_DIR/mvn.log" 2>&1; then
    tail -n 40 "$KAFKA_DIR/mvn.log" >&2 || true
    die "maven could not fetch the Kafka jars (see $KAFKA_DIR/mvn.log)"
  fi
  compgen -G "$tmp/kafka_2.13-*.jar" >/dev/null || die "maven ran but no kafka_2.13 jar in $tmp"
  rm -rf "$KAFKA_LIBS"
  mv "$tmp" "$KAFKA_LIBS"
  log "kafka: $(find "$KAFKA_LIBS" -name '*.jar' | wc -l) jars fetched in $((SECONDS - start))s"
}

kafka_write_config() {
  mkdir -p "$KAFKA_DATA"
  cat >"$KAFKA_PROPS" <<EOF
# Generated by scripts/services.sh -- single-node KRaft for local tests.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://$HOST:$KAFKA_PORT,CONTROLLER://$HOST:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$KAFKA_PORT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs=$KAFKA_DATA
num.partitions=1
auto.create.topics.enable=true
delete.topic.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
group.initial.rebalance.delay.ms=0
EOF
  cat >"$KAFKA_LOG4J" <<'EOF'
# Quiet: WARN and above only; stdout is redirected to .services/kafka/kafka.log.
log4j.rootLogger=WARN, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
EOF
}

kafka_format() {
  if [[ -f "$KAFKA_DATA/meta.properties" ]]; then
    return 0
  fi
  local uuid
  uuid="$(java -cp "$KAFKA_LIBS/*" -Dlog4j.configuration="file:$KAFKA_LOG4J" \
    kafka.tools.StorageTool random-uuid 2>>"$KAFKA_LOG" | tail -n 1 | tr -d '[:space:]')"
  [[ -n "$uuid" ]] || die "kafka: StorageTool random-uuid returned nothing"
  log "kafka: formatting $KAFKA_DATA (cluster id $uuid)"
  java -cp "$KAFKA_LIBS/*" -Dlog4j.configuration="file:$KAFKA_LOG4J" \
    kafka.tools.StorageTool format -t "$uuid" -c "$KAFKA_PROPS" >>"$KAFKA_LOG" 2>&1 \
    || { tail -n 30 "$KAFKA_LOG" >&2; die "kafka: storage format failed"; }
}

kafka_up() {
  mkdir -p "$KAFKA_DIR"
  if kafka_answers; then
    log "kafka: reusing broker already answering on $HOST:$KAFKA_PORT"
    return 0
  fi
  local pid
  if pid="$(pid_alive "$KAFKA_PID" kafka.Kafka)"; then
    log "kafka: pid $pid already running, waiting for it to answer"
  else
    rm -f "$KAFKA_PID"
    kafka_fetch_jars
    command -v java >/dev/null 2>&1 || apt_install openjdk-17-jre-headless
    kafka_write_config
    kafka_format
    log "kafka: starting on $HOST:$KAFKA_PORT (controller $HOST:$KAFKA_CONTROLLER_PORT)"
    (
      cd "$KAFKA_DIR"
      nohup java -Xms256m -Xmx768m -Djava.awt.headless=true \
        -Dlog4j.configuration="file:$KAFKA_LOG4J" \
        -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_PROPS" \
        >>"$KAFKA_LOG" 2>&1 </dev/null &
      echo $! >"$KAFKA_PID"
    )
    pid="$(cat "$KAFKA_PID")"
  fi
  local start=$SECONDS
  until kafka_answers; do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "kafka: last lines of $KAFKA_LOG:"
      tail -n 40 "$KAFKA_LOG" >&2 || true
      rm -f "$KAFKA_PID"
      die "kafka process $pid exited during startup"
    fi
    if ((SECONDS - start >= WAIT_S)); then
      log "kafka: last lines of $KAFKA_LOG:"
      tail -n 40 "$KAFKA_LOG" >&2 || true
      die "kafka did not answer on $HOST:$KAFKA_PORT within ${WAIT_S}s (pid $pid still running)"
    fi
    sleep 0.5
  done
  log "kafka: up after $((SECONDS - start))s (pid $pid)"
}

# -------------------------------------------------------------- commands --

cmd_up() {
  mkdir -p "$SVC"
  redis_up
  kafka_up
  echo "export KAFKA_BOOTSTRAP=$HOST:$KAFKA_PORT"
  echo "export REDIS_URL=redis://$HOST:$REDIS_PORT/0"
}

cmd_down() {
  stop_pid kafka "$KAFKA_PID" kafka.Kafka
  stop_pid redis "$REDIS_PID" redis-server
}

cmd_status() {
  local ok=0 pid
  if command -v redis-cli >/dev/null 2>&1 && redis_answers; then
    if pid="$(pid_alive "$REDIS_PID" redis-server)"; then
      echo "redis: up ($HOST:$REDIS_PORT, pid $pid)"
    else
      echo "redis: up ($HOST:$REDIS_PORT, not started by this script)"
    fi
  else
    echo "redis: down ($HOST:$REDIS_PORT)"
    ok=1
  fi
  if kafka_answers; then
    if pid="$(pid_alive "$KAFKA_PID" kafka.Kafka)"; then
      echo "kafka: up ($HOST:$KAFKA_PORT, pid $pid)"
    else
      echo "kafka: up ($HOST:$KAFKA_PORT, not started by this script)"
    fi
  else
    if pid="$(pid_alive "$KAFKA_PID" kafka.Kafka)"; then
      echo "kafka: down ($HOST:$KAFKA_PORT not answering; pid $pid alive, maybe starting)"
    else
      echo "kafka: down ($HOST:$KAFKA_PORT)"
    fi
    ok=1
  fi
  return "$ok"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  kafka-up) mkdir -p "$SVC" && kafka_up ;;
  kafka-down) stop_pid kafka "$KAFKA_PID" kafka.Kafka ;;
  *)
    echo "usage: $0 up|down|status|kafka-up|kafka-down" >&2
    exit 2
    ;;
esac
