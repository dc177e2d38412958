//! [`RedisConnection`]: the command connection of every Redis backend, with the one retry
//! rule, script loading and per-call deadline; [`connect_pubsub`] for the subscribing ones.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chat_core::Result;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSub};
use redis::{Client, Cmd, ErrorKind, FromRedisValue, Pipeline, RedisError, RedisResult};
use tracing::debug;

use crate::error::{is_connection_error, map_error, timed_out, unavailable};
use crate::options::RedisOptions;

/// Something that can be sent on a [`RedisConnection`]: a command or a pipeline.
pub trait Query: Sync {
    /// Sends it on `conn` and parses the reply.
    fn run<T: FromRedisValue>(
        &self,
        conn: &mut ConnectionManager,
    ) -> impl Future<Output = RedisResult<T>> + Send;
}

impl Query for Cmd {
    fn run<T: FromRedisValue>(
        &self,
        conn: &mut ConnectionManager,
    ) -> impl Future<Output = RedisResult<T>> + Send {
        self.query_async(conn)
    }
}

impl Query for Pipeline {
    fn run<T: FromRedisValue>(
        &self,
        conn: &mut ConnectionManager,
    ) -> impl Future<Output = RedisResult<T>> + Send {
        self.query_async(conn)
    }
}

/// A Lua script run by its SHA1 (`EVALSHA`). The [`RedisConnection`] it was given to loads it
/// at connect and again whenever the server answers `NOSCRIPT` (a restarted or flushed server
/// has an empty script cache), so the source travels once per server, not with every call.
///
/// ```
/// use chat_redis::Script;
///
/// let script = Script::new("return ARGV[1]");
/// assert_eq!(script.hash().len(), 40);
/// let mut call = script.call(&[]); // EVALSHA <sha1> 0
/// call.arg("hello");
/// ```
#[derive(Clone)]
pub struct Script {
    /// The Lua source (what `SCRIPT LOAD` sends).
    source: Arc<str>,
    /// Its SHA1 in hex (what `EVALSHA` names).
    hash: Arc<str>,
}

impl Script {
    /// A script with this Lua source.
    pub fn new(source: impl Into<Arc<str>>) -> Self {
        let source = source.into();
        let hash = Arc::from(redis::Script::new(&source).get_hash());
        Self { source, hash }
    }

    /// The SHA1 of the source, in hex.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The Lua source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// `EVALSHA <hash> <number of keys> <keys…>`; add the `ARGV` with [`Cmd::arg`] and run it
    /// with [`RedisConnection::query`] (alone or in a pipeline).
    pub fn call(&self, keys: &[&str]) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&*self.hash).arg(keys.len());
        for key in keys {
            cmd.arg(*key);
        }
        cmd
    }
}

impl fmt::Debug for Script {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Script")
            .field("hash", &self.hash)
            .finish_non_exhaustive()
    }
}

/// The command connection of a Redis backend. Cloning is cheap and shares the connection.
///
/// * **Multiplexed and reconnecting**: one TCP connection that concurrent callers share (their
///   requests are pipelined on it), replaced in the background when it fails, with
///   [`RedisOptions::reconnect_attempts`] attempts and exponential backoff.
/// * **A deadline on everything**: [`connect`](Self::connect) and every
///   [`query`](Self::query) either finish or fail with `Error::Unavailable { backend: "redis",
///   .. }` within [`RedisOptions::op_timeout`], also while Redis is down or never answers.
/// * **One retry rule**: a call that failed because the connection dropped (the server
///   restarted, the network broke) is sent once more, on the reconnected connection; a call
///   that got `NOSCRIPT` is sent once more after loading the scripts again. Each at most once
///   per call (after a restart a call typically meets both: the dead connection, then the
///   empty script cache of the new server). Nothing else is retried. So every call a backend makes **must be safe to run twice** (the backends'
///   scripts are idempotent, a duplicate `PUBLISH` is allowed).
/// * **One error mapping**: [`map_error`](crate::map_error).
#[derive(Clone)]
pub struct RedisConnection {
    /// Multiplexed, replaced in the background when it drops.
    conn: ConnectionManager,
    /// The deadline of every call.
    op_timeout: Duration,
    /// What is loaded at connect and after `NOSCRIPT`.
    scripts: Arc<[Script]>,
}

