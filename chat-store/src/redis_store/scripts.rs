//! The Lua scripts of [`super::RedisStore`]: every mutation that touches more than one key runs
//! as one script, so Redis executes it atomically (no other command runs in between).
//!
//! Conventions shared by every script:
//! * `ARGV[1]` is the key prefix; in every script that can record a change, `ARGV[2]` is a
//!   fresh random epoch, used only if the conversation has no change stream (see
//!   `ensure_stream`); keys that depend on data read inside the script (the
//!   conversation list of each member, the per-sender seq sets) are built from it with the
//!   helpers of [`PRELUDE`]. That is why the store needs a non-cluster Redis (see the crate docs).
//! * Domain failures are error replies whose first word is a `CHAT_*` code (see
//!   `chat_redis::map_error`); every check happens before the first write, so a failed script
//!   changes nothing.
//! * Numbers that may exceed 2^53 (Snowflake ids, `last_activity`) are only ever handled as
//!   strings; Lua numbers (doubles) are used for seqs, which stay far below 2^53, and are turned
//!   back into strings with `string.format('%d', n)` (never `tostring`, which keeps only 14
//!   significant digits). Message JSON is stored and compared verbatim, never decoded: `cjson`
//!   would turn its 64-bit numbers into doubles. The one JSON a script decodes is a message's
//!   reactions (`reactions` hash), which holds only strings (keys and user ids).
//!   Epochs (63-bit) are strings too; positions are numbers, like seqs.
//! * The change stream: `epoch` and `position` are fields of the conversation hash, the
//!   compacted log is the `changes` sorted set (member = the item that changed: `m:<seq>`,
//!   `k:<user>` for a member's markers, `j:<user>` for a membership; score = the position of
//!   its latest change, so `ZADD` of an item already there moves it: compaction for free).
//!   A position is taken with `HINCRBY` in the same script as the change it numbers.

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
-- Makes a new change stream (epoch `fresh`, position 0, empty log) unless the conversation
-- has an intact one. A stream is lost when the epoch or position field is missing, or when the
-- position is past 0 but the log is gone (a log is never empty once a change was recorded).
local function ensure_stream(ck, xk, fresh)
  local s = redis.call('HMGET', ck, 'epoch', 'position')
  if s[1] and s[2] and (s[2] == '0' or redis.call('EXISTS', xk) == 1) then return end
  redis.call('HSET', ck, 'epoch', fresh, 'position', '0')
  redis.call('DEL', xk)
end
-- Gives `item` the conversation's next position (moving its entry in the log); returns it.
local function record(ck, xk, fresh, item)
  ensure_stream(ck, xk, fresh)
  local p = redis.call('HINCRBY', ck, 'position', 1)
  redis.call('ZADD', xk, p, item)
  return p
end
local function invalid(why) return redis.error_reply('CHAT_INVALID ' .. why) end
local function no_message(mid, cid)
  return redis.error_reply('CHAT_NOT_FOUND message ' .. mid .. ' in conversation ' .. cid)
end
local function not_found(cid) return redis.error_reply('CHAT_NOT_FOUND conversation ' .. cid) end
local function not_member(cid) return redis.error_reply('CHAT_NOT_MEMBER ' .. cid) end
"#;

fn script(body: &str) -> Script {
    Script::new(format!("{PRELUDE}\n{body}"))
}

/// Every script, for the connection to load at connect and after `NOSCRIPT`.
pub(super) fn all() -> [&'static Script; 14] {
    [
        &REACT,
        &TIMELINE,
        &STREAM,
        &CHANGES,
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

/// `append`. KEYS: conv, members, msgs, ids, idem, sent (of the sender), changes, reactions.
/// ARGV: prefix, epoch, cid, sender, idempotency field, message_id, message JSON (without seq).
/// Returns `{0, seq, position}` for a new message, `{1, seq, json, reactions or nil}` for a
/// retry.
pub(super) static APPEND: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local cid, sender, idem, mid = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if redis.call('EXISTS', KEYS[1]) == 0 then return not_found(cid) end
if redis.call('HEXISTS', KEYS[2], sender) == 0 then return not_member(cid) end
local dup = redis.call('HGET', KEYS[5], idem)
if dup then
  local m = redis.call('ZRANGEBYSCORE', KEYS[3], dup, dup)
  if not m[1] then
    return redis.error_reply('CHAT_INTERNAL idempotency key points at no message')
  end
  return {1, dup, m[1], redis.call('HGET', KEYS[8], dup)}
end
if redis.call('HEXISTS', KEYS[4], mid) == 1 then
  return redis.error_reply('CHAT_CONFLICT message id ' .. mid .. ' is already in use')
end
local seq = fmt(redis.call('HINCRBY', KEYS[1], 'last_seq', 1))
redis.call('ZADD', KEYS[3], seq, ARGV[7])
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
return {0, seq, record(KEYS[1], KEYS[7], ARGV[2], 'm:' .. seq)}
"#,
    )
});

