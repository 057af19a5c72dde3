#!/usr/bin/env bash
# Starts private PostgreSQL and Redis on free loopback ports under a temporary directory,
# exports DATABASE_URL, REDIS_URL, SECRET_KEY, TWINMCP_ENCRYPTION_KEYS, TWINMCP_VAR_DIR and
# COVERAGE_FILE, runs the given command, then stops them. Used by .ci/test.sh and the benchmarks.
# Any number of these can run at once on one machine, from one checkout or several: nothing
# they write is shared, and a port another process takes first is replaced by a fresh one.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin

need_install=()
command -v redis-server >/dev/null || need_install+=(redis-server)
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || need_install+=(postgresql)
# The usage export tests start their own ClickHouse (tests/clickhouse_server.py) and load files with its client.
{ [ -x /usr/sbin/clickhouse-server ] && command -v clickhouse-client >/dev/null; } ||
  need_install+=(clickhouse-server clickhouse-client)
if [ ${#need_install[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "Installing ${need_install[*]} from Debian packages…"
    wait_lock=(-o DPkg::Lock::Timeout=300)   # another run may be installing too
    apt-get "${wait_lock[@]}" update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get "${wait_lock[@]}" install -y -qq "${need_install[@]}" >/dev/null
  else
    echo "Missing ${need_install[*]}: install them (apt-get install ${need_install[*]})" >&2
    exit 1
  fi
fi
PGBIN=$(dirname "$(ls -d /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -n 1)")

TMP=$(mktemp -d /tmp/twinmcp-test.XXXXXX)
free_port() { "$BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
as_pg=()
if [ "$(id -u)" = 0 ]; then chown postgres "$TMP"; as_pg=(runuser -u postgres --); fi

cleanup() {
  "${as_pg[@]}" "$PGBIN/pg_ctl" -D "$TMP/pg" -m immediate stop >/dev/null 2>&1 || true
  [ -f "$TMP/redis.pid" ] && kill "$(cat "$TMP/redis.pid")" 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT

# A port found free is only a candidate: until a server has bound it, anything else on the machine
# (another run's servers or peers, an outgoing connection) may take it. So each server is started
# on a fresh candidate until it binds one, and is recognised by its own Unix socket in $TMP, never
# by a TCP probe that another run's server could answer.
ATTEMPTS=5
"${as_pg[@]}" "$PGBIN/initdb" -D "$TMP/pg" -U twinmcp -A trust -E UTF8 >/dev/null
for attempt in $(seq "$ATTEMPTS"); do
  PGPORT=$(free_port)
  rm -f "$TMP/pg.log"
  if "${as_pg[@]}" "$PGBIN/pg_ctl" -D "$TMP/pg" -l "$TMP/pg.log" -w -t 300 \
       -o "-p $PGPORT -k $TMP -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null; then
    break
  fi
  if [ "$attempt" = "$ATTEMPTS" ] || ! grep -q "could not bind\|could not create any TCP/IP sockets" "$TMP/pg.log"; then
    echo "PostgreSQL did not start:" >&2; tail -n 20 "$TMP/pg.log" >&2; exit 1
  fi
  echo "Port $PGPORT was taken before PostgreSQL bound it; trying another." >&2
done
"${as_pg[@]}" "$PGBIN/createdb" -h "$TMP" -p "$PGPORT" -U twinmcp twinmcp

redis_up() {
  for _ in $(seq 300); do   # 30 s: only a broken start takes that long
    redis-cli -s "$TMP/redis.sock" ping >/dev/null 2>&1 && return 0
    grep -q "Could not create server TCP listening socket" "$TMP/redis.log" 2>/dev/null && return 1
    sleep 0.1
  done
  return 1
}
for attempt in $(seq "$ATTEMPTS"); do
  REDISPORT=$(free_port)
  rm -f "$TMP/redis.log"
  redis-server --port "$REDISPORT" --bind 127.0.0.1 --unixsocket "$TMP/redis.sock" --save '' --appendonly no \
    --daemonize yes --pidfile "$TMP/redis.pid" --dir "$TMP" --logfile "$TMP/redis.log"
  redis_up && break
  if [ "$attempt" = "$ATTEMPTS" ] || ! grep -q "Could not create server TCP listening socket" "$TMP/redis.log"; then
    echo "Redis did not start:" >&2; tail -n 20 "$TMP/redis.log" >&2; exit 1
  fi
  echo "Port $REDISPORT was taken before Redis bound it; trying another." >&2
done

gen_key() { "$BIN/python" -c 'import base64, os; print(base64.urlsafe_b64encode(os.urandom(32)).decode())'; }
export DATABASE_URL="postgres://twinmcp@127.0.0.1:$PGPORT/twinmcp"
export REDIS_URL="redis://127.0.0.1:$REDISPORT/0"
export SECRET_KEY="test-$(gen_key)$(gen_key)"
export TWINMCP_ENCRYPTION_KEYS="$(gen_key)"
export TWINMCP_VAR_DIR="$TMP/var"   # collectstatic output, the demo's files: private to this run
export COVERAGE_FILE="${COVERAGE_FILE:-$TMP/.coverage}"   # .ci/test.sh publishes it as ./.coverage
export CI="${CI:-}"
echo "PostgreSQL on 127.0.0.1:$PGPORT, Redis on 127.0.0.1:$REDISPORT"

"$@"
