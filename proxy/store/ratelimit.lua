-- Rate limits shared by every replica: a GCRA bucket and a leased concurrency set, judged
-- against the Redis clock (TIME) so replicas with skewed clocks agree.
--
-- ARGV[1] picks the operation. Times are integer microseconds; numbers handed back to Redis are
-- formatted with %d, since Lua's default number formatting keeps only 14 significant digits.
--
-- acquire  KEYS: rl key (GCRA TAT), cc key (sorted set: slot -> lease expiry),
--                tk key (token TAT)
--          ARGV: op, emission interval, capacity in time (burst x interval), concurrent cap,
--                lease, slot id, tokens per minute (0: no token limit), tokens this replica
--                metered since its last call for the key (added first, whatever the verdict)
--          -> {admitted 0/1, reason 0 ok | 1 rate | 2 concurrency | 3 tokens, remaining, reset,
--              retry, tokens remaining (-1: no token limit), tokens reset}
-- consume  KEYS: tk keys; ARGV: op, then per key: tokens per minute, tokens metered -> #keys
--
-- Tokens are a GCRA bucket too: a minute's budget (tokens_per_minute) of capacity, each token
-- worth 60 s / tokens_per_minute. Usage is known only when an answer ends, so a request is let
-- in while at least one token of budget is left and its tokens are added afterwards.
-- lease    KEYS: rl, cc, tk keys as for acquire
--          ARGV: op, interval, capacity, concurrent cap, slot lease, tokens per minute, tokens
--                metered, requests wanted (0: none), then the ids of the slots wanted (maybe none)
--          -> acquire's reply, then requests granted, slots granted (the first ids given).
--          A request lease advances the TAT by granted x interval at once: at most what the
--          bucket holds now, so GCRA's bound holds for what is leased.
-- giveback KEYS: rl keys; ARGV: op, then per key the time (granted-but-unused x interval) to
--          take back off the TAT -> #keys
-- release  KEYS: cc keys; ARGV: op, one slot id per key -> slots removed
-- refresh  KEYS: cc keys; ARGV: op, lease, one slot id per key -> leases extended
-- heartbeat KEYS: replica set; ARGV: op, ttl, replica id -> live replicas

local op = ARGV[1]

local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function fmt(n)
  return string.format('%d', n)
end

local function ms_ceil(us)
  return fmt(math.max(1, math.ceil(us / 1000)))
end

local MINUTE = 60000000

-- The token TAT of key after adding spent tokens (written back only when it moved).
local function spend(key, tpm, spent, now)
  local per = MINUTE / tpm
  local ttat = tonumber(redis.call('GET', key)) or now
  if ttat < now then
    ttat = now
  end
  if spent > 0 then
    ttat = math.floor(ttat + spent * per)
    redis.call('SET', key, fmt(ttat), 'PX', ms_ceil(ttat - now))
  end
  return ttat, per
end

-- The token budget after adding spent tokens: tokens left (-1: no token limit), reset, retry.
local function token_budget(tk, tpm, spent, now)
  if tpm <= 0 then
    return -1, 0, 0
  end
  local ttat, per = spend(tk, tpm, spent, now)
  return math.max(0, math.floor((now + MINUTE - ttat) / per)), ttat - now, ttat + per - MINUTE - now
end

-- The request bucket's TAT, never in the past.
local function request_tat(rl, now)
  return math.max(tonumber(redis.call('GET', rl)) or now, now)
end

if op == 'acquire' then
  local rl, cc, tk = KEYS[1], KEYS[2], KEYS[3]
  local interval = tonumber(ARGV[2])
  local capacity = tonumber(ARGV[3])
  local concurrent = tonumber(ARGV[4])
  local lease = tonumber(ARGV[5])
  local slot = ARGV[6]
  local tpm = tonumber(ARGV[7]) or 0
  local spent = tonumber(ARGV[8]) or 0
  local now = now_us()

  local t_left, t_reset, t_retry = token_budget(tk, tpm, spent, now)
  local tat = request_tat(rl, now)
  local new_tat = tat + interval
  local allow_at = new_tat - capacity
  if allow_at > now then
    return {0, 1, 0, tat - now, allow_at - now, t_left, t_reset}
  end
  if t_left == 0 then
    local remaining = math.floor((now + capacity - tat) / interval)
    return {0, 3, remaining, tat - now, t_retry, t_left, t_reset}
  end

  redis.call('ZREMRANGEBYSCORE', cc, '-inf', fmt(now))
  if redis.call('ZCARD', cc) >= concurrent then
    local remaining = math.floor((now + capacity - tat) / interval)
    return {0, 2, remaining, tat - now, 0, t_left, t_reset}
  end
  redis.call('ZADD', cc, fmt(now + lease), slot)
  redis.call('PEXPIRE', cc, ms_ceil(lease))

  redis.call('SET', rl, fmt(new_tat), 'PX', ms_ceil(new_tat - now))
  local remaining = math.floor((now + capacity - new_tat) / interval)
  return {1, 0, remaining, new_tat - now, 0, t_left, t_reset}
