//! [`Subscriber`]: one dedicated pub/sub connection per backend instance, owned by one task
//! that subscribes, reads messages, and reconnects (resubscribing everything) when the
//! connection drops.
//!
//! One task owns the connection, the set of wanted channels and the message handler, so
//! (un)subscribe requests and deliveries are serialized without locks: a request is answered
//! only after the server confirmed it, while the task keeps reading messages.

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use chat_core::{Error, Result};
use chat_redis::redis::Client;
use chat_redis::redis::aio::{PubSubSink, PubSubStream};
use chat_redis::{RedisOptions, connect_pubsub, redis, timed_out, unavailable};
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

/// What the task hands to its owner's handler.
#[derive(Debug)]
pub(crate) enum SubEvent<'a> {
    /// A message on a wanted channel.
    Message {
        /// The channel.
        channel: &'a str,
        /// The payload, as published.
        payload: &'a [u8],
    },
    /// The connection was lost and is back, every wanted channel subscribed again: messages
    /// published in between are lost.
    Reconnected,
}

/// Receives everything the subscriber task reads. Runs on the task: must be quick and must not
/// block (hand work to other tasks).
pub(crate) type Handler = Box<dyn FnMut(SubEvent<'_>) + Send>;

/// A request to the task.
enum Request {
    Subscribe(Vec<String>, oneshot::Sender<Result<()>>),
    Unsubscribe(Vec<String>, oneshot::Sender<Result<()>>),
}

/// What the owner and the task both see (for `Debug` and metrics).
#[derive(Default)]
struct Status {
    /// Whether the pub/sub connection is up.
    connected: AtomicBool,
    /// How many channels are wanted.
    channels: AtomicUsize,
    /// How many times the connection was re-established.
    reconnects: AtomicUsize,
}

/// Handle on the subscriber task; dropping it stops the task and closes the connection.
pub(crate) struct Subscriber {
    /// Requests to the task (bounded: callers wait when it is busy).
    requests: mpsc::Sender<Request>,
    /// Stops the task on drop.
    task: AbortHandle,
    /// Shared with the task.
    status: Arc<Status>,
    /// How long a caller waits for the task's answer.
    answer_timeout: std::time::Duration,
}

impl fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscriber")
            .field("connected", &self.is_connected())
            .field("channels", &self.status.channels.load(Ordering::Relaxed))
            .field(
                "reconnects",
                &self.status.reconnects.load(Ordering::Relaxed),
            )
            .finish()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Subscriber {
    /// Connects, subscribes to `initial`, and starts the task. Fails (`Unavailable`) when the
    /// server cannot be reached within `op_timeout`.
    pub(crate) async fn start(
        client: Client,
        options: &RedisOptions,
        initial: Vec<String>,
        handler: Handler,
    ) -> Result<Self> {
        let pubsub = connect_pubsub(&client, options).await?;
        let (sink, stream) = pubsub.split();
        let op_timeout = options.checked_op_timeout();
        match tokio::time::timeout(op_timeout, subscribe_all(&sink, &initial)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(unavailable(e)),
            Err(_) => return Err(timed_out("SUBSCRIBE", op_timeout)),
        }
        let status = Arc::new(Status::default());
        status.connected.store(true, Ordering::SeqCst);
        status.channels.store(initial.len(), Ordering::Relaxed);
        let (requests, rx) = mpsc::channel(256);
        let task = Task {
            client,
            options: options.clone(),
            wanted: initial.into_iter().collect(),
            requests: rx,
            handler,
            status: status.clone(),
        };
        let handle = tokio::spawn(task.run(sink, stream));
        Ok(Self {
            requests,
            task: handle.abort_handle(),
            status,
            answer_timeout: op_timeout * 2,
        })
    }

    /// Subscribes to `channels`; returns once the server confirmed. While disconnected the
    /// channels are remembered (subscribed on reconnect) and `Unavailable` is returned.
    pub(crate) async fn subscribe(&self, channels: Vec<String>) -> Result<()> {
        self.ask(|tx| Request::Subscribe(channels, tx)).await
    }

    /// Unsubscribes from `channels`; returns once the server confirmed (or at once while
    /// disconnected: a lost connection has no subscriptions).
    pub(crate) async fn unsubscribe(&self, channels: Vec<String>) -> Result<()> {
        self.ask(|tx| Request::Unsubscribe(channels, tx)).await
    }

    /// Whether the connection is up right now.
    pub(crate) fn is_connected(&self) -> bool {
        self.status.connected.load(Ordering::SeqCst)
    }

    async fn ask(
        &self,
        request: impl FnOnce(oneshot::Sender<Result<()>>) -> Request,
    ) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        let answer = async {
            self.requests
                .send(request(tx))
                .await
                .map_err(|_| Error::Shutdown)?;
            rx.await.map_err(|_| Error::Shutdown)?
        };
        tokio::time::timeout(self.answer_timeout, answer)
            .await
            .map_err(|_| timed_out("pub/sub request", self.answer_timeout))?
    }
}

