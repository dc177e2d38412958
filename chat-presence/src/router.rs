//! [`RedisRouter`]: moves envelopes between the nodes of a cluster over Redis pub/sub.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use chat_core::router::{Envelope, Inbound, LossyInbox, Router, Topic};
use chat_core::{Error, NodeId, Result};
use tokio::sync::mpsc;
use tracing::{info, warn};

use chat_redis::{RedisConnection, RedisOptions, redis};

use crate::pubsub::{SubEvent, Subscriber};

/// A [`Router`] over Redis pub/sub: one channel per topic, one subscriber connection per node.
///
/// ```no_run
/// use std::sync::Arc;
/// use chat_core::router::DynRouter;
/// use chat_core::{Chat, NodeId};
/// use chat_presence::RedisRouter;
///
/// # async fn run() -> chat_core::Result<()> {
/// let node = NodeId::new(1)?;
/// let router = RedisRouter::connect("redis://127.0.0.1:6379/", "chat", node).await?;
/// let chat = Chat::builder().router(Arc::new(router) as DynRouter).build().await?;
/// # drop(chat);
/// # Ok(()) }
/// ```
///
/// * `subscribe`/`unsubscribe` send `SUBSCRIBE`/`UNSUBSCRIBE` on this node's single pub/sub
///   connection and return once the server confirmed, so a subscription is in effect when
///   `subscribe` returns and gone when `unsubscribe` returns. Both are idempotent.
/// * `publish` sends `PUBLISH` with the JSON-encoded [`Envelope`] on the (multiplexed) command
///   connection. Envelopes published one after another by one router reach every node in that
///   order: one connection in, one connection out, one task forwarding. The envelope's `origin`
///   is set to this router's node; a node drops the envelopes it published itself (Redis
///   delivers them back to it).
/// * Received envelopes go to the engine's inbox with `try_send`; when the inbox is full the
///   envelope is dropped and [`Inbound::Lagged`] follows as soon as the inbox has room.
/// * When the pub/sub connection drops (Redis restarted, network), it is re-established with
///   backoff, every topic is subscribed again, and [`Inbound::Lagged`] is sent: envelopes
///   published during the outage are lost, and the engine makes its clients resync from the
///   store. `subscribe` during an outage returns `Unavailable` (the topic is still subscribed
///   on reconnect); `unsubscribe` succeeds.
/// * No call hangs while Redis is down: each fails with `Error::Unavailable` after
///   [`RedisOptions::op_timeout`] at the latest.
///
/// Dropping it closes its connections (every subscription ends with it).
pub struct RedisRouter {
    /// This node; stamped on every published envelope, and its own envelopes are dropped.
    node: NodeId,
    /// Channel names start with it.
    prefix: String,
    /// The command connection (publishes).
    commands: RedisConnection,
    /// This node's pub/sub connection.
    subscriber: Subscriber,
    /// Where received envelopes go.
    inbox: Arc<LossyInbox>,
}

impl RedisRouter {
    /// Connects to the Redis at `url` with default [`RedisOptions`]. Every node of a cluster
    /// uses the same `prefix` and its own `node` id. Must run inside a tokio runtime; fails
    /// with `Error::Unavailable` if Redis cannot be reached.
    pub async fn connect(url: &str, prefix: &str, node: NodeId) -> Result<Self> {
        Self::connect_with(url, prefix, node, RedisOptions::default()).await
    }

    /// [`connect`](Self::connect) with explicit options.
    pub async fn connect_with(
        url: &str,
        prefix: &str,
        node: NodeId,
        options: RedisOptions,
    ) -> Result<Self> {
        let client = chat_redis::client(url)?;
        let commands = RedisConnection::connect(&client, &options, &[]).await?;
        let inbox = LossyInbox::new();
        let handler = {
            let inbox = inbox.clone();
            Box::new(move |event: SubEvent<'_>| match event {
                SubEvent::Message { payload, .. } => {
                    match serde_json::from_slice::<Envelope>(payload) {
                        Ok(envelope) if envelope.origin == node => {} // our own
                        Ok(envelope) => inbox.deliver(Arc::new(envelope)),
                        Err(e) => warn!(error = %e, "undecodable envelope ignored"),
                    }
                }
                SubEvent::Reconnected => {
                    // Whatever was published while we were away is lost.
                    warn!("router reconnected to Redis: reporting lagged");
                    inbox.report_lagged();
                }
            })
        };
        let subscriber = Subscriber::start(client, &options, Vec::new(), handler).await?;
        info!(%node, prefix, "redis router connected");
        Ok(Self {
            node,
            prefix: prefix.to_owned(),
            commands,
            subscriber,
            inbox,
        })
    }

    /// The node this router belongs to.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// The pub/sub channel of `topic`: `{prefix}:t:conv:{id}` or `{prefix}:t:user:{id}`.
    pub fn channel(&self, topic: &Topic) -> String {
        match topic {
            Topic::Conversation(id) => format!("{}:t:conv:{id}", self.prefix),
            Topic::User(id) => format!("{}:t:user:{}", self.prefix, id.as_str()),
        }
    }

    /// Whether the pub/sub connection is up right now.
    pub fn is_connected(&self) -> bool {
        self.subscriber.is_connected()
    }
}

impl fmt::Debug for RedisRouter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRouter")
            .field("node", &self.node)
            .field("prefix", &self.prefix)
            .field("subscriber", &self.subscriber)
            .field("lagged", &self.inbox.is_lagged())
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Router for RedisRouter {
    async fn start(&self, inbox: mpsc::Sender<Inbound>) -> Result<()> {
        // A second start replaces the inbox.
        self.inbox.set(inbox);
        Ok(())
    }

    async fn subscribe(&self, topic: &Topic) -> Result<()> {
        self.subscriber.subscribe(vec![self.channel(topic)]).await
    }

    async fn unsubscribe(&self, topic: &Topic) -> Result<()> {
        self.subscriber.unsubscribe(vec![self.channel(topic)]).await
    }

    async fn publish(&self, mut envelope: Envelope) -> Result<()> {
        envelope.origin = self.node;
        let payload = serde_json::to_vec(&envelope)
            .map_err(|e| Error::internal(format!("envelope not encodable: {e}")))?;
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(self.channel(&envelope.topic)).arg(payload);
        self.commands.query::<i64>("PUBLISH", &cmd).await.map(drop)
    }

    fn is_distributed(&self) -> bool {
        true
    }
}
