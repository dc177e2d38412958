//! Typed identifiers and the Snowflake generator.
//!
//! * [`UserId`] is an opaque string chosen by the host (the JWT `sub`).
//! * [`ConversationId`], [`MessageId`] and [`ConnectionId`] are 64-bit Snowflakes: 41 bits of
//!   milliseconds since [`EPOCH_MS`], 10 bits of [`NodeId`], 12 bits of sequence. They are unique
//!   across threads and nodes (as long as every node has its own [`NodeId`]) and sort by creation time.
//! * On the JSON wire every 64-bit id travels as a string (JavaScript numbers lose precision past
//!   2^53); deserialization accepts a string or a number.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::Error;

/// The Snowflake epoch: 2024-01-01T00:00:00Z in milliseconds since the Unix epoch.
pub const EPOCH_MS: u64 = 1_704_067_200_000;
const NODE_BITS: u32 = 10;
const SEQ_BITS: u32 = 12;
const TIME_BITS: u32 = 41;
/// Largest node id (inclusive): 1023.
pub const MAX_NODE_ID: u16 = (1 << NODE_BITS) - 1;
const MAX_SEQ: u64 = (1 << SEQ_BITS) - 1;
const MAX_TIME: u64 = (1 << TIME_BITS) - 1;

/// A user, as named by the host application (for example the JWT `sub` claim).
///
/// Deserializing checks it like [`UserId::parse`], so a client frame naming an empty or
/// oversized user id is refused where it is decoded.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct UserId(Arc<str>);

impl<'de> Deserialize<'de> for UserId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl UserId {
    /// Longest accepted user id, in UTF-8 bytes.
    pub const MAX_LEN: usize = 256;

    /// A user id, checked: non-empty, at most [`UserId::MAX_LEN`] bytes, no control characters.
    pub fn parse(s: &str) -> Result<Self, Error> {
        if s.is_empty() || s.len() > Self::MAX_LEN || s.chars().any(char::is_control) {
            return Err(Error::invalid(format!(
                "user id must be 1..={} bytes without control characters",
                Self::MAX_LEN
            )));
        }
        Ok(Self(Arc::from(s)))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for UserId {
    fn from(s: &str) -> Self {
        Self(Arc::from(s))
    }
}

impl From<String> for UserId {
    fn from(s: String) -> Self {
        Self(Arc::from(s))
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UserId({:?})", &*self.0)
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::borrow::Borrow<str> for UserId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// A Snowflake node id (0..=1023), unique per process in a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(u16);

impl NodeId {
    /// Node 0, the single-node default.
    pub const ZERO: Self = Self(0);

    /// A node id, checked against [`MAX_NODE_ID`].
    pub fn new(id: u16) -> Result<Self, Error> {
        if id > MAX_NODE_ID {
            return Err(Error::invalid(format!(
                "node id {id} is out of range 0..={MAX_NODE_ID}"
            )));
        }
        Ok(Self(id))
    }

    /// The raw value.
    pub fn get(self) -> u16 {
        self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

macro_rules! snowflake_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name(u64);

        impl $name {
            /// Wraps a raw 64-bit value.
            pub const fn from_raw(raw: u64) -> Self {
                Self(raw)
            }

            /// The raw 64-bit value.
            pub const fn get(self) -> u64 {
                self.0
            }

            /// Milliseconds since the Unix epoch encoded in the id.
            pub fn timestamp_ms(self) -> u64 {
                (self.0 >> (NODE_BITS + SEQ_BITS)) + EPOCH_MS
            }

            /// The node that generated the id.
            pub fn node(self) -> NodeId {
                NodeId(((self.0 >> SEQ_BITS) & u64::from(MAX_NODE_ID)) as u16)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                s.parse::<u64>().map(Self).map_err(|_| {
                    Error::invalid(format!("{} must be a decimal 64-bit id", stringify!($name)))
                })
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_any(U64Visitor).map(Self)
            }
        }
    };
}

snowflake_id!(
    /// A message, unique across the cluster and ordered by creation time.
    MessageId
);
snowflake_id!(
    /// A conversation (direct or group).
    ConversationId
);
snowflake_id!(
    /// One live client connection (one device session). Unique across the cluster, so a node can
    /// exclude "the connection that sent this" even when the event crossed nodes.
    ConnectionId
);

struct U64Visitor;

impl serde::de::Visitor<'_> for U64Visitor {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a 64-bit id as a decimal string or a non-negative integer")
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v).map_err(|_| E::custom("id must not be negative"))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<u64, E> {
        v.parse()
            .map_err(|_| E::custom("id must be a decimal 64-bit integer"))
    }
}

/// Serde helper for `u64` fields that travel as strings in JSON (e.g. cursors).
pub mod u64_string {
    use super::*;

    /// Serializes a `u64` as a decimal string.
    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    /// Accepts a string or a number.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        d.deserialize_any(U64Visitor)
    }
}

/// Serde helper for `Option<u64>` fields that travel as strings in JSON (`null` or absent:
/// `None`).
pub mod opt_u64_string {
    use super::*;

