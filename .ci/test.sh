#!/usr/bin/env bash
# Runs every check against private PostgreSQL and Redis (see .ci/with-services.sh).
# Usage: bash .ci/test.sh [pytest args…]   (make test T="tests/test_x.py -k name")
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
if [ -z "${TWINMCP_SERVICES:-}" ]; then
  exec env TWINMCP_SERVICES=1 bash .ci/with-services.sh bash .ci/test.sh "$@"
fi

echo "== ruff"
"$BIN/ruff" check .
echo "== makemigrations --check"
DEBUG=true "$BIN/python" manage.py makemigrations --check --dry-run
echo "== check --deploy (production-like settings)"
DEBUG=false ALLOWED_HOSTS=twinmcp.example.com "$BIN/python" manage.py check --deploy --fail-level WARNING
echo "== collectstatic"
"$BIN/python" manage.py collectstatic --noinput -v 0
echo "== chromium for the browser tests"
bash .ci/browser.sh --install
echo "== pytest"
export SECURE_SSL_REDIRECT=false
if [ $# -gt 0 ]; then
  "$BIN/python" -m pytest "$@"   # a chosen subset: no coverage floor
else
  # The data is collected in this run's own COVERAGE_FILE (with-services.sh): two runs from one
  # checkout would otherwise add to, or lock, the same .coverage. Published whole when done.
  status=0
  "$BIN/python" -m pytest --cov --cov-report=term --cov-fail-under=85 || status=$?
  if [ -f "$COVERAGE_FILE" ] && [ "$COVERAGE_FILE" != .coverage ]; then
    cp "$COVERAGE_FILE" ".coverage.$$" && mv -f ".coverage.$$" .coverage
  fi
  exit "$status"
fi
