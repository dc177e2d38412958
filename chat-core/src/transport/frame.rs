//! [`Frame`]: an event on its way to connections, shared by every recipient of a fan-out.

use std::sync::OnceLock;

use bytes::Bytes;

use crate::protocol::Event;

/// How many codecs a [`Frame`] can cache an encoding for.
pub const CODEC_SLOTS: usize = 4;

/// An event on its way to connections, with a per-codec cache of its encoding.
///
/// Fan-out hands the same `Arc<Frame>` to every recipient; the first writer using a codec
/// encodes, every other writer reuses the same [`Bytes`]. So a group message is encoded once
/// per codec per node, not once per recipient.
#[derive(Debug)]
pub struct Frame {
    /// The event.
    event: Event,
    /// One lazily filled encoding per codec slot.
    encoded: [OnceLock<Bytes>; CODEC_SLOTS],
    /// One lazily filled transport-specific value per codec slot (e.g. a ready-to-send
    /// WebSocket message), shared by every recipient like the encoding.
    prepared: [OnceLock<Box<dyn std::any::Any + Send + Sync>>; CODEC_SLOTS],
    /// When the frame was made (for fan-out latency metrics).
    created: std::time::Instant,
}

impl Frame {
    /// Wraps an event.
    pub fn new(event: Event) -> Self {
        Self {
            event,
            encoded: Default::default(),
            prepared: Default::default(),
            created: std::time::Instant::now(),
        }
    }

    /// The event.
    pub fn event(&self) -> &Event {
        &self.event
    }

    /// How long ago the frame was made (the event was ready to send).
    pub fn age(&self) -> std::time::Duration {
        self.created.elapsed()
    }

    /// The encoding for codec `slot` (`0..CODEC_SLOTS`), computed by `encode` at most once.
    ///
    /// # Panics
    /// If `slot >= CODEC_SLOTS` (a programming error in a codec, not reachable from input).
    pub fn encoded(&self, slot: usize, encode: impl FnOnce(&Event) -> Bytes) -> Bytes {
        self.encoded[slot]
            .get_or_init(|| encode(&self.event))
            .clone()
    }
}

impl Frame {
    /// A transport-specific value for codec `slot`, made by `prepare` at most once and cloned
    /// for every later caller (a transport caches its ready-to-send message here, so per
    /// recipient it pays a clone, typically a reference-count increment). `None` if the slot
    /// already holds a value of another type (two transports disagreeing on a slot).
    ///
    /// # Panics
    /// If `slot >= CODEC_SLOTS`.
    pub fn prepared<T: Clone + Send + Sync + 'static>(
        &self,
        slot: usize,
        prepare: impl FnOnce(&Event) -> T,
    ) -> Option<T> {
        self.prepared_ref(slot, prepare).cloned()
    }

    /// Like [`Frame::prepared`], by reference (for a transport that only needs to look at its
    /// cached value, e.g. to write its bytes).
    ///
    /// # Panics
    /// If `slot >= CODEC_SLOTS`.
    pub fn prepared_ref<T: Send + Sync + 'static>(
        &self,
        slot: usize,
        prepare: impl FnOnce(&Event) -> T,
    ) -> Option<&T> {
        self.prepared[slot]
            .get_or_init(|| Box::new(prepare(&self.event)))
            .downcast_ref::<T>()
    }
}

impl From<Event> for Frame {
    fn from(event: Event) -> Self {
        Self::new(event)
    }
}
