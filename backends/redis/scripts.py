"""The Lua scripts of the Redis backend: one script call, one round trip, per operation.

Every script reads the clock with ``TIME`` on the Redis server, so daemons on several
machines agree on deadlines whatever their own clocks say. A queue entry is the
deadline in milliseconds as 13 digits, then the payload. Keys follow ``keys``.

Wake-ups: a script that queues messages publishes, once per wake-up channel it
touched, ``"<origin> <channel> [<channel>...]"``, where ``origin`` names the daemon
that sent (it ignores its own echo: it woke its router already). ``pubcmd`` is
``PUBLISH``, or ``SPUBLISH`` in Cluster mode (sharded pub/sub: the wake-up channel
shares the hash tag of the keys, so it stays on their node).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

__all__ = [
    "GROUP_ADD",
    "GROUP_MEMBERS",
    "GROUP_SEND",
    "PUSH",
    "RELEASE",
    "SCRIPTS",
    "TAKE",
    "Script",
]


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script and its SHA1, for EVALSHA."""

    name: str
    source: str
    sha: str

    @classmethod
    def of(cls, name: str, body: str) -> Script:
        source = _COMMON + body
        return cls(name, source, hashlib.sha1(source.encode()).hexdigest())


#: Helpers shared by the scripts. ``keep_ms`` is how long queue keys outlive their
#: newest message: a margin for clock steps, after which an abandoned queue vanishes.
_COMMON = r"""
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Make ``key`` live at least ``ms`` - 1 s more. The second of slack (``keep_ms`` is 5 s
-- past the deadlines) spares a PEXPIRE on nearly every write of a busy key.
local function extend(key, ms)
  if redis.call('PTTL', key) < ms - 1000 then redis.call('PEXPIRE', key, ms) end
end
local function deadline_of(entry)
  return tonumber(string.sub(entry, 1, 13))
end
local function trim(q, now)
  local n = redis.call('LLEN', q)
  while n > 0 and deadline_of(redis.call('LINDEX', q, 0)) <= now do
    redis.call('LPOP', q)
    n = n - 1
  end
  return n
end
-- Send room reserved on a channel (``room``): a HASH of holder (a daemon) -> "<count>
-- <deadline in ms>", beside the held count; a lapsed holder's (a dead daemon's) goes.
local function room_key(h, channel)
  return string.sub(h, 1, #h - #channel - 2) .. 'r:' .. channel
end
local function reserved(rk, now)
  local total = 0
  local flat = redis.call('HGETALL', rk)
  for i = 1, #flat, 2 do
    local count, deadline = string.match(flat[i + 1], '(%d+) (%d+)')
    if tonumber(deadline) > now then
      total = total + tonumber(count)
    else
      redis.call('HDEL', rk, flat[i])
    end
  end
  return total
end
-- Capacity-checked append: 1 if queued, 0 if the channel is full (reserved room counts).
local function push(q, h, idx, channel, entry, cap, now, keep_ms)
  if cap < 1 then return 0 end
  local n = redis.call('LLEN', q)
  local held = tonumber(redis.call('GET', h) or '0') + reserved(room_key(h, channel), now)
  if n + held >= cap then
    if n == 0 then return 0 end
    if trim(q, now) + held >= cap then return 0 end
  end
  redis.call('RPUSH', q, entry)
  extend(q, keep_ms)
  if idx then
    redis.call('SADD', idx, channel)
    extend(idx, keep_ms)
  end
  return 1
end
-- Pop up to ``want`` unexpired entries of queue ``q`` onto ``out``; expired ones do not
-- count toward ``want`` (popped on until enough live ones) and add to ``out[2]``. With a
-- lease hash ``l``, each live entry is kept there too, as ``<token>.<i>``, until its
-- take is acknowledged (``lease_scripts``). -> how many, their latest deadline.
local function pop_live(q, want, now, out, l, token)
  local n, latest = 0, 0
  while n < want do
    local popped = redis.call('LPOP', q, want - n)
    if not popped then break end
    for _, entry in ipairs(popped) do
      local deadline = deadline_of(entry)
      if deadline > now then
        n = n + 1
        out[#out + 1] = entry
        if l then redis.call('HSET', l, token .. '.' .. n, entry) end
        if deadline > latest then latest = deadline end
      else
        out[2] = out[2] + 1
      end
    end
  end
  return n, latest
end
-- Note a take of ``n`` messages leased to ``token`` (each already in the lease hash
-- ``l``) in the lease zset ``d``, both kept while the lease or a message may last.
local function note_take(l, d, token, n, latest, now, lease_ms, keep_ms)
  redis.call('ZADD', d, now + lease_ms, token .. '.' .. n)
  local keep = math.max(latest - now, lease_ms) + keep_ms
  extend(l, keep)
  extend(d, keep)
end
local function entry_of(deadline, payload)
  return string.format('%013d', deadline) .. payload
end
local function publish(pubcmd, origin, wakes)
  for channel, names in pairs(wakes) do
    redis.call(pubcmd, channel, origin .. ' ' .. table.concat(names, ' '))
  end
end
-- Publish only where someone else listens: ``mine`` counts our own subscriptions, so a
-- daemon alone on its Redis does not read back an echo of every message it sends.
local function publish_heard(pubcmd, origin, wakes, mine)
  local numsub = 'NUMSUB'
  if pubcmd == 'SPUBLISH' then numsub = 'SHARDNUMSUB' end
  for channel, names in pairs(wakes) do
    if redis.call('PUBSUB', numsub, channel)[2] > (mine[channel] or 0) then
      redis.call(pubcmd, channel, origin .. ' ' .. table.concat(names, ' '))
    end
  end
end
local function note_wake(wakes, channel, name)
  local names = wakes[channel]
  if not names then
    names = {}
    wakes[channel] = names
  end
  names[#names + 1] = name
end
"""

