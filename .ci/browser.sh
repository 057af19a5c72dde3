#!/usr/bin/env bash
# Browser tests (tests/browser/): Playwright (PyPI) driving Debian's Chromium, headless.
# Installs Chromium with apt-get when /usr/bin/chromium is missing (as root), and Playwright into
# .venv when it is not importable, then runs the browser tests on private PostgreSQL + Redis.
#   bash .ci/browser.sh            # install what is missing, run tests/browser
#   bash .ci/browser.sh --install  # only install
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
PLAYWRIGHT_VERSION=${PLAYWRIGHT_VERSION:-1.65.2}
CHROMIUM=${TWINMCP_CHROMIUM:-/usr/bin/chromium}

if [ ! -x "$CHROMIUM" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "Installing Chromium (Debian package chromium)…"
    apt-get -o DPkg::Lock::Timeout=300 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
      chromium fonts-dejavu-core >/dev/null
  else
    echo "Chromium is missing at $CHROMIUM: install it as root (apt-get install chromium)" >&2
    echo "or point TWINMCP_CHROMIUM at a Chromium binary." >&2
    exit 1
  fi
fi
"$CHROMIUM" --version >/dev/null 2>&1 || { echo "$CHROMIUM does not run" >&2; exit 1; }

if ! "$BIN/python" -c "import playwright" 2>/dev/null; then
  echo "Installing playwright==$PLAYWRIGHT_VERSION into $BIN (the browser comes from Debian, not Playwright)…"
  "$BIN/python" -m pip install -q "playwright==$PLAYWRIGHT_VERSION"
fi

[ "${1:-}" = "--install" ] && exit 0
export CI="${CI:-true}" SECURE_SSL_REDIRECT=false
exec bash .ci/with-services.sh "$BIN/python" -m pytest tests/browser -q "$@"
