#!/usr/bin/env bash
# Starts private PostgreSQL and Redis on free loopback ports under a temporary directory,
# exports DATABASE_URL, REDIS_URL, SECRET_KEY, TWINMCP_ENCRYPTION_KEYS, runs the given command,
# then stops them. Used by .ci/test.sh and the benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin

need_install=()
command -v redis-server >/dev/null || need_install+=(redis-server)
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || need_install+=(postgresql)
if [ ${#need_install[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "Installing ${need_install[*]} from Debian packages…"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_install[@]}" >/dev/null
  else
    echo "Missing ${need_install[*]}: install them (apt-get install ${need_install[*]})" >&2
    exit 1
  fi
fi
PGBIN=$(dirname "$(ls -d /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -n 1)")

TMP=$(mktemp -d /tmp/twinmcp-test.XXXXXX)
free_port() { "$BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PGPORT=$(free_port)
REDISPORT=$(free_port)
as_pg=()
if [ "$(id -u)" = 0 ]; then chown postgres "$TMP"; as_pg=(runuser -u postgres --); fi

cleanup() {
  "${as_pg[@]}" "$PGBIN/pg_ctl" -D "$TMP/pg" -m immediate stop >/dev/null 2>&1 || true
  [ -f "$TMP/redis.pid" ] && kill "$(cat "$TMP/redis.pid")" 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT

"${as_pg[@]}" "$PGBIN/initdb" -D "$TMP/pg" -U twinmcp -A trust -E UTF8 >/dev/null
"${as_pg[@]}" "$PGBIN/pg_ctl" -D "$TMP/pg" -l "$TMP/pg.log" -w \
  -o "-p $PGPORT -k $TMP -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null
"${as_pg[@]}" "$PGBIN/createdb" -h 127.0.0.1 -p "$PGPORT" -U twinmcp twinmcp
redis-server --port "$REDISPORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
  --pidfile "$TMP/redis.pid" --dir "$TMP" --logfile "$TMP/redis.log"
for _ in $(seq 50); do redis-cli -p "$REDISPORT" ping >/dev/null 2>&1 && break; sleep 0.1; done

gen_key() { "$BIN/python" -c 'import base64, os; print(base64.urlsafe_b64encode(os.urandom(32)).decode())'; }
export DATABASE_URL="postgres://twinmcp@127.0.0.1:$PGPORT/twinmcp"
export REDIS_URL="redis://127.0.0.1:$REDISPORT/0"
export SECRET_KEY="test-$(gen_key)$(gen_key)"
export TWINMCP_ENCRYPTION_KEYS="$(gen_key)"
export TWINMCP_VAR_DIR="$TMP/var"
export CI="${CI:-}"
echo "PostgreSQL on 127.0.0.1:$PGPORT, Redis on 127.0.0.1:$REDISPORT"

"$@"
