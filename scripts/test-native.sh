#!/usr/bin/env bash
# The compiled build (NUDGEFLOW_MYPYC=1, setup.py) under the tests of what it compiles.
#
#   scripts/test-native.sh [pytest args...]
#   scripts/test-native.sh --build     # only build build/native-site (for the bench)
#
# Builds the wheel with .venv's mypyc (scripts/test.sh makes .venv), unpacks it into
# build/native-site, checks that it installs nothing but nudgeflow/ and that its
# detection is compiled, then runs pytest with build/native-site first on PYTHONPATH:
# every import of nudgeflow, in the tests' subprocesses too, is the compiled one.
# Without test paths among the args: the detection, spec, replay and flow suites. scripts/test.sh
# runs this after the main suite (NATIVE=0 skips it).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
WHEELS="$ROOT/build/native-wheel"
SITE="$ROOT/build/native-site"

log() { printf '[native] %s\n' "$*" >&2; }
die() { printf '[native] ERROR: %s\n' "$*" >&2; exit 1; }

[[ -x "$PY" ]] || die ".venv missing: run scripts/test.sh first"
rm -rf "$WHEELS" "$SITE"
log "NUDGEFLOW_MYPYC=1 pip wheel (mypyc, gcc)"
NUDGEFLOW_MYPYC=1 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" . ||
  die "the compiled wheel did not build"
"$PY" -m pip install -q --no-deps --upgrade --target "$SITE" "$WHEELS"/nudgeflow-*.whl
"$PY" - "$WHEELS" <<'PYCHECK' || die "the compiled wheel installs more than nudgeflow/"
import sys, zipfile, pathlib
(wheel,) = pathlib.Path(sys.argv[1]).glob("nudgeflow-*.whl")
tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist() if ".dist-info/" not in n}
sys.exit(tops != {"nudgeflow"})
PYCHECK
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
if [[ "${1:-}" == "--build" ]]; then
  log "built: PYTHONPATH=$SITE, from a directory outside the repository"
  exit 0
fi
(cd /tmp && "$PY" -c 'from nudgeflow.operators.native import compiled; raise SystemExit(not compiled())') ||
  die "nudgeflow from $SITE is not the compiled one"

paths=0
for arg in "$@"; do [[ "$arg" == tests* ]] && paths=1; done
if [[ "$paths" -eq 0 ]]; then
  set -- tests/unit tests/operators tests/intent tests/test_spec_golden.py \
    tests/test_spec_properties.py tests/replay_contract tests/flows "$@"
fi
log "pytest $* (compiled)"
# From an empty directory, through pytest's own script: `python -m` would put the
# working directory, and with it the sources, first on sys.path (subprocesses too).
mkdir -p "$ROOT/build/native-cwd"
cd "$ROOT/build/native-cwd"
"$ROOT/.venv/bin/pytest" -p no:cacheprovider --rootdir "$ROOT" -c "$ROOT/pyproject.toml" \
  "${@/#tests/$ROOT/tests}"
