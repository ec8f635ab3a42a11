"""The Lua scripts of send windows on Redis (``room``): room reserved, stores into it,
and the record of each client's numbered sends, each written in the script that stores.

Room on a channel is the HASH ``r:<channel>`` beside its queue (``scripts.reserved``):
holder -> "<count> <deadline in ms>", a holder being one connection ("<client> <serial>
<daemon>"). Every change by a holder pushes its deadline ``lapse_ms`` on; the daemon's
layers give idle room back within a fraction of a second, so only a dead daemon's room
grows that old, and then the next capacity check drops it. Until then, a numbered
request of the same client spends a unit of it (``spend_left``): it is the client
sending again a windowed send whose daemon died before storing it, into the room
reserved for it, so it is not refused for a channel full of its own room.

A client's record (``{<ns>!<client>}``, its own hash tag): ``s`` the highest seq
recorded, ``k`` a bitmap of which of the latest ``span`` seqs up to it were stored (bit
``seq % span``; ``backends.SEQ_SPAN``). Only a store sets a bit: a seq whose store
failed (Redis away) was recorded nowhere, and a later seq of the client may have been
stored since, so "at most the highest" cannot mean stored. The bits of seqs skipped
over (not seen here, or seen by no store) are cleared as the highest passes them. A
seq further back than ``span`` is taken for stored: a client never sends again one
that old. Both keys live ``seq_keep_ms`` past the latest write: what the client stored
has expired by then.
"""

from __future__ import annotations

from .scripts import SCRIPTS, Script

__all__ = [
    "ALL_SCRIPTS",
    "RECORD_SEQ",
    "RELEASE_ROOM",
    "RESERVE_ROOM",
    "SEND_RESERVED",
    "SEND_RESERVING",
    "SEQ_STORED",
]

#: Helpers of the room scripts (after ``scripts._COMMON``).
_ROOM = r"""
-- Add ``delta`` units (never below 0) to a holder's room, pushing its deadline on.
local function hold_room(rk, holder, delta, now, lapse_ms)
  local count = 0
  local value = redis.call('HGET', rk, holder)
  if value then
    local c, d = string.match(value, '(%d+) (%d+)')
    if tonumber(d) > now then count = tonumber(c) end
  end
  count = math.max(0, count + delta)
  if count == 0 then
    redis.call('HDEL', rk, holder)
  else
    redis.call('HSET', rk, holder, count .. ' ' .. (now + lapse_ms))
    redis.call('PEXPIRE', rk, lapse_ms + 1000)
  end
end
-- Spend a unit of the room another connection of the same client holds on the channel
-- (``prefix``: "<client> "; ``own``: this connection's holder); false if none.
local function spend_left(rk, prefix, own, now)
  local flat = redis.call('HGETALL', rk)
  for i = 1, #flat, 2 do
    local field = flat[i]
    if field ~= own and string.sub(field, 1, #prefix) == prefix then
      local count, deadline = string.match(flat[i + 1], '(%d+) (%d+)')
      count = tonumber(count)
      if tonumber(deadline) > now and count > 0 then
        if count == 1 then
          redis.call('HDEL', rk, field)
        else
          redis.call('HSET', rk, field, (count - 1) .. ' ' .. deadline)
        end
        return true
      end
    end
  end
  return false
end
-- Reserve half of what still fits the channel, up to ``window``; return it.
local function reserve(q, h, channel, cap, window, holder, now, lapse_ms)
  local rk = room_key(h, channel)
  -- LLEN, not trim: expired messages are counted (metrics) where a take meets them.
  local used = redis.call('LLEN', q) + tonumber(redis.call('GET', h) or '0') + reserved(rk, now)
  local room = math.max(0, math.min(window, math.floor((cap - used) / 2)))
  if room > 0 then hold_room(rk, holder, room, now, lapse_ms) end
  return room
end
-- Whether ``seq`` was stored, by the record (``top``: its highest seq, ``k``: its bits).
local function was_stored(k, top, seq, span)
  if seq > top then return false end
  if seq <= top - span then return true end
  return redis.call('GETBIT', k, seq % span) == 1
end
-- Record ``seq`` stored (or not) in ``k``; return the record's new highest seq.
local function record(k, top, seq, stored, span)
  if seq > top then
    if seq - top >= span then
      redis.call('DEL', k)
    else
      for skipped = top + 1, seq - 1 do redis.call('SETBIT', k, skipped % span, 0) end
    end
    top = seq
  elseif seq <= top - span then
    return top
  end
  redis.call('SETBIT', k, seq % span, stored and 1 or 0)
  return top
end
local function keep_record(s, k, top, keep_ms)
  redis.call('SET', s, top, 'PX', keep_ms)
  redis.call('PEXPIRE', k, keep_ms)
end
"""

