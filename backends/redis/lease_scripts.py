"""The Lua scripts of leases: a worker's message stays in Redis until it was handed out.

A take for workers (a normal channel, not held) moves each message it pops into the
channel's lease hash ``l:<channel>`` (field ``<token>.<i>``, the entry as it was) and
notes the take in the lease zset ``d:<channel>`` (member ``<token>.<n>``, scored by the
lease's deadline in ms, Redis server time). Acknowledging a take deletes both. A lease
whose deadline passed goes back to the head of its queue, takes in the order they were
made, each take's messages in their order: by the next take of the channel (any
daemon), or by a reaper pass (``REAP_LEASES``). Either publishes one wake-up per message
given back, origin ``-`` (every daemon, this one too, hears it). Keys follow ``keys``.
"""

from __future__ import annotations

from .scripts import SCRIPTS, Script

__all__ = [
    "ACK_LEASES",
    "ALL_SCRIPTS",
    "GIVE_BACK",
    "REAP_LEASES",
    "RENEW_LEASES",
    "TAKE_LEASED",
]

#: Give back the expired leases of one channel (at most ``most`` takes): each message
#: back at the head of the queue in its old place, one wake-up each. -> how many.
_GIVE_BACK = r"""
local function give_back(q, l, d, channel, wake, pubcmd, now, keep_ms, most)
  local due = redis.call('ZRANGEBYSCORE', d, '-inf', now, 'LIMIT', 0, most)
  if #due == 0 then return 0 end
  local count, latest = 0, now
  -- The newest take first: each LPUSH goes in front, so the oldest ends at the head.
  for i = #due, 1, -1 do
    local member = due[i]
    local dot = string.find(member, '.', 1, true)
    local token, n = string.sub(member, 1, dot - 1), tonumber(string.sub(member, dot + 1))
    for j = n, 1, -1 do
      local field = token .. '.' .. j
      local entry = redis.call('HGET', l, field)
      if entry then
        redis.call('LPUSH', q, entry)
        redis.call('HDEL', l, field)
        count = count + 1
        latest = math.max(latest, deadline_of(entry))
      end
    end
    redis.call('ZREM', d, member)
  end
  if count > 0 then
    extend(q, latest - now + keep_ms)
    if string.find(channel, '!', 1, true) then
      -- A push's lease (``pushed_scripts``): its messages were counted as held, and the
      -- client's index must list the channel for its next connection to find them.
      local base = string.sub(q, 1, #q - #channel - 2)
      if redis.call('DECRBY', base .. 'h:' .. channel, count) <= 0 then
        redis.call('DEL', base .. 'h:' .. channel)
      end
      redis.call('SADD', base .. 'i', channel)
      extend(base .. 'i', latest - now + keep_ms)
    end
    local names = {}
    for i = 1, count do names[i] = channel end
    redis.call(pubcmd, wake, '- ' .. table.concat(names, ' '))
  end
  return count
end
"""

#: Lease up to ``want`` unexpired messages of one normal channel to ``token`` for
#: ``lease_ms``, after giving back its expired leases. KEYS: queue, held, lease hash,
#: lease zset. ARGV: want, keep_ms, lease_ms, token, channel, wake-up channel, pubcmd,
#: most (takes given back at most). -> {now_ms, expired, n, n entries, given back}.
TAKE_LEASED = Script.of(
    "take_leased",
    _GIVE_BACK
    + r"""
local now = now_ms()
local q, l, d = KEYS[1], KEYS[3], KEYS[4]
local want, keep_ms, lease_ms = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local token = ARGV[4]
local back = give_back(q, l, d, ARGV[5], ARGV[6], ARGV[7], now, keep_ms, tonumber(ARGV[8]))
local out = {now, 0, 0}
local n, latest = pop_live(q, want, now, out, l, token)
out[3] = n
if n > 0 then note_take(l, d, token, n, latest, now, lease_ms, keep_ms) end
out[#out + 1] = back
return out
""",
)

#: End leases whose messages were handed out. KEYS: lease hash, lease zset, per
#: channel. ARGV: per channel the number of takes k, then k members ``<token>.<n>``.
#: -> how many had lapsed already (their messages were given back: a redelivery).
ACK_LEASES = Script.of(
    "ack_leases",
    r"""
local lapsed, at = 0, 1
for c = 1, #KEYS, 2 do
  local l, d = KEYS[c], KEYS[c + 1]
  local k = tonumber(ARGV[at])
  for i = at + 1, at + k do
    local member = ARGV[i]
    if redis.call('ZREM', d, member) == 1 then
      local dot = string.find(member, '.', 1, true)
      local token, n = string.sub(member, 1, dot - 1), tonumber(string.sub(member, dot + 1))
      for j = 1, n do redis.call('HDEL', l, token .. '.' .. j) end
    else
      lapsed = lapsed + 1
    end
  end
  at = at + k + 1
end
return lapsed
""",
)

