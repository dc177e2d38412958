//! What a client knows, built only from the JSON frames it received: the reference for
//! "every device converges" tests. Two devices that applied the frames they got (one live,
//! one by a later `sync`) must end with equal [`View`]s.
//!
//! The rules are the client's side of the wire contract (`docs/protocol.md`): a message is
//! kept at its highest `version` (a frame of the same version replaces it: reactions change
//! without a version bump); a `reaction` frame replaces the message's reactions; markers only
//! move forward and reading up to N also delivers up to N; `membership` sets whether a user
//! is a member; `reset` drops what the client had of the conversation; `sync_done.streams`
//! and every `position` move the client's position forward.

use std::collections::BTreeMap;

use serde_json::Value;

/// A client's view of every conversation it heard of.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    /// Conversation id → its view.
    pub conversations: BTreeMap<String, ConversationView>,
}

/// A client's view of one conversation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConversationView {
    /// Message id → the message object as the server sent it (latest version, reactions
    /// applied; no `reactions` key when there are none, as the server omits it).
    pub messages: BTreeMap<String, Value>,
    /// User → (delivered, read).
    pub markers: BTreeMap<String, (u64, u64)>,
    /// User → member now (from `membership` frames).
    pub members: BTreeMap<String, bool>,
    /// The stream epoch, once a `sync_done` or `reset` said it.
    pub epoch: Option<String>,
    /// The highest position applied.
    pub position: u64,
    /// How many `reset`s the client got.
    pub resets: u32,
}

impl View {
    /// Applies one frame; frames that change no state (acks, typing, presence, …) are ignored.
    pub fn apply(&mut self, frame: &Value) {
        let ty = frame["type"].as_str().unwrap_or_default();
        let conv_of = |v: &Value| v.as_str().map(str::to_owned);
        match ty {
            "message" | "message_edited" | "message_deleted" => {
                let m = &frame["message"];
                let Some(conv) = conv_of(&m["conversation_id"]) else {
                    return;
                };
                let c = self.conversations.entry(conv).or_default();
                c.see(frame);
                let id = m["message_id"].as_str().unwrap_or_default().to_owned();
                let newer = c
                    .messages
                    .get(&id)
                    .is_none_or(|old| version(old) <= version(m));
                if newer {
                    c.messages.insert(id, m.clone());
                }
            }
            "reaction" => {
                let Some(conv) = conv_of(&frame["conversation_id"]) else {
                    return;
                };
                let c = self.conversations.entry(conv).or_default();
                c.see(frame);
                let id = frame["message_id"].as_str().unwrap_or_default();
                if let Some(Value::Object(m)) = c.messages.get_mut(id) {
                    match &frame["reactions"] {
                        Value::Array(a) if !a.is_empty() => {
                            m.insert("reactions".into(), frame["reactions"].clone());
                        }
                        _ => {
                            m.remove("reactions");
                        }
                    }
                }
            }
            "receipt" => {
                let Some(conv) = conv_of(&frame["conversation_id"]) else {
                    return;
                };
                let c = self.conversations.entry(conv).or_default();
                c.see(frame);
                let user = frame["user_id"].as_str().unwrap_or_default().to_owned();
                let seq = frame["seq"].as_u64().unwrap_or(0);
                let (delivered, read) = c.markers.entry(user).or_default();
                if frame["kind"] == "read" {
                    *read = (*read).max(seq);
                }
                *delivered = (*delivered).max(seq).max(*read);
            }
            "membership" => {
                let Some(conv) = conv_of(&frame["conversation_id"]) else {
                    return;
                };
                let c = self.conversations.entry(conv).or_default();
                c.see(frame);
                let user = frame["user_id"].as_str().unwrap_or_default().to_owned();
                c.members.insert(user, frame["change"] == "joined");
            }
            "reset" => {
                let Some(conv) = conv_of(&frame["conversation_id"]) else {
                    return;
                };
                let c = self.conversations.entry(conv).or_default();
                let resets = c.resets + 1;
                *c = ConversationView {
                    epoch: frame["stream"]["epoch"].as_str().map(str::to_owned),
                    position: frame["stream"]["position"].as_u64().unwrap_or(0),
                    resets,
                    ..ConversationView::default()
                };
            }
            "sync_done" => {
                if let Value::Object(streams) = &frame["streams"] {
                    for (conv, s) in streams {
                        let c = self.conversations.entry(conv.clone()).or_default();
                        c.epoch = s["epoch"].as_str().map(str::to_owned);
                        c.position = c.position.max(s["position"].as_u64().unwrap_or(0));
                    }
                }
            }
            _ => {}
        }
    }

    /// One conversation's view (empty when never heard of).
    pub fn conversation(&self, id: &str) -> ConversationView {
        self.conversations.get(id).cloned().unwrap_or_default()
    }
}

impl ConversationView {
    fn see(&mut self, frame: &Value) {
        if let Some(p) = frame["position"].as_u64() {
            self.position = self.position.max(p);
        }
    }

    /// The state two converged devices share: messages, markers and membership changes (not
    /// the bookkeeping of positions and resets).
    pub fn state(&self) -> ConversationState<'_> {
        (&self.messages, &self.markers, &self.members)
    }
}

/// What [`ConversationView::state`] compares.
pub type ConversationState<'a> = (
    &'a BTreeMap<String, Value>,
    &'a BTreeMap<String, (u64, u64)>,
    &'a BTreeMap<String, bool>,
);

fn version(m: &Value) -> u64 {
    m["version"].as_u64().unwrap_or(0)
}