/// One `SUBSCRIBE` per channel (the `redis` crate matches one reply to one request, and a
/// multi-channel `SUBSCRIBE` has one reply per channel), all sent at once.
async fn subscribe_all(sink: &PubSubSink, channels: &[String]) -> redis::RedisResult<()> {
    futures::future::try_join_all(channels.iter().map(|channel| {
        let mut sink = sink.clone();
        async move { sink.subscribe(channel.as_str()).await }
    }))
    .await
    .map(drop)
}

/// Like [`subscribe_all`], with `UNSUBSCRIBE`.
async fn unsubscribe_all(sink: &PubSubSink, channels: &[String]) -> redis::RedisResult<()> {
    futures::future::try_join_all(channels.iter().map(|channel| {
        let mut sink = sink.clone();
        async move { sink.unsubscribe(channel.as_str()).await }
    }))
    .await
    .map(drop)
}

/// The task's state.
struct Task {
    /// To reconnect.
    client: Client,
    /// Timeouts and backoff.
    options: RedisOptions,
    /// Every channel the owner wants (what a reconnect subscribes again). Messages on other
    /// channels (in flight when they were unsubscribed) are dropped.
    wanted: HashSet<String>,
    /// Requests from the owner; closed when the owner is dropped.
    requests: mpsc::Receiver<Request>,
    /// The owner's handler.
    handler: Handler,
    /// Shared with the owner.
    status: Arc<Status>,
}

/// Why the connected loop ended.
enum Ended {
    /// The owner is gone: stop.
    Stop,
    /// The connection failed: reconnect.
    Lost(String),
}

impl Task {
    async fn run(mut self, sink: PubSubSink, stream: PubSubStream) {
        let mut connection = Some((sink, stream));
        let mut backoff = self.options.checked_reconnect_min();
        loop {
            let (sink, mut stream) = match connection.take() {
                Some(c) => c,
                None => match self.reconnect(&mut backoff).await {
                    Some(c) => c,
                    None => return,
                },
            };
            self.status.connected.store(true, Ordering::SeqCst);
            match self.serve(&sink, &mut stream).await {
                Ended::Stop => return,
                Ended::Lost(why) => {
                    self.status.connected.store(false, Ordering::SeqCst);
                    warn!(reason = %why, "redis pub/sub connection lost; reconnecting");
                }
            }
        }
    }

