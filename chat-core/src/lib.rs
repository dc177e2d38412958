//! # chat-core
//!
//! An embeddable chat backend. A host composes four pluggable parts into a [`Chat`] engine and
//! mounts a transport in its own server:
//!
//! | part | job | backends |
//! |---|---|---|
//! | [`transport`] (the contract) | client connections: accept, authenticate, decode commands, encode events | in-process ([`memory::InProcessTransport`]); WebSocket + HTTP (`chat-transport`) |
//! | [`MessageStore`] | timelines, conversations, members, read markers | in-memory ([`memory::MemoryStore`]); Redis, ScyllaDB (`chat-store`) |
//! | [`Router`] | moves events between gateway nodes | single node ([`router::LocalRouter`]), in-process hub ([`memory::MemoryRouterHub`]); Redis (`chat-presence`) |
//! | [`PresenceTracker`] | online / offline / last seen | in-memory ([`memory::MemoryPresence`]); Redis (`chat-presence`) |
//!
//! `chat-core` alone is a complete single-process chat: every part has an in-memory default
//! (fast, concurrent, **lost on restart**).
//!
//! | feature | what it adds |
//! |---|---|
//! | `testing` | `chat_core::testing`: the conformance suites every backend must pass |
//!
//! ```
//! use chat_core::{Chat, Command, Event, UserId, model::ConversationKind};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), chat_core::Error> {
//! // In-memory store, presence and router; nothing to configure.
//! let chat = Chat::builder().build().await?;
//! let (alice, bob) = (UserId::from("alice"), UserId::from("bob"));
//! let conv = chat
//!     .create_conversation(&alice, ConversationKind::Direct, &[bob.clone()], None)
//!     .await?;
//!
//! let (alice_session, mut alice_out) = chat.connect(alice).await?;
//! let (_bob_session, mut bob_out) = chat.connect(bob).await?;
//! alice_session
//!     .handle(serde_json::from_str::<Command>(&format!(
//!         r#"{{"type":"message","conversation_id":"{}","client_msg_id":"m1","content":"hi"}}"#,
//!         conv.conversation.id
//!     )).unwrap())
//!     .await;
//!
//! let ack = alice_out.recv().await.unwrap();
//! assert!(matches!(ack.event(), Event::MessageAck { seq: 1, .. }));
//! let msg = bob_out.recv().await.unwrap();
//! assert!(matches!(msg.event(), Event::Message { message, .. } if message.content == "hi"));
//! # Ok(()) }
//! ```
//!
//! See `docs/architecture.md` for the life of a message and where each promise is enforced.

pub mod engine;
pub mod error;
pub mod hooks;
pub mod id;
pub mod memory;
pub mod model;
pub mod presence;
pub mod protocol;
pub mod push;
pub mod router;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod time;
pub mod transport;

pub use engine::{Chat, ChatBuilder, ChatConfig};

/// The README's code, run as doc tests (so the front page always compiles and runs).
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
pub use error::{Error, ErrorCode, Result};
pub use id::{ConnectionId, ConversationId, MessageId, NodeId, UserId};
pub use presence::PresenceTracker;
pub use protocol::{Command, Event};
pub use router::Router;
pub use store::MessageStore;
pub use transport::Frame;
pub use transport::{CloseReason, Outbound, Session, SessionOptions};
