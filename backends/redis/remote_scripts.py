"""The Lua scripts of fan-outs to owners attached to another daemon (``remote``).

A daemon marks each client attached to it that takes fan-outs: the key ``a`` in the
client's slot holds ``<version> <daemon>`` (version ``REMOTE_VERSION``; a daemon of an
earlier release sets none, so nothing is appended for its clients), for a lease, renewed
while the client stays (``MARK_CLIENTS``) and removed when it leaves (``UNMARK_CLIENT``).
A group send keeps one record per marked owner (``FANOUT_LEASE``, ``edge_scripts``: the
hash ``f`` and lease zset ``fd`` of fan-outs leased here, and the token appended to the
list ``fq``). The owner's daemon takes the tokens from ``fq`` (``TAKE_FANOUTS``),
leases their records to itself, and from then on they are its own fan-outs: pushed,
acknowledged, renewed, given back or lapsed as those (``edge_scripts``).
"""

from __future__ import annotations

from .edge_scripts import _EXPAND
from .scripts import Script

__all__ = ["MARK_CLIENTS", "REMOTE_SCRIPTS", "REMOTE_VERSION", "TAKE_FANOUTS", "UNMARK_CLIENT"]

#: The version a mark carries: a sender appends to an owner's list only for a mark of
#: this version or later (a later release may add to the record and raise it).
REMOTE_VERSION = 1

#: Mark clients attached to this daemon (``force``: at attach, over a mark a daemon that
#: had the client before left; else only ours, or a mark lost, is renewed). KEYS: per
#: client its mark, its fan-out list, its fan-outs' lease zset. ARGV: the mark
#: (``<version> <daemon>``), lease_ms, force (1 or 0). -> per client the length of its
#: fan-out list (records to take), and 1 if a fan-out's lease lapsed (a dead daemon's,
#: or one whose take's reply was lost: to store per member), else 0.
MARK_CLIENTS = Script.of(
    "mark_clients",
    r"""
local out, now = {}, now_ms()
for k = 1, #KEYS, 3 do
  local mark = redis.call('GET', KEYS[k])
  if ARGV[3] == '1' or not mark or mark == ARGV[1] then
    redis.call('SET', KEYS[k], ARGV[1], 'PX', ARGV[2])
  end
  out[#out + 1] = redis.call('LLEN', KEYS[k + 1])
  out[#out + 1] = #redis.call('ZRANGEBYSCORE', KEYS[k + 2], '-inf', now, 'LIMIT', 0, 1)
end
return out
""",
)

#: A client left this daemon: remove our mark (not another daemon's, which takes the
#: list itself), and store the records its list still holds for each of their members,
#: at most ``budget`` members a call. KEYS: mark, list, the client's index. ARGV: the
#: mark, the client's key base, pubcmd, keep_ms, budget. -> {1 if records are left
#: (call again), channel queued to...}.
UNMARK_CLIENT = Script.of(
    "unmark_client",
    _EXPAND
    + r"""
local mark = redis.call('GET', KEYS[1])
if mark and mark ~= ARGV[1] then return {0} end
if mark then redis.call('DEL', KEYS[1]) end
local now, base, keep_ms = now_ms(), ARGV[2], tonumber(ARGV[4])
local budget, queued = tonumber(ARGV[5]), {}
while budget > 0 do
  local token = redis.call('LINDEX', KEYS[2], 0)
  if not token then break end
  budget = expand_fanout(base, token, now, keep_ms, queued, budget)
  if redis.call('HEXISTS', base .. 'f', token .. ':m') == 0 then redis.call('LPOP', KEYS[2]) end
end
if #queued > 0 then redis.call(ARGV[3], base .. 'w', '- ' .. table.concat(queued, ' ')) end
table.insert(queued, 1, math.min(1, redis.call('LLEN', KEYS[2])))
return queued
""",
)

#: Take up to ``most`` records from a client's fan-out list, in order, each leased to
#: this daemon (an expired one is forgotten; one stored per member already, after its
#: lease lapsed, is gone). KEYS: record hash, lease zset, list. ARGV: lease_ms, keep_ms,
#: most. -> {now_ms, 1 if the list holds more, then per record token, entry, list}.
TAKE_FANOUTS = Script.of(
    "take_fanouts",
    r"""
local now, lease_ms = now_ms(), tonumber(ARGV[1])
local out = {now, 0}
local tokens = redis.call('LPOP', KEYS[3], tonumber(ARGV[3]))
if not tokens then return out end
for _, token in ipairs(tokens) do
  local entry = redis.call('HGET', KEYS[1], token)
  local listed = redis.call('HGET', KEYS[1], token .. ':m')
  if entry and listed and deadline_of(entry) > now then
    redis.call('ZADD', KEYS[2], now + lease_ms, token)
    out[#out + 1] = token
    out[#out + 1] = entry
    out[#out + 1] = listed
  elseif entry or listed then
    redis.call('HDEL', KEYS[1], token, token .. ':m')
    redis.call('ZREM', KEYS[2], token)
  end
end
extend(KEYS[1], lease_ms + tonumber(ARGV[2]))
extend(KEYS[2], lease_ms + tonumber(ARGV[2]))
out[2] = math.min(1, redis.call('LLEN', KEYS[3]))
return out
""",
)

REMOTE_SCRIPTS = (MARK_CLIENTS, UNMARK_CLIENT, TAKE_FANOUTS)