/// `create_conversation`. KEYS: conv, members, direct (the pair's key; unused for a group),
/// changes, reactions. ARGV: prefix, epoch (of the new stream), cid, kind, has name ("0"/"1"), name,
/// created_at, role of the first user, users… (deduplicated, creator first; exactly two for a
/// direct conversation). Returns `{cid, snapshot}`: the new conversation or the pair's existing
/// one (whose restored members' joins take positions).
pub(super) static CREATE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local cid, kind, now, first_role = ARGV[3], ARGV[4], ARGV[7], ARGV[8]
local users = {}
for i = 9, #ARGV do users[#users + 1] = ARGV[i] end
if kind == 'direct' then
  local existing = redis.call('GET', KEYS[3])
  if existing then
    local ck, mk = key('conv', existing), key('members', existing)
    if redis.call('EXISTS', ck) == 1 then
      -- One of the pair may have left: opening the conversation again restores them.
      local xk = key('changes', existing)
      for _, u in ipairs(users) do
        if add_member(ck, mk, existing, u, 'member', now) then
          record(ck, xk, ARGV[2], 'j:' .. u)
        end
      end
      return {existing, snapshot(ck, mk)}
    end
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.error_reply('CHAT_CONFLICT conversation id ' .. cid .. ' is already in use')
end
redis.call('HSET', KEYS[1], 'kind', kind, 'created_at', now, 'last_seq', '0',
  'last_activity', cid, 'next_order', '0', 'epoch', ARGV[2], 'position', '0')
-- A log or reactions left behind by a lost conversation of this id belong to nothing now.
redis.call('DEL', KEYS[4], KEYS[5])
if ARGV[5] == '1' then redis.call('HSET', KEYS[1], 'name', ARGV[6]) end
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

/// `add_members`. KEYS: conv, members, changes. ARGV: prefix, epoch, cid, now, users…
/// Returns `{user, position}` for each user that was added, in order.
pub(super) static ADD_MEMBERS: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local cid, now = ARGV[3], ARGV[4]
if redis.call('EXISTS', KEYS[1]) == 0 then return not_found(cid) end
local a, b = redis.call('HGET', KEYS[1], 'pair_a'), redis.call('HGET', KEYS[1], 'pair_b')
if a then
  for i = 5, #ARGV do
    if ARGV[i] ~= a and ARGV[i] ~= b then
      return redis.error_reply('CHAT_INVALID a direct conversation cannot have other members')
    end
  end
end
local added = {}
for i = 5, #ARGV do
  if add_member(KEYS[1], KEYS[2], cid, ARGV[i], 'member', now) then
    added[#added + 1] = {ARGV[i], record(KEYS[1], KEYS[3], ARGV[2], 'j:' .. ARGV[i])}
  end
end
return added
"#,
    )
});

/// `remove_member`. KEYS: conv, members, changes. ARGV: prefix, epoch, cid, user.
/// Returns the position of the leave, 0 when the user was not a member.
pub(super) static REMOVE_MEMBER: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local cid, user = ARGV[3], ARGV[4]
if redis.call('EXISTS', KEYS[1]) == 0 then return not_found(cid) end
if redis.call('HDEL', KEYS[2], user) == 0 then return 0 end
redis.call('ZREM', user_key(user), entry(redis.call('HGET', KEYS[1], 'last_activity'), cid))
return record(KEYS[1], KEYS[3], ARGV[2], 'j:' .. user)
"#,
    )
});

/// `set_marker`. KEYS: conv, members, changes. ARGV: prefix, epoch, cid, user,
/// "read"/"delivered", seq. Forward only, clamped to last_seq; read implies delivered.
/// Returns `{seq, moved, position}` (position 0 when it did not move).
pub(super) static SET_MARKER: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local cid, user, kind, target = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
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
if moved then return {result, 1, record(KEYS[1], KEYS[3], ARGV[2], 'k:' .. user)} end
return {result, 0, 0}
"#,
    )
});

