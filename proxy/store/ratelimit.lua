-- Rate limits shared by every replica: a GCRA bucket and a leased concurrency set, judged
-- against the Redis clock (TIME) so replicas with skewed clocks agree.
--
-- ARGV[1] picks the operation. Times are integer microseconds; numbers handed back to Redis are
-- formatted with %d, since Lua's default number formatting keeps only 14 significant digits.
--
-- acquire  KEYS: rl key (GCRA TAT), cc key (sorted set: slot -> lease expiry)
--          ARGV: op, emission interval, capacity in time (burst x interval), concurrent cap,
--                lease, slot id
--          -> {admitted 0/1, reason 0 ok | 1 rate | 2 concurrency, remaining, reset, retry}
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

if op == 'acquire' then
  local rl, cc = KEYS[1], KEYS[2]
  local interval = tonumber(ARGV[2])
  local capacity = tonumber(ARGV[3])
  local concurrent = tonumber(ARGV[4])
  local lease = tonumber(ARGV[5])
  local slot = ARGV[6]
  local now = now_us()

  local tat = tonumber(redis.call('GET', rl)) or now
  if tat < now then
    tat = now
  end
  local new_tat = tat + interval
  local allow_at = new_tat - capacity
  if allow_at > now then
    return {0, 1, 0, tat - now, allow_at - now}
  end

  redis.call('ZREMRANGEBYSCORE', cc, '-inf', fmt(now))
  if redis.call('ZCARD', cc) >= concurrent then
    local remaining = math.floor((now + capacity - tat) / interval)
    return {0, 2, remaining, tat - now, 0}
  end
  redis.call('ZADD', cc, fmt(now + lease), slot)
  redis.call('PEXPIRE', cc, ms_ceil(lease))

  redis.call('SET', rl, fmt(new_tat), 'PX', ms_ceil(new_tat - now))
  local remaining = math.floor((now + capacity - new_tat) / interval)
  return {1, 0, remaining, new_tat - now, 0}
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