#: A request of a windowed client: its seq's record, a capacity-checked store, and room
#: reserved in one step. KEYS: s, k, queue, held[, index]. ARGV: channel, capacity,
#: payload, expiry_ms, keep_ms, origin, pubcmd, wake-up channel, whether we subscribe
#: to it (0/1), window, holder, lapse_ms, seq (0: none), seq_keep_ms, span,
#: "<client> ". -> {0, 0} full, {1, room} stored, {2, 0} stored before. A numbered one
#: goes into room another connection of its client left, if any, unchecked.
SEND_RESERVING = Script.of(
    "send_reserving",
    _ROOM
    + r"""
local now = now_ms()
local channel, cap, seq = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[13])
local span, top = tonumber(ARGV[15]), tonumber(redis.call('GET', KEYS[1]) or '0')
if seq > 0 and was_stored(KEYS[2], top, seq, span) then return {2, 0} end
local q, h, idx = KEYS[3], KEYS[4], KEYS[5] or false
local entry = entry_of(now + tonumber(ARGV[4]), ARGV[3])
local ok
if seq > 0 and spend_left(room_key(h, channel), ARGV[16], ARGV[11], now) then
  redis.call('RPUSH', q, entry)
  extend(q, tonumber(ARGV[5]))
  if idx then
    redis.call('SADD', idx, channel)
    extend(idx, tonumber(ARGV[5]))
  end
  ok = 1
else
  ok = push(q, h, idx, channel, entry, cap, now, tonumber(ARGV[5]))
end
if seq > 0 then
  keep_record(KEYS[1], KEYS[2], record(KEYS[2], top, seq, ok == 1, span), tonumber(ARGV[14]))
end
if ok == 0 then return {0, 0} end
local wakes = {}
note_wake(wakes, ARGV[8], channel)
publish_heard(ARGV[7], ARGV[6], wakes, {[ARGV[8]] = tonumber(ARGV[9])})
return {1, reserve(q, h, channel, cap, tonumber(ARGV[10]), ARGV[11], now, tonumber(ARGV[12]))}
""",
)

#: Windowed sends, in order, each into a unit of its channel's room, unchecked; one
#: stored before (by seq) spends its unit and is not stored again. KEYS: s, k, then per
#: item queue, held[, index]. ARGV: expiry_ms, keep_ms, origin, pubcmd, holder,
#: lapse_ms, seq_keep_ms, span, then per item channel, payload, wake-up channel, whether
#: we subscribe to it, seq (0: none). -> per item 1 (stored) or 2 (stored before).
SEND_RESERVED = Script.of(
    "send_reserved",
    _ROOM
    + r"""
local now = now_ms()
local expiry_ms, keep_ms, lapse_ms = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[6])
local span, top = tonumber(ARGV[8]), tonumber(redis.call('GET', KEYS[1]) or '0')
local numbered = false
local results, wakes, mine, spent = {}, {}, {}, {}
local k, a = 3, 9
while a <= #ARGV do
  local channel, seq = ARGV[a], tonumber(ARGV[a + 4])
  local q, h = KEYS[k], KEYS[k + 1]
  local idx = false
  if string.find(channel, '!', 1, true) then idx = KEYS[k + 2]; k = k + 3 else k = k + 2 end
  local rk = room_key(h, channel)
  spent[rk] = (spent[rk] or 0) + 1
  if seq > 0 and was_stored(KEYS[2], top, seq, span) then
    results[#results + 1] = 2
  else
    redis.call('RPUSH', q, entry_of(now + expiry_ms, ARGV[a + 1]))
    extend(q, keep_ms)
    if idx then
      redis.call('SADD', idx, channel)
      extend(idx, keep_ms)
    end
    if seq > 0 then
      top = record(KEYS[2], top, seq, true, span)
      numbered = true
    end
    note_wake(wakes, ARGV[a + 2], channel)
    mine[ARGV[a + 2]] = tonumber(ARGV[a + 3])
    results[#results + 1] = 1
  end
  a = a + 5
end
for rk, n in pairs(spent) do hold_room(rk, ARGV[5], -n, now, lapse_ms) end
if numbered then keep_record(KEYS[1], KEYS[2], top, tonumber(ARGV[7])) end
publish_heard(ARGV[4], ARGV[3], wakes, mine)
return results
""",
)

#: Room for a sender that keeps sending, storing nothing. KEYS: queue, held. ARGV:
#: channel, capacity, window, holder, lapse_ms. -> the room reserved.
RESERVE_ROOM = Script.of(
    "reserve_room",
    _ROOM
    + r"""
local now = now_ms()
return reserve(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], now,
               tonumber(ARGV[5]))
""",
)

#: Give back room. KEYS: room. ARGV: holder, count, lapse_ms.
RELEASE_ROOM = Script.of(
    "release_room",
    _ROOM
    + r"""
hold_room(KEYS[1], ARGV[1], -tonumber(ARGV[2]), now_ms(), tonumber(ARGV[3]))
return 1
""",
)

#: Whether a numbered GROUP_SEND was stored (delivered) before. KEYS: s, k. ARGV: seq,
#: span. -> 1 or 0.
SEQ_STORED = Script.of(
    "seq_stored",
    _ROOM
    + r"""
local top = tonumber(redis.call('GET', KEYS[1]) or '0')
if was_stored(KEYS[2], top, tonumber(ARGV[1]), tonumber(ARGV[2])) then return 1 end
return 0
""",
)

#: Numbered GROUP_SENDs' outcome, each. KEYS: s, k. ARGV: stored (0/1), seq_keep_ms,
#: span, then the seqs.
RECORD_SEQ = Script.of(
    "record_seq",
    _ROOM
    + r"""
local top = tonumber(redis.call('GET', KEYS[1]) or '0')
local stored, span = ARGV[1] == '1', tonumber(ARGV[3])
for i = 4, #ARGV do top = record(KEYS[2], top, tonumber(ARGV[i]), stored, span) end
keep_record(KEYS[1], KEYS[2], top, tonumber(ARGV[2]))
return 1
""",
)

#: Every script of the backend, loaded at connect.
ALL_SCRIPTS = (
    *SCRIPTS,
    SEND_RESERVING,
    SEND_RESERVED,
    RESERVE_ROOM,
    RELEASE_ROOM,
    SEQ_STORED,
    RECORD_SEQ,
)
