"""The Lua scripts of pushes' leases: a message pushed to a client stays in Redis until
its layer acknowledges it, so a daemon killed with pushes in flight loses none.

A take for a push (``hold``, a process-specific channel) keeps each message it pops in
the channel's lease hash ``l:<channel>`` (field ``<token>.<i>``) and notes the take in
the lease zset ``d:<channel>`` (member ``<token>.<n>``, scored by its deadline), as a
take for workers does (``lease_scripts``), and counts the messages as held. The daemon
names each message by ``<token>.<i>.<n>`` (``Taken.lease``): an ACK's count ends the
leases of the messages it covers (``END_PUSHED``: their fields go, the take's member
with its last message, the held count with them); the daemon renews its takes' leases
while it holds them (``RENEW_PUSHED``). A lease that lapses (the daemon died) goes back
to the head of its channel with its held count, and the client's index lists the
channel: at the channel's next take, or when the client's next connection looks for
its channels (``OWN_WAITING``, again at the soonest live lease's deadline).
A grab of the PUSH script (``scripts``) is a take of one message, leased alike.
"""

from __future__ import annotations

from .edge_scripts import _EXPAND, EDGE_SCRIPTS
from .lease_scripts import _GIVE_BACK
from .remote_scripts import REMOTE_SCRIPTS
from .scripts import Script

__all__ = ["END_PUSHED", "OWN_WAITING", "PUSHED_SCRIPTS", "RENEW_PUSHED", "TAKE_HELD"]

#: Give back what takes of one channel whose answer was lost leased (``lost``: their
#: tokens, oldest first; a grab's is ``<token>-<number>``): each take's messages back
#: at the head of the queue in their old place, the oldest take's first, uncounted as
#: held. A take that never ran leased nothing under its token. -> how many.
_GIVE_BACK_LOST = r"""
local function give_back_lost(q, l, d, h, lost, now, keep_ms)
  local count, latest = 0, now
  for t = #lost, 1, -1 do  -- the newest first: each LPUSH goes in front
    local token, entries = lost[t], {}
    while true do
      local entry = redis.call('HGET', l, token .. '.' .. (#entries + 1))
      if not entry then break end
      entries[#entries + 1] = entry
    end
    for i = #entries, 1, -1 do
      redis.call('LPUSH', q, entries[i])
      redis.call('HDEL', l, token .. '.' .. i)
      latest = math.max(latest, deadline_of(entries[i]))
    end
    if #entries > 0 then redis.call('ZREM', d, token .. '.' .. #entries) end
    count = count + #entries
  end
  if count > 0 then
    if redis.call('DECRBY', h, count) <= 0 then redis.call('DEL', h) end
    extend(q, latest - now + keep_ms)
  end
  return count
end
"""

#: Pop up to ``want`` unexpired messages from each of several channels (one slot), held,
#: and leased (process-specific ones) to ``token``, after giving back what this
#: daemon's takes whose answer was lost leased, then their lapsed leases (older). KEYS:
#: per channel queue, held[, index] (3 keys when the channel has a "!"). ARGV: want,
#: keep_ms, lease_ms, token, pubcmd, most (takes given back per channel), then per
#: channel: the channel, k, k tokens of takes whose answer was lost (oldest first).
#: -> {now_ms, expired, then per channel: n, n entries, then given back}.
TAKE_HELD = Script.of(
    "take_held",
    _GIVE_BACK
    + _GIVE_BACK_LOST
    + r"""
local now = now_ms()
local want, keep_ms, lease_ms = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local token, pubcmd, most = ARGV[4], ARGV[5], tonumber(ARGV[6])
local out, back, k = {now, 0}, 0, 1
local a = 7
while a <= #ARGV do
  local channel, lost = ARGV[a], {}
  for t = 1, tonumber(ARGV[a + 1]) do lost[t] = ARGV[a + 1 + t] end
  a = a + 2 + #lost
  local q, h = KEYS[k], KEYS[k + 1]
  local idx = false
  if string.find(channel, '!', 1, true) then idx = KEYS[k + 2]; k = k + 3 else k = k + 2 end
  local base = string.sub(q, 1, #q - #channel - 2)
  local l, d = base .. 'l:' .. channel, base .. 'd:' .. channel
  if idx then
    give_back_lost(q, l, d, h, lost, now, keep_ms)
    back = back + give_back(q, l, d, channel, base .. 'w', pubcmd, now, keep_ms, most)
  end
  local at = #out + 1
  out[at] = 0
  local n, latest = pop_live(q, want, now, out, idx and l, token)
  out[at] = n
  if n > 0 then
    redis.call('INCRBY', h, n)
    extend(h, latest - now + keep_ms)
    if idx then note_take(l, d, token, n, latest, now, lease_ms, keep_ms) end
  elseif idx and redis.call('LLEN', q) == 0 and redis.call('EXISTS', d) == 0 then
    redis.call('SREM', idx, channel)
  end
end
out[#out + 1] = back
return out
""",
)

