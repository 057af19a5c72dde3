#!/usr/bin/env bash
# Checks the Prometheus alert rules in docs/ops: `promtool check rules` + `promtool test rules`.
# Installs Debian's `prometheus` package (which ships promtool) when promtool is missing: as root
# only, without recommends, and without letting the package start a Prometheus server.
# Usage: bash .ci/promtool.sh            (PROMTOOL=/path/to/promtool to use another binary)
set -euo pipefail
cd "$(dirname "$0")/.."
RULES=docs/ops/prometheus-alerts.yml
TESTS=docs/ops/prometheus-alerts.test.yml
PROMTOOL=${PROMTOOL:-promtool}

install_promtool() {
  if [ "$(id -u)" != 0 ]; then
    echo "promtool is missing. Install it as root: apt-get install --no-install-recommends prometheus" >&2
    echo "(or set PROMTOOL=/path/to/promtool, e.g. from https://prometheus.io/download/)" >&2
    exit 1
  fi
  if ! command -v apt-get >/dev/null; then
    echo "promtool is missing and apt-get is not available: install promtool (Prometheus 2.x) yourself" >&2
    exit 1
  fi
  # One installer at a time on the machine: two would share (and one remove) the policy-rc.d below.
  exec 8>/tmp/twinmcp-promtool-install.lock
  flock -w 900 8 || { echo "timed out waiting for another promtool install" >&2; exit 1; }
  if command -v promtool >/dev/null; then return 0; fi   # the other run installed it meanwhile
  echo "Installing promtool (Debian package prometheus)…"
  # The package's maintainer scripts would enable and start prometheus.service. A policy-rc.d that
  # exits 101 makes invoke-rc.d / deb-systemd-invoke skip the start; remove ours again afterwards.
  local own_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
  fi
  local rc=0
  local wait_lock=(-o DPkg::Lock::Timeout=300)   # another apt-get (e.g. .ci/test.sh's) may hold the lock
  { apt-get "${wait_lock[@]}" update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get "${wait_lock[@]}" install -y -qq --no-install-recommends prometheus >/dev/null
  } || rc=$?
  if [ -n "$own_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
  if [ "$rc" != 0 ]; then
    echo "apt-get install prometheus failed (exit $rc)" >&2
    exit "$rc"
  fi
  # On a systemd host the unit was still enabled (it would start at next boot): only promtool is wanted.
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemctl disable --now prometheus.service >/dev/null 2>&1 || true
  fi
}

if ! command -v "$PROMTOOL" >/dev/null; then
  [ "$PROMTOOL" = promtool ] || { echo "PROMTOOL=$PROMTOOL is not executable" >&2; exit 1; }
  install_promtool
  command -v promtool >/dev/null || { echo "promtool still not found after installing prometheus" >&2; exit 1; }
fi

echo "== promtool check rules $RULES"
"$PROMTOOL" check rules "$RULES"
echo "== promtool test rules $TESTS"
"$PROMTOOL" test rules "$TESTS"
