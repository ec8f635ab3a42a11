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

__all__ = [
    "EDGE_SCRIPTS",
    "END_FANOUTS",
    "FANOUT_LEASE",
    "GIVE_BACK_FANOUTS",
    "GROUP_DISCARD",
    "GROUP_SAME",
    "GROUP_VERSION",
    "RENEW_FANOUTS",
]

#: Store fan-out records for each of their members (under capacity, unexpired), and
#: forget them, at most ``budget`` members per script: Redis runs one script at a time,
#: so a record of thousands of members is stored over several calls, each holding
#: Redis a few milliseconds at most (the rest of its list stays in the record).
#: ``base`` is the owner's key base; ``queued`` collects the channels queued to. ->
#: the budget left (0: stop, there may be more).
_EXPAND = r"""
local function expand_fanout(base, token, now, keep_ms, queued, budget)
  local f = base .. 'f'
  local entry = redis.call('HGET', f, token)
  local listed = redis.call('HGET', f, token .. ':m')
  local at, cap = nil, 0
  if entry and listed and deadline_of(entry) > now then
    cap, at = string.match(listed, '^(%d+) ()')
    cap = tonumber(cap)
  end
  local deadline = at and deadline_of(entry) or now
  while at and budget > 0 do
    local first, last = string.find(listed, '%S+', at)
    if not first then at = nil; break end
    local name = string.sub(listed, first, last)
    if push(base .. 'q:' .. name, base .. 'h:' .. name, base .. 'i', name, entry, cap,
            now, deadline - now + keep_ms) == 1 then
      queued[#queued + 1] = name
    end
    budget = budget - 1
    at = last + 1
  end
  if at and string.find(listed, '%S', at) then
    redis.call('HSET', f, token .. ':m', cap .. ' ' .. string.sub(listed, at))
    return 0
  end
  redis.call('HDEL', f, token, token .. ':m')
  redis.call('ZREM', base .. 'fd', token)
  return budget
end
local function expand_lapsed(base, now, keep_ms, most, queued, budget)
  local due = redis.call('ZRANGEBYSCORE', base .. 'fd', '-inf', now, 'LIMIT', 0, most)
  for _, token in ipairs(due) do
    budget = expand_fanout(base, token, now, keep_ms, queued, budget)
    if budget == 0 then return 0 end
  end
  return budget
end
"""

#: Keep one fan-out record per owner: leased to this daemon for an owner attached here
#: (``L``), or appended to the owner's fan-out list ``fq`` for one attached to another
#: daemon (``R``), if a daemon of this release marked it (``a``: ``<version> <daemon>``,
#: ``remote_scripts``), with one wake-up on the owner's wake-up channel. An unmarked
#: owner's members are left to the caller to store per member. An appended record's
#: lease deadline is a lease away: if no daemon takes it by then (the marking one died),
#: the owner's next connection stores it per member, as a lapsed one (``OWN_WAITING``).
#: First, if a group version is given (the members were read before: ``GROUP_SAME``),
#: check it, and write nothing if it changed. KEYS: per owner the record hash, the lease
#: zset, the mark, the list[, then the group's version]. ARGV: token, lease_ms,
#: expiry_ms, keep_ms, payload, the version ('' : no check), the soonest deadline of the
#: members, pubcmd, origin, then per owner ``<L|R> <capacity> <channel>...``. -> 0 (the
#: version changed or a member lapsed: read again), or {1, per owner 1 (kept) or 0 (not
#: marked)}.
FANOUT_LEASE = Script.of(
    "fanout_lease",
    r"""
local now = now_ms()
local owners_end = #KEYS
if ARGV[6] ~= '' then
  owners_end = #KEYS - 1
  if redis.call('GET', KEYS[#KEYS]) ~= ARGV[6] or now >= tonumber(ARGV[7]) then return 0 end
end
local token, lease_ms, expiry_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local entry = entry_of(now + expiry_ms, ARGV[5])
local keep = math.max(expiry_ms, lease_ms) + tonumber(ARGV[4])
local out = {1}
for k = 1, owners_end, 4 do
  local arg = ARGV[9 + (k + 3) / 4]
  local remote = string.sub(arg, 1, 1) == 'R'
  local ok = 1
  if remote then
    local mark = redis.call('GET', KEYS[k + 2])
    if not (mark and tonumber(string.match(mark, '^(%d+) ') or '0') >= 1) then ok = 0 end
  end
  if ok == 1 then
    redis.call('HSET', KEYS[k], token, entry, token .. ':m', string.sub(arg, 3))
    redis.call('ZADD', KEYS[k + 1], now + lease_ms, token)
    extend(KEYS[k], keep)
    extend(KEYS[k + 1], keep)
    if remote then
      redis.call('RPUSH', KEYS[k + 3], token)
      extend(KEYS[k + 3], keep)
      redis.call(ARGV[8], string.sub(KEYS[k], 1, -2) .. 'w', ARGV[9] .. ' *')
    end
  end
  out[#out + 1] = ok
end
return out
""",
)

