"""The Redis side of the daily quota: key names, the Lua scripts the limiter runs and what they
answer. Each script is one atomic step on the server; ``usage.limiter`` decides what to do with
the answers (docs/architecture.md, "The daily quota")."""

from __future__ import annotations

from datetime import date
from typing import Any

from redis.exceptions import RedisError

REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError)

KEY_PREFIX = "twinmcp:quota"
EPOCH_KEY = "twinmcp:quota-epoch"
TICKET_PREFIX = "twinmcp:quota-ticket"
# Keys outlive their day by this much, so a request that computed its key just before midnight
# still finds the right day's counter; the UTC date in the key keeps days apart anyway.
EXPIRY_GRACE_SECONDS = 3600

class RedisDown(Exception):
    """Redis did not answer a step (or is skipped for a moment after failing)."""


def quota_key(user_id: int, day: date) -> str:
    """The Redis key of one user's counter for one UTC day."""
    return f"{KEY_PREFIX}:{int(user_id)}:{day.isoformat()}"


def ticket_key(ticket: str) -> str:
    """Where one call's decision is kept, so that asking again gives the same answer."""
    return f"{TICKET_PREFIX}:{ticket}"


# Results of the scripts below besides {1, used} (admitted) and {0, used} (refused).
NO_EPOCH = -1  # Redis lost its counters (or never had them): an epoch must be started
SETTLING = -2  # a new epoch is settling: second element = milliseconds left
NEEDS_SEED = -3  # no counter for this user and day: seed it from the committed events

# KEYS: counter, epoch marker, ticket. ARGV: amount, limit (-1 = uncapped), counter TTL (s),
# seed ("" = none), ticket TTL (s). A decision already written under the ticket is returned as is.
CONSUME_SCRIPT = """
local done = redis.call('GET', KEYS[3])
if done then
  local ok, used = string.match(done, '^(%d+):(%d+):')
  return {tonumber(ok), tonumber(used)}
end
local ready = redis.call('GET', KEYS[2])
if not ready then return {-1, 0} end
local used = redis.call('GET', KEYS[1])
if not used then
  local t = redis.call('TIME')
  local left = tonumber(ready) - (tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
  if left > 0 then return {-2, left} end
  if ARGV[4] == '' then return {-3, 0} end
  redis.call('SET', KEYS[1], ARGV[4], 'EX', ARGV[3])
  used = ARGV[4]
end
used = tonumber(used)
local amount = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local ok = 0
if limit < 0 or used + amount <= limit then
  used = redis.call('INCRBY', KEYS[1], amount)
  ok = 1
end
if redis.call('TTL', KEYS[1]) == -1 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
redis.call('SET', KEYS[3], ok .. ':' .. used .. ':' .. amount .. ':0', 'EX', ARGV[5])
return {ok, used}
"""

# KEYS: counter, ticket. ARGV: how many of the call's uses are refunded in all, so far. The
# ticket ("admitted:used:amount:refunded") remembers what was given back: a refund asked again after
# a lost reply, or a second partial refund of the same call, gives back only the difference, and
# never more than the call was charged.
REFUND_SCRIPT = """
local done = redis.call('GET', KEYS[2])
if not done then return 0 end
local ok, used, amount, refunded = string.match(done, '^(%d+):(%d+):(%d+):(%d+)$')
if ok ~= '1' then return 0 end
local total = math.min(tonumber(ARGV[1]), tonumber(amount))
local give = total - tonumber(refunded)
if give <= 0 then return 0 end
redis.call('SET', KEYS[2], ok .. ':' .. used .. ':' .. amount .. ':' .. total, 'KEEPTTL')
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local left = redis.call('DECRBY', KEYS[1], give)
if left < 0 then redis.call('INCRBY', KEYS[1], -left) end
return give
"""

# KEYS: epoch marker. ARGV: settle milliseconds. Sets when capped plans may be admitted again, on
# Redis's clock (``epoch_start`` runs it once per epoch, under a lock).
EPOCH_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[1], now + tonumber(ARGV[1]), 'NX')
"""


def register(client: Any) -> dict[str, Any]:
    """The scripts bound to ``client``. register_script hashes locally and calls EVALSHA; on
    NOSCRIPT (a restarted or flushed Redis) it loads the script and retries."""
    return {"consume": client.register_script(CONSUME_SCRIPT), "refund": client.register_script(REFUND_SCRIPT),
            "epoch": client.register_script(EPOCH_SCRIPT)}