/// `change_message`, the write half of a compare-and-set: replaces the message at a seq only if
/// it is still exactly the JSON the caller read, and gives the change a position; a delete also
/// removes the reactions. KEYS: msgs, deleted, sent (of the sender), conv, changes, reactions.
/// ARGV: prefix, epoch, cid, seq, old JSON, new JSON, "1" when the change deletes it.
/// Returns `{position, reactions or nil}` when replaced, `{0}` when the message changed in
/// between.
pub(super) static REPLACE_MESSAGE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local cid, seq = ARGV[3], ARGV[4]
if redis.call('EXISTS', KEYS[4]) == 0 then return not_found(cid) end
local cur = redis.call('ZRANGEBYSCORE', KEYS[1], seq, seq)
if cur[1] ~= ARGV[5] then return {0} end
redis.call('ZREM', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[1], seq, ARGV[6])
if ARGV[7] == '1' then
  redis.call('ZADD', KEYS[2], seq, seq)
  redis.call('ZREM', KEYS[3], seq)
  redis.call('HDEL', KEYS[6], seq)
end
return {record(KEYS[4], KEYS[5], ARGV[2], 'm:' .. seq), redis.call('HGET', KEYS[6], seq)}
"#,
    )
});

/// `message`. KEYS: conv, ids, msgs, reactions. ARGV: prefix, cid, message_id.
/// Returns `{seq, json, reactions or nil}`, or nil when the conversation has no such message.
pub(super) static GET_MESSAGE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return not_found(ARGV[2]) end
local seq = redis.call('HGET', KEYS[2], ARGV[3])
if not seq then return false end
local m = redis.call('ZRANGEBYSCORE', KEYS[3], seq, seq)
if not m[1] then return false end
return {seq, m[1], redis.call('HGET', KEYS[4], seq)}
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
/// Returns `{entries, views}`; a view is `{snapshot, unread, {{newest json, seq, reactions}} or
/// {}}` for each of the first `limit` entries.
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
  if newest[1] then
    newest = {{newest[1], newest[2], redis.call('HGET', key('reactions', cid), newest[2])}}
  end
  views[i] = {snapshot(ck, mk), unread(ck, mk, cid, user) or 0, newest}
end
return {entries, views}
"#,
    )
});

/// `stream`. KEYS: conv, changes. ARGV: prefix, epoch, cid. Returns `{epoch, position}`
/// (making a new stream if the conversation has lost its own).
pub(super) static STREAM: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return not_found(ARGV[3]) end
ensure_stream(KEYS[1], KEYS[2], ARGV[2])
return redis.call('HMGET', KEYS[1], 'epoch', 'position')
"#,
    )
});

/// `changes_after`, one consistent page of the compacted log. KEYS: conv, members, msgs,
/// changes, reactions. ARGV: prefix, epoch, cid, after, entries to fetch (limit + 1), limit.
/// Returns `{epoch, position, entries, more}`: for each of the first `limit` log entries after
/// `after`, `{item, position, state}` where state is `{json, reactions or nil}` of the message
/// (`m:`), the member value
/// or nil for someone who left (`k:`), or 1/0 for whether the user is a member (`j:`); `more`
/// is 1 when further entries follow.
pub(super) static CHANGES: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local cid, limit = ARGV[3], tonumber(ARGV[6])
if redis.call('EXISTS', KEYS[1]) == 0 then return not_found(cid) end
ensure_stream(KEYS[1], KEYS[4], ARGV[2])
local s = redis.call('HMGET', KEYS[1], 'epoch', 'position')
local items = redis.call('ZRANGEBYSCORE', KEYS[4], '(' .. ARGV[4], '+inf', 'WITHSCORES',
  'LIMIT', 0, ARGV[5])
local n = #items / 2
local out = {}
for i = 1, math.min(n, limit) do
  local item = items[2 * i - 1]
  local kind, id = string.sub(item, 1, 1), string.sub(item, 3)
  local state
  if kind == 'm' then
    local json = redis.call('ZRANGEBYSCORE', KEYS[3], id, id)[1]
    state = false
    if json then state = {json, redis.call('HGET', KEYS[5], id)} end
  elseif kind == 'k' then
    state = redis.call('HGET', KEYS[2], id)
  else
    state = redis.call('HEXISTS', KEYS[2], id)
  end
  out[i] = {item, items[2 * i], state}
