//! How values look in Redis, and how replies are decoded. Nothing here talks to Redis.

use std::borrow::Cow;

use chat_core::id::{ConversationId, MessageId, UserId};
use chat_core::model::{
    Change, Conversation, ConversationKind, Media, Member, Message, MessageKind, NewMessage,
    Reaction, Role,
};
use chat_core::{Error, Result};
use chat_redis::redis::Value;
use serde::{Deserialize, Serialize};

/// Width of the zero-padded `last_activity` in a conversation-list entry (`u64::MAX` has 20
/// decimal digits), so that entries sort by activity as strings.
pub(super) const ACTIVITY_WIDTH: usize = 20;

/// A message as stored in the `msgs` sorted set: every field of [`Message`] except `seq`, which
/// is the member's score. Field names and shapes are those of [`Message`]'s JSON (64-bit ids as
/// strings).
#[derive(Serialize)]
struct StoredRef<'a> {
    message_id: MessageId,
    conversation_id: ConversationId,
    sender_id: &'a UserId,
    kind: MessageKind,
    content: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    media: Option<&'a Media>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reply_to: Option<MessageId>,
    client_msg_id: &'a str,
    created_at: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    edited_at: Option<u64>,
    deleted: bool,
    version: u32,
}

/// The owned counterpart of [`StoredRef`], for reading.
#[derive(Deserialize)]
struct Stored {
    message_id: MessageId,
    conversation_id: ConversationId,
    sender_id: UserId,
    kind: MessageKind,
    content: String,
    #[serde(default)]
    media: Option<Media>,
    #[serde(default)]
    reply_to: Option<MessageId>,
    client_msg_id: String,
    created_at: u64,
    #[serde(default)]
    edited_at: Option<u64>,
    deleted: bool,
    version: u32,
}

fn to_json(stored: &StoredRef<'_>) -> Result<String> {
    serde_json::to_string(stored).map_err(|e| Error::internal(format!("encode message: {e}")))
}

/// The stored JSON of a message that is about to be appended (version 1, not edited).
pub(super) fn encode_new(m: &NewMessage) -> Result<String> {
    to_json(&StoredRef {
        message_id: m.message_id,
        conversation_id: m.conversation_id,
        sender_id: &m.sender_id,
        kind: m.kind,
        content: &m.content,
        media: m.media.as_ref(),
        reply_to: m.reply_to,
        client_msg_id: &m.client_msg_id,
        created_at: m.created_at,
        edited_at: None,
        deleted: false,
        version: 1,
    })
}

/// The stored JSON of a message (its `seq` is the score, not part of the JSON).
pub(super) fn encode(m: &Message) -> Result<String> {
    to_json(&StoredRef {
        message_id: m.message_id,
        conversation_id: m.conversation_id,
        sender_id: &m.sender_id,
        kind: m.kind,
        content: &m.content,
        media: m.media.as_ref(),
        reply_to: m.reply_to,
        client_msg_id: &m.client_msg_id,
        created_at: m.created_at,
        edited_at: m.edited_at,
        deleted: m.deleted,
        version: m.version,
    })
}

/// A stored message and its seq, without its reactions (they are stored apart).
pub(super) fn decode_message(json: &str, seq: u64) -> Result<Message> {
    let s: Stored = serde_json::from_str(json)
        .map_err(|e| Error::internal(format!("stored message is not valid JSON: {e}")))?;
    Ok(Message {
        message_id: s.message_id,
        conversation_id: s.conversation_id,
        seq,
        sender_id: s.sender_id,
        kind: s.kind,
        content: s.content,
        media: s.media,
        reply_to: s.reply_to,
        client_msg_id: s.client_msg_id,
        created_at: s.created_at,
        edited_at: s.edited_at,
        deleted: s.deleted,
        version: s.version,
        reactions: Vec::new(),
    })
}

/// A message's reactions as stored in the `reactions` hash (the JSON of `Vec<Reaction>`);
/// nil (no field) is none.
pub(super) fn decode_reactions(v: Value) -> Result<Vec<Reaction>> {
    if v == Value::Nil {
        return Ok(Vec::new());
    }
    serde_json::from_str(&string(v)?)
        .map_err(|e| Error::internal(format!("stored reactions are not valid JSON: {e}")))
}

/// A stored message, its seq and its reactions (a reply value).
pub(super) fn decode_message_with(json: &str, seq: u64, reactions: Value) -> Result<Message> {
    let mut m = decode_message(json, seq)?;
    m.reactions = decode_reactions(reactions)?;
    Ok(m)
}