#: Queue payloads for targets. KEYS: per target queue, held[, index] (3 keys when the
#: channel has a "!"). ARGV: expiry_ms, keep_ms, origin, pubcmd, K, payload 1..K, then
#: per target: channel, capacity, payload number, wake-up channel, whether we subscribe
#: to that (0/1), whether to grab (0, or ``<lease_ms>:<token>``: the owner is attached
#: to the sender). -> per target 0 (full), 1 (queued), or the entry itself, popped
#: again, held and leased to ``token`` (grabbed: nothing else waited on the channel;
#: see ``stash``, ``pushed_scripts``).
PUSH = Script.of(
    "push",
    r"""
local now = now_ms()
local expiry_ms, keep_ms = tonumber(ARGV[1]), tonumber(ARGV[2])
local count = tonumber(ARGV[5])
local entries = {}
for i = 1, count do entries[i] = entry_of(now + expiry_ms, ARGV[5 + i]) end
local results, wakes, mine = {}, {}, {}
local k, a = 1, 6 + count
while a <= #ARGV do
  local channel = ARGV[a]
  local idx = false
  if string.find(channel, '!', 1, true) then idx = KEYS[k + 2] end
  local ok = push(KEYS[k], KEYS[k + 1], idx, channel, entries[tonumber(ARGV[a + 2])],
                  tonumber(ARGV[a + 1]), now, keep_ms)
  results[#results + 1] = ok
  if ok == 1 and ARGV[a + 5] ~= '0' and redis.call('LLEN', KEYS[k]) == 1 then
    local entry = redis.call('LPOP', KEYS[k])
    results[#results] = entry
    redis.call('INCRBY', KEYS[k + 1], 1)
    extend(KEYS[k + 1], expiry_ms + keep_ms)
    if idx then
      -- Leased as a take of one (``pushed_scripts``): the index keeps the channel.
      local lease_ms, token = string.match(ARGV[a + 5], '^(%d+):(.+)$')
      local base = string.sub(KEYS[k], 1, #KEYS[k] - #channel - 2)
      local l = base .. 'l:' .. channel
      redis.call('HSET', l, token .. '.1', entry)
      note_take(l, base .. 'd:' .. channel, token, 1, now + expiry_ms, now,
                tonumber(lease_ms), keep_ms)
    end
  elseif ok == 1 then
    note_wake(wakes, ARGV[a + 3], channel)
    mine[ARGV[a + 3]] = tonumber(ARGV[a + 4])
  end
  if idx then k = k + 3 else k = k + 2 end
  a = a + 6
end
publish_heard(ARGV[4], ARGV[3], wakes, mine)
return results
""",
)

