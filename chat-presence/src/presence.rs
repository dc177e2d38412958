//! [`RedisPresence`]: presence shared by every node of a cluster through Redis.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use chat_core::model::{Presence, PresenceStatus};
use chat_core::presence::{PresenceConfig, PresenceTracker};
use chat_core::{ConnectionId, Error, NodeId, Result, UserId};
use chat_redis::redis::{self, Value};
use chat_redis::{RedisConnection, RedisOptions, Script};
use tokio::sync::{Notify, broadcast};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::pubsub::{SubEvent, Subscriber};
use crate::scripts;

/// Sessions per `TOUCH` script call of a heartbeat batch: bounds how long one call keeps Redis
/// busy, while the whole batch still goes out in one pipelined round trip.
const HEARTBEAT_CHUNK: usize = 128;

/// Users settled per `SWEEP` call (per kind of deadline).
const SWEEP_LIMIT: usize = 500;

/// Users per read when re-reading watched users after a reconnect.
const RESYNC_CHUNK: usize = 500;

/// Presence in Redis, shared by every node of a cluster: see the [crate docs](crate) for the
/// keys, the channels and how offline is detected.
///
/// ```no_run
/// use chat_core::presence::{PresenceConfig, PresenceTracker};
/// use chat_core::model::PresenceStatus;
/// use chat_core::{ConnectionId, NodeId, UserId};
/// use chat_presence::RedisPresence;
///
/// # async fn run() -> chat_core::Result<()> {
/// let presence = RedisPresence::connect(
///     "redis://127.0.0.1:6379/",
///     "chat",
///     NodeId::new(1)?,
///     PresenceConfig::default(),
/// )
/// .await?;
/// let alice = UserId::from("alice");
/// let mut changes = presence.changes();
/// presence.watch(&[alice.clone()]).await?; // this node wants alice's changes
/// presence.connect(&alice, ConnectionId::from_raw(1)).await?;
/// assert_eq!(changes.recv().await.unwrap().status, PresenceStatus::Online);
/// # Ok(()) }
/// ```
///
/// Semantics are those of [`chat_core::memory::MemoryPresence`] (the conformance suite checks
/// both), with Redis's clock as the clock: a heartbeat of an unknown session re-creates it; the
/// debounce after an expiry counts from the expiry and `last_seen` is the last heartbeat;
/// reads reflect every deadline already passed even before a sweep has run.
///
/// Dropping it stops its background tasks and closes its connections; the sessions it
/// connected stay until their TTL lapses (then other nodes turn the users offline).
pub struct RedisPresence {
    /// What the background tasks share (they hold it weakly).
    shared: Arc<Shared>,
    /// Subscribed to the watched users' channels and to expiry events.
    subscriber: Subscriber,
    /// The sweeper task (stopped on drop).
    sweeper: AbortHandle,
}

impl RedisPresence {
    /// Capacity of the [`PresenceTracker::changes`] broadcast channel.
    pub const CHANGES_CAPACITY: usize = 1024;

    /// Connects to the Redis at `url` (`redis://[user:password@]host:port/db`) with default
    /// [`RedisOptions`]. Every node of a cluster uses the same `prefix` (all keys and
    /// channels start with it) and the same `config`. Must run inside a tokio runtime; fails
    /// with `Error::Unavailable` if Redis cannot be reached.
    pub async fn connect(
        url: &str,
        prefix: &str,
        node: NodeId,
        config: PresenceConfig,
    ) -> Result<Self> {
        Self::connect_with(url, prefix, node, config, RedisOptions::default()).await
    }