end
local more = 0
if n > limit then more = 1 end
return {s[1], s[2], out, more}
"#,
    )
});

/// `react`: sets or removes a user's reaction by the rule of `chat_core::model::apply_reaction`
/// (mirrored step by step), atomically. KEYS: conv, members, ids, msgs, deleted, reactions,
/// changes. ARGV: prefix, epoch, cid, message_id, user, "1"/"0" set or remove, key, "1"/"0"
/// whether the key is valid (checked by the caller with `Reaction::validate_key`), the error of
/// an invalid key, the most distinct keys, the error of too many keys.
/// Returns `{seq, json, reactions or nil, position}` (position 0 when nothing changed).
pub(super) static REACT: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local cid, mid, user, has_key, rkey = ARGV[3], ARGV[4], ARGV[5], ARGV[6] == '1', ARGV[7]
if redis.call('EXISTS', KEYS[1]) == 0 then return not_found(cid) end
if redis.call('HEXISTS', KEYS[2], user) == 0 then return not_member(cid) end
local seq = redis.call('HGET', KEYS[3], mid)
if not seq then return no_message(mid, cid) end
local json = redis.call('ZRANGEBYSCORE', KEYS[4], seq, seq)[1]
if not json then return no_message(mid, cid) end
if redis.call('ZSCORE', KEYS[5], seq) then return invalid('message is deleted') end
local raw = redis.call('HGET', KEYS[6], seq)
local rs = {}
if raw then rs = cjson.decode(raw) end
local current
for _, r in ipairs(rs) do
  for _, u in ipairs(r.users) do
    if u == user then current = r end
  end
  if current then break end
end
if has_key then
  if ARGV[8] ~= '1' then return invalid(ARGV[9]) end
  if current and current.key == rkey then return {seq, json, raw, 0} end
  local exists = false
  for _, r in ipairs(rs) do
    if r.key == rkey then exists = true end
  end
  -- Replacing one's only-user key frees a slot, so count after removal.
  if not exists and #rs >= tonumber(ARGV[10]) and not (current and #current.users == 1) then
    return invalid(ARGV[11])
  end
end
local changed = false
local kept = {}
for _, r in ipairs(rs) do
  local users = {}
  for _, u in ipairs(r.users) do
    if u == user then changed = true else users[#users + 1] = u end
  end
  if #users > 0 then
    r.users = users
    kept[#kept + 1] = r
  end
end
if has_key then
  local found = false
  for _, r in ipairs(kept) do
    if r.key == rkey then
      r.users[#r.users + 1] = user
      found = true
      break
    end
  end
  if not found then kept[#kept + 1] = {key = rkey, users = {user}} end
  changed = true
end
if not changed then return {seq, json, raw, 0} end
if #kept == 0 then
  redis.call('HDEL', KEYS[6], seq)
  raw = false
else
  raw = cjson.encode(kept)
  redis.call('HSET', KEYS[6], seq, raw)
end
return {seq, json, raw, record(KEYS[1], KEYS[7], ARGV[2], 'm:' .. seq)}
"#,
    )
});

/// `history` and `messages_after`: a range of the timeline with each message's reactions.
/// KEYS: conv, msgs, reactions. ARGV: prefix, cid, `ZRANGEBYSCORE` or `ZREVRANGEBYSCORE`, from,
/// to, limit. Returns `{page, reactions}`: the `WITHSCORES` page as it is (json, seq, json,
/// seq, …) and the reactions of its messages in the same order (nil for none), or `{}` when the
/// conversation has no reactions at all (flat replies: no table per message to build or parse).
pub(super) static TIMELINE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return not_found(ARGV[2]) end
local page = redis.call(ARGV[3], KEYS[2], ARGV[4], ARGV[5], 'WITHSCORES', 'LIMIT', 0, ARGV[6])
-- One HMGET for the page, none when the conversation has no reactions at all.
local rx = {}
if #page > 0 and redis.call('EXISTS', KEYS[3]) == 1 then
  local seqs = {}
  for i = 2, #page, 2 do seqs[#seqs + 1] = page[i] end
  rx = redis.call('HMGET', KEYS[3], unpack(seqs))
end
return {page, rx}
"#,
    )
});