#: group_send in one call, keys computed here (outside Cluster only). KEYS: group.
#: ARGV: prefix, ns, expiry_ms, keep_ms, origin, pubcmd, payload, capacity, most
#: members. -> {skipped, delivered channel...}, or {-1} and nothing done when the group
#: has more live members than that (``sends`` then goes by slices).
GROUP_SEND = Script.of(
    "group_send",
    r"""
local now = now_ms()
local prefix, ns = ARGV[1], ARGV[2]
local keep_ms, cap = tonumber(ARGV[4]), tonumber(ARGV[8])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) > tonumber(ARGV[9]) then return {-1} end
local entry = entry_of(now + tonumber(ARGV[3]), ARGV[7])
local out, wakes = {0}, {}
for _, channel in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local bang = string.find(channel, '!', 1, true)
  local tag
  if bang then
    tag = ns .. '!' .. string.match(string.sub(channel, 1, bang - 1), '([^.]*)$')
  else
    tag = ns .. ':' .. channel
  end
  local base = prefix .. ':{' .. tag .. '}:'
  local idx = false
  if bang then idx = base .. 'i' end
  if push(base .. 'q:' .. channel, base .. 'h:' .. channel, idx, channel, entry, cap, now,
          keep_ms) == 1 then
    out[#out + 1] = channel
    note_wake(wakes, base .. 'w', channel)
  else
    out[1] = out[1] + 1
  end
end
publish(ARGV[6], ARGV[5], wakes)
return out
""",
)

#: One page of a group's live members (ZSCAN: a member there all along comes at least
#: once, perhaps twice), dropping lapsed ones on the first page. KEYS: group. ARGV:
#: cursor ("0" to start), page size. -> {next cursor ("0": done), the soonest deadline
#: of the page's members (ms; 0: none), member...}
GROUP_MEMBERS = Script.of(
    "group_members",
    r"""
local now = now_ms()
if ARGV[1] == '0' then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now) end
local page = redis.call('ZSCAN', KEYS[1], ARGV[1], 'COUNT', tonumber(ARGV[2]))
local out, items, soonest = {page[1], 0}, page[2], false
for i = 1, #items, 2 do
  local deadline = tonumber(items[i + 1])
  if deadline > now then
    out[#out + 1] = items[i]
    if not soonest or deadline < soonest then soonest = deadline end
  end
end
if soonest then out[2] = soonest end
return out
""",
)

#: Add or renew a membership. KEYS: group, its version. ARGV: channel,
#: group_expiry_ms, keep_ms, a new version (set when the live members change: a new
#: member, or one that had lapsed; a renewal keeps the version: ``edge``).
GROUP_ADD = Script.of(
    "group_add",
    r"""
local now = now_ms()
local before = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
extend(KEYS[1], tonumber(ARGV[2]) + tonumber(ARGV[3]))
if not before or tonumber(before) <= now then redis.call('SET', KEYS[2], ARGV[4]) end
extend(KEYS[2], tonumber(ARGV[2]) + tonumber(ARGV[3]))
return 1
""",
)

#: Pop up to ``limit`` unexpired messages from each of several channels (one slot).
#: KEYS: per channel queue, held[, index] (3 keys when the channel has a "!"). ARGV:
#: limit, hold (0/1), keep_ms, channel... -> {now_ms, expired, then per channel: the
#: count n, then n entries}.
TAKE = Script.of(
    "take",
    r"""
local now = now_ms()
local want, hold, keep_ms = tonumber(ARGV[1]), ARGV[2] == '1', tonumber(ARGV[3])
local out = {now, 0}
local k = 1
for a = 4, #ARGV do
  local channel = ARGV[a]
  local q, h = KEYS[k], KEYS[k + 1]
  local idx = false
  if string.find(channel, '!', 1, true) then idx = KEYS[k + 2]; k = k + 3 else k = k + 2 end
  local at = #out + 1
  out[at] = 0
  local n, latest = pop_live(q, want, now, out, false)
  out[at] = n
  if hold and n > 0 then
    redis.call('INCRBY', h, n)
    -- Held messages lapse at their deadline anyway: so does their count, should the
    -- daemon holding them die before releasing.
    extend(h, latest - now + keep_ms)
  end
  if idx and redis.call('LLEN', q) == 0 then redis.call('SREM', idx, channel) end
end
return out
""",
)

#: Uncount held messages, never below zero. KEYS: held counts. ARGV: a count for each.
RELEASE = Script.of(
    "release",
    r"""
for i, key in ipairs(KEYS) do
  if redis.call('DECRBY', key, ARGV[i]) <= 0 then redis.call('DEL', key) end
end
return 1
""",
)

SCRIPTS = (PUSH, GROUP_SEND, GROUP_MEMBERS, GROUP_ADD, TAKE, RELEASE)