#: Renew leases of messages delivered and not yet acknowledged, on a live connection:
#: each still leased runs ``lease_ms`` from now (one ended or given back is left as it
#: is). KEYS: lease hash, lease zset, per channel. ARGV: lease_ms, keep_ms, then per
#: channel the number of takes k, then k members ``<token>.<n>``. -> how many renewed.
RENEW_LEASES = Script.of(
    "renew_leases",
    r"""
local now = now_ms()
local lease_ms, keep_ms = tonumber(ARGV[1]), tonumber(ARGV[2])
local renewed, at = 0, 3
for c = 1, #KEYS, 2 do
  local l, d = KEYS[c], KEYS[c + 1]
  local k = tonumber(ARGV[at])
  for i = at + 1, at + k do
    renewed = renewed + redis.call('ZADD', d, 'XX', 'CH', now + lease_ms, ARGV[i])
  end
  extend(l, lease_ms + keep_ms)
  extend(d, lease_ms + keep_ms)
  at = at + k + 1
end
return renewed
""",
)

#: Give back the expired leases of several normal channels (one slot). KEYS: queue,
#: held, lease hash, lease zset per channel. ARGV: keep_ms, pubcmd, most, then per
#: channel: channel, wake-up channel. -> how many messages went back.
REAP_LEASES = Script.of(
    "reap_leases",
    _GIVE_BACK
    + r"""
local now = now_ms()
local keep_ms, pubcmd, most = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local back = 0
for a = 4, #ARGV, 2 do
  local k = (a - 4) * 2 + 1
  back = back + give_back(KEYS[k], KEYS[k + 2], KEYS[k + 3], ARGV[a], ARGV[a + 1], pubcmd,
                          now, keep_ms, most)
end
return back
""",
)

#: Put messages pushed to a client and not acknowledged (or grabbed for it and not
#: pushed) back at the head of their channel, in order, and uncount held ones
#: (``Backend.give_back``). KEYS: queue, held, index (process-specific channels). ARGV:
#: channel, wake-up channel, pubcmd, keep_ms, how many held to uncount besides leased
#: ones, then the items, oldest first, each tagged: ``E`` and an entry relative to now
#: (13 digits of ms to live, then the payload), or ``L`` and a push's lease
#: ``<token>.<i>.<n>`` (``pushed_scripts``): its entry comes from the lease hash, unless
#: that lease lapsed and was given back already. -> how many went back.
GIVE_BACK = Script.of(
    "give_back",
    r"""
local now = now_ms()
local channel = ARGV[1]
local base = string.sub(KEYS[1], 1, #KEYS[1] - #channel - 2)
local l, d = base .. 'l:' .. channel, base .. 'd:' .. channel
local latest, count, uncount = now, 0, tonumber(ARGV[5])
for i = #ARGV, 6, -1 do
  local item = ARGV[i]
  local entry = false
  if string.sub(item, 1, 1) == 'E' then
    entry = string.format('%013d', now + tonumber(string.sub(item, 2, 14))) .. string.sub(item, 15)
  else
    local token, j, n = string.match(item, '^L([^.]+)%.(%d+)%.(%d+)$')
    entry = redis.call('HGET', l, token .. '.' .. j)
    if entry then
      redis.call('HDEL', l, token .. '.' .. j)
      uncount = uncount + 1
      if deadline_of(entry) <= now then entry = false end
    end
    redis.call('ZREM', d, token .. '.' .. n)
  end
  if entry then
    redis.call('LPUSH', KEYS[1], entry)
    latest = math.max(latest, deadline_of(entry))
    count = count + 1
  end
end
if uncount > 0 and redis.call('DECRBY', KEYS[2], uncount) <= 0 then
  redis.call('DEL', KEYS[2])
end
if count > 0 then
  extend(KEYS[1], latest - now + tonumber(ARGV[4]))
  if KEYS[3] then
    redis.call('SADD', KEYS[3], ARGV[1])
    extend(KEYS[3], latest - now + tonumber(ARGV[4]))
  end
  redis.call(ARGV[3], ARGV[2], '- ' .. ARGV[1])
end
return count
""",
)

#: Every script, for loading at connect and for finding one by its SHA1.
ALL_SCRIPTS = (*SCRIPTS, TAKE_LEASED, ACK_LEASES, RENEW_LEASES, REAP_LEASES, GIVE_BACK)