    /// Waits out the backoff (answering requests meanwhile), then tries to connect and
    /// resubscribe until it works. `None`: the owner is gone.
    async fn reconnect(
        &mut self,
        backoff: &mut std::time::Duration,
    ) -> Option<(PubSubSink, PubSubStream)> {
        loop {
            let wake = Instant::now() + *backoff;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => break,
                    request = self.requests.recv() => match request {
                        Some(request) => self.answer_offline(request),
                        None => return None,
                    },
                }
            }
            *backoff = (*backoff * 2).min(self.options.checked_reconnect_max());
            let pubsub = match connect_pubsub(&self.client, &self.options).await {
                Ok(pubsub) => pubsub,
                Err(e) => {
                    debug!(error = %e, "redis pub/sub reconnect failed");
                    continue;
                }
            };
            let (sink, stream) = pubsub.split();
            let channels: Vec<String> = self.wanted.iter().cloned().collect();
            let op_timeout = self.options.checked_op_timeout();
            match tokio::time::timeout(op_timeout, subscribe_all(&sink, &channels)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    debug!(error = %e, "redis pub/sub resubscribe failed");
                    continue;
                }
                Err(_) => {
                    debug!("redis pub/sub resubscribe timed out");
                    continue;
                }
            }
            *backoff = self.options.checked_reconnect_min();
            self.status.reconnects.fetch_add(1, Ordering::Relaxed);
            info!(channels = channels.len(), "redis pub/sub reconnected");
            (self.handler)(SubEvent::Reconnected);
            return Some((sink, stream));
        }
    }

    /// Answers a request while there is no connection.
    fn answer_offline(&mut self, request: Request) {
        match request {
            Request::Subscribe(channels, reply) => {
                self.wanted.extend(channels);
                self.status
                    .channels
                    .store(self.wanted.len(), Ordering::Relaxed);
                let _ = reply.send(Err(unavailable(std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    "pub/sub connection down (the subscription is made on reconnect)",
                ))));
            }
            Request::Unsubscribe(channels, reply) => {
                for channel in &channels {
                    self.wanted.remove(channel);
                }
                self.status
                    .channels
                    .store(self.wanted.len(), Ordering::Relaxed);
                let _ = reply.send(Ok(()));
            }
        }
    }

    /// Reads messages and serves requests until the connection fails or the owner is gone.
    async fn serve(&mut self, sink: &PubSubSink, stream: &mut PubSubStream) -> Ended {
        let mut ping = tokio::time::interval(self.options.checked_ping_interval());
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ping.tick().await;
        let op_timeout = self.options.checked_op_timeout();
        loop {
            tokio::select! {
                message = stream.next() => match message {
                    Some(message) => self.deliver(&message),
                    None => return Ended::Lost("connection closed".to_owned()),
                },
                request = self.requests.recv() => {
                    let Some(request) = request else { return Ended::Stop };
                    if let Err(why) = self.serve_request(request, sink, stream).await {
                        return Ended::Lost(why);
                    }
                }
                _ = ping.tick() => {
                    let mut ping_sink = sink.clone();
                    let pong = tokio::time::timeout(
                        op_timeout,
                        async move { ping_sink.ping::<redis::Value>().await },
                    );
                    match self.while_reading(pong, stream).await {
                        Some(Ok(Ok(_))) => {}
                        Some(Ok(Err(e))) => return Ended::Lost(format!("PING failed: {e}")),
                        Some(Err(_)) => return Ended::Lost("PING timed out".to_owned()),
                        None => return Ended::Lost("connection closed".to_owned()),
                    }
                }
            }
        }
    }

    /// Applies one request on the live connection. `Err`: the connection must be replaced.
    async fn serve_request(
        &mut self,
        request: Request,
        sink: &PubSubSink,
        stream: &mut PubSubStream,
    ) -> std::result::Result<(), String> {
        let op_timeout = self.options.checked_op_timeout();
        match request {
            Request::Subscribe(channels, reply) => {
                let fresh: Vec<String> = channels
                    .into_iter()
                    .filter(|c| !self.wanted.contains(c))
                    .collect::<HashSet<_>>()
                    .into_iter()
                    .collect();
                if fresh.is_empty() {
                    let _ = reply.send(Ok(()));
                    return Ok(());
                }
                // Wanted from now on, whatever happens: a failure is retried by the reconnect.
                self.wanted.extend(fresh.iter().cloned());
                self.status
                    .channels
                    .store(self.wanted.len(), Ordering::Relaxed);
                let done = tokio::time::timeout(op_timeout, subscribe_all(sink, &fresh));
                match self.while_reading(done, stream).await {
                    Some(Ok(Ok(()))) => {
                        let _ = reply.send(Ok(()));
                        Ok(())
                    }
                    Some(Ok(Err(e))) => {
                        let why = format!("SUBSCRIBE failed: {e}");
                        let _ = reply.send(Err(unavailable(e)));
                        Err(why)
                    }
                    Some(Err(_)) => {
                        let _ = reply.send(Err(timed_out("SUBSCRIBE", op_timeout)));
                        Err("SUBSCRIBE timed out".to_owned())
                    }
                    None => {
                        let _ = reply.send(Err(unavailable(std::io::Error::new(
                            std::io::ErrorKind::ConnectionReset,
                            "pub/sub connection closed during SUBSCRIBE",
                        ))));
                        Err("connection closed".to_owned())
                    }
                }
            }
            Request::Unsubscribe(channels, reply) => {
                let gone: Vec<String> = channels
                    .into_iter()
                    .filter(|c| self.wanted.remove(c))
                    .collect();
                self.status
                    .channels
                    .store(self.wanted.len(), Ordering::Relaxed);
                if gone.is_empty() {
                    let _ = reply.send(Ok(()));
                    return Ok(());
                }
                let done = tokio::time::timeout(op_timeout, unsubscribe_all(sink, &gone));
                let outcome = match self.while_reading(done, stream).await {
                    Some(Ok(Ok(()))) => Ok(()),
                    Some(Ok(Err(e))) => Err(format!("UNSUBSCRIBE failed: {e}")),
                    Some(Err(_)) => Err("UNSUBSCRIBE timed out".to_owned()),
                    None => Err("connection closed".to_owned()),
                };
                // Either way the channels are gone when this returns: on failure the
                // connection is replaced, and the new one does not subscribe them.
                let _ = reply.send(Ok(()));
                outcome
            }
        }
    }

    /// Drives `fut` while delivering the messages that arrive meanwhile. `None`: the
    /// connection closed first.
    async fn while_reading<F: Future>(
        &mut self,
        fut: F,
        stream: &mut PubSubStream,
    ) -> Option<F::Output> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                biased;
                out = &mut fut => return Some(out),
                message = stream.next() => match message {
                    Some(message) => self.deliver(&message),
                    None => return None,
                },
            }
        }
    }

    fn deliver(&mut self, message: &redis::Msg) {
        let channel = message.get_channel_name();
        if self.wanted.contains(channel) {
            (self.handler)(SubEvent::Message {
                channel,
                payload: message.get_payload_bytes(),
            });
        }
    }
}