#: Forget fan-out records their layers acknowledged. KEYS: per owner the record hash,
#: the lease zset. ARGV: per owner the number k of tokens, then k tokens. -> 1.
END_FANOUTS = Script.of(
    "end_fanouts",
    r"""
local at = 1
for c = 1, #KEYS, 2 do
  local k = tonumber(ARGV[at])
  for i = at + 1, at + k do
    redis.call('HDEL', KEYS[c], ARGV[i], ARGV[i] .. ':m')
    redis.call('ZREM', KEYS[c + 1], ARGV[i])
  end
  at = at + k + 1
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
#: keep_ms, budget (members), tokens. -> {how many tokens are done, channel queued to...}
#: (fewer than given: call again with the rest).
GIVE_BACK_FANOUTS = Script.of(
    "give_back_fanouts",
    _EXPAND
    + r"""
local now = now_ms()
local base, keep_ms, budget = ARGV[1], tonumber(ARGV[3]), tonumber(ARGV[4])
local queued, done = {}, 0
for i = 5, #ARGV do
  budget = expand_fanout(base, ARGV[i], now, keep_ms, queued, budget)
  if budget == 0 then break end
  done = done + 1
end
if #queued > 0 then redis.call(ARGV[2], base .. 'w', '- ' .. table.concat(queued, ' ')) end
table.insert(queued, 1, done)
return queued
""",
)

#: Remove a membership; a new version if it was there. KEYS: group, its version. ARGV:
#: channel, the new version. -> 1.
GROUP_DISCARD = Script.of(
    "group_discard",
    r"""
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('SET', KEYS[2], ARGV[2], 'KEEPTTL')
end
return 1
""",
)

#: A group's version (made, as ``ARGV[1]``, if the group has none), read before its
#: members are, so a change meanwhile shows at the next send. KEYS: group, its version.
#: -> the version (nil: no such group).
GROUP_VERSION = Script.of(
    "group_version",
    r"""
local version = redis.call('GET', KEYS[2])
if version then return version end
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -2 then return false end
if ttl > 0 then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ttl)
else
  redis.call('SET', KEYS[2], ARGV[1])
end
return ARGV[1]
""",
)

#: Whether members read at a version are still the group's live members: the version is
#: the same and none of them has lapsed. KEYS: the group's version. ARGV: version, the
#: soonest deadline among them (ms). -> 1 or 0.
GROUP_SAME = Script.of(
    "group_same",
    r"""
if redis.call('GET', KEYS[1]) == ARGV[1] and now_ms() < tonumber(ARGV[2]) then return 1 end
return 0
""",
)

EDGE_SCRIPTS = (
    FANOUT_LEASE,
    END_FANOUTS,
    RENEW_FANOUTS,
    GIVE_BACK_FANOUTS,
    GROUP_DISCARD,
    GROUP_VERSION,
    GROUP_SAME,
)