impl fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the URL: it may carry a password.
        f.debug_struct("RedisConnection")
            .field("op_timeout", &self.op_timeout)
            .field("scripts", &self.scripts.len())
            .finish_non_exhaustive()
    }
}

impl RedisConnection {
    /// Connects to the server of `client` and loads `scripts`, each step bounded by
    /// [`RedisOptions::op_timeout`]. `Error::Unavailable` when Redis cannot be reached or does
    /// not answer in time.
    pub async fn connect(
        client: &Client,
        options: &RedisOptions,
        scripts: &[&Script],
    ) -> Result<Self> {
        let op_timeout = options.checked_op_timeout();
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.checked_connect_timeout()))
            .set_response_timeout(Some(options.checked_response_timeout()))
            .set_number_of_retries(options.reconnect_attempts)
            .set_min_delay(options.checked_reconnect_min())
            .set_max_delay(options.checked_reconnect_max());
        let conn = tokio::time::timeout(
            op_timeout,
            ConnectionManager::new_with_config(client.clone(), config),
        )
        .await
        .map_err(|_| timed_out("connecting to Redis", op_timeout))?
        .map_err(unavailable)?;
        let this = Self {
            conn,
            op_timeout,
            scripts: scripts.iter().map(|s| (*s).clone()).collect(),
        };
        this.load_scripts().await?;
        Ok(this)
    }

    /// The deadline of every call.
    pub fn op_timeout(&self) -> Duration {
        self.op_timeout
    }

    /// Runs `query` within the deadline, under the retry rule (see the type's docs), and maps
    /// the outcome with [`map_error`](crate::map_error). `what` names the call in errors and
    /// logs.
    pub async fn query<T: FromRedisValue>(
        &self,
        what: &'static str,
        query: &impl Query,
    ) -> Result<T> {
        let attempt = async {
            let mut conn = self.conn.clone();
            let (mut reconnected, mut reloaded) = (false, false);
            loop {
                match query.run(&mut conn).await {
                    Err(e) if !reloaded && is_no_script(&e) => {
                        debug!("{what}: scripts missing on the server, loading them");
                        reloaded = true;
                        self.load_scripts_on(&mut conn).await?;
                    }
                    Err(e) if !reconnected && is_connection_error(&e) => {
                        debug!(error = %e, "{what}: connection lost, trying once more");
                        reconnected = true;
                    }
                    other => return other,
                }
            }
        };
        match tokio::time::timeout(self.op_timeout, attempt).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(map_error(e)),
            Err(_) => Err(timed_out(what, self.op_timeout)),
        }
    }

    async fn load_scripts(&self) -> Result<()> {
        if self.scripts.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        tokio::time::timeout(self.op_timeout, self.load_scripts_on(&mut conn))
            .await
            .map_err(|_| timed_out("loading scripts", self.op_timeout))?
            .map_err(unavailable)
    }

    async fn load_scripts_on(&self, conn: &mut ConnectionManager) -> RedisResult<()> {
        let mut pipe = redis::pipe();
        for script in self.scripts.iter() {
            pipe.cmd("SCRIPT").arg("LOAD").arg(script.source()).ignore();
        }
        pipe.query_async::<()>(conn).await
    }
}

/// Whether the server lost the scripts (`NOSCRIPT`).
fn is_no_script(err: &RedisError) -> bool {
    err.kind() == ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

/// Opens a dedicated pub/sub connection to the server of `client`, bounded by
/// [`RedisOptions::op_timeout`]. It does not reconnect by itself: its owner re-opens it
/// (with [`RedisOptions::reconnect_min`]..[`RedisOptions::reconnect_max`] backoff) and
/// subscribes again.
pub async fn connect_pubsub(client: &Client, options: &RedisOptions) -> Result<PubSub> {
    let op_timeout = options.checked_op_timeout();
    tokio::time::timeout(op_timeout, client.get_async_pubsub())
        .await
        .map_err(|_| timed_out("connecting to Redis (pub/sub)", op_timeout))?
        .map_err(unavailable)
}