    /// Serializes `Some(v)` as a decimal string, `None` as null.
    pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(v),
            None => s.serialize_none(),
        }
    }

    /// Accepts a string, a number or null.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(with = "super::u64_string")] u64);
        Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
    }
}

/// The wall clock a generator reads, in milliseconds since the Unix epoch. Injectable for tests.
pub type ClockFn = Arc<dyn Fn() -> u64 + Send + Sync>;

fn system_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Lock-free Snowflake generator: at most 4096 ids per millisecond per node, unique and strictly
/// increasing within the process even when the wall clock steps backwards.
///
/// The last issued `(millisecond, sequence)` pair lives in one atomic word updated by
/// compare-and-swap. When the clock steps backwards the generator keeps counting from the last
/// millisecond it issued (it never re-issues an older timestamp); when the 4096 sequence numbers
/// of a millisecond are used up it waits for the next millisecond, or, if the clock is behind,
/// moves its own millisecond forward by one.
///
/// ```
/// use chat_core::id::{NodeId, SnowflakeGenerator};
/// let ids = SnowflakeGenerator::new(NodeId::new(7).unwrap());
/// let a = ids.next_raw();
/// let b = ids.next_raw();
/// assert!(b > a);
/// ```
pub struct SnowflakeGenerator {
    /// Node bits stamped into every id.
    node: NodeId,
    /// `(ms since EPOCH_MS) << 12 | seq` of the last id issued.
    state: AtomicU64,
    /// Wall clock in Unix milliseconds.
    clock: ClockFn,
}