elseif op == 'lease' then
  local rl, cc, tk = KEYS[1], KEYS[2], KEYS[3]
  local interval = tonumber(ARGV[2])
  local capacity = tonumber(ARGV[3])
  local concurrent = tonumber(ARGV[4])
  local lease = tonumber(ARGV[5])
  local tpm = tonumber(ARGV[6]) or 0
  local spent = tonumber(ARGV[7]) or 0
  local want = tonumber(ARGV[8]) or 0
  local slots_wanted = #ARGV - 8
  local now = now_us()

  local t_left, t_reset, t_retry = token_budget(tk, tpm, spent, now)
  local tat = request_tat(rl, now)
  local granted = 0
  if want > 0 then
    granted = math.min(want, math.floor((now + capacity - tat) / interval))
    if granted < 1 then
      return {0, 1, 0, tat - now, tat + interval - capacity - now, t_left, t_reset, 0, 0}
    end
  end
  if t_left == 0 then
    local remaining = math.floor((now + capacity - tat) / interval)
    return {0, 3, remaining, tat - now, t_retry, t_left, t_reset, 0, 0}
  end

  local slots = 0
  if slots_wanted > 0 then
    redis.call('ZREMRANGEBYSCORE', cc, '-inf', fmt(now))
    local free = concurrent - redis.call('ZCARD', cc)
    if free < 1 then
      local remaining = math.floor((now + capacity - tat) / interval)
      return {0, 2, remaining, tat - now, 0, t_left, t_reset, 0, 0}
    end
    slots = math.min(slots_wanted, free)
    for i = 1, slots do
      redis.call('ZADD', cc, fmt(now + lease), ARGV[8 + i])
    end
    redis.call('PEXPIRE', cc, ms_ceil(lease))
  end

  if granted > 0 then
    tat = tat + granted * interval
    redis.call('SET', rl, fmt(tat), 'PX', ms_ceil(tat - now))
  end
  local remaining = math.floor((now + capacity - tat) / interval)
  return {1, 0, remaining, tat - now, 0, t_left, t_reset, granted, slots}
elseif op == 'giveback' then
  local now = now_us()
  for i, key in ipairs(KEYS) do
    local tat = tonumber(redis.call('GET', key))
    if tat then
      tat = tat - tonumber(ARGV[1 + i])
      if tat <= now then
        redis.call('DEL', key)
      else
        redis.call('SET', key, fmt(tat), 'PX', ms_ceil(tat - now))
      end
    end
  end
  return #KEYS
elseif op == 'consume' then
  local now = now_us()
  for i, key in ipairs(KEYS) do
    local tpm = tonumber(ARGV[2 * i])
    local spent = tonumber(ARGV[2 * i + 1])
    if tpm > 0 and spent > 0 then
      spend(key, tpm, spent, now)
    end
  end
  return #KEYS
elseif op == 'release' then
  local removed = 0
  for i, key in ipairs(KEYS) do
    removed = removed + redis.call('ZREM', key, ARGV[1 + i])
  end
  return removed
elseif op == 'refresh' then
  local lease = tonumber(ARGV[2])
  local expiry = fmt(now_us() + lease)
  local extended = 0
  for i, key in ipairs(KEYS) do
    local changed = redis.call('ZADD', key, 'XX', 'CH', expiry, ARGV[2 + i])
    if changed > 0 then
      extended = extended + changed
      redis.call('PEXPIRE', key, ms_ceil(lease))
    end
  end
  return extended
elseif op == 'heartbeat' then
  local ttl = tonumber(ARGV[2])
  local now = now_us()
  redis.call('ZADD', KEYS[1], fmt(now + ttl), ARGV[3])
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now))
  redis.call('PEXPIRE', KEYS[1], ms_ceil(ttl))
  return redis.call('ZCARD', KEYS[1])
end
return redis.error_reply('unknown rate limit op: ' .. tostring(op))
