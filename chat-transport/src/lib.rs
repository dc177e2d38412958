//! # chat-transport
//!
//! The WebSocket + HTTP gateway for `chat-core` (in progress): codecs first.

pub mod codec;