    /// [`connect`](Self::connect) with explicit options.
    pub async fn connect_with(
        url: &str,
        prefix: &str,
        node: NodeId,
        config: PresenceConfig,
        options: RedisOptions,
    ) -> Result<Self> {
        if config.ttl < Duration::from_millis(1) {
            return Err(Error::invalid("presence TTL must be at least 1 ms"));
        }
        let client = chat_redis::client(url)?;
        let db = client.get_connection_info().redis_settings().db();
        let (touch, end, sweep) = (
            Script::new(scripts::TOUCH),
            Script::new(scripts::END),
            Script::new(scripts::SWEEP),
        );
        let commands = RedisConnection::connect(&client, &options, &[&touch, &end, &sweep]).await?;
        let keyspace_events = keyspace_events_enabled(&commands).await;
        if !keyspace_events {
            warn!(
                "Redis keyspace notifications for expired keys are off \
                 (notify-keyspace-events lacks `Ex`): offline detection relies on the sweep alone"
            );
        }
        let sweep_interval = options.sweep_interval.unwrap_or_else(|| {
            (config.ttl.min(config.offline_debounce) / 4)
                .clamp(Duration::from_millis(50), Duration::from_secs(5))
        });
        let (changes, _) = broadcast::channel(Self::CHANGES_CAPACITY);
        let keys = Keys::new(prefix);
        let expired_channel = format!("__keyevent@{db}__:expired");
        let shared = Arc::new(Shared {
            node,
            keys,
            config,
            commands,
            touch,
            end,
            sweep,
            changes,
            watched: Mutex::new(HashSet::new()),
            timer: Arc::new(Timer::new()),
            sweep_interval: sweep_interval.max(Duration::from_millis(1)),
            keyspace_events,
        });
        let handler = {
            let weak = Arc::downgrade(&shared);
            let expired_channel = expired_channel.clone();
            Box::new(move |event: SubEvent<'_>| on_event(&weak, &expired_channel, event))
        };
        let subscriber =
            Subscriber::start(client, &options, vec![expired_channel], handler).await?;
        let sweeper =
            tokio::spawn(sweep_loop(Arc::downgrade(&shared), shared.timer.clone())).abort_handle();
        info!(%node, prefix, ?config, ?sweep_interval, keyspace_events, "redis presence connected");
        Ok(Self {
            shared,
            subscriber,
            sweeper,
        })
    }

    /// The timing this tracker was built with.
    pub fn config(&self) -> PresenceConfig {
        self.shared.config
    }

    /// The node this tracker runs on.
    pub fn node(&self) -> NodeId {
        self.shared.node
    }

    /// Whether the server sends expired-key notifications (`notify-keyspace-events` with `Ex`,
    /// checked at connect). Without them offline detection relies on the sweep alone.
    pub fn keyspace_events(&self) -> bool {
        self.shared.keyspace_events
    }

    /// Runs one sweep now (normally the background sweeper does): turns offline the users
    /// whose last session expired and whose debounce is over, publishing their changes.
    pub async fn sweep(&self) -> Result<()> {
        self.shared.sweep_once().await.map(drop)
    }
}

impl Drop for RedisPresence {
    fn drop(&mut self) {
        self.sweeper.abort();
    }
}

impl fmt::Debug for RedisPresence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisPresence")
            .field("node", &self.shared.node)
            .field("prefix", &self.shared.keys.prefix)
            .field("config", &self.shared.config)
            .field("keyspace_events", &self.shared.keyspace_events)
            .field("subscriber", &self.subscriber)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl PresenceTracker for RedisPresence {
    async fn connect(&self, user: &UserId, session: ConnectionId) -> Result<()> {
        self.shared
            .touch(&[(user.clone(), session)], "presence connect")
            .await?;
        // Our own new session: make sure we sweep when it could expire.
        self.shared
            .timer
            .schedule(Instant::now() + self.shared.config.ttl);
        Ok(())
    }

    async fn disconnect(&self, user: &UserId, session: ConnectionId) -> Result<()> {
        let mut cmd = self.shared.eval(&self.shared.end);
        cmd.arg(user.as_str()).arg(session.get());
        let due: i64 = self
            .shared
            .commands
            .query("presence disconnect", &cmd)
            .await?;
        if let Ok(due) = u64::try_from(due) {
            // The user's last session ended: sweep when the debounce is over.
            self.shared
                .timer
                .schedule(Instant::now() + Duration::from_millis(due + 1));
        }
        Ok(())
    }

    async fn heartbeat(&self, sessions: &[(UserId, ConnectionId)]) -> Result<()> {
        self.shared.touch(sessions, "presence heartbeat").await
    }

    async fn presence(&self, users: &[UserId]) -> Result<Vec<Presence>> {
        self.shared.presence(users).await
    }

    async fn is_connected(&self, users: &[UserId]) -> Result<Vec<bool>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        pipe.cmd("TIME");
        for user in users {
            pipe.cmd("ZSCORE")
                .arg(&self.shared.keys.live)
                .arg(user.as_str());
        }
        let values: Vec<Value> = self
            .shared
            .commands
            .query("presence is_connected", &pipe)
            .await?;
        let mut values = values.into_iter();
        let now = server_now(values.next())?;
        values
            .map(|v| Ok(score(v)?.is_some_and(|expiry| expiry > now)))
            .collect()
    }

