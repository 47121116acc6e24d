#!/usr/bin/env bash
# The one command that installs and runs the whole test suite, on a fresh machine too.
#
#   scripts/test.sh [--no-lint] [pytest args...]
#
# 1. creates .venv with python3.11 if missing and `pip install -e '.[dev]'`
#    (skipped when pyproject.toml is unchanged since the last install; FORCE_INSTALL=1
#    to force it),
# 2. unless --no-lint: `ruff check .`, `mypy` and `lint-imports` (config from pyproject),
#    failing fast,
# 3. `scripts/services.sh up` (Kafka + Redis) and exports KAFKA_BOOTSTRAP / REDIS_URL,
#    and installs Debian's chromium and chromium-driver when missing (the dashboard's and
#    the tracker's browser tests drive them; nothing downloads a browser), and takes
#    promtool out of Debian's prometheus package (a test evaluates the Grafana PromQL),
# 4. `.venv/bin/python -m pytest "$@"`,
# 5. with no pytest args (and unless NATIVE=0), scripts/test-native.sh: the compiled
#    build (NUDGEFLOW_MYPYC=1) under the detection, spec, replay and flow suites;
#    exiting with the first failing exit code.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export DEBIAN_FRONTEND=noninteractive PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1

log() { printf '[test] %s\n' "$*" >&2; }
die() { printf '[test] ERROR: %s\n' "$*" >&2; exit 1; }

lint=1
pytest_args=()
for arg in "$@"; do
  if [[ "$arg" == "--no-lint" ]]; then
    lint=0
  else
    pytest_args+=("$arg")
  fi
done

VENV="$ROOT/.venv"
PY="$VENV/bin/python"

# --- 1. virtualenv + install ------------------------------------------------
if [[ ! -x "$PY" ]]; then
  base=""
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1 &&
      [[ "$("$cand" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" == "3.11" ]]; then
      base="$(command -v "$cand")"
      break
    fi
  done
  [[ -n "$base" ]] || die "python3.11 not found (the project requires Python 3.11)"
  log "creating .venv with $base"
  if ! "$base" -m venv "$VENV" 2>/dev/null; then
    # Debian ships venv/ensurepip separately.
    rm -rf "$VENV"
    if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" -eq 0 ]]; then
      log "installing python3.11-venv via apt"
      apt-get update -qq >/dev/null
      apt-get install -y -qq python3.11-venv >/dev/null
      "$base" -m venv "$VENV"
    else
      die "'$base -m venv' failed; install the python3.11-venv package"
    fi
  fi
fi

stamp="$VENV/.nudgeflow-install.sha256"
want="$(cat pyproject.toml setup.py | sha256sum | cut -d' ' -f1)"
if [[ "${FORCE_INSTALL:-0}" == "1" || ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]] ||
  ! "$PY" -c 'import nudgeflow, pytest' >/dev/null 2>&1; then
  log "pip install -e '.[dev]'"
  "$PY" -m pip install -q -e '.[dev]'
  echo "$want" >"$stamp"
fi

# --- 2. lint ----------------------------------------------------------------
if [[ "$lint" -eq 1 ]]; then
  log "ruff check ."
  "$VENV/bin/ruff" check . || die "ruff check failed"
  log "mypy"
  "$VENV/bin/mypy" || die "mypy failed"
  log "lint-imports (the package's layers, pyproject.toml)"
  "$VENV/bin/lint-imports" --no-cache >/dev/null || { "$VENV/bin/lint-imports" --no-cache; die "lint-imports failed"; }
fi

# --- 3. services ------------------------------------------------------------
exports="$("$ROOT/scripts/services.sh" up)" # exits non-zero (and so do we) on failure
eval "$(tail -n 2 <<<"$exports")"
[[ -n "${KAFKA_BOOTSTRAP:-}" && -n "${REDIS_URL:-}" ]] ||
  die "scripts/services.sh up did not print KAFKA_BOOTSTRAP / REDIS_URL"
export KAFKA_BOOTSTRAP REDIS_URL
log "KAFKA_BOOTSTRAP=$KAFKA_BOOTSTRAP REDIS_URL=$REDIS_URL"

# The browser tests (the dashboard's, the tracker's) drive Debian's own chromium
# through its chromedriver.
if [[ ! -x /usr/bin/chromium || ! -x /usr/bin/chromedriver ]]; then
  command -v apt-get >/dev/null 2>&1 ||
    die "chromium missing and no apt-get: install chromium and chromium-driver"
  sudo_cmd=()
  if [[ "$(id -u)" -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || die "installing chromium needs root (or sudo)"
    sudo_cmd=(sudo)
  fi
  log "installing chromium and chromium-driver via apt"
  "${sudo_cmd[@]}" apt-get update -qq >/dev/null
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    chromium chromium-driver >/dev/null || die "apt-get install chromium chromium-driver failed"
fi

# The Grafana panels' PromQL is evaluated by Prometheus's own promtool
# (tests/test_monitoring.py). Only that binary is taken from Debian's prometheus
# package, into .venv/bin: installing the package would start a Prometheus server.
if ! command -v promtool >/dev/null 2>&1 && [[ ! -x .venv/bin/promtool ]]; then
  command -v apt-get >/dev/null 2>&1 || die "promtool missing and no apt-get: install prometheus"
  log "extracting promtool from Debian's prometheus package into .venv/bin"
  apt_update=(apt-get update -qq)
  [[ "$(id -u)" -eq 0 ]] || apt_update=(sudo apt-get update -qq)
  deb_dir="$(mktemp -d)"
  # apt-get download needs no root; the package lists may need an update first.
  (cd "$deb_dir" && apt-get download prometheus >/dev/null 2>&1) ||
    { "${apt_update[@]}" >/dev/null && (cd "$deb_dir" && apt-get download prometheus >/dev/null); } ||
    die "apt-get download prometheus failed"
  dpkg-deb -x "$deb_dir"/prometheus_*.deb "$deb_dir/x"
  install -m 0755 "$deb_dir/x/usr/bin/promtool" .venv/bin/promtool
  rm -rf "$deb_dir"
fi

# --- 4. pytest --------------------------------------------------------------
log "pytest ${pytest_args[*]:-}"
rc=0
"$PY" -m pytest ${pytest_args[@]+"${pytest_args[@]}"} || rc=$?

# --- 5. the compiled build --------------------------------------------------
# A whole run (no pytest args) also tests the compiled detection the image ships.
if [[ "$rc" -eq 0 && ${#pytest_args[@]} -eq 0 && "${NATIVE:-1}" != "0" ]]; then
  "$ROOT/scripts/test-native.sh" || rc=$?
fi
exit "$rc"
