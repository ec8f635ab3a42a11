"""The Lua scripts of fan-outs at the edge: one record per (group send, owning client).

A group send to members whose owner is attached to the sending daemon stores no copy per
member: ``FANOUT_LEASE`` keeps, in the owner's slot, one record of the message (a queue
entry: deadline and payload) and the owner's member list (``<capacity> <channel>...``)
in the hash ``f`` (fields ``<token>`` and ``<token>:m``), leased in the zset ``fd``
(member ``<token>``, scored by the lease's deadline in ms), for every owner at once (one
script per slot). The daemon pushes it as one PUSH; the layer's ACK ends the lease
(``END_FANOUTS``), the daemon renews what it holds (``RENEW_FANOUTS``). A record given
back (its connection closed first: ``GIVE_BACK_FANOUTS``) or whose lease lapsed (the
daemon died: ``OWN_WAITING`` expands them, at the owner's next connection) is stored
for each member, under capacity, as for an owner that is away: that is the only
per-member work, and it runs in the owner's slot, for that owner's members only.
"""

from __future__ import annotations

from .scripts import Script

__all__ = ["EDGE_SCRIPTS", "END_FANOUTS", "FANOUT_LEASE", "GIVE_BACK_FANOUTS", "RENEW_FANOUTS"]

#: Store one fan-out record for each of its members (under capacity, unexpired), and
#: forget it. ``base`` is the owner's key base. -> the channels queued to.
_EXPAND = r"""
local function expand_fanout(base, token, now, keep_ms, queued)
  local f = base .. 'f'
  local entry = redis.call('HGET', f, token)
  local listed = redis.call('HGET', f, token .. ':m')
  redis.call('HDEL', f, token, token .. ':m')
  redis.call('ZREM', base .. 'fd', token)
  if not entry or not listed then return end
  local deadline = deadline_of(entry)
  if deadline <= now then return end
  local cap = false
  for name in string.gmatch(listed, '%S+') do
    if not cap then
      cap = tonumber(name)
    elseif push(base .. 'q:' .. name, base .. 'h:' .. name, base .. 'i', name, entry, cap,
                now, deadline - now + keep_ms) == 1 then
      queued[#queued + 1] = name
    end
  end
end
local function expand_lapsed(base, now, keep_ms, most, queued)
  local due = redis.call('ZRANGEBYSCORE', base .. 'fd', '-inf', now, 'LIMIT', 0, most)
  for _, token in ipairs(due) do
    expand_fanout(base, token, now, keep_ms, queued)
  end
end
"""

#: Keep one fan-out record per owner, leased. KEYS: per owner the record hash, the
#: lease zset. ARGV: token, lease_ms, expiry_ms, keep_ms, payload, then per owner its
#: member list ``<capacity> <channel>...``. -> 1.
FANOUT_LEASE = Script.of(
    "fanout_lease",
    r"""
local now = now_ms()
local token, lease_ms, expiry_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local entry = entry_of(now + expiry_ms, ARGV[5])
local keep = math.max(expiry_ms, lease_ms) + tonumber(ARGV[4])
for k = 1, #KEYS, 2 do
  redis.call('HSET', KEYS[k], token, entry, token .. ':m', ARGV[5 + (k + 1) / 2])
  redis.call('ZADD', KEYS[k + 1], now + lease_ms, token)
  extend(KEYS[k], keep)
  extend(KEYS[k + 1], keep)
end
return 1
""",
)

#: Forget fan-out records their layer acknowledged. KEYS: record hash, lease zset (one
#: owner). ARGV: tokens. -> 1.
END_FANOUTS = Script.of(
    "end_fanouts",
    r"""
for _, token in ipairs(ARGV) do
  redis.call('HDEL', KEYS[1], token, token .. ':m')
  redis.call('ZREM', KEYS[2], token)
end
return 1
""",
)

#: Renew the leases of fan-outs a live daemon holds. KEYS: record hash, lease zset (one
#: owner). ARGV: lease_ms, keep_ms, tokens. A record already given back is not made
#: again (``XX``). -> 1.
RENEW_FANOUTS = Script.of(
    "renew_fanouts",
    r"""
local now = now_ms()
local lease_ms = tonumber(ARGV[1])
for i = 3, #ARGV do redis.call('ZADD', KEYS[2], 'XX', now + lease_ms, ARGV[i]) end
extend(KEYS[1], lease_ms + tonumber(ARGV[2]))
extend(KEYS[2], lease_ms + tonumber(ARGV[2]))
return 1
""",
)

#: Store fan-outs their connection did not acknowledge for their members, and wake the
#: owner's daemon (any). KEYS: the owner's index. ARGV: the owner's key base, pubcmd,
#: keep_ms, tokens. -> the channels queued to.
GIVE_BACK_FANOUTS = Script.of(
    "give_back_fanouts",
    _EXPAND
    + r"""
local now = now_ms()
local base, keep_ms, queued = ARGV[1], tonumber(ARGV[3]), {}
for i = 4, #ARGV do expand_fanout(base, ARGV[i], now, keep_ms, queued) end
if #queued > 0 then redis.call(ARGV[2], base .. 'w', '- ' .. table.concat(queued, ' ')) end
return queued
""",
)

EDGE_SCRIPTS = (FANOUT_LEASE, END_FANOUTS, RENEW_FANOUTS, GIVE_BACK_FANOUTS)