    fn changes(&self) -> broadcast::Receiver<Presence> {
        self.shared.changes.subscribe()
    }

    async fn watch(&self, users: &[UserId]) -> Result<()> {
        if users.is_empty() {
            return Ok(());
        }
        self.shared.watched().extend(users.iter().cloned());
        let channels = users.iter().map(|u| self.shared.keys.channel(u)).collect();
        self.subscriber.subscribe(channels).await
    }

    async fn unwatch(&self, users: &[UserId]) -> Result<()> {
        if users.is_empty() {
            return Ok(());
        }
        {
            let mut watched = self.shared.watched();
            for user in users {
                watched.remove(user);
            }
        }
        let channels = users.iter().map(|u| self.shared.keys.channel(u)).collect();
        self.subscriber.unsubscribe(channels).await
    }
}

/// Key and channel names.
#[derive(Debug)]
struct Keys {
    /// The prefix every key and channel starts with.
    prefix: String,
    /// `{p}:live`.
    live: String,
    /// `{p}:pending`.
    pending: String,
    /// `{p}:alive:`, to recognize our keys in expiry events.
    alive: String,
    /// `{p}:presence:`.
    channel: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            live: format!("{prefix}:live"),
            pending: format!("{prefix}:pending"),
            alive: format!("{prefix}:alive:"),
            channel: format!("{prefix}:presence:"),
        }
    }

    fn seen(&self, user: &UserId) -> String {
        format!("{}:seen:{}", self.prefix, user.as_str())
    }

    fn channel(&self, user: &UserId) -> String {
        format!("{}{}", self.channel, user.as_str())
    }
}

/// State shared with the background tasks.
struct Shared {
    /// This node (for logs).
    node: NodeId,
    /// Key and channel names.
    keys: Keys,
    /// TTL and debounce (the same on every node).
    config: PresenceConfig,
    /// The command connection.
    commands: RedisConnection,
    /// `TOUCH`, `END`, `SWEEP` (their hashes, for `EVALSHA`).
    touch: Script,
    end: Script,
    sweep: Script,
    /// Changes of watched users, as received from Redis.
    changes: broadcast::Sender<Presence>,
    /// The users this node watches (re-read after a reconnect).
    watched: Mutex<HashSet<UserId>>,
    /// When the sweeper runs next.
    timer: Arc<Timer>,
    /// Longest pause between two sweeps.
    sweep_interval: Duration,
    /// Whether the server notifies expired keys.
    keyspace_events: bool,
}