#: End the leases of pushed messages a client acknowledged, and uncount them as held.
#: KEYS: per channel held, lease hash, lease zset. ARGV: per channel the number k of
#: leases, then k leases ``<token>.<i>.<n>``. A lapsed one (given back, uncounted
#: then) is skipped. -> 1.
END_PUSHED = Script.of(
    "end_pushed",
    r"""
local at = 1
for c = 1, #KEYS, 3 do
  local k, ended = tonumber(ARGV[at]), 0
  for i = at + 1, at + k do
    local token, j, n = string.match(ARGV[i], '^([^.]+)%.(%d+)%.(%d+)$')
    if token then
      ended = ended + redis.call('HDEL', KEYS[c + 1], token .. '.' .. j)
      if j == n then redis.call('ZREM', KEYS[c + 2], token .. '.' .. n) end
    end
  end
  if ended > 0 and redis.call('DECRBY', KEYS[c], ended) <= 0 then redis.call('DEL', KEYS[c]) end
  at = at + k + 1
end
return 1
""",
)

#: Renew the leases of takes a live daemon holds. KEYS: per channel lease hash, lease
#: zset. ARGV: lease_ms, keep_ms, then per channel k and k members ``<token>.<n>``. A
#: lease that lapsed and was given back is not made again (``XX``). -> 1.
RENEW_PUSHED = Script.of(
    "renew_pushed",
    r"""
local now = now_ms()
local lease_ms, keep_ms = tonumber(ARGV[1]), tonumber(ARGV[2])
local at = 3
for c = 1, #KEYS, 2 do
  local k = tonumber(ARGV[at])
  for i = at + 1, at + k do
    redis.call('ZADD', KEYS[c + 1], 'XX', now + lease_ms, ARGV[i])
  end
  extend(KEYS[c], lease_ms + keep_ms)
  extend(KEYS[c + 1], lease_ms + keep_ms)
  at = at + k + 1
end
return 1
""",
)

#: A client's channels with unexpired messages, after giving back their lapsed leases
#: (and storing the fan-outs whose lease lapsed for their members: ``edge_scripts``).
#: KEYS: index. ARGV: the client's key base (``<prefix>:{<ns>!<client>}:``), pubcmd,
#: keep_ms, most, budget (fan-out members stored at most). -> {ms until the soonest
#: live lease lapses (0: none; -1: lapsed fan-outs are left, call again), channel...}.
OWN_WAITING = Script.of(
    "own_waiting",
    _GIVE_BACK
    + _EXPAND
    + r"""
local now = now_ms()
local base, pubcmd, keep_ms, most = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local out, soonest = {0}, false
local more = expand_lapsed(base, now, keep_ms, most, {}, tonumber(ARGV[5])) == 0
local fanout = redis.call('ZRANGE', base .. 'fd', 0, 0, 'WITHSCORES')
if #fanout > 0 then soonest = tonumber(fanout[2]) end
for _, channel in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local q, d = base .. 'q:' .. channel, base .. 'd:' .. channel
  give_back(q, base .. 'l:' .. channel, d, channel, base .. 'w', pubcmd, now, keep_ms, most)
  local first = redis.call('ZRANGE', d, 0, 0, 'WITHSCORES')
  if #first > 0 then
    local at = tonumber(first[2])
    if not soonest or at < soonest then soonest = at end
  end
  if trim(q, now) > 0 then
    out[#out + 1] = channel
  elseif #first == 0 then
    redis.call('SREM', KEYS[1], channel)
  end
end
if soonest then out[1] = math.max(1, soonest - now) end
if more then out[1] = -1 end
return out
""",
)

#: With the fan-outs' scripts, whose lapsed records ``OWN_WAITING`` expands.
PUSHED_SCRIPTS = (TAKE_HELD, END_PUSHED, RENEW_PUSHED, OWN_WAITING, *EDGE_SCRIPTS, *REMOTE_SCRIPTS)
