//! The Lua scripts of [`super::RedisStore`]: every mutation that touches more than one key runs
//! as one script, so Redis executes it atomically (no other command runs in between).
//!
//! Conventions shared by every script:
//! * `ARGV[1]` is the key prefix; keys that depend on data read inside the script (the
//!   conversation list of each member, the per-sender seq sets) are built from it with the
//!   helpers of [`PRELUDE`]. That is why the store needs a non-cluster Redis (see the crate docs).
//! * Domain failures are error replies whose first word is a `CHAT_*` code (see
//!   `chat_redis::map_error`); every check happens before the first write, so a failed script
//!   changes nothing.
//! * Numbers that may exceed 2^53 (Snowflake ids, `last_activity`) are only ever handled as
//!   strings; Lua numbers (doubles) are used for seqs, which stay far below 2^53, and are turned
//!   back into strings with `string.format('%d', n)` (never `tostring`, which keeps only 14
//!   significant digits). No script uses `cjson`: message JSON is stored and compared verbatim.

use std::sync::LazyLock;

use chat_redis::Script;

/// Helpers prepended to every script.
const PRELUDE: &str = r#"
local P = ARGV[1]
local function key(kind, id) return P .. ':' .. kind .. ':' .. id end
local function user_key(user) return P .. ':user:' .. user .. ':convs' end
local function sent_key(cid, user) return P .. ':sent:' .. cid .. ':' .. user end
local function pad(s) return string.rep('0', 20 - #s) .. s end
-- An entry of a user's conversation list: zero-padded last_activity, ':', conversation id.
local function entry(activity, cid) return pad(activity) .. ':' .. cid end
local function fmt(n) return string.format('%d', n) end
-- A member: "role:joined_at:order:last_read_seq:last_delivered_seq".
local function parse_member(v)
  return string.match(v, '^(%a+):(%d+):(%d+):(%d+):(%d+)$')
end
local function member_value(role, joined, ord, r, d)
  return role .. ':' .. joined .. ':' .. ord .. ':' .. r .. ':' .. d
end
local function snapshot(ck, mk)
  return {redis.call('HGETALL', ck), redis.call('HGETALL', mk)}
end
-- Adds `user` unless already a member: markers at the current last_seq, indexed in the user's
-- conversation list under the current last_activity. Returns whether it was added.
local function add_member(ck, mk, cid, user, role, joined)
  if redis.call('HEXISTS', mk, user) == 1 then return false end
  local last = redis.call('HGET', ck, 'last_seq')
  local ord = fmt(redis.call('HINCRBY', ck, 'next_order', 1) - 1)
  redis.call('HSET', mk, user, member_value(role, joined, ord, last, last))
  redis.call('ZADD', user_key(user), 0, entry(redis.call('HGET', ck, 'last_activity'), cid))
  return true
end
-- Messages from others after the user's read marker, not deleted; nil for a non-member.
-- (last - read) - own undeleted after read - all deleted after read: O(log n).
local function unread(ck, mk, cid, user)
  local v = redis.call('HGET', mk, user)
  if not v then return nil end
  local _, _, _, r = parse_member(v)
  local last = tonumber(redis.call('HGET', ck, 'last_seq'))
  local read = tonumber(r)
  if read >= last then return 0 end
  local own = redis.call('ZCOUNT', sent_key(cid, user), '(' .. r, '+inf')
  local deleted = redis.call('ZCOUNT', key('deleted', cid), '(' .. r, '+inf')
  local n = last - read - own - deleted
  if n < 0 then n = 0 end
  return n
end
local function not_found(cid) return redis.error_reply('CHAT_NOT_FOUND conversation ' .. cid) end
local function not_member(cid) return redis.error_reply('CHAT_NOT_MEMBER ' .. cid) end
"#;

fn script(body: &str) -> Script {
    Script::new(format!("{PRELUDE}\n{body}"))
}

/// Every script, for the connection to load at connect and after `NOSCRIPT`.
pub(super) fn all() -> [&'static Script; 10] {
    [
        &APPEND,
        &CREATE,
        &ADD_MEMBERS,
        &REMOVE_MEMBER,
        &SET_MARKER,
        &REPLACE_MESSAGE,
        &GET_MESSAGE,
        &CONVERSATION,
        &UNREAD,
        &LIST,
    ]
}

/// `append`. KEYS: conv, members, msgs, ids, idem, sent (of the sender).
/// ARGV: prefix, cid, sender, idempotency field, message_id, message JSON (without seq).
/// Returns `{0, seq}` for a new message, `{1, seq, json}` for a retry.
pub(super) static APPEND: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local cid, sender, idem, mid = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if redis.call('EXISTS', KEYS[1]) == 0 then return not_found(cid) end
if redis.call('HEXISTS', KEYS[2], sender) == 0 then return not_member(cid) end
local dup = redis.call('HGET', KEYS[5], idem)
if dup then
  local m = redis.call('ZRANGEBYSCORE', KEYS[3], dup, dup)
  if not m[1] then
    return redis.error_reply('CHAT_INTERNAL idempotency key points at no message')
  end
  return {1, dup, m[1]}
end
if redis.call('HEXISTS', KEYS[4], mid) == 1 then
  return redis.error_reply('CHAT_CONFLICT message id ' .. mid .. ' is already in use')
end
local seq = fmt(redis.call('HINCRBY', KEYS[1], 'last_seq', 1))
redis.call('ZADD', KEYS[3], seq, ARGV[6])
redis.call('HSET', KEYS[4], mid, seq)
redis.call('HSET', KEYS[5], idem, seq)
redis.call('ZADD', KEYS[6], seq, seq)
local old = entry(redis.call('HGET', KEYS[1], 'last_activity'), cid)
local new = entry(mid, cid)
redis.call('HSET', KEYS[1], 'last_activity', mid)
for _, user in ipairs(redis.call('HKEYS', KEYS[2])) do
  local uk = user_key(user)
  redis.call('ZREM', uk, old)
  redis.call('ZADD', uk, 0, new)
end
return {0, seq}
"#,
    )
});

