//! The convergence property on the in-memory store (`chat_core::testing::converge`): random
//! sends, edits, deletes, reactions, receipts, member changes, disconnects and reconnect +
//! syncs over six devices; after a final sync every device's view equals the store's.
//!
//! `cargo test -p chat-core --test converge` (`PROPTEST_CASES=1000` for more cases). The Redis
//! store runs the same property in `chat-store/tests/redis_store.rs`.

use std::sync::Arc;

use chat_core::memory::MemoryStore;
use chat_core::store::DynMessageStore;
use chat_core::testing::converge;

#[test]
fn every_device_converges_after_a_final_sync() {
    converge::check(256, || async {
        (Arc::new(MemoryStore::new()) as DynMessageStore, ())
    });
}