/// `{json, seq, reactions or nil}` per message, as the timeline scripts return them.
pub(super) fn messages_with_reactions(v: Value) -> Result<Vec<Message>> {
    array(v)?
        .into_iter()
        .map(|m| {
            let [json, seq, reactions] = tuple::<3>(m)?;
            decode_message_with(&string(json)?, uint(seq)?, reactions)
        })
        .collect()
}

/// `{page, reactions}` of the timeline script: `page` is `json, seq, json, seq, …`, `reactions`
/// the reactions of each message in order (nil for none), or empty when there are none.
pub(super) fn timeline_page(v: Value) -> Result<Vec<Message>> {
    let [page, reactions] = tuple::<2>(v)?;
    let page = array(page)?;
    let mut reactions = array(reactions)?.into_iter();
    let mut out = Vec::with_capacity(page.len() / 2);
    let mut items = page.into_iter();
    while let (Some(json), Some(seq)) = (items.next(), items.next()) {
        let r = reactions.next().unwrap_or(Value::Nil);
        out.push(decode_message_with(&string(json)?, uint(seq)?, r)?);
    }
    Ok(out)
}

/// The field of the idempotency hash for `(sender, client_msg_id)`: length-prefixed, so that
/// no two pairs share a field whatever characters they contain.
pub(super) fn idempotency_field(sender: &UserId, client_msg_id: &str) -> String {
    format!("{}:{}:{}", sender.as_str().len(), sender, client_msg_id)
}

/// `(`-prefixed, zero-padded activity: the exclusive upper bound of a `ZREVRANGEBYLEX` over a
/// conversation list, i.e. "older than `activity`".
pub(super) fn older_than(activity: u64) -> String {
    format!("({activity:0ACTIVITY_WIDTH$}")
}

/// The `last_activity` and conversation id of a conversation-list entry.
pub(super) fn parse_entry(entry: &str) -> Result<(u64, ConversationId)> {
    let parsed = entry
        .split_once(':')
        .and_then(|(a, c)| Some((a.parse::<u64>().ok()?, c.parse::<ConversationId>().ok()?)));
    parsed.ok_or_else(|| corrupt(format!("conversation list entry {entry:?}")))
}

pub(super) fn corrupt(what: impl Into<Cow<'static, str>>) -> Error {
    let what = what.into();
    Error::internal(format!("unexpected data in redis: {what}"))
}

// ------------------------------------------------------------------------- reply values

/// A string-like reply (bulk, simple or integer).
pub(super) fn string(v: Value) -> Result<String> {
    match v {
        Value::BulkString(b) => {
            String::from_utf8(b).map_err(|_| corrupt("a reply that is not UTF-8"))
        }
        Value::SimpleString(s) => Ok(s),
        Value::Int(i) => Ok(i.to_string()),
        other => Err(corrupt(format!("expected a string, got {other:?}"))),
    }
}

/// A non-negative integer reply (integer or decimal string, e.g. a score).
pub(super) fn uint(v: Value) -> Result<u64> {
    match v {
        Value::Int(i) => u64::try_from(i).map_err(|_| corrupt(format!("negative integer {i}"))),
        other => parse_u64(&string(other)?),
    }
}

/// A decimal `u64`; also accepts a score printed as an integral float (`"3"`, `"3.0"`).
pub(super) fn parse_u64(s: &str) -> Result<u64> {
    if let Ok(n) = s.parse::<u64>() {
        return Ok(n);
    }
    match s.parse::<f64>() {
        Ok(f) if f >= 0.0 && f.fract() == 0.0 && f < 9_007_199_254_740_992.0 => Ok(f as u64),
        _ => Err(corrupt(format!(
            "expected a non-negative integer, got {s:?}"
        ))),
    }
}

