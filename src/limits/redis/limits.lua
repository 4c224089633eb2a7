-- tollgate rate limits: one atomic admission or settlement over a key's limits
-- and the global limits. The maths is the local backend's (src/limits/local.rs),
-- in microseconds of Redis server time, so every replica shares one clock.
--
-- Every limit is per minute and kept as a "theoretical arrival time" (tat): the
-- moment its bucket is full again. Requests are GCRA with a burst of the whole
-- limit; n tokens weigh n * 60 s / tpm; a bucket holds what is left of one
-- minute before its tat. Concurrency slots are members of a sorted set scored by
-- the end of their lease, so a crashed replica's slots expire.
--
-- KEYS[1] key state (hash r, i, o)    KEYS[2] key slots (zset)
-- KEYS[3] global state                KEYS[4] global slots
-- KEYS[5..] slot sets of reservations dropped without settling, released now
--
-- ARGV[1] "admit" or "settle"         ARGV[2] reservation id (slot member)
-- ARGV[3] slot lease (us)             ARGV[4] advised wait for a full slot set (us)
-- ARGV[5] input tokens, ARGV[6] output tokens: the estimate (admit) or
--         actual minus estimate (settle)
-- ARGV[7..10]  key rpm, input tpm, output tpm, max concurrent (0: unlimited)
-- ARGV[11..14] the same for the global limits
-- ARGV[15..] the members released from KEYS[5..], in order
--
-- admit returns {admitted, wait_us, limited_by, then for the key's requests,
-- input tokens and output tokens: remaining (-1 if unlimited), reset_us}.
-- limited_by: 0 none; 1..4 key requests, input, output, concurrency; 5..8 global.
-- settle returns {1}.

local WINDOW = 60000000

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])

local op = ARGV[1]
local member = ARGV[2]
local lease = tonumber(ARGV[3])
local poll = tonumber(ARGV[4])
local demand_in = tonumber(ARGV[5])
local demand_out = tonumber(ARGV[6])

-- Lua would print large numbers with 14 digits only, losing microseconds.
local function fmt(x)
  return string.format('%.3f', x)
end

local function backlog(tat)
  if tat == nil or tat <= now then
    return 0
  end
  return tat - now
end

local function scope(state, slots, first)
  local s = {
    state = state,
    slots = slots,
    rpm = tonumber(ARGV[first]),
    itpm = tonumber(ARGV[first + 1]),
    otpm = tonumber(ARGV[first + 2]),
    conc = tonumber(ARGV[first + 3]),
  }
  if s.rpm > 0 or s.itpm > 0 or s.otpm > 0 then
    local v = redis.call('HMGET', state, 'r', 'i', 'o')
    s.r, s.i, s.o = tonumber(v[1]), tonumber(v[2]), tonumber(v[3])
  end
  return s
end

local function save(s)
  local fields = {}
  for _, f in ipairs({ 'r', 'i', 'o' }) do
    if s[f] ~= nil then
      fields[#fields + 1] = f
      fields[#fields + 1] = fmt(s[f])
    end
  end
  if #fields > 0 then
    redis.call('HSET', s.state, unpack(fields))
    -- Once everything is full again the state means nothing: let it expire.
    local longest = math.max(backlog(s.r), backlog(s.i), backlog(s.o))
    redis.call('PEXPIRE', s.state, math.ceil(longest / 1000) + 1000)
  end
end

local key = scope(KEYS[1], KEYS[2], 7)
local global = scope(KEYS[3], KEYS[4], 11)

for i = 5, #KEYS do
  redis.call('ZREM', KEYS[i], ARGV[i + 10])
end

if op == 'settle' then
  local function adjust(tat, tpm, delta)
    if delta > 0 then
      return math.max(tat or now, now) + delta * WINDOW / tpm
    end
    if delta < 0 and tat ~= nil and tat > now then
      return math.max(tat + delta * WINDOW / tpm, now)
    end
    return tat
  end
  for _, s in ipairs({ key, global }) do
    local changed = false
    if s.itpm > 0 and demand_in ~= 0 then
      s.i = adjust(s.i, s.itpm, demand_in)
      changed = true
    end
    if s.otpm > 0 and demand_out ~= 0 then
      s.o = adjust(s.o, s.otpm, demand_out)
      changed = true
    end
    if changed then
      save(s)
    end
    if s.conc > 0 then
      redis.call('ZREM', s.slots, member)
    end
  end
  return { 1 }
end

local wait, limited_by = 0, 0
local function block(w, code)
  if w > wait then
    wait, limited_by = w, code
  end
end

-- n tokens against a bucket full at tat: the wait (0 if they fit) and the new tat.
local function take(tat, tpm, n)
  local back = backlog(tat)
  local cost = n * WINDOW / tpm
  if back + cost <= WINDOW then
    return 0, now + back + cost
  end
  if cost > WINDOW then
    -- Larger than the whole bucket: admitted once it is full, in debt after.
    if back == 0 then
      return 0, now + cost
    end
    return back, nil
  end
  return back + cost - WINDOW, nil
end

local function check(s, base)
  local plan = {}
  if s.rpm > 0 then
    local t = WINDOW / s.rpm
    local tat = math.max(s.r or now, now)
    local early = tat - (WINDOW - t) - now
    if early > 0 then
      block(early, base + 1)
    else
      plan.r = tat + t
    end
  end
  if s.itpm > 0 then
    local w, tat = take(s.i, s.itpm, demand_in)
    if tat then plan.i = tat else block(w, base + 2) end
  end
  if s.otpm > 0 then
    local w, tat = take(s.o, s.otpm, demand_out)
    if tat then plan.o = tat else block(w, base + 3) end
  end
  if s.conc > 0 then
    redis.call('ZREMRANGEBYSCORE', s.slots, '-inf', fmt(now))
    if redis.call('ZCARD', s.slots) >= s.conc then
      block(poll, base + 4)
    end
  end
  return plan
end

local key_plan = check(key, 0)
local global_plan = check(global, 4)

if wait == 0 then
  for _, pair in ipairs({ { key, key_plan }, { global, global_plan } }) do
    local s, plan = pair[1], pair[2]
    if plan.r or plan.i or plan.o then
      s.r = plan.r or s.r
      s.i = plan.i or s.i
      s.o = plan.o or s.o
      save(s)
    end
    if s.conc > 0 then
      redis.call('ZADD', s.slots, fmt(now + lease), member)
      redis.call('PEXPIRE', s.slots, math.ceil(lease / 1000) + 1000)
    end
  end
end

local function state(tat, limit)
  if limit <= 0 then
    return -1, 0
  end
  local back = backlog(tat)
  -- The epsilon keeps float error from turning 3 into 2.999.
  local remaining = math.floor((WINDOW - back) * limit / WINDOW + 1e-6)
  remaining = math.max(0, math.min(limit, remaining))
  return remaining, math.ceil(back)
end

local r_left, r_reset = state(key.r, key.rpm)
local i_left, i_reset = state(key.i, key.itpm)
local o_left, o_reset = state(key.o, key.otpm)
local admitted = 0
if wait == 0 then
  admitted = 1
end
return { admitted, math.ceil(wait), limited_by, r_left, r_reset, i_left, i_reset, o_left, o_reset }