impl Shared {
    fn watched(&self) -> std::sync::MutexGuard<'_, HashSet<UserId>> {
        self.watched.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `EVALSHA <script> 0 prefix ttl debounce`: the start of every script call (the scripts
    /// build their key names from the prefix).
    fn eval(&self, script: &Script) -> redis::Cmd {
        let mut cmd = script.call(&[]);
        cmd.arg(&self.keys.prefix)
            .arg(millis(self.config.ttl).max(1))
            .arg(millis(self.config.offline_debounce));
        cmd
    }

    /// Connect or heartbeat: every session in one pipelined round trip.
    async fn touch(&self, sessions: &[(UserId, ConnectionId)], what: &'static str) -> Result<()> {
        if sessions.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for chunk in sessions.chunks(HEARTBEAT_CHUNK) {
            let mut cmd = self.eval(&self.touch);
            for (user, session) in chunk {
                cmd.arg(user.as_str()).arg(session.get());
            }
            pipe.add_command(cmd).ignore();
        }
        self.commands.query::<()>(what, &pipe).await
    }

    async fn presence(&self, users: &[UserId]) -> Result<Vec<Presence>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        pipe.cmd("TIME");
        for user in users {
            pipe.cmd("ZSCORE").arg(&self.keys.live).arg(user.as_str());
            pipe.cmd("ZSCORE")
                .arg(&self.keys.pending)
                .arg(user.as_str());
            pipe.cmd("GET").arg(self.keys.seen(user));
        }
        let values: Vec<Value> = self.commands.query("presence read", &pipe).await?;
        let mut values = values.into_iter();
        let now = server_now(values.next())?;
        let debounce = millis(self.config.offline_debounce);
        let mut out = Vec::with_capacity(users.len());
        for user in users {
            let (Some(live), Some(pending), Some(seen)) =
                (values.next(), values.next(), values.next())
            else {
                return Err(Error::internal("short reply to a presence read"));
            };
            let online = match (score(live)?, score(pending)?) {
                // Live, or expired but not settled yet: online until the debounce from the
                // expiry is over (exactly what the next sweep will conclude).
                (Some(expiry), _) => now < expiry.saturating_add(debounce),
                (None, Some(due)) => now < due,
                (None, None) => false,
            };
            let seen: Option<u64> = redis::from_redis_value(seen).map_err(parse_error)?;
            out.push(Presence {
                user_id: user.clone(),
                status: if online {
                    PresenceStatus::Online
                } else {
                    PresenceStatus::Offline
                },
                last_seen: if online { Some(now) } else { seen },
            });
        }
        Ok(out)
    }

    /// One `SWEEP` (repeated while it hits its limit). Returns when to sweep next.
    async fn sweep_once(&self) -> Result<Duration> {
        loop {
            let mut cmd = self.eval(&self.sweep);
            cmd.arg(SWEEP_LIMIT);
            let (more, next): (i64, i64) = self.commands.query("presence sweep", &cmd).await?;
            if more != 0 {
                tokio::task::yield_now().await;
                continue;
            }
            let next = match u64::try_from(next) {
                // +1: the deadline is inclusive on the server; never spin at 0.
                Ok(ms) => Duration::from_millis(ms + 1).max(Duration::from_millis(2)),
                Err(_) => self.sweep_interval,
            };
            return Ok(next.min(self.sweep_interval));
        }
    }

    /// After a pub/sub reconnect: changes published meanwhile are lost, so every watched
    /// user's current presence is broadcast (watchers may see their current status again).
    async fn resync(&self) {
        let users: Vec<UserId> = self.watched().iter().cloned().collect();
        for chunk in users.chunks(RESYNC_CHUNK) {
            match self.presence(chunk).await {
                Ok(list) => {
                    for p in list {
                        let _ = self.changes.send(p);
                    }
                }
                Err(e) => warn!(error = %e, "presence re-read after reconnect failed"),
            }
        }
    }
}

/// Handles what the subscriber reads (runs on its task: quick, no blocking).
fn on_event(shared: &Weak<Shared>, expired_channel: &str, event: SubEvent<'_>) {
    let Some(shared) = shared.upgrade() else {
        return;
    };
    match event {
        SubEvent::Message { channel, payload } if channel == expired_channel => {
            if payload.starts_with(shared.keys.alive.as_bytes()) {
                // A user's last session expired (on whatever node): settle it now.
                debug!(key = %String::from_utf8_lossy(payload), "session expired");
                shared.timer.schedule(Instant::now());
            }
        }
        SubEvent::Message { payload, .. } => match serde_json::from_slice::<Presence>(payload) {
            Ok(p) => {
                // No receivers is fine.
                let _ = shared.changes.send(p);
            }
            Err(e) => warn!(error = %e, "undecodable presence change ignored"),
        },
        SubEvent::Reconnected => {
            // Expiry events may have been missed too.
            shared.timer.schedule(Instant::now());
            tokio::spawn(async move { shared.resync().await });
        }
    }
}