/// An array reply.
pub(super) fn array(v: Value) -> Result<Vec<Value>> {
    match v {
        Value::Array(items) | Value::Set(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        other => Err(corrupt(format!("expected an array, got {other:?}"))),
    }
}

/// An array reply of `N` items.
pub(super) fn tuple<const N: usize>(v: Value) -> Result<[Value; N]> {
    <[Value; N]>::try_from(array(v)?)
        .map_err(|items| corrupt(format!("expected {N} items, got {}", items.len())))
}

fn pairs(v: Value) -> Result<Vec<(String, String)>> {
    let items = array(v)?;
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let Some(k) = it.next() {
        let v = it
            .next()
            .ok_or_else(|| corrupt("hash reply of odd length"))?;
        out.push((string(k)?, string(v)?));
    }
    Ok(out)
}

/// A member entry: `role:joined_at:order:last_read_seq:last_delivered_seq`. Returns the member
/// and its join order.
pub(super) fn decode_member(user: UserId, value: &str) -> Result<(Member, u64)> {
    let bad = || corrupt(format!("member entry {value:?}"));
    let mut parts = value.split(':');
    let mut next = || parts.next().ok_or_else(bad);
    let role = match next()? {
        "owner" => Role::Owner,
        "admin" => Role::Admin,
        "member" => Role::Member,
        _ => return Err(bad()),
    };
    let joined_at = parse_u64(next()?)?;
    let order = parse_u64(next()?)?;
    let last_read_seq = parse_u64(next()?)?;
    let last_delivered_seq = parse_u64(next()?)?;
    Ok((
        Member {
            user_id: user,
            role,
            joined_at,
            last_read_seq,
            last_delivered_seq,
        },
        order,
    ))
}

/// One entry of the change log (`m:<seq>`, `k:<user>`, `j:<user>`) at `position`, with the
/// state the `changes` script read for it; `None` for nothing to replay (the markers of
/// someone who left).
pub(super) fn decode_change(item: &str, position: u64, state: Value) -> Result<Option<Change>> {
    let bad = || corrupt(format!("change log entry {item:?}"));
    let (kind, id) = item.split_once(':').ok_or_else(bad)?;
    Ok(match (kind, state) {
        (_, Value::Nil) if kind != "j" => None,
        ("m", state) => {
            let [json, reactions] = tuple::<2>(state)?;
            Some(Change::Message {
                position,
                message: Box::new(decode_message_with(
                    &string(json)?,
                    parse_u64(id)?,
                    reactions,
                )?),
            })
        }
        ("k", value) => {
            let (m, _) = decode_member(UserId::from(id), &string(value)?)?;
            Some(Change::Markers {
                position,
                user_id: m.user_id,
                delivered: m.last_delivered_seq,
                read: m.last_read_seq,
            })
        }
        ("j", member) => Some(Change::Membership {
            position,
            user_id: UserId::from(id),
            member: uint(member)? == 1,
        }),
        _ => return Err(bad()),
    })
}

/// A `{HGETALL conv, HGETALL members}` snapshot.
pub(super) fn decode_conversation(id: ConversationId, v: Value) -> Result<Conversation> {
    let [conv, members] = tuple::<2>(v)?;
    let (mut kind, mut name, mut created_at, mut last_seq, mut last_activity) =
        (None, None, None, None, None);
    for (field, value) in pairs(conv)? {
        match field.as_str() {
            "kind" => {
                kind = Some(match value.as_str() {
                    "direct" => ConversationKind::Direct,
                    "group" => ConversationKind::Group,
                    _ => return Err(corrupt(format!("conversation kind {value:?}"))),
                });
            }
            "name" => name = Some(value),
            "created_at" => created_at = Some(parse_u64(&value)?),
            "last_seq" => last_seq = Some(parse_u64(&value)?),
            "last_activity" => last_activity = Some(parse_u64(&value)?),
            _ => {}
        }
    }
    let missing = |f: &str| corrupt(format!("conversation {id} has no {f}"));
    let mut members = pairs(members)?
        .into_iter()
        .map(|(user, value)| decode_member(UserId::from(user), &value))
        .collect::<Result<Vec<_>>>()?;
    members.sort_unstable_by_key(|&(_, order)| order);
    Ok(Conversation {
        id,
        kind: kind.ok_or_else(|| missing("kind"))?,
        name,
        members: members.into_iter().map(|(m, _)| m).collect(),
        created_at: created_at.ok_or_else(|| missing("created_at"))?,
        last_seq: last_seq.ok_or_else(|| missing("last_seq"))?,
        last_activity: last_activity.ok_or_else(|| missing("last_activity"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_json_round_trips_every_field_except_seq() {
        let m = Message {
            message_id: MessageId::from_raw(u64::MAX - 3),
            conversation_id: ConversationId::from_raw(u64::MAX - 7),
            seq: 42,
            sender_id: UserId::from("a:b\"c"),
            kind: MessageKind::Image,
            content: "hi ☃".into(),
            media: Some(Media {
                url: "https://x/y.png".into(),
                mime: "image/png".into(),
                size: u64::MAX,
                name: Some("y.png".into()),
            }),
            reply_to: Some(MessageId::from_raw(9)),
            client_msg_id: "k".into(),
            created_at: u64::MAX - 1,
            edited_at: Some(5),
            deleted: false,
            version: 3,
            reactions: vec![
                Reaction {
                    key: "👍".into(),
                    users: vec![UserId::from("a:b\"c"), UserId::from("x")],
                },
                Reaction {
                    key: "ok".into(),
                    users: vec![UserId::from("y")],
                },
            ],
        };
        let json = encode(&m).unwrap();
        assert!(!json.contains("\"seq\""), "{json}");
        assert!(
            json.contains(&format!("\"{}\"", u64::MAX - 3)),
            "ids as strings: {json}"
        );
        // Reactions are stored apart, as the JSON of `Vec<Reaction>`.
        assert!(!json.contains("reactions"), "{json}");
        let reactions = serde_json::to_string(&m.reactions).unwrap();
        assert_eq!(
            decode_message_with(&json, 42, Value::BulkString(reactions.into_bytes())).unwrap(),
            m
        );
        // As Lua's cjson writes them: `/` escaped, any key order.
        let lua = r#"[{"users":["a\/b"],"key":"ok"}]"#;
        assert_eq!(
            decode_reactions(Value::BulkString(lua.as_bytes().to_vec())).unwrap(),
            vec![Reaction {
                key: "ok".into(),
                users: vec![UserId::from("a/b")]
            }]
        );
        let plain = Message {
            reactions: Vec::new(),
            ..m.clone()
        };
        assert_eq!(decode_message_with(&json, 42, Value::Nil).unwrap(), plain);

        let new = NewMessage {
            message_id: m.message_id,
            conversation_id: m.conversation_id,
            sender_id: m.sender_id.clone(),
            client_msg_id: m.client_msg_id.clone(),
            kind: m.kind,
            content: m.content.clone(),
            media: m.media.clone(),
            reply_to: m.reply_to,
            created_at: m.created_at,
        };
        let json = encode_new(&new).unwrap();
        assert_eq!(decode_message(&json, 7).unwrap(), new.into_message(7));
    }

    #[test]
    fn list_entries_sort_by_activity_as_strings() {
        let entry = |a: u64, c: u64| format!("{a:0ACTIVITY_WIDTH$}:{c}");
        let mut v = [entry(10, 1), entry(9, 2), entry(u64::MAX, 3), entry(0, 4)];
        v.sort();
        assert_eq!(
            v,
            [entry(0, 4), entry(9, 2), entry(10, 1), entry(u64::MAX, 3)]
        );
        assert_eq!(
            parse_entry(&entry(u64::MAX, 3)).unwrap(),
            (u64::MAX, ConversationId::from_raw(3))
        );
        // Everything strictly older than 10, none of the entries at 10.
        let bound = &older_than(10)[1..];
        assert!(entry(9, u64::MAX).as_str() < bound && entry(10, 0).as_str() > bound);
        assert!(parse_entry("nonsense").is_err());
    }

    #[test]
    fn idempotency_fields_do_not_collide() {
        let a = idempotency_field(&UserId::from("a:1"), "x");
        let b = idempotency_field(&UserId::from("a"), "1:x");
        assert_ne!(a, b);
    }

    #[test]
    fn member_entries() {
        let (m, order) = decode_member(UserId::from("u"), "owner:1700000000000:3:5:8").unwrap();
        assert_eq!(
            (
                m.role,
                m.joined_at,
                order,
                m.last_read_seq,
                m.last_delivered_seq
            ),
            (Role::Owner, 1_700_000_000_000, 3, 5, 8)
        );
        assert!(decode_member(UserId::from("u"), "owner:1:2:3").is_err());
        assert!(decode_member(UserId::from("u"), "boss:1:2:3:4").is_err());
    }

    #[test]
    fn change_log_entries() {
        let c = decode_change("k:a:b", 7, Value::BulkString(b"member:1:0:3:5".to_vec()))
            .unwrap()
            .unwrap();
        assert_eq!(
            c,
            Change::Markers {
                position: 7,
                user_id: UserId::from("a:b"),
                delivered: 5,
                read: 3
            }
        );
        assert_eq!(decode_change("k:gone", 8, Value::Nil).unwrap(), None);
        let c = decode_change("j:u", 9, Value::Int(0)).unwrap().unwrap();
        assert_eq!(
            c,
            Change::Membership {
                position: 9,
                user_id: UserId::from("u"),
                member: false
            }
        );
        assert!(decode_change("x:1", 1, Value::Int(1)).is_err());
        assert!(decode_change("nonsense", 1, Value::Int(1)).is_err());
    }

    #[test]
    fn scores() {
        assert_eq!(parse_u64("3").unwrap(), 3);
        assert_eq!(parse_u64("3.0").unwrap(), 3);
        assert!(parse_u64("-1").is_err());
        assert!(parse_u64("1.5").is_err());
    }
}
