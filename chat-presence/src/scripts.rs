//! The Lua scripts of [`RedisPresence`](crate::RedisPresence): every state transition of a user
//! runs inside one script, so it is atomic across nodes and its change is published exactly
//! once (the `PUBLISH` is part of the transition).
//!
//! Every script gets `ARGV[1..3] = prefix, ttl_ms, debounce_ms` and reads the server clock
//! (`TIME`), so all nodes agree on time whatever their own clocks say.
//!
//! State of a user `u` (see the crate docs for the key table):
//! * `{p}:sess:{u}`: hash `connection id → last heartbeat (ms)`;
//! * `{p}:live`: sorted set, `u` scored by the expiry of its newest session, while it has one;
//! * `{p}:pending`: sorted set, `u` scored by when its debounced offline comes due;
//! * `{p}:seen:{u}`: the last time `u` was known alive (ms);
//! * `{p}:alive:{u}`: a flag that expires with `u`'s last session (for keyspace notifications).
//!
//! A user is in at most one of `live` and `pending`; online exactly while in one of them.

/// Shared prelude: arguments, the clock, `publish` and `settle`.
macro_rules! prelude {
    () => {
        r#"
local P = ARGV[1]
local TTL = tonumber(ARGV[2])
local DEBOUNCE = tonumber(ARGV[3])
local LIVE = P .. ':live'
local PENDING = P .. ':pending'
local clock = redis.call('TIME')
local NOW = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

local function ms(n)
  return string.format('%d', n)
end

local function publish(user, status, seen)
  redis.call('PUBLISH', P .. ':presence:' .. user,
    '{"user_id":' .. cjson.encode(user) .. ',"status":"' .. status .. '","last_seen":' .. ms(seen) .. '}')
end

-- Brings `user` up to date at NOW: drops expired sessions; when the last one has expired,
-- starts the debounce from its expiry; when the debounce is over, turns the user offline and
-- publishes the change. Returns the newest live session's heartbeat, or nil.
local function settle(user)
  local sk = P .. ':sess:' .. user
  local flat = redis.call('HGETALL', sk)
  local newest = nil
  for i = 1, #flat, 2 do
    local seen = tonumber(flat[i + 1])
    if seen == nil or seen + TTL <= NOW then
      redis.call('HDEL', sk, flat[i])
    elseif newest == nil or seen > newest then
      newest = seen
    end
  end
  local expiry = redis.call('ZSCORE', LIVE, user)
  if newest ~= nil then
    if expiry == false or tonumber(expiry) < newest + TTL then
      redis.call('ZADD', LIVE, ms(newest + TTL), user)
    end
  elseif expiry ~= false then
    -- The last session expired at `expiry` (its last heartbeat + TTL): debounce from there.
    redis.call('ZREM', LIVE, user)
    redis.call('DEL', P .. ':alive:' .. user)
    redis.call('ZADD', PENDING, ms(tonumber(expiry) + DEBOUNCE), user)
  end
  local due = redis.call('ZSCORE', PENDING, user)
  if due ~= false and tonumber(due) <= NOW then
    redis.call('ZREM', PENDING, user)
    local seen = tonumber(redis.call('GET', P .. ':seen:' .. user)) or NOW
    publish(user, 'offline', seen)
  end
  return newest
end
"#
    };
}

/// `TOUCH prefix ttl debounce (user conn)*`: connect, or heartbeat (which re-creates an unknown
/// session). Turns an offline user online (publishing the change); cancels a pending offline
/// silently.
pub(crate) const TOUCH: &str = concat!(
    prelude!(),
    r#"
local function touch(user, conn)
  settle(user)
  local online = redis.call('ZSCORE', LIVE, user) ~= false
    or redis.call('ZSCORE', PENDING, user) ~= false
  local sk = P .. ':sess:' .. user
  redis.call('HSET', sk, conn, ms(NOW))
  redis.call('PEXPIRE', sk, ms(TTL))
  redis.call('SET', P .. ':alive:' .. user, '1', 'PX', ms(TTL))
  redis.call('SET', P .. ':seen:' .. user, ms(NOW))
  redis.call('ZADD', LIVE, ms(NOW + TTL), user)
  if online then
    -- Already online (maybe inside the debounce of an ended session): no change.
    redis.call('ZREM', PENDING, user)
  else
    publish(user, 'online', NOW)
  end
end

for i = 4, #ARGV - 1, 2 do
  touch(ARGV[i], ARGV[i + 1])
end
return 0
"#
);

/// `END prefix ttl debounce user conn`: a session ended. Returns the milliseconds until the
/// user's debounced offline comes due when this was the last session, else -1 (also for an
/// unknown session, which changes nothing).
pub(crate) const END: &str = concat!(
    prelude!(),
    r#"
local user, conn = ARGV[4], ARGV[5]
settle(user)
local sk = P .. ':sess:' .. user
if redis.call('HDEL', sk, conn) == 0 then
  return -1
end
redis.call('SET', P .. ':seen:' .. user, ms(NOW))
-- `settle` dropped the expired sessions: every remaining one is live.
local flat = redis.call('HGETALL', sk)
local newest = nil
for i = 2, #flat, 2 do
  local seen = tonumber(flat[i])
  if newest == nil or seen > newest then
    newest = seen
  end
end
if newest ~= nil then
  redis.call('ZADD', LIVE, ms(newest + TTL), user)
  redis.call('SET', P .. ':alive:' .. user, '1', 'PX', ms(newest + TTL - NOW))
  return -1
end
redis.call('ZREM', LIVE, user)
redis.call('DEL', P .. ':alive:' .. user)
redis.call('ZADD', PENDING, ms(NOW + DEBOUNCE), user)
return DEBOUNCE
"#
);

/// `SWEEP prefix ttl debounce limit`: settles up to `limit` users whose last session expired
/// and up to `limit` users whose debounce is over. Returns `{more, next}`: `more` = 1 when a
/// limit was hit (sweep again at once), `next` = milliseconds until the earliest known
/// deadline (-1: none).
pub(crate) const SWEEP: &str = concat!(
    prelude!(),
    r#"
local LIMIT = tonumber(ARGV[4])
local expired = redis.call('ZRANGEBYSCORE', LIVE, '-inf', ms(NOW), 'LIMIT', 0, LIMIT)
for _, user in ipairs(expired) do
  settle(user)
end
local due = redis.call('ZRANGEBYSCORE', PENDING, '-inf', ms(NOW), 'LIMIT', 0, LIMIT)
for _, user in ipairs(due) do
  settle(user)
end
local more = 0
if #expired >= LIMIT or #due >= LIMIT then
  more = 1
end
local next = -1
local a = redis.call('ZRANGE', LIVE, 0, 0, 'WITHSCORES')
local b = redis.call('ZRANGE', PENDING, 0, 0, 'WITHSCORES')
if a[2] then
  next = tonumber(a[2])
end
if b[2] and (next == -1 or tonumber(b[2]) < next) then
  next = tonumber(b[2])
end
if next ~= -1 then
  next = math.max(next - NOW, 0)
end
return {more, next}
"#
);
