//! The `MessageStore` conformance suite against the in-memory store.
//!
//! `cargo test -p chat-core --test memory_store`

use std::sync::Arc;

use chat_core::memory::MemoryStore;
use chat_core::store::DynMessageStore;

chat_core::store_conformance_tests!(|| async { Arc::new(MemoryStore::new()) as DynMessageStore });

mod change_stream {
    use super::*;
    chat_core::change_stream_conformance_tests!(|| async {
        Arc::new(MemoryStore::new()) as DynMessageStore
    });
}