/// When the sweeper runs next; lowered by anyone who knows of an earlier deadline.
struct Timer {
    /// The next sweep.
    target: Mutex<Instant>,
    /// Wakes the sweeper to re-read `target`.
    wake: Notify,
}

impl Timer {
    fn new() -> Self {
        Self {
            target: Mutex::new(Instant::now()),
            wake: Notify::new(),
        }
    }

    fn target(&self) -> Instant {
        *self.target.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sweep no later than `at`.
    fn schedule(&self, at: Instant) {
        let mut target = self.target.lock().unwrap_or_else(PoisonError::into_inner);
        if at < *target {
            *target = at;
            drop(target);
            self.wake.notify_one();
        }
    }

    /// Before a sweep: forget the target (the sweep handles everything due), so that what is
    /// scheduled while it runs, and then the sweep's own answer, set the next one.
    fn reset(&self) {
        *self.target.lock().unwrap_or_else(PoisonError::into_inner) =
            Instant::now() + Duration::from_secs(24 * 3600);
    }
}

/// The sweeper: sweeps, then sleeps until the earliest known deadline (capped by the sweep
/// interval) or until woken earlier. Exits when the tracker is dropped.
async fn sweep_loop(shared: Weak<Shared>, timer: Arc<Timer>) {
    // Consecutive failures (Redis down): back off, and warn once per outage.
    let mut failures: u32 = 0;
    loop {
        timer.reset();
        let next = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            match shared.sweep_once().await {
                Ok(next) => {
                    if failures > 0 {
                        info!("presence sweep works again");
                    }
                    failures = 0;
                    next
                }
                Err(e) => {
                    if failures == 0 {
                        warn!(error = %e, "presence sweep failed; retrying with backoff");
                    } else {
                        debug!(error = %e, failures, "presence sweep failed again");
                    }
                    failures = failures.saturating_add(1);
                    let backoff = shared
                        .sweep_interval
                        .saturating_mul(1 << failures.min(8))
                        .min(Duration::from_secs(5));
                    backoff.max(shared.sweep_interval)
                }
            }
        };
        timer.schedule(Instant::now() + next);
        loop {
            let target = timer.target();
            if target <= Instant::now() {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(target) => break,
                _ = timer.wake.notified() => {}
            }
        }
    }
}

/// Whether `notify-keyspace-events` includes expired-key events (`E` plus `x` or `A`).
/// Unknown (the server refuses `CONFIG`, as managed services may) counts as off.
async fn keyspace_events_enabled(commands: &RedisConnection) -> bool {
    let mut cmd = redis::cmd("CONFIG");
    cmd.arg("GET").arg("notify-keyspace-events");
    match commands
        .query::<HashMap<String, String>>("CONFIG GET", &cmd)
        .await
    {
        Ok(config) => config.get("notify-keyspace-events").is_some_and(|flags| {
            flags.contains('E') && (flags.contains('x') || flags.contains('A'))
        }),
        Err(e) => {
            debug!(error = %e, "CONFIG GET notify-keyspace-events failed");
            false
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The server's clock (a `TIME` reply) in Unix milliseconds.
fn server_now(reply: Option<Value>) -> Result<u64> {
    let reply = reply.ok_or_else(|| Error::internal("missing TIME reply"))?;
    let (secs, micros): (u64, u64) = redis::from_redis_value(reply).map_err(parse_error)?;
    Ok(secs * 1000 + micros / 1000)
}

/// A `ZSCORE` reply (milliseconds).
fn score(reply: Value) -> Result<Option<u64>> {
    let score: Option<f64> = redis::from_redis_value(reply).map_err(parse_error)?;
    // Scores are integral milliseconds well inside f64's exact range.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(score.map(|s| s.max(0.0) as u64))
}

fn parse_error(e: impl fmt::Display) -> Error {
    Error::internal(format!("unexpected Redis reply: {e}"))
}