/// `create_conversation`. KEYS: conv, members, direct (the pair's key; unused for a group).
/// ARGV: prefix, cid, kind, has name ("0"/"1"), name, created_at, role of the first user,
/// users… (deduplicated, creator first; exactly two for a direct conversation).
/// Returns `{cid, snapshot}`: the new conversation or the pair's existing one.
pub(super) static CREATE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local cid, kind, now, first_role = ARGV[2], ARGV[3], ARGV[6], ARGV[7]
local users = {}
for i = 8, #ARGV do users[#users + 1] = ARGV[i] end
if kind == 'direct' then
  local existing = redis.call('GET', KEYS[3])
  if existing then
    local ck, mk = key('conv', existing), key('members', existing)
    if redis.call('EXISTS', ck) == 1 then
      -- One of the pair may have left: opening the conversation again restores them.
      for _, u in ipairs(users) do add_member(ck, mk, existing, u, 'member', now) end
      return {existing, snapshot(ck, mk)}
    end
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.error_reply('CHAT_CONFLICT conversation id ' .. cid .. ' is already in use')
end
redis.call('HSET', KEYS[1], 'kind', kind, 'created_at', now, 'last_seq', '0',
  'last_activity', cid, 'next_order', '0')
if ARGV[4] == '1' then redis.call('HSET', KEYS[1], 'name', ARGV[5]) end
if kind == 'direct' then
  redis.call('HSET', KEYS[1], 'pair_a', users[1], 'pair_b', users[2])
  redis.call('SET', KEYS[3], cid)
end
for i, u in ipairs(users) do
  local role = 'member'
  if i == 1 then role = first_role end
  add_member(KEYS[1], KEYS[2], cid, u, role, now)
end
return {cid, snapshot(KEYS[1], KEYS[2])}
"#,
    )
});

/// `add_members`. KEYS: conv, members. ARGV: prefix, cid, now, users…
/// Returns the users that were added, in order.
pub(super) static ADD_MEMBERS: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local cid, now = ARGV[2], ARGV[3]
if redis.call('EXISTS', KEYS[1]) == 0 then return not_found(cid) end
local a, b = redis.call('HGET', KEYS[1], 'pair_a'), redis.call('HGET', KEYS[1], 'pair_b')
if a then
  for i = 4, #ARGV do
    if ARGV[i] ~= a and ARGV[i] ~= b then
      return redis.error_reply('CHAT_INVALID a direct conversation cannot have other members')
    end
  end
end
local added = {}
for i = 4, #ARGV do
  if add_member(KEYS[1], KEYS[2], cid, ARGV[i], 'member', now) then
    added[#added + 1] = ARGV[i]
  end
end
return added
"#,
    )
});

