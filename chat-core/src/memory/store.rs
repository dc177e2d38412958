//! In-memory [`MessageStore`](crate::MessageStore) (stub, to be written).

/// In-memory store.
#[derive(Debug, Default)]
pub struct MemoryStore;