impl fmt::Debug for SnowflakeGenerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnowflakeGenerator")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl SnowflakeGenerator {
    /// A generator for `node` on the system clock.
    pub fn new(node: NodeId) -> Self {
        Self::with_clock(node, Arc::new(system_ms))
    }

    /// A generator reading `clock` (Unix milliseconds) instead of the system clock.
    pub fn with_clock(node: NodeId, clock: ClockFn) -> Self {
        Self {
            node,
            state: AtomicU64::new(0),
            clock,
        }
    }

    /// The node this generator stamps.
    pub fn node(&self) -> NodeId {
        self.node
    }

    fn now(&self) -> u64 {
        (self.clock)().saturating_sub(EPOCH_MS).min(MAX_TIME)
    }

    /// The next raw id.
    pub fn next_raw(&self) -> u64 {
        loop {
            let now = self.now();
            let cur = self.state.load(Ordering::Acquire);
            let (last_ms, last_seq) = (cur >> SEQ_BITS, cur & MAX_SEQ);
            let (ms, seq) = if now > last_ms {
                (now, 0)
            } else if last_seq < MAX_SEQ {
                (last_ms, last_seq + 1)
            } else if now < last_ms {
                // The clock is behind the last id issued and this millisecond is used up:
                // borrow the next one rather than stall until the clock catches up.
                (last_ms + 1, 0)
            } else {
                // 4096 ids in this millisecond already: wait for the next one.
                std::thread::yield_now();
                continue;
            };
            let next = (ms << SEQ_BITS) | seq;
            if self
                .state
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return (ms << (NODE_BITS + SEQ_BITS)) | (u64::from(self.node.0) << SEQ_BITS) | seq;
            }
        }
    }

    /// The next message id.
    pub fn message_id(&self) -> MessageId {
        MessageId(self.next_raw())
    }

    /// The next conversation id.
    pub fn conversation_id(&self) -> ConversationId {
        ConversationId(self.next_raw())
    }

    /// The next connection id.
    pub fn connection_id(&self) -> ConnectionId {
        ConnectionId(self.next_raw())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Mutex;

    #[test]
    fn ids_are_unique_and_increasing_across_threads() {
        let generator = Arc::new(SnowflakeGenerator::new(NodeId::new(3).unwrap()));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let g = generator.clone();
                std::thread::spawn(move || {
                    let mut v = Vec::with_capacity(20_000);
                    for _ in 0..20_000 {
                        v.push(g.next_raw());
                    }
                    v
                })
            })
            .collect();
        let mut all = HashSet::new();
        for h in handles {
            let v = h.join().unwrap();
            assert!(v.windows(2).all(|w| w[0] < w[1]), "per-thread order");
            for id in v {
                assert!(all.insert(id), "duplicate id {id}");
                assert_eq!(MessageId::from_raw(id).node().get(), 3);
            }
        }
        assert_eq!(all.len(), 160_000);
    }

    #[test]
    fn distinct_nodes_never_collide_on_the_same_clock() {
        let clock: ClockFn = Arc::new(|| EPOCH_MS + 1_000);
        let a = SnowflakeGenerator::with_clock(NodeId::new(1).unwrap(), clock.clone());
        let b = SnowflakeGenerator::with_clock(NodeId::new(2).unwrap(), clock);
        let ida: HashSet<_> = (0..4096).map(|_| a.next_raw()).collect();
        let idb: HashSet<_> = (0..4096).map(|_| b.next_raw()).collect();
        assert!(ida.is_disjoint(&idb));
    }

    #[test]
    fn clock_stepping_backwards_keeps_ids_increasing() {
        let now = Arc::new(Mutex::new(EPOCH_MS + 10_000));
        let n = now.clone();
        let g = SnowflakeGenerator::with_clock(
            NodeId::new(0).unwrap(),
            Arc::new(move || *n.lock().unwrap()),
        );
        let before = g.next_raw();
        *now.lock().unwrap() = EPOCH_MS + 5_000; // NTP step back by 5 s
        let mut last = before;
        // Far more than 4096 ids while the clock is behind: must borrow milliseconds, not repeat.
        for _ in 0..10_000 {
            let id = g.next_raw();
            assert!(id > last);
            last = id;
        }
        // Never more than 4096 ids in one millisecond.
        let ms_of = |id: u64| id >> (NODE_BITS + SEQ_BITS);
        assert!(ms_of(last) - ms_of(before) >= 10_000 / 4096);
    }

    #[test]
    fn at_most_4096_per_millisecond() {
        let g = SnowflakeGenerator::new(NodeId::new(9).unwrap());
        let mut per_ms = std::collections::HashMap::<u64, u32>::new();
        for _ in 0..50_000 {
            *per_ms
                .entry(g.next_raw() >> (NODE_BITS + SEQ_BITS))
                .or_default() += 1;
        }
        assert!(per_ms.values().all(|&c| c <= 4096));
        assert_eq!(per_ms.values().sum::<u32>(), 50_000);
    }

    #[test]
    fn timestamp_and_node_round_trip() {
        let g = SnowflakeGenerator::with_clock(
            NodeId::new(1023).unwrap(),
            Arc::new(|| EPOCH_MS + 123_456),
        );
        let id = g.message_id();
        assert_eq!(id.timestamp_ms(), EPOCH_MS + 123_456);
        assert_eq!(id.node().get(), 1023);
        assert!(NodeId::new(1024).is_err());
    }

    #[test]
    fn ids_travel_as_strings_and_parse_from_either() {
        let id = MessageId::from_raw(u64::MAX - 1);
        let s = serde_json::to_string(&id).unwrap();
        assert_eq!(s, format!("\"{}\"", u64::MAX - 1));
        let back: MessageId = serde_json::from_str(&s).unwrap();
        assert_eq!(back, id);
        let from_num: MessageId = serde_json::from_str("42").unwrap();
        assert_eq!(from_num.get(), 42);
        assert!(serde_json::from_str::<MessageId>("\"x1\"").is_err());
        assert!(serde_json::from_str::<MessageId>("-1").is_err());
    }

    #[test]
    fn user_id_validation() {
        assert!(UserId::parse("alice").is_ok());
        assert!(UserId::parse("").is_err());
        assert!(UserId::parse("a\nb").is_err());
        assert!(UserId::parse(&"x".repeat(257)).is_err());
        // Deserializing checks the same way.
        assert!(serde_json::from_str::<UserId>(r#""alice""#).is_ok());
        for bad in [r#""""#, r#""a\u0000b""#] {
            assert!(serde_json::from_str::<UserId>(bad).is_err(), "{bad}");
        }
        let long = format!("\"{}\"", "x".repeat(257));
        assert!(serde_json::from_str::<UserId>(&long).is_err());
    }
}