/// `remove_member`. KEYS: conv, members. ARGV: prefix, cid, user. Returns 1 if removed.
pub(super) static REMOVE_MEMBER: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local cid, user = ARGV[2], ARGV[3]
if redis.call('EXISTS', KEYS[1]) == 0 then return not_found(cid) end
if redis.call('HDEL', KEYS[2], user) == 0 then return 0 end
redis.call('ZREM', user_key(user), entry(redis.call('HGET', KEYS[1], 'last_activity'), cid))
return 1
"#,
    )
});

/// `set_marker`. KEYS: conv, members. ARGV: prefix, cid, user, "read"/"delivered", seq.
/// Forward only, clamped to last_seq; read implies delivered. Returns `{seq, moved}`.
pub(super) static SET_MARKER: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local cid, user, kind, target = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local last = redis.call('HGET', KEYS[1], 'last_seq')
if not last then return not_found(cid) end
local v = redis.call('HGET', KEYS[2], user)
if not v then return not_member(cid) end
local role, joined, ord, r, d = parse_member(v)
if tonumber(target) > tonumber(last) then target = last end
local moved, result
if kind == 'read' then
  moved = tonumber(target) > tonumber(r)
  if moved then r = target end
  result = r
else
  moved = tonumber(target) > tonumber(d)
  if moved then d = target end
  result = d
end
if tonumber(r) > tonumber(d) then d = r end
local updated = member_value(role, joined, ord, r, d)
if updated ~= v then redis.call('HSET', KEYS[2], user, updated) end
if moved then return {result, 1} end
return {result, 0}
"#,
    )
});

/// `change_message`, the write half of a compare-and-set: replaces the message at a seq only if
/// it is still exactly the JSON the caller read. KEYS: msgs, deleted, sent (of the sender).
/// ARGV: prefix, seq, old JSON, new JSON, "1" when the change deletes it. Returns 1 if replaced.
pub(super) static REPLACE_MESSAGE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local seq = ARGV[2]
local cur = redis.call('ZRANGEBYSCORE', KEYS[1], seq, seq)
if cur[1] ~= ARGV[3] then return 0 end
redis.call('ZREM', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[1], seq, ARGV[4])
if ARGV[5] == '1' then
  redis.call('ZADD', KEYS[2], seq, seq)
  redis.call('ZREM', KEYS[3], seq)
end
return 1
"#,
    )
});

/// `message`. KEYS: conv, ids, msgs. ARGV: prefix, cid, message_id.
/// Returns `{seq, json}`, or nil when the conversation has no such message.
pub(super) static GET_MESSAGE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return not_found(ARGV[2]) end
local seq = redis.call('HGET', KEYS[2], ARGV[3])
if not seq then return false end
local m = redis.call('ZRANGEBYSCORE', KEYS[3], seq, seq)
if not m[1] then return false end
return {seq, m[1]}
"#,
    )
});

/// `conversation`. KEYS: conv, members. ARGV: prefix. Returns a snapshot or nil.
pub(super) static CONVERSATION: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return snapshot(KEYS[1], KEYS[2])
"#,
    )
});

/// `unread`. KEYS: conv, members. ARGV: prefix, cid, user.
pub(super) static UNREAD: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return not_found(ARGV[2]) end
local n = unread(KEYS[1], KEYS[2], ARGV[2], ARGV[3])
if not n then return not_member(ARGV[2]) end
return n
"#,
    )
});

/// `list_conversations`, one consistent page. KEYS: the user's conversation list.
/// ARGV: prefix, user, max (`+` or `(<padded cursor>`), entries to fetch (limit + 1), limit.
/// Returns `{entries, views}`; a view is `{snapshot, unread, {newest json, seq} or {}}` for each
/// of the first `limit` entries.
pub(super) static LIST: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local user, limit = ARGV[2], tonumber(ARGV[5])
local entries = redis.call('ZREVRANGEBYLEX', KEYS[1], ARGV[3], '-', 'LIMIT', 0, ARGV[4])
local views = {}
for i, e in ipairs(entries) do
  if i > limit then break end
  local cid = string.sub(e, 22)
  local ck, mk = key('conv', cid), key('members', cid)
  local newest = redis.call('ZREVRANGEBYSCORE', key('msgs', cid), '+inf', '-inf',
    'WITHSCORES', 'LIMIT', 0, 1)
  views[i] = {snapshot(ck, mk), unread(ck, mk, cid, user) or 0, newest}
end
return {entries, views}
"#,
    )
});
