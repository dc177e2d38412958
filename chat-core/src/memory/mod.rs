//! In-memory implementations of the four parts: the embedded default.
//!
//! Real, concurrent implementations for a single process. Everything is **lost on restart**;
//! use the Redis or ScyllaDB backends for durability and for several nodes.

mod presence;
mod router;
mod store;
mod transport;

pub use presence::MemoryPresence;
pub use router::{MemoryRouter, MemoryRouterHub};
pub use store::MemoryStore;
pub use transport::{InProcessClient, InProcessTransport};
